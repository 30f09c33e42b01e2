"""The published layouts (Sat2Cap shards, SoundingEarth, GeoTIFF tiles), read from fixtures
generated here, and configs of the two published layouts trained end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from fixtures import TINY_CLIP
from layout_fixtures import make_geotiff, make_sat2cap, make_soundingearth, write_geotiff
from test_model import build_space

from geobind.binding.cache import embed_table
from geobind.cli import main
from geobind.data import shards as shards_mod
from geobind.data.check import check_dataset
from geobind.data.manifest import Table, read_dataset
from geobind.data.shards import ShardSet
from geobind.encoders.audio import tiny_clap_audio_spec


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))


@pytest.fixture(scope="module")
def sat2cap(tmp_path_factory):
    return make_sat2cap(tmp_path_factory.mktemp("sat2cap"))


@pytest.fixture(scope="module")
def soundingearth(tmp_path_factory):
    return make_soundingearth(tmp_path_factory.mktemp("soundingearth"))


def test_sat2cap_shards_use_keys_as_ids_and_metadata_coordinates(sat2cap, monkeypatch):
    data = read_dataset(sat2cap, "sat2cap")
    assert isinstance(data, ShardSet) and len(data) == 36 and len(data.urls) == 4
    assert set(data.columns) == {"satellite", "ground"}
    assert data.ids[:2] == ["9000000", "9000037"]
    assert all(-60 <= a <= 60 for a in data.lat) and data.bad_rows == {}
    assert data.meta["date_taken"].iloc[0] == "2012-01-10 12:00:00.0"
    # The index was built once and cached: a second open reads no tar, and a brace pattern of the
    # same shards is the same set.
    monkeypatch.setattr(shards_mod, "build_index", lambda *a, **k: pytest.fail("re-indexed"))
    again = read_dataset(str(sat2cap / "yfcc-{0000..0003}.tar"), "sat2cap")
    assert again.ids == data.ids and again.identity == data.identity
    # Read with GeoBind's own keys the members are not found, and the error says which it expected.
    monkeypatch.undo()
    wrong = read_dataset(sat2cap, "shards")
    with pytest.raises(ValueError, match=r"satellite.jpg.*hold satellite, ground under layout 'sat2cap'"):
        wrong.require("satellite")
    with pytest.raises(ValueError, match="read them with --layout sat2cap"):
        check_dataset(sat2cap)
    with pytest.raises(ValueError, match="has no option 'workers'; its options are index_workers"):
        read_dataset(sat2cap, "sat2cap", workers=2)


def test_keys_that_restart_in_every_shard_are_not_duplicates(tmp_path):
    data = read_dataset(make_sat2cap(tmp_path / "s", n=12, shard_size=6, keys_per_shard=True), "sat2cap")
    assert len(data) == 12 and data.bad_rows == {}


def test_soundingearth_table_follows_the_published_layout(soundingearth, monkeypatch):
    t = read_dataset(soundingearth, "soundingearth")
    assert isinstance(t, Table) and len(t) == 32 and t.bad_rows == {}
    root = soundingearth.parent
    assert t.ids[0] == "100"
    assert t.columns["satellite"][0] == str(root / "images/googleEarth/100.jpg")
    assert t.columns["audio"][0] == str(root / "raw_audio/aporee_0000_1000/rec_0000.mp3")
    assert t.columns["text"][1] == "the sound of a desert at dawn"
    assert {"caption", "address", "long_key", "mp3name"} <= set(t.meta.columns)
    # The folder works too; options pick another image set and caption column.
    (root / "images/sentinel").mkdir(exist_ok=True)
    t2 = read_dataset(root, "soundingearth", image="images/sentinel/{key}.jpeg", text="caption")
    assert t2.columns["satellite"][3] == str(root / "images/sentinel/103.jpeg")
    assert t2.columns["text"][0].startswith("This is a sound of forest")
    assert t2.identity != t.identity
    with pytest.raises(ValueError, match="names column 'nope'"):
        read_dataset(soundingearth, "soundingearth", image="x/{nope}.jpg")
    # A relative CSV path (as users type it) names the same files; a relative root is relative
    # to the CSV's folder.
    monkeypatch.chdir(root.parent)
    rel = read_dataset(f"{root.name}/{soundingearth.name}", "soundingearth")
    assert [str(root.parent / p) for p in rel.columns["satellite"]] == t.columns["satellite"]
    assert all((root.parent / p).is_file() for p in rel.columns["audio"])
    sub = read_dataset(f"{root.name}/{soundingearth.name}", "soundingearth", root="images/..")
    assert (root.parent / sub.columns["satellite"][0]).resolve() == root / "images/googleEarth/100.jpg"


def test_audio_of_every_format_is_decoded_mono_resampled_and_fitted(soundingearth):
    """MP3, FLAC, WAV and OGG at 16/22.05/44.1 kHz, mono and stereo, 1-3 s -> 1 s at 16 kHz."""
    from geobind.encoders.audio import AudioSettings, load_clip

    t = read_dataset(soundingearth, "soundingearth")
    audio = AudioSettings(
        **{k: v for k, v in tiny_clap_audio_spec(32).items() if k in AudioSettings.__annotations__}
    )
    seen = set()
    for path in t.columns["audio"][:8]:
        seen.add(path.rsplit(".", 1)[-1])
        fixed = load_clip(path, audio, train=False)
        assert fixed.shape == (audio.clip_samples,) and fixed.dtype == torch.float32
        assert torch.equal(fixed, load_clip(path, audio, train=False))  # evaluation: a fixed window
    assert seen == {"mp3", "flac", "wav", "ogg"}
    long = t.columns["audio"][2]  # 3 s: training crops a random 1 s window
    crops = {tuple(load_clip(long, audio, train=True)[:4].tolist()) for _ in range(6)}
    assert len(crops) > 1


def test_published_layout_configs_train_end_to_end(
    sat2cap, soundingearth, tmp_path, tiny_data, capsys
):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "device": "cpu",
        "anchor": {"type": "clip", "config": TINY_CLIP, "tokenizer": str(tiny_data["tokenizer"])},
        "stages": [
            {
                "name": "satellite",
                "train": "satellite",
                "bind_to": "ground",
                "encoder": {"type": "clip_vision", "init_from": "ground"},
                "data": {"train": str(sat2cap), "layout": "sat2cap", "shuffle_buffer": 8},
                "optim": {
                    "batch_size": 8,
                    "max_steps": 3,
                    "lr": 1e-3,
                    "log_every": 1,
                    "num_workers": 2,
                },
            },
            {
                "name": "audio",
                "train": "audio",
                "bind_to": "satellite",
                "encoder": {"type": "clap_audio", **tiny_clap_audio_spec(32)},
                "data": {"train": str(soundingearth), "layout": "soundingearth"},
                "optim": {"batch_size": 8, "max_steps": 3, "lr": 1e-3, "log_every": 1},
                "loss": {"symmetric": True},
            },
        ],
        "eval": {"data": str(soundingearth), "layout": "soundingearth", "batch_size": 16},
    }
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["pairs"]) == {
        f"{a}->{b}"
        for a in ("satellite", "audio", "text")
        for b in ("satellite", "audio", "text")
        if a != b
    }
    assert all(m["n"] == 32 for m in report["pairs"].values())
    stages = json.loads((tmp_path / "run" / "model" / "geobind.json").read_text())["stages"]
    assert [s["steps"] for s in stages] == [3, 3]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "36 samples in 4 shards (sat2cap)" in log
    # eval reads any layout with its options; a misspelt option is refused before training.
    out = tmp_path / "captions.json"
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data", str(soundingearth),
                 "--layout", "soundingearth", "--layout-option", "text=caption", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"]["audio->text"]["n"] == 32
    cfg["stages"][1]["data"]["layout_options"] = {"imgae": "x/{key}.jpg"}
    cfg["output_dir"] = str(tmp_path / "typo")
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(path), "--no-progress"]) == 2
    assert ("stages[1] (audio).data.layout_options: layout 'soundingearth' has no option 'imgae'; its "
            "options are image, audio, text, root") in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    # A wrong column or path template of a later stage is reported before the first trains.
    cfg["stages"][1]["data"]["layout_options"] = {"text": "descr", "image": "images/x/{key}.png"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    assert "stages.audio.data.train: " in capsys.readouterr().err and not (tmp_path / "typo" / "stages").exists()
    cfg["stages"][1]["data"]["layout_options"] = {"image": "images/x/{key}.png"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stages.audio.data.train: none of 20 satellite files spread over the dataset exists (e.g. " in err
    assert "images/x/100.png" in err and not (tmp_path / "typo" / "stages").exists()
    # So is an evaluation dataset that lacks a column, or whose files are all missing.
    cfg["stages"][1]["data"].pop("layout_options")
    (tmp_path / "nolat.csv").write_text("id,lon,satellite\na,1.0,x.png\n")
    cfg["eval"] = {"data": str(tmp_path / "nolat.csv")}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    assert f"eval.data: {tmp_path / 'nolat.csv'}: missing column(s) lat" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "stages").exists()
    (tmp_path / "gone.csv").write_text("id,lat,lon,satellite\n" + "".join(f"p{i},1.0,2.0,no/{i}.png\n" for i in range(30)))
    cfg["eval"] = {"data": str(tmp_path / "gone.csv")}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--no-progress"]) == 2
    assert "eval.data: none of 20 satellite files spread over the dataset exists" in capsys.readouterr().err
    assert not (tmp_path / "typo" / "stages").exists()


def test_geotiff_centres_are_transformed_to_wgs84(tmp_path):
    pytest.importorskip("rasterio")
    tiles = make_geotiff(tmp_path / "tiles")
    t = read_dataset(tmp_path / "tiles", "geotiff")
    pos = {i: (a, o) for i, a, o in zip(t.ids, t.lat, t.lon)}
    assert set(pos) == {"bavaria/wgs84", "utm/north", "utm/south", "s2/tile", "plain/nocrs"}
    assert pos["bavaria/wgs84"] == pytest.approx((48.0, 11.0), abs=1e-9)
    # UTM 33N: on the central meridian (15 E) at the equator.
    assert pos["utm/north"] == pytest.approx((0.0, 15.0), abs=1e-7)
    # UTM 33S, northing 10,000 km = the equator; 100 km east of 15 E at scale 0.9996.
    lat, lon = pos["utm/south"]
    assert lat == pytest.approx(0.0, abs=1e-7)
    assert lon == pytest.approx(15 + 100_000 / 0.9996 / 111_319.49, abs=2e-3)
    assert t.bad_rows == {t.ids.index("plain/nocrs"): "no-georeference"}
    # Sidecar caption; tiles of any type come out as 8-bit RGB.
    assert t.columns["text"][t.ids.index("bavaria/wgs84")] == "a photo of a forest"
    s2 = t.item("satellite", t.ids.index("s2/tile"))
    assert s2.shape == (16, 16, 3) and s2.dtype == np.uint8 and s2.max() == 255 and s2.min() == 0
    t3 = read_dataset(tiles["uint16"], "geotiff", bands=[4, 3, 2], scale=4000)
    x = t3.item("satellite", 0)
    assert x.shape == (16, 16, 3) and 0 < x.max() <= 255
    rgb = read_dataset(tmp_path / "tiles", "geotiff").item("satellite", t.ids.index("utm/north"))
    import rasterio

    with rasterio.open(tiles["utm_north"]) as src:
        assert np.array_equal(rgb, src.read().transpose(1, 2, 0))  # 8-bit tiles are untouched


def test_geotiff_tiles_embed_and_check(tmp_path, tiny_data):
    pytest.importorskip("rasterio")
    make_geotiff(tmp_path / "tiles")
    t = read_dataset(tmp_path / "tiles", "geotiff")
    model = build_space(tiny_data)
    emb, valid, bad = embed_table(
        model.encoder("satellite"), t, "satellite", num_workers=2, batch_size=2
    )
    assert valid.sum() == 4 and dict(bad) == {"no-georeference": 1}
    assert torch.allclose(emb[valid].norm(dim=1), torch.ones(4))
    report = check_dataset(tmp_path / "tiles", "geotiff", modalities=["satellite"])
    assert (report.usable, dict(report.reasons)) == (4, {"no-georeference": 1})


def test_tif_files_named_in_a_manifest_are_read_like_the_geotiff_layout(tmp_path, monkeypatch):
    """A 16-bit 4-band tile named in a plain manifest: rasterio's reading (first three bands,
    percentile stretch), not PIL's clip to white; without rasterio, a clear error."""
    pytest.importorskip("rasterio")
    from geobind.data.layouts import read_raster_rgb
    from geobind.data.media import load_image

    rng = np.random.default_rng(0)
    data16 = (rng.random((4, 24, 24)) * 3000).astype(np.uint16)
    write_geotiff(tmp_path / "s2.tif", data16, "EPSG:4326", 10.0, 50.0, 0.001)
    got = np.asarray(load_image(str(tmp_path / "s2.tif")))
    assert got.shape == (24, 24, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, read_raster_rgb(str(tmp_path / "s2.tif")))
    assert 20 < got.mean() < 235  # stretched, not clipped to white

    data8 = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    write_geotiff(tmp_path / "rgb8.tif", data8, None, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "rgb8.tif"))), data8.transpose(1, 2, 0))

    import geobind.data.media as media

    monkeypatch.setattr(media, "_have_rasterio", lambda: False)
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "rgb8.tif"))), data8.transpose(1, 2, 0))
    from PIL import Image

    Image.fromarray(data16[0]).save(tmp_path / "grey16.tif")  # PIL reads it, stretched alike
    from geobind.data.media import array_to_rgb

    grey = np.asarray(load_image(str(tmp_path / "grey16.tif")))
    np.testing.assert_array_equal(grey, np.asarray(array_to_rgb(data16[0])))
    assert 20 < grey.mean() < 235


