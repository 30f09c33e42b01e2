import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import TINY_CLIP
from PIL import Image

from geobind import GeoBind
from geobind.data.manifest import read_dataset
from geobind.encoders import ClipVisionEncoder, anchor_encoders, build_anchor, get_encoder_class
from geobind.encoders.audio import tiny_clap_audio_spec


def build_space(tiny_data):
    torch.manual_seed(0)
    clip, tok = build_anchor({"config": TINY_CLIP, "tokenizer": str(tiny_data["tokenizer"])})
    model = GeoBind(32, anchor_encoders(clip, tok, "ground", "text"))
    model.add_encoder("satellite", ClipVisionEncoder.create("satellite", {"init_from": "ground"}, 32,
                                                            dict(model.encoders.items())))
    audio_cls = get_encoder_class("clap_audio")
    model.add_encoder("audio", audio_cls.create("audio", tiny_clap_audio_spec(32), 32, {}))
    return model.eval()


def test_satellite_tower_starts_as_the_anchor_image_tower(tiny_data):
    model = build_space(tiny_data)
    sat = model.encoder("satellite").model
    clip = model.encoder("ground").clip
    for (n1, p1), (n2, p2) in zip(sat.vision_model.state_dict().items(), clip.vision_model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(sat.visual_projection.weight, clip.visual_projection.weight)


def test_embed_gives_unit_float32_rows_for_every_modality(tiny_data):
    model = build_space(tiny_data)
    t = read_dataset(tiny_data["test"])
    for m in ("satellite", "ground", "text", "audio"):
        e = model.embed(m, t.columns[m][:5], batch_size=2)
        assert e.shape == (5, 32) and e.dtype == torch.float32
        assert torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    # PIL images, arrays and (waveform, rate) pairs are items too.
    img = Image.open(t.columns["satellite"][0])
    assert torch.allclose(model.embed("satellite", [img]), model.embed("satellite", [t.columns["satellite"][0]]))
    wave = np.sin(np.linspace(0, 2000, 8000)).astype(np.float32)
    assert model.embed("audio", [(wave, 8000)]).shape == (1, 32)
    assert model.embed("text", "a photo of a forest").shape == (1, 32)
    # One item given alone is one item; a tuple of two images is two images, not a waveform pair.
    one = model.embed("satellite", img)
    assert one.shape == (1, 32) and torch.allclose(one, model.embed("satellite", [img]))
    assert torch.allclose(model.embed("satellite", np.asarray(img.convert("RGB"))), one, atol=1e-6)
    two = model.embed("satellite", (img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    assert two.shape == (2, 32) and torch.allclose(two[0], one[0])
    assert torch.allclose(model.embed("audio", (wave, 8000)), model.embed("audio", [(wave, 8000)]))
    with pytest.raises(ValueError, match=r"takes the rate as a number, got '8000' \(a string\)"):
        model.embed("audio", (wave, "8000"))  # not a waveform and a file named 8000
    texts = np.array(["a photo of a forest", "a photo of a desert"], dtype=object)  # df["text"].values
    assert torch.allclose(model.embed("text", texts), model.embed("text", list(texts)))


def test_save_and_load_round_trip_gives_identical_embeddings(tiny_data, tmp_path):
    model = build_space(tiny_data)
    t = read_dataset(tiny_data["test"])
    before = {m: model.embed(m, t.columns[m]) for m in model.modalities}
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "geobind.json").read_text())
    assert cfg["dim"] == 32 and set(cfg["modalities"]) == {"ground", "text", "satellite", "audio"}
    assert cfg["modalities"]["ground"]["path"] == cfg["modalities"]["text"]["path"] == "clip"
    assert (tmp_path / "m" / "satellite" / "model.safetensors").is_file()
    loaded = GeoBind.from_pretrained(tmp_path / "m")
    for m, e in before.items():
        assert torch.equal(loaded.embed(m, t.columns[m]), e), m
    # ground and text share one CLIP after loading, as before saving.
    assert loaded.encoder("ground").clip is loaded.encoder("text").clip


def test_saved_folders_work_with_transformers_and_say_who_wrote_them(tiny_data, tmp_path):
    """The ``clip/`` tokenizer truncates to what the text tower takes (the fixture's tokenizer
    says 77, the tower takes 32), and a model loaded and saved again records this version."""
    from transformers import AutoTokenizer, CLIPModel

    import geobind

    model = build_space(tiny_data)
    model.meta["geobind_version"] = "0.0.1"  # as if loaded from an older version's folder
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "geobind.json").read_text())["geobind_version"] == geobind.__version__
    tok = AutoTokenizer.from_pretrained(tmp_path / "m" / "clip")
    clip = CLIPModel.from_pretrained(tmp_path / "m" / "clip")
    ids = tok(["forest " * 100], truncation=True, return_tensors="pt")
    assert ids["input_ids"].shape[1] == clip.config.text_config.max_position_embeddings
    clip.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])  # fits the tower
    cfg = json.loads((tmp_path / "m" / "clip" / "tokenizer_config.json").read_text())
    # A class transformers 4 knows too (5 writes TokenizersBackend), and no load-time flags.
    assert cfg["tokenizer_class"] != "TokenizersBackend" and "local_files_only" not in cfg


