"""A modality added by a plugin, through what users meet: checking its files, the errors of a
plugin that fails or is not imported, querying with it, thumbnails of an image-like one, and a
CLIP tower trained by an earlier stage as a starting point."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_model import build_space

from geobind.modality import ModalitySpec, get_modality, register_modality


def _read_dat(item):
    data = open(item, "rb").read() if not isinstance(item, bytes) else item
    if not data.startswith(b"DAT1"):
        raise ValueError("not a DAT1 file")


@pytest.fixture(autouse=True)
def toy_modalities():
    """Two plugin modalities, registered for each test and removed after it: a registered
    modality with shard keys is part of every shard schema's fingerprint, so leaving them
    registered would change the shard datasets' identities (and cache keys) of later tests
    against their spawned ranks, which never import this module."""
    from geobind import modality

    register_modality(ModalitySpec("toy_dat", "path", ("toy_dat.bin",), check=_read_dat), exist_ok=True)
    register_modality(ModalitySpec("toy_naip", "path", ("toy_naip.png",)), exist_ok=True)
    yield
    for name in ("toy_dat", "toy_naip"):
        modality._REGISTRY.pop(name, None)


def test_data_check_and_pack_decode_a_plugin_modality_with_its_check(tmp_path):
    from geobind.data.check import check_dataset
    from geobind.data.pack import pack

    (tmp_path / "good.bin").write_bytes(b"DAT1 payload")
    (tmp_path / "bad.bin").write_bytes(b"garbage")
    (tmp_path / "m.csv").write_text("id,lat,lon,toy_dat\na,1,2,good.bin\nb,3,4,bad.bin\nc,5,6,gone.bin\n")
    report = check_dataset(tmp_path / "m.csv")
    assert (report.usable, report.bad) == (1, 2)
    assert dict(report.reasons) == {"undecodable": 1, "missing": 1}
    assert any("ValueError: not a DAT1 file" in d for _, _, d in report.examples)
    res = pack(tmp_path / "m.csv", tmp_path / "shards", progress=False, log=None)
    assert res.samples == 1 and sum(res.bad.values()) == 2


def test_registering_a_built_in_modality_again_and_a_failing_plugin(tmp_path, monkeypatch, capsys):
    from geobind.cli import main

    loc = get_modality("location")
    assert register_modality(ModalitySpec("location", "latlon", (), "my description")).description == "my description"
    register_modality(loc, exist_ok=True)
    with pytest.raises(ValueError, match="'satellite' is already registered as .* pass exist_ok=True"):
        register_modality(ModalitySpec("satellite", "text"))
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('no licence key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GEOBIND_PLUGINS", "broken_plugin")
    monkeypatch.delitem(sys.modules, "broken_plugin", raising=False)
    assert main(["index", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "GEOBIND_PLUGINS module 'broken_plugin' failed while importing: RuntimeError: no licence key" in err
    assert "Traceback" not in err


def test_a_latlon_encoder_on_a_plugin_file_modality_is_refused_before_training(tiny_data, tmp_path):
    """A file modality may suit an encoder that reads images, but never one that reads only
    (lat, lon): without the check it failed mid-run on the first path."""
    from fixtures import tiny_config

    from geobind.config import ConfigError, parse_config
    from geobind.encoders import Encoder, register_encoder

    @register_encoder("toy_latlon_only")
    class LatLon(Encoder):
        input_kind = "latlon"

        @classmethod
        def create(cls, modality, spec, dim, space):
            return cls(modality, dim)

    d = tiny_config(tiny_data, tmp_path / "run", audio=False)
    d["stages"][0].update(train="toy_dat", encoder={"type": "toy_latlon_only"})
    with pytest.raises(ConfigError, match="type toy_latlon_only reads latlon, but 'toy_dat' is file data"):
        parse_config(d)


def test_search_queries_any_modality_with_query(tiny_data, tmp_path, capsys):
    from space_helpers import saved_space

    from geobind import GeoBind
    from geobind.cli import main
    from geobind.cli_space import _query_kwargs
    from geobind.search.embed import embed_dataset
    from geobind.search.index import build_index

    model_dir = saved_space(tiny_data, tmp_path)
    embed_dataset(GeoBind.from_pretrained(model_dir), tiny_data["test"], "satellite", tmp_path / "s.parquet", log=None)
    build_index(tmp_path / "s.parquet", tmp_path / "s.index", "exact", log=None)
    from geobind.data.manifest import read_dataset

    tile = read_dataset(tiny_data["test"]).columns["satellite"][0]
    base = ["search", "--model", str(model_dir), "--index", str(tmp_path / "s.index"), "--json"]
    assert main([*base, "--satellite", tile]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert main([*base, "--query", f"satellite={tile}"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == direct["results"]

    class Args:
        text, audio, image, satellite, file = [], [], [], [], []
        query = ["location=48.1, 11.6", "text=a forest"]

    kw = _query_kwargs(Args)
    assert kw["queries"] == {"location": [(48.1, 11.6)], "text": ["a forest"]}
    for bad, said in [("location=north", "location takes lat,lon in degrees"), ("satellite", "write MODALITY=VALUE"),
                      ("satellite=/no/such.png", "query file /no/such.png does not exist")]:
        Args.query = [bad]
        with pytest.raises((ValueError, FileNotFoundError), match=said):
            _query_kwargs(Args)


def test_an_image_like_plugin_modality_gets_thumbnails():
    from geobind.search.embed import is_image_modality

    assert is_image_modality("toy_naip") and is_image_modality("satellite")
    assert not is_image_modality("toy_dat") and not is_image_modality("audio")
    assert not is_image_modality("not_registered_here")


def test_a_model_with_a_plugin_encoder_names_the_module_to_import(tiny_data, tmp_path):
    from test_trainer import ToyLocationEncoder

    from geobind import GeoBind
    from geobind.encoders import base

    model = build_space(tiny_data)
    model.add_encoder("toy_place", ToyLocationEncoder("toy_place", model.dim))
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "geobind.json").read_text())["modalities"]
    assert saved["toy_place"]["module"] == "test_trainer" and "module" not in saved["satellite"]
    registry = base._ENCODERS
    cls = registry.pop("toy_location")
    try:
        with pytest.raises(ValueError, match=r"from the module 'test_trainer': import it first \(on the command "
                                             r"line: GEOBIND_PLUGINS=test_trainer\)"):
            GeoBind.from_pretrained(tmp_path / "m")
    finally:
        registry["toy_location"] = cls


def test_a_clip_vision_stage_can_start_from_a_tower_trained_before(tiny_data):
    from geobind.encoders.clip import ClipVisionEncoder

    model = build_space(tiny_data)
    with torch.no_grad():
        next(model.encoder("satellite").model.parameters()).add_(0.5)  # as training moved it
    enc = ClipVisionEncoder.create("naip", {"init_from": "satellite"}, model.dim, dict(model.encoders.items()))
    for a, b in zip(enc.model.state_dict().values(), model.encoder("satellite").model.state_dict().values()):
        assert torch.equal(a, b)
    assert enc.model is not model.encoder("satellite").model  # a copy, trained on its own
    with pytest.raises(ValueError, match=r"CLIP image tower in the space \(ground, satellite\)"):
        ClipVisionEncoder.create("naip", {"init_from": "text"}, model.dim, dict(model.encoders.items()))