# ---------------------------------------------------------------------------------------------
# The geotiff layout's bands and scale options on the tiles a plain manifest names


def _s2_manifest(root):
    """Two 4-band uint16 16x16 tiles (Sentinel-2-like reflectance up to 6000) named in a
    manifest's satellite column, one in its ground column beside a PNG, and a caption column.
    Returns the manifest and the tiles' data by row."""
    from PIL import Image

    rng = np.random.default_rng(7)
    tiles = []
    for i in range(2):
        data = rng.integers(0, 6000, (4, 16, 16), dtype=np.uint16)
        data[3, 0, 0], data[2, 0, 0], data[1, 0, 0] = 3000, 1500, 6000  # red, green, blue
        write_geotiff(root / f"tiles/t{i}.tif", data, "EPSG:4326", 10.0 + i, 50.0, 0.001)
        tiles.append(data)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(root / "photo.png")
    manifest = root / "m.csv"
    manifest.write_text("id,lat,lon,satellite,ground,text\n"
                        "a,50,10,tiles/t0.tif,tiles/t1.tif,a forest\n"
                        "b,50,11,tiles/t1.tif,photo.png,a field\n")
    return manifest, tiles


def _reflectance_rgb(data, bands=(4, 3, 2), white=3000.0):
    """What ``bands`` of a tile should look like with ``scale=white``: value/white*255, clipped."""
    x = data[[b - 1 for b in bands]].astype(np.float64) / white * 255
    return np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def test_manifest_tifs_take_the_geotiff_layouts_bands_and_scale(tmp_path):
    pytest.importorskip("rasterio")
    from geobind.data.errors import BadSampleError
    from geobind.data.layouts import read_raster_rgb

    manifest, tiles = _s2_manifest(tmp_path)
    t = read_dataset(manifest, bands=[4, 3, 2], scale=3000)
    sat = t.item("satellite", 0)
    assert sat.shape == (16, 16, 3) and sat.dtype == np.uint8
    assert sat[0, 0].tolist() == [255, 127, 255]  # 3000 is white, 1500 half, 6000 clipped
    np.testing.assert_array_equal(sat, _reflectance_rgb(tiles[0]))
    np.testing.assert_array_equal(t.item("satellite", 1), _reflectance_rgb(tiles[1]))
    # Every image column's tiles; its other files and the text are untouched.
    np.testing.assert_array_equal(t.item("ground", 0), _reflectance_rgb(tiles[1]))
    assert t.item("ground", 1) == str(tmp_path / "photo.png")
    assert t.item("text", 0) == "a forest"
    # The command line's spelling reads the same pixels; one band is grey.
    again = read_dataset(manifest, bands="4,3,2", scale="3000")
    np.testing.assert_array_equal(again.item("satellite", 0), sat)
    grey = read_dataset(manifest, bands=[4]).item("satellite", 0)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 0] == grey[..., 2]).all()
    # Without the options a tile is read with the defaults (bands 1-3, stretched) when loaded.
    plain = read_dataset(manifest)
    assert plain.loaders == {} and plain.item("satellite", 0) == str(tmp_path / "tiles/t0.tif")
    assert not np.array_equal(read_raster_rgb(plain.item("satellite", 0)), sat)
    # A band the tile lacks is that sample's problem, as in the geotiff layout.
    with pytest.raises(BadSampleError, match=r"asked for bands \[5, 3, 2\], the raster has 4") as e:
        read_dataset(manifest, bands=[5, 3, 2]).item("satellite", 0)
    assert e.value.reason == "bad-bands"