def test_image_folders_embed_in_plain_transformers_as_in_geobind(tiny_data, tmp_path):
    """``satellite/`` and ``clip/`` carry a ``preprocessor_config.json``: transformers' own image
    processor and model give geobind's vectors, square and non-square images alike."""
    from transformers import AutoImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    model = build_space(tiny_data)
    model.save_pretrained(tmp_path / "m")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((32, 32), (45, 60), (70, 41), (100, 100))]
    sat = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "m" / "satellite").eval()
    clip = CLIPModel.from_pretrained(tmp_path / "m" / "clip").eval()
    for modality, folder, embed in (
        ("satellite", "satellite", lambda px: sat(pixel_values=px).image_embeds),
        ("ground", "clip", lambda px: clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output)),
    ):
        proc = AutoImageProcessor.from_pretrained(tmp_path / "m" / folder)
        with torch.no_grad():
            theirs = torch.nn.functional.normalize(embed(proc(images, return_tensors="pt")["pixel_values"]), dim=-1)
        ours = model.embed(modality, images)
        assert torch.nn.functional.cosine_similarity(theirs, ours).min() > 0.9999, modality


def test_saving_replaces_a_model_but_never_deletes_what_it_did_not_write(tiny_data, tmp_path, monkeypatch):
    model = build_space(tiny_data)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not part of a GeoBind model \(notes.txt\)"):
        model.save_pretrained(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # A model folder is replaced whole; a folder named like the swap's is left alone.
    target, beside = tmp_path / "m", tmp_path / "m.old"
    beside.mkdir()
    (beside / "keep.txt").write_text("kept")
    model.save_pretrained(target)
    first = (target / "geobind.json").read_text()
    model.meta["note"] = "second"
    model.save_pretrained(target)
    assert (target / "geobind.json").read_text() != first and (beside / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.old", "mine"]  # no swap left behind
    # Files beside a model are not the model's: refused too.
    (target / "README.txt").write_text("about this model")
    with pytest.raises(FileExistsError, match="README.txt"):
        model.save_pretrained(target)
    assert (target / "README.txt").is_file() and (target / "geobind.json").is_file()
    # The current folder is a folder like any other, and stays the current folder (twice: empty,
    # then holding the model), as does OS clutter in it.
    here = tmp_path / "here"
    here.mkdir()
    (here / ".DS_Store").write_bytes(b"\0")
    monkeypatch.chdir(here)
    model.save_pretrained(".")
    model.save_pretrained(".")
    assert Path.cwd() == here and (here / ".DS_Store").is_file()
    assert GeoBind.from_pretrained(".").modalities == model.modalities
    # A new folder gets the usual permissions, not a private temporary folder's.
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o777 & ~umask


def test_clear_errors(tiny_data, tmp_path, monkeypatch):
    model = build_space(tiny_data)
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        model.embed("lidar", ["x"])
    with pytest.raises(ValueError, match="unknown modality 'satelite' \\(did you mean 'satellite'\\?\\)"):
        model.embed("satelite", ["x"])
    with pytest.raises(TypeError, match="the modality is a name .*call embed\\(modality, items\\)"):
        model.embed(["a forest"], "text")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GeoBind.from_pretrained(tmp_path / "nope")
    # A mistyped folder beside an existing one is a missing folder, never a hub lookup.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="model directory runs/modle does not exist"):
        GeoBind.from_pretrained("runs/modle")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="geobind.json is missing"):
        GeoBind.from_pretrained(tmp_path / "empty")
    # The model's file for its folder, and a run's folder for its model/.
    model.save_pretrained(tmp_path / "run" / "model")
    with pytest.raises(FileNotFoundError, match=f"is a file; a GeoBind model is a folder \\(pass its folder, "
                                                f"{tmp_path / 'run' / 'model'}\\)"):
        GeoBind.from_pretrained(tmp_path / "run" / "model" / "geobind.json")
    with pytest.raises(FileNotFoundError, match=f"the model is in {tmp_path / 'run' / 'model'}"):
        GeoBind.from_pretrained(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=f"is one of its encoder folders: pass the model, "
                                                f"{tmp_path / 'run' / 'model'}"):
        GeoBind.from_pretrained(tmp_path / "run" / "model" / "clip")
    # A save stopped between moving the old model aside and moving the new one in.
    (tmp_path / "run" / "model").rename(tmp_path / "run" / ".model.old.x1y2")
    with pytest.raises(FileNotFoundError, match=r"a save into it was interrupted, and the model it replaced is at "
                                                r".*\.model\.old\.x1y2: rename that folder back"):
        GeoBind.from_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / ".model.old.x1y2").rename(tmp_path / "run" / "model")
    small = GeoBind(16)
    with pytest.raises(ValueError, match="returns 32-d vectors but the space has 16"):
        small.add_encoder("satellite", model.encoder("satellite"))
    only = GeoBind(32, {"ground": model.encoder("ground")})
    with pytest.raises(ValueError, match="no 'audio' encoder"):
        only.embed("audio", ["x.wav"])


