"""Zero-shot maps: GeoTIFF georeferencing and values against a direct computation, point maps,
softmax scores, bad rasters, no-overwrite, and the map command."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from space_helpers import saved_space

from geobind import GeoBind
from geobind.cli import main
from geobind.search.maps import auto_resolution, map_points, tile_grid

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402  (installed with rasterio)

ORIGIN = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_650_000.0)  # 10 m pixels, UTM 33N


def write_raster(
    path,
    width=96,
    height=64,
    *,
    dtype="uint8",
    crs="EPSG:32633",
    transform=ORIGIN,
    nodata=None,
    seed=0,
):
    """A seeded 3-band raster: greenish on the left, sandy on the right."""
    rng = np.random.default_rng(seed)
    base = np.zeros((3, height, width))
    base[:, :, : width // 2] = np.array([40, 140, 50])[:, None, None]
    base[:, :, width // 2 :] = np.array([220, 190, 120])[:, None, None]
    data = np.clip(base + rng.normal(0, 20, base.shape), 0, 255)
    if dtype == "uint16":
        data = data * 40
    data = data.astype(dtype)
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": dtype,
        "transform": transform,
        "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return data


@pytest.fixture(scope="module")
def model(tiny_data, tmp_path_factory):
    return GeoBind.from_pretrained(saved_space(tiny_data, tmp_path_factory.mktemp("maps")))


def direct_tile_scores(model, data, tile, stride, query):
    """Scores computed the plain way: crop each tile from the full array, embed, dot."""
    rows, cols = tile_grid(data.shape[2], data.shape[1], tile, stride)
    crops = [
        np.ascontiguousarray(
            data[:, r * stride : r * stride + tile, c * stride : c * stride + tile].transpose(
                1, 2, 0
            )
        )
        for r in range(rows)
        for c in range(cols)
    ]
    emb = model.embed("satellite", crops)
    return (emb @ query).numpy().reshape(rows, cols)


@pytest.mark.parametrize("stride", [32, 16])
def test_raster_map_georeferencing_and_values(model, tmp_path, stride):
    data = write_raster(tmp_path / "region.tif")
    out = tmp_path / "forest.tif"
    result = model.map(
        text="a photo of a forest",
        raster=tmp_path / "region.tif",
        tile_size=32,
        stride=stride,
        out=out,
    )
    q = model.embed("text", ["a photo of a forest"])[0]
    expect = direct_tile_scores(model, data, 32, stride, q)
    with rasterio.open(tmp_path / "region.tif") as src, rasterio.open(out) as m:
        assert m.crs == src.crs
        off = (32 - stride) / 2  # cell centred on its tile, stride pixels wide
        t = src.transform
        assert m.transform == Affine(
            t.a * stride, 0.0, t.c + t.a * off, 0.0, t.e * stride, t.f + t.e * off
        )
        if stride == 32:  # one cell = one tile's footprint
            assert m.transform == Affine(320.0, 0.0, 500_000.0, 0.0, -320.0, 4_650_000.0)
        assert m.shape == expect.shape == tile_grid(96, 64, 32, stride)
        assert m.dtypes[0] == "float32"
        np.testing.assert_allclose(m.read(1), expect, atol=1e-5)
        assert m.tags()["score"] == "cosine" and "forest" in m.tags()["query"]
    np.testing.assert_allclose(result.values, expect, atol=1e-5)
    table = pd.read_csv(tmp_path / "forest.csv")
    assert list(table.columns[:4]) == ["row", "col", "lat", "lon"] and len(table) == expect.size
    # tile centres in lat/lon: UTM 33N near 500 km easting is close to 15 E, ~42 N
    assert table["lon"].between(14.9, 15.1).all() and table["lat"].between(41.9, 42.1).all()
    # x, y: the centre of tile (row, col) in the raster's CRS, which is also its cell's centre
    px = table["col"].to_numpy() * stride + 16  # tile centre, pixels
    py = table["row"].to_numpy() * stride + 16
    np.testing.assert_allclose(table["x"], t.c + t.a * px, rtol=0, atol=1e-6)
    np.testing.assert_allclose(table["y"], t.f + t.e * py, rtol=0, atol=1e-6)
    g = result.transform
    np.testing.assert_allclose(table["x"], g.c + g.a * (table["col"].to_numpy() + 0.5), rtol=0, atol=1e-6)
    np.testing.assert_allclose(table["y"], g.f + g.e * (table["row"].to_numpy() + 0.5), rtol=0, atol=1e-6)
    np.testing.assert_allclose(table["score"].to_numpy(), expect.reshape(-1), atol=1e-5)
    png = (tmp_path / "forest.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_raster_map_softmax_over_prompts(model, tmp_path):
    data = write_raster(tmp_path / "r.tif")
    prompts = ["a photo of a desert", "a photo of an ocean"]
    result = model.map(
        text="a photo of a forest",
        raster=tmp_path / "r.tif",
        tile_size=32,
        prompts=prompts,
        scale=10.0,
    )
    texts = model.embed("text", ["a photo of a forest", *prompts])
    cos = np.stack([direct_tile_scores(model, data, 32, 32, t) for t in texts])  # [3, rows, cols]
    expect = torch.softmax(torch.from_numpy(cos) * 10.0, dim=0)[0].numpy()
    assert (
        result.score == "softmax" and "softmax over the query and 2 prompts" in result.score_label
    )
    np.testing.assert_allclose(result.values, expect, atol=1e-5)
    assert ((result.values >= 0) & (result.values <= 1)).all()


def test_raster_nodata_and_16_bit(model, tmp_path):
    data = write_raster(tmp_path / "r16.tif", dtype="uint16", nodata=0)
    with rasterio.open(tmp_path / "r16.tif", "r+") as dst:  # blank out the top-left tile
        block = data.copy()
        block[:, :32, :32] = 0
        dst.write(block)
    result = model.map(text="a photo of a forest", raster=tmp_path / "r16.tif", tile_size=32)
    assert np.isnan(result.values[0, 0]) and np.isfinite(result.values[0, 1:]).all()
    assert np.isfinite(result.values[1]).all()
    # A tile more than half nodata (a scene's edge) gets no score either; one under half does.
    with rasterio.open(tmp_path / "r16.tif", "r+") as dst:
        block = data.copy()
        block[:, :20, 32:64] = 0  # 20 of 32 rows of the second tile
        block[:, :12, 64:96] = 0  # 12 of 32 rows of the third
        dst.write(block)
    result = model.map(text="a photo of a forest", raster=tmp_path / "r16.tif", tile_size=32)
    assert np.isnan(result.values[0, 1]) and np.isfinite(result.values[0, 2])


def test_raster_without_georeferencing_is_refused(model, tmp_path):
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        write_raster(tmp_path / "plain.tif", crs=None, transform=Affine.identity())
    with pytest.raises(ValueError, match="has no georeferencing"):
        model.map(text="forest", raster=tmp_path / "plain.tif", tile_size=32)
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="has no georeferencing"):
        model.map(text="forest", raster=tmp_path / "photo.png", tile_size=32)
    write_raster(tmp_path / "small.tif", width=20, height=20)
    with pytest.raises(ValueError, match="smaller than one tile"):
        model.map(text="forest", raster=tmp_path / "small.tif", tile_size=32)


def test_point_map_from_embeddings(model, tiny_data, tmp_path):
    from geobind.search import embed_dataset, read_embeddings

    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "sat.parquet", log=None)
    emb = read_embeddings(tmp_path / "sat.parquet")
    result = model.map(
        text="a photo of a desert",
        embeddings=tmp_path / "sat.parquet",
        resolution=5.0,
        out=tmp_path / "desert.tif",
    )
    q = model.embed("text", ["a photo of a desert"])[0].numpy()
    direct = emb.vectors.astype(np.float32) @ q
    table = pd.read_csv(tmp_path / "desert.csv", dtype={"id": str})
    assert list(table.columns) == ["id", "lat", "lon", "score"]
    np.testing.assert_allclose(table["score"], direct, atol=1e-5)
    with rasterio.open(tmp_path / "desert.tif") as m:
        assert m.crs.to_epsg() == 4326
        assert m.transform.a == 5.0 and m.transform.e == -5.0
        grid = m.read(1)
        # every place lands in the cell the transform puts it in; a cell holds its places' mean score
        cells = {}
        for la, lo, x in zip(emb.lat, emb.lon, direct):
            cells.setdefault(rasterio.transform.rowcol(m.transform, lo, la), []).append(x)
        for (r, c), xs in cells.items():
            assert grid[r, c] == pytest.approx(np.mean(xs), abs=1e-5)
        assert np.isnan(grid).sum() == grid.size - len(cells)
    assert result.bounds_latlon() == result.bounds
    assert result.overlay_png()[:4] == b"\x89PNG"


def test_point_map_grid_of_places_and_softmax():
    lat, lon = np.meshgrid(np.arange(-10, 10.1, 2.0), np.arange(0, 20.1, 2.0), indexing="ij")
    lat, lon = lat.ravel(), lon.ravel()
    assert auto_resolution(lat, lon) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(lat.size, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q, p = v[0], v[1:3]
    res = map_points(v, lat, lon, [str(i) for i in range(lat.size)], q)
    assert res.values.shape == (11, 11) and np.isfinite(res.values).all()
    np.testing.assert_allclose(np.sort(res.values.ravel()), np.sort(v @ q), atol=1e-6)
    # Each place sits at its cell's centre: the grid starts half a cell west of the westmost
    # place and half a cell north of the northmost one.
    assert res.transform == Affine(2.0, 0.0, -1.0, 0.0, -2.0, 11.0)
    for i in range(lat.size):
        r, c = rasterio.transform.rowcol(res.transform, lon[i], lat[i])
        assert (-1.0 + 2.0 * (c + 0.5), 11.0 - 2.0 * (r + 0.5)) == pytest.approx((lon[i], lat[i]))
        assert res.values[r, c] == pytest.approx(float(v[i] @ q), abs=1e-6)
    sm = map_points(v, lat, lon, [str(i) for i in range(lat.size)], q, prompts=p, scale=100.0)
    logits = 100.0 * v @ np.vstack([q, p]).T
    expect = np.exp(logits - logits.max(1, keepdims=True))
    expect = expect[:, 0] / expect.sum(1)
    np.testing.assert_allclose(sm.table["score"], expect, atol=1e-5)


@pytest.mark.parametrize("lats, res, north, south", [
    ((88.0, 60.0), 5.0, 90.0, 55.0),  # near the north pole: capped at 90 N
    ((-60.0, -88.0), 5.0, -55.0, -90.0),  # near the south pole: the grid moves up to end at 90 S
    ((89.0, -89.0), 5.0, 90.0, -90.0),  # pole to pole: 36 rows fit exactly
    ((10.0, -10.0), 5.0, 12.5, -12.5),  # elsewhere: unchanged, places at cell centres
])
def test_a_point_map_grid_stops_at_the_poles(lats, res, north, south):
    lat = np.array(lats * 3)
    lon = np.repeat([0.0, 10.0, 20.0], len(lats))
    v = np.eye(lat.size, 4, dtype=np.float32)
    v[:, 0] = 1.0
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    m = map_points(v, lat, lon, [str(i) for i in range(lat.size)], v[0], resolution=res)
    west, s, east, n = m.bounds
    assert (n, s) == pytest.approx((north, south)) and (west, east) == pytest.approx((-2.5, 22.5))
    rows = m.values.shape[0]
    assert n - rows * res == pytest.approx(s)
    for i in range(lat.size):  # every place is in the cell that holds its score
        r, c = rasterio.transform.rowcol(m.transform, lon[i], lat[i])
        assert 0 <= r < rows and m.values[r, c] == pytest.approx(float(v[i] @ v[0]), abs=1e-6)


def test_scattered_places_get_a_grid_where_each_covers_a_visible_cell():
    """Dense places keep their own spacing; a few hundred scattered over the world get cells
    about half their typical distance wide, not a grid of specks that is almost all empty."""
    from geobind.search.maps import default_resolution

    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-60, 70, 790), rng.uniform(-170, 170, 790)
    v = rng.normal(size=(790, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    res = map_points(v, lat, lon, [str(i) for i in range(790)], v[0])
    filled = np.isfinite(res.values).mean()
    assert default_resolution(lat, lon) > 2 * auto_resolution(lat, lon) and filled > 0.1
    g_lat, g_lon = np.meshgrid(np.arange(-10, 10.1, 2.0), np.arange(0, 20.1, 2.0), indexing="ij")
    assert default_resolution(g_lat.ravel(), g_lon.ravel()) == pytest.approx(2.0)


def test_map_cli_names_a_bad_band_list(model, tmp_path, capsys):
    write_raster(tmp_path / "r.tif")
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    assert main(["map", "--model", str(model_dir), "--text", "a forest", "--raster", str(tmp_path / "r.tif"),
                 "--tile-size", "32", "--bands", "x", "--out", str(tmp_path / "o.tif")]) == 2
    assert "--bands x: give band numbers counted from 1" in capsys.readouterr().err


def test_point_map_refuses_a_grid_too_fine_for_memory(monkeypatch):
    import re

    from geobind.search import maps

    monkeypatch.setattr(maps, "MAX_GRID_CELLS", 10_000)  # a 100 x 100 grid: tiny and fast
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 60, 50), rng.uniform(-170, 170, 50)
    lat[:2], lon[:2] = (-60, 60), (-170, 170)  # the extent: 120 x 340 degrees
    v = rng.normal(size=(50, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [str(i) for i in range(50)]
    with pytest.raises(ValueError, match=r"coarser resolution \(--resolution") as e:
        map_points(v, lat, lon, ids, v[0], resolution=1e-4)
    msg = str(e.value)
    assert re.search(r"is a 1,2\d\d,\d\d\d x 3,4\d\d,\d\d\d grid", msg) and "TiB of memory" in msg
    assert "smaller region" in msg
    fits = float(re.search(r"coarser resolution \(--resolution; ([0-9.e+-]+) or more", msg).group(1))
    assert map_points(v, lat, lon, ids, v[0], resolution=fits).values.size <= 10_000


def test_map_outputs_never_overwritten_without_force(model, tmp_path):
    write_raster(tmp_path / "r.tif")
    (tmp_path / "m.png").write_text("keep me")
    with pytest.raises(FileExistsError, match="m.png exists"):
        model.map(text="forest", raster=tmp_path / "r.tif", tile_size=32, out=tmp_path / "m.tif")
    assert not (tmp_path / "m.tif").exists()  # checked before anything is written
    assert (tmp_path / "m.png").read_text() == "keep me"
    model.map(
        text="forest", raster=tmp_path / "r.tif", tile_size=32, out=tmp_path / "m.tif", force=True
    )
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.png", "m.tif", "r.tif"]


def test_map_cli(model, tiny_data, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    write_raster(tmp_path / "r.tif")
    wav = str(tiny_data["root"] / "audio" / "0003.wav")
    base = ["map", "--model", str(model_dir), "--no-progress"]
    rc = main(
        base
        + [
            "--text",
            "forest",
            "--audio",
            wav,
            "--raster",
            str(tmp_path / "r.tif"),
            "--tile-size",
            "32",
            "--out",
            str(tmp_path / "a.tif"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert 'query: "forest" + audio 0003.wav' in out and "score: cosine similarity" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"a.tif", "a.png", "a.csv"}
    assert (
        main(
            base
            + [
                "--text",
                "forest",
                "--raster",
                str(tmp_path / "r.tif"),
                "--tile-size",
                "32",
                "--out",
                str(tmp_path / "a.tif"),
            ]
        )
        == 2
    )
    assert "exists; pass --force" in capsys.readouterr().err
    assert (
        main(
            base
            + [
                "--text",
                "forest",
                "--raster",
                str(tmp_path / "r.tif"),
                "--out",
                str(tmp_path / "b.tif"),
            ]
        )
        == 2
    )
    assert "--tile-size" in capsys.readouterr().err
    assert main(base + ["--text", "forest", "--out", str(tmp_path / "b.tif")]) == 2
    assert "exactly one of --raster" in capsys.readouterr().err
    # A .png name is the PNG; the GeoTIFF and the CSV go beside it.
    raster = ["--text", "forest", "--raster", str(tmp_path / "r.tif"), "--tile-size", "32"]
    assert main(base + raster + ["--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "c.tif").is_file()
    assert (tmp_path / "c.csv").is_file()
    capsys.readouterr()
    assert main(base + raster + ["--out", str(tmp_path / "d.tif"), "--png", str(tmp_path / "d.tif")]) == 2
    assert "three different files" in capsys.readouterr().err and not (tmp_path / "d.tif").exists()


def test_default_outputs_never_give_one_file_two_roles():
    from geobind.search.maps import default_outputs

    for name in ("map", "map.tif", "map.tiff", "map.png", "map.csv", "x/map.PNG"):
        outs = default_outputs(name)
        assert len(set(outs.values())) == 3, name
    assert default_outputs("m.png") == {"tif": Path("m.tif"), "png": Path("m.png"), "csv": Path("m.csv")}
    assert default_outputs("m.tif")["png"] == Path("m.png") and default_outputs("m")["tif"] == Path("m.tif")
    with pytest.raises(ValueError, match=r"m.jpg: a map is written as a GeoTIFF .*name the map m.tif"):
        default_outputs("m.jpg")  # would otherwise be a GeoTIFF named .jpg


def test_raster_is_read_window_by_window(model, tmp_path, monkeypatch):
    """No read covers more than one tile (or a decimated overview for 16-bit scaling): rasters
    larger than memory work."""
    from geobind.search import maps

    write_raster(tmp_path / "r.tif", width=128, height=96, dtype="uint16")
    reads = []
    real_open = maps.open_georeferenced

    class Recording:
        def __init__(self, src):
            self._src = src

        def __getattr__(self, name):
            return getattr(self._src, name)

        def read(self, *args, window=None, out_shape=None, **kw):
            reads.append((window, out_shape))
            return self._src.read(*args, window=window, out_shape=out_shape, **kw)

    monkeypatch.setattr(maps, "open_georeferenced", lambda p: Recording(real_open(p)))
    result = model.map(text="forest", raster=tmp_path / "r.tif", tile_size=32)
    assert result.values.shape == (3, 4)
    tiles = [w for w, o in reads if w is not None]
    assert len(tiles) == 12 and all((w.width, w.height) == (32, 32) for w in tiles)
    assert all(w is not None or o is not None for w, o in reads)  # never a plain full read


def test_nan_in_a_float_raster_is_no_data_declared_or_not(model, tmp_path):
    data = write_raster(tmp_path / "f.tif", dtype="float32")
    with rasterio.open(tmp_path / "f.tif", "r+") as dst:
        block = data.astype(np.float32)
        block[:, :40, :40] = np.nan  # the top-left 32 px tile entirely, its neighbours in part
        dst.write(block)
    result = model.map(text="a photo of a forest", raster=tmp_path / "f.tif", tile_size=32)
    assert np.isnan(result.values[0, 0]) and np.isfinite(result.values[0, 1:]).all()


def test_map_outputs_keep_their_precision_and_checks_of_the_api(model, tmp_path):
    write_raster(tmp_path / "r.tif")
    result = model.map(text="a forest", raster=tmp_path / "r.tif", tile_size=32, out=tmp_path / "m.tif")
    table = pd.read_csv(tmp_path / "m.csv")
    # Coordinates as computed, not rounded to 6 digits (4,650,000 m northings keep their metres).
    cols = [c for c in result.table.columns if result.table[c].dtype.kind == "f"]
    assert {"lat", "lon"} <= set(cols)
    np.testing.assert_allclose(table[cols].to_numpy(), result.table[cols].to_numpy(), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="three different files"):
        model.map(text="a forest", raster=tmp_path / "r.tif", tile_size=32, out=tmp_path / "a.tif",
                  png=tmp_path / "a.tif")
    assert not (tmp_path / "a.tif").exists()
    with pytest.raises(ValueError, match="scale=-5.0: the softmax logit scale is a positive number"):
        model.map(text="a forest", raster=tmp_path / "r.tif", tile_size=32, prompts=["a lake"], scale=-5.0)


def _unit(rng, n, d=8):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_point_map_across_the_antimeridian_is_gridded_across_it():
    """Places on both sides of 180 degrees (Fiji) get a grid over their own few degrees, with
    longitudes running past 180, not one over the whole world; the CSV keeps their longitudes."""
    from geobind.search.maps import unwrap_longitudes

    lat, lon = np.meshgrid(np.arange(-20, -14.9, 1.0), np.array([176.0, 177, 178, 179, -180, -179, -178]),
                           indexing="ij")
    lat, lon = lat.ravel(), lon.ravel()
    v = _unit(np.random.default_rng(0), lat.size)
    res = map_points(v, lat, lon, [str(i) for i in range(lat.size)], v[0])
    assert res.values.shape == (6, 7) and np.isfinite(res.values).all()
    assert res.transform == Affine(1.0, 0.0, 175.5, 0.0, -1.0, -14.5)
    for i in range(lat.size):  # each place's score in the cell at its longitude (+360 west of 180)
        r, c = rasterio.transform.rowcol(res.transform, lon[i] % 360, lat[i])
        assert res.values[r, c] == pytest.approx(float(v[i] @ v[0]), abs=1e-6)
    np.testing.assert_array_equal(res.table["lon"], lon)
    # Places spread over the world, or already on one side, keep the -180..180 frame.
    world = np.array([-170.0, -60.0, 10.0, 100.0, 170.0])
    np.testing.assert_array_equal(unwrap_longitudes(world), world)
    np.testing.assert_array_equal(unwrap_longitudes(np.array([10.0, 12.0])), [10.0, 12.0])


def test_point_map_png_colours_span_the_places_own_scores(monkeypatch, tmp_path):
    """A point map's PNG draws each place's own score, so its colour scale spans those scores,
    not the (narrower) range of the cell means."""
    import matplotlib.axes

    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(0, 10, 400), rng.uniform(0, 10, 400)
    v = _unit(rng, 400)
    res = map_points(v, lat, lon, [str(i) for i in range(400)], v[0], resolution=5.0)
    seen = {}
    real = matplotlib.axes.Axes.scatter

    def scatter(self, *args, **kw):
        seen.update(vmin=kw["vmin"], vmax=kw["vmax"])
        return real(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", scatter)
    res.write(png=tmp_path / "m.png")
    scores = res.table["score"].to_numpy()
    inside = ((scores >= seen["vmin"] - 1e-9) & (scores <= seen["vmax"] + 1e-9)).mean()
    assert inside > 0.9  # the 2-98 % limits of the places' scores
    assert seen["vmax"] - seen["vmin"] > np.nanmax(res.values) - np.nanmin(res.values)


def test_point_map_checks_coordinates_and_a_softmax_map_records_its_prompts(model, tiny_data, tmp_path):
    from geobind.search import embed_dataset

    rng = np.random.default_rng(0)
    v = _unit(rng, 3, model.dim)
    with pytest.raises(ValueError, match="NaN latitude or longitude"):
        map_points(v, np.array([1.0, np.nan, 2.0]), np.array([1.0, 2.0, 3.0]), ["a", "b", "c"], v[0])
    embed_dataset(model, tiny_data["test"], "satellite", tmp_path / "sat.parquet", log=None)
    model.map(text="a forest", embeddings=tmp_path / "sat.parquet", prompts=["a city", "the sea"], scale=50,
              out=tmp_path / "s.tif")
    with rasterio.open(tmp_path / "s.tif") as ds:
        tags = ds.tags()
    assert tags["prompts"] == '["a city", "the sea"]' and tags["logit_scale"] == "50"


def test_raster_bands_must_be_one_or_three(model, tmp_path):
    write_raster(tmp_path / "r.tif")
    with pytest.raises(ValueError, match="give 1 band .grey. or 3"):
        model.map(text="forest", raster=tmp_path / "r.tif", tile_size=32, bands=[1, 2])


def test_16_bit_raster_tiles_are_scaled_as_the_geotiff_layout_scales_them(model, tmp_path):
    """``pixel_scale`` gives the map the tiles training and ``embed`` see: per tile by default
    (the layout's ``scale: auto``), a fixed white value, or one stretch over the raster."""
    from geobind.data.layouts import read_raster_rgb
    from geobind.search.maps import open_georeferenced, raster_tiles

    data = write_raster(tmp_path / "r16.tif", dtype="uint16")
    # Each tile cut out as its own GeoTIFF, read as the geotiff layout reads a tile.
    with rasterio.open(tmp_path / "r16.tif") as src:
        profile = src.profile
    for scale in ("auto", 3000):
        with open_georeferenced(tmp_path / "r16.tif") as src:
            tiles = list(raster_tiles(src, 32, 32, pixel_scale=scale))
        for r, c, tile in tiles:
            path = tmp_path / f"t{r}{c}.tif"
            with rasterio.open(path, "w", **{**profile, "width": 32, "height": 32}) as dst:
                dst.write(data[:, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32])
            np.testing.assert_array_equal(tile, read_raster_rgb(str(path), scale=scale))
    with open_georeferenced(tmp_path / "r16.tif") as src:
        whole = [t for _, _, t in raster_tiles(src, 32, 32, pixel_scale="raster")]
    assert not np.array_equal(whole[0], tiles[0][2])  # one stretch for the raster is another input
    with pytest.raises(ValueError, match="pixel scale 'bright'"):
        model.map(text="forest", raster=tmp_path / "r16.tif", tile_size=32, pixel_scale="bright")
    with pytest.raises(ValueError, match="pixel scale -1"):
        model.map(text="forest", raster=tmp_path / "r16.tif", tile_size=32, pixel_scale=-1)


def test_a_point_map_summary_ranges_over_places_as_its_best_place_does():
    from geobind.search.maps import describe

    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(0, 10, 300), rng.uniform(0, 10, 300)
    v = _unit(rng, 300)
    res = map_points(v, lat, lon, [str(i) for i in range(300)], v[0], resolution=5.0)
    text = describe(res)
    best = float((v @ v[0]).max())
    assert f"max {best:.4f}" in text and "scores (per place)" in text


def test_tile_centres_of_a_projected_grid_get_a_default_grid_without_holes():
    """Tiles of a projected grid (2.56 km apart at 47 N: wider apart in longitude than in
    latitude, and no two rows on the same longitudes) fill the default grid, where half their
    spacing left three cells in four empty; scattered places keep their coarser cells."""
    from geobind.search.maps import _interior_holes, default_resolution

    i, j = np.meshgrid(np.arange(60), np.arange(60), indexing="ij")
    lat = 47.0 + i * 0.023
    lon = 15.0 + j * 0.023 / np.cos(np.radians(lat)) + 0.001 * i  # rows slightly sheared, as UTM's are
    lat, lon = lat.ravel(), lon.ravel()
    res = default_resolution(lat, lon)
    assert _interior_holes(lat, lon, res) <= 0.03 and res < 0.05
    v = _unit(np.random.default_rng(0), lat.size)
    grid = map_points(v, lat, lon, [str(k) for k in range(lat.size)], v[0]).values
    assert np.isnan(grid).mean() < 0.1
    rng = np.random.default_rng(1)
    lat_s, lon_s = rng.uniform(-60, 70, 790), rng.uniform(-170, 170, 790)
    area = np.ptp(lat_s) * np.ptp(lon_s)
    assert default_resolution(lat_s, lon_s) == pytest.approx(np.sqrt(area / 790) / 2)