@pytest.mark.parametrize("options", [{"bands": [1, 2]}, {"bands": "4,3,x"}, {"bands": [0, 1, 2]},
                                     {"bands": []}, {"scale": 0}, {"scale": "white"}, {"scale": None}])
def test_manifest_raster_options_are_refused_as_the_geotiff_layout_refuses_them(tmp_path, options):
    pytest.importorskip("rasterio")
    manifest, _ = _s2_manifest(tmp_path)
    with pytest.raises(ValueError, match="layout option (bands|scale)=") as geotiff:
        read_dataset(tmp_path / "tiles", "geotiff", **options)
    with pytest.raises(ValueError) as plain:
        read_dataset(manifest, **options)
    assert str(plain.value) == str(geotiff.value)


def test_manifest_raster_options_key_the_anchor_cache(tmp_path, tiny_data):
    """Other bands or scale are other pixels: the anchor cache must compute them afresh, and
    the same options however spelt must find the same file."""
    pytest.importorskip("rasterio")
    from geobind.binding.cache import cached_embeddings, dataset_fingerprint

    manifest, _ = _s2_manifest(tmp_path)
    encoder = build_space(tiny_data).encoder("satellite")

    def cached(**options):
        t = read_dataset(manifest, **options)
        emb, valid, info = cached_embeddings(encoder, t, "satellite", tmp_path / "cache", batch_size=2)
        assert valid.all()
        return emb, info

    rgb, info = cached(bands=[4, 3, 2], scale=3000)
    assert not info["hit"]
    same, info = cached(bands="4,3,2", scale="3000")
    assert info["hit"] and torch.equal(same, rgb)
    for options in ({"bands": [3, 2, 1], "scale": 3000}, {"bands": [4, 3, 2], "scale": 6000}, {}):
        other, info = cached(**options)
        assert not info["hit"], options
        assert not torch.equal(other, rgb), options
    prints = {dataset_fingerprint(read_dataset(manifest, **o), "satellite")
              for o in ({}, {"bands": [4, 3, 2]}, {"scale": 3000}, {"bands": [4, 3, 2], "scale": 3000})}
    assert len(prints) == 4