def test_embed_names_the_bad_item(tiny_data):
    from geobind.data.errors import BadSampleError

    model = build_space(tiny_data)
    with pytest.raises(BadSampleError, match=r"item 1 of 3: <text>: not-text \(a caption is a string, not int\)"):
        model.embed("text", ["a forest", 5, "a lake"])
    with pytest.raises(BadSampleError, match="empty-text"):
        model.embed("text", "  ")
    with pytest.raises(BadSampleError, match="not-text"):
        model.embed("text", 5)  # one item, not a sequence
    with pytest.raises(TypeError, match="got a dict; pass one item or a list"):
        model.embed("text", {"a": 1})
    # Audio items of the wrong kind, or with a rate that is no rate, name their position too.
    wave = np.zeros(1600, np.float32) + 0.1
    with pytest.raises(BadSampleError, match=r"item 2 of 3: <list>: bad-type"):
        model.embed("audio", [(wave, 16000), (wave, 16000), [1, 2]])
    with pytest.raises(BadSampleError, match=r"item 1 of 2: <tuple>: bad-type .*positive integer rate"):
        model.embed("audio", [(wave, 16000), (wave, 0)])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a whole number of 1 or more"):
            model.embed("text", ["a forest"], batch_size=bad)
    # A stacked batch of clips, an image folder, a batch of images: the message says what to pass.
    with pytest.raises(BadSampleError, match=r"or list\(arr\) for a batch of clips"):
        model.embed("audio", np.zeros((4, 1600), np.float32))
    with pytest.raises(BadSampleError, match="is a directory, not an image file"):
        model.embed("satellite", [tiny_data["test"].parent])
    with pytest.raises(BadSampleError, match=r"for a batch of N images pass list\(arr\)"):
        model.embed("satellite", [np.zeros((2, 8, 8, 3), np.uint8)])


def test_texts_the_vocabulary_does_not_know_are_warned_of(tiny_data):
    """Every text with no known word embeds to one vector: embed says so (search refuses them)."""
    import warnings

    model = build_space(tiny_data)
    with pytest.warns(UserWarning, match=r"2 of 3 texts have no word the model's vocabulary knows \(item 0 "):
        vecs = model.embed("text", ["森林", "a forest", "Москва"])
    assert torch.allclose(vecs[0], vecs[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.embed("text", ["a forest"])
    # An embed_query vector on either side of similarity gives a 1-D result, without warnings.
    q = model.embed_query(text="a forest")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.similarity(vecs, q).shape == (3,)


def test_a_space_in_training_mode_embeds_from_several_threads_as_in_eval(tiny_data):
    """``embed`` switches an encoder in training mode to eval and back; calls from several
    threads at once each run it in eval mode (batch norm statistics untouched), and the
    encoder is back in training mode after them."""
    from concurrent.futures import ThreadPoolExecutor

    model = build_space(tiny_data)
    rng = np.random.default_rng(0)
    clips = [((0.1 * rng.standard_normal(16000)).astype(np.float32), 16000) for _ in range(6)]
    ref = model.embed("audio", clips, batch_size=2)
    stats = {k: v.clone() for k, v in model.encoder("audio").state_dict().items() if "running" in k}
    assert stats
    model.train()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: model.embed("audio", clips, batch_size=2), range(8)))
    assert model.encoder("audio").training
    for g in got:
        torch.testing.assert_close(g, ref)
    for k, v in model.encoder("audio").state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k


def test_objects_print_as_summaries(tiny_data, tmp_path):
    """A model, an embeddings file and an index print as one line each in a notebook, and the
    package lists its lazily imported names."""
    import geobind
    import geobind.search
    from geobind.search.embed import embed_dataset, read_embeddings
    from geobind.search.index import build_index

    model = build_space(tiny_data)
    text = repr(model)
    assert text.startswith("GeoBind(dim=32, encoders={") and "satellite: clip_vision" in text
    assert "\n" not in text and model.stages == [] and model.logit_scales == {}
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "sat.parquet", log=None)
    emb = read_embeddings(tmp_path / "sat.parquet")
    assert repr(emb).startswith(f"Embeddings(n={len(emb)}, dim=32, modality='satellite'") and len(repr(emb)) < 200
    index = build_index(tmp_path / "sat.parquet", tmp_path / "sat.index", "exact", log=None)
    assert repr(index) == f"Index({str(tmp_path / 'sat.index')!r}, kind='exact', modality='satellite', " \
                          f"n={len(emb)}, dim=32)"
    with pytest.raises(ValueError, match="k must be a whole number of 1 or more, not 2.5"):
        index.search(model.embed("text", "a forest"), k=2.5)
    # A tuple of two images is two items in a query, as in embed; a (waveform, rate) pair is one.
    img = Image.open(read_dataset(tiny_data["test"]).columns["satellite"][0])
    hits = model.search(index, satellite=(img, img), k=3)
    assert [h.id for h in hits] == [h.id for h in model.search(index, satellite=[img, img], k=3)]
    assert "GeoBind" in dir(geobind) and "Index" in dir(geobind.search)