def test_manifest_raster_options_on_the_command_line(tmp_path, tiny_data, capsys):
    """``data check``, ``embed`` and ``eval`` read a manifest's tiles with ``--layout-option
    bands=... scale=...`` as the Python reader does, and refuse a bad option before reading."""
    pytest.importorskip("rasterio")
    from space_helpers import saved_space

    from geobind import GeoBind
    from geobind.search import read_embeddings

    manifest, tiles = _s2_manifest(tmp_path)
    opts = ["--layout-option", "bands=4,3,2", "--layout-option", "scale=3000"]
    assert main(["data", "check", str(manifest), *opts]) == 0
    assert "usable: 2" in capsys.readouterr().out
    assert main(["data", "check", str(manifest), "--layout-option", "bands=[5,3,2]"]) == 1
    assert "bad-bands (asked for bands [5, 3, 2], the raster has 4)" in capsys.readouterr().out
    assert main(["data", "check", str(manifest), "--layout-option", "bands=4,3"]) == 2
    assert "layout option bands=['4', '3']: give 1 or 3 band numbers" in capsys.readouterr().err

    model_dir = saved_space(tiny_data, tmp_path)
    out = tmp_path / "sat.parquet"
    assert main(["embed", "--model", str(model_dir), "--data", str(manifest), "--modality", "satellite",
                 "--out", str(out), "--no-progress", *opts]) == 0
    model = GeoBind.from_pretrained(model_dir)
    want = model.embed("satellite", [_reflectance_rgb(x) for x in tiles])
    np.testing.assert_allclose(read_embeddings(out).vectors, want.numpy(), atol=1e-6)
    # The options are part of the dataset's identity, so an interrupted embed with others restarts.
    recorded = read_embeddings(out).header["dataset"]["identity"]
    assert recorded == read_dataset(manifest, bands=[4, 3, 2], scale=3000).identity
    assert recorded != read_dataset(manifest).identity

    report = tmp_path / "report.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(manifest), "--out", str(report),
                 "--no-progress", *opts]) == 0
    assert json.loads(report.read_text())["pairs"]["satellite->text"]["n"] == 2
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(manifest), "--no-progress",
                 "--layout-option", "scale=-1"]) == 2
    assert "layout option scale=-1: give auto (stretch each tile)" in capsys.readouterr().err