def test_a_damaged_model_directory_names_the_file_that_fails(tiny_data, tmp_path):
    model = build_space(tiny_data)
    model.save_pretrained(tmp_path / "m")
    meta = (tmp_path / "m" / "geobind.json").read_text()
    (tmp_path / "m" / "geobind.json").write_text(meta[: len(meta) // 2])
    with pytest.raises(ValueError, match=r"geobind.json is not a readable GeoBind model description .* damaged"):
        GeoBind.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "geobind.json").write_text(meta)
    weights = next((tmp_path / "m" / "audio").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OSError, match=r"the audio encoder \(clap_audio, in .*audio\) could not be loaded"):
        GeoBind.from_pretrained(tmp_path / "m")


def test_tiny_tokenizer_vocabulary_is_refused(tmp_path):
    from geobind.encoders.tokenizer import train_tokenizer

    train_tokenizer(["a b c"], vocab_size=10, out_dir=tmp_path / "tok")
    with pytest.raises(ValueError, match="implausibly|only .* tokens"):
        build_anchor({"config": TINY_CLIP, "tokenizer": str(tmp_path / "tok")})


def test_a_point_map_from_python_writes_the_files_named_without_rasterio(tiny_data, tmp_path, monkeypatch):
    """``model.map(embeddings=<index folder>, png=..., csv=...)`` writes those two, and needs no
    rasterio for it (the GeoTIFF does: asking for one without it says which extra)."""
    from geobind.search import maps
    from geobind.search.embed import embed_dataset
    from geobind.search.index import build_index

    model = build_space(tiny_data)
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "sat.parquet", log=None)
    build_index(tmp_path / "sat.parquet", tmp_path / "sat.index", "exact", log=None)

    def no_rasterio():
        raise ImportError("raster maps and GeoTIFF output need rasterio: pip install 'geobind[geo]'")

    monkeypatch.setattr(maps, "import_rasterio", no_rasterio)
    res = model.map(text="a forest", embeddings=tmp_path / "sat.index", png=tmp_path / "m.png",
                    csv=tmp_path / "m.csv")
    assert sorted(p.name for p in tmp_path.glob("m.*")) == ["m.csv", "m.png"] and set(res.paths) == {"png", "csv"}
    with pytest.raises(ImportError, match=r"geobind\[geo\]"):
        model.map(text="a forest", embeddings=str(tmp_path / "sat.index"), out=tmp_path / "g.tif")
    with pytest.raises(FileExistsError):
        model.map(text="a forest", embeddings=tmp_path / "sat.index", png=tmp_path / "m.png")


def test_saved_model_files_get_the_umask_mode(tiny_data, tmp_path):
    """safetensors writes its files 0600 whatever the umask: others who may read the folder
    could not load the model."""

    model = build_space(tiny_data)
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "m").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.stat().st_mode & 0o777 for f in files} == {0o644}


def test_a_hub_id_that_cannot_be_downloaded_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection or see\nthe docs.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError) as e:
        GeoBind.from_pretrained("someone/no-such-geobind-model")
    msg = str(e.value)
    assert "\n" not in msg and "could not be downloaded (OSError: We couldn't connect" in msg


def test_a_model_folder_missing_an_encoder_never_asks_the_hub_and_each_tower_loads_alone(tiny_data, tmp_path,
                                                                                         monkeypatch):
    """A missing encoder folder is a missing folder, not a hub id named like it; the saved CLIP
    loads as either tower with its projection in plain transformers; a format version that is
    not a number is a damaged description."""
    import shutil

    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    model = build_space(tiny_data)
    model.save_pretrained(tmp_path / "m")
    text = CLIPTextModelWithProjection.from_pretrained(tmp_path / "m" / "clip", local_files_only=True)
    ref = model.encoder("text")
    ids = ref.tokenizer(["a forest"], return_tensors="pt")
    with torch.no_grad():
        plain = torch.nn.functional.normalize(text(**ids).text_embeds, dim=-1)
    assert torch.allclose(plain, model.embed("text", ["a forest"]), atol=1e-5)
    CLIPVisionModelWithProjection.from_pretrained(tmp_path / "m" / "clip", local_files_only=True)
    shutil.copytree(tmp_path / "m", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "clip")
    monkeypatch.chdir(tmp_path / "copy")
    with pytest.raises(FileNotFoundError, match="CLIP encoder directory .*clip does not exist"):
        GeoBind.from_pretrained(".")
    meta = json.loads((tmp_path / "m" / "geobind.json").read_text())
    (tmp_path / "m" / "geobind.json").write_text(json.dumps({**meta, "format_version": "2"}))
    with pytest.raises(ValueError, match="format_version is '2', not a number"):
        GeoBind.from_pretrained(tmp_path / "m")


def test_a_long_text_embeds_without_a_tokenizer_warning(tiny_data, capfd, caplog):
    """The vocabulary check reads the whole text (it is truncated when embedded): transformers'
    "longer than the specified maximum sequence length" warning would only alarm."""
    model = build_space(tiny_data)
    model.encoder("text").tokenizer.model_max_length = 48  # as a real CLIP tokenizer says (77)
    model.embed("text", ["a forest " * 400])
    assert "sequence length" not in capfd.readouterr().err + caplog.text
