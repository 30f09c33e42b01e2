"""World maps: the GeoTIFF's georeferencing and the PNG."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

from geobind.maps_world import infer_cell_deg, plot_world_map, world_raster, write_points_geotiff


def test_world_raster_means_and_nan():
    values, transform = world_raster(
        [10.5, 10.9, -45.0], [20.2, 20.7, 170.0], [1.0, 3.0, -2.0], 1.0
    )
    assert values.shape == (180, 360) and values.dtype == np.float32
    assert transform == (1.0, 0.0, -180.0, 0.0, -1.0, 90.0)
    assert values[79, 200] == pytest.approx(2.0)  # both points of the cell, averaged
    assert values[135, 350] == pytest.approx(-2.0)
    assert np.isnan(values).sum() == 180 * 360 - 2


def test_infer_cell_deg_of_a_grid():
    lats, lons = np.meshgrid(np.arange(-89, 90, 2.0), np.arange(-179, 180, 2.0), indexing="ij")
    assert infer_cell_deg(lats.ravel(), lons.ravel()) == pytest.approx(2.0)


@pytest.mark.skipif(importlib.util.find_spec("rasterio") is None, reason="rasterio not installed")
def test_geotiff_is_georeferenced(tmp_path):
    import rasterio

    out = write_points_geotiff(
        [48.85, -33.9], [2.35, 151.2], [0.75, -0.25], tmp_path / "m.tif", cell_deg=2.0
    )
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.dtypes == ("float32",)
        assert np.isnan(ds.nodata)
        band = ds.read(1)
        # The transform takes a known lat/lon to the cell holding its value.
        for (lat, lon), v in (((48.85, 2.35), 0.75), ((-33.9, 151.2), -0.25)):
            row, col = ds.index(lon, lat)
            assert band[row, col] == pytest.approx(v)
            assert next(ds.sample([(lon, lat)]))[0] == pytest.approx(v)
        assert np.isnan(band).sum() == band.size - 2
        assert ds.bounds == (-180.0, -90.0, 180.0, 90.0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]  # no temp file left


def test_png_written(tmp_path):
    rng = np.random.default_rng(0)
    lats, lons = np.meshgrid(np.arange(-85, 90, 10.0), np.arange(-175, 180, 10.0), indexing="ij")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coastlines are skipped without the world extra
        out = plot_world_map(
            lats.ravel(),
            lons.ravel(),
            rng.random(lats.size),
            tmp_path / "map.png",
            'text: "a busy city centre"',
        )
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_world_maps_of_scattered_places_stay_small_and_cells_land_where_they_are(tmp_path, monkeypatch):
    """Scattered places (a tiny smallest gap) get a grid a PNG can show, not one of terabytes; a
    grid finer than that is refused; a cell size that does not divide 360 is drawn at its own
    place; GeoTIFF tags say what the values are."""
    import matplotlib.axes

    rng = np.random.default_rng(0)
    lats, lons = rng.uniform(-60, 60, 2000), rng.uniform(-170, 170, 2000)
    lons[1] = lons[0] + 1e-5  # two places almost on top of each other
    extents = []
    real = matplotlib.axes.Axes.imshow

    def imshow(self, values, *args, **kw):
        extents.append((values.shape, kw["extent"]))
        return real(self, values, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", imshow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plot_world_map(lats, lons, rng.random(2000), tmp_path / "m.png", "scattered")
        plot_world_map([10.0], [103.5], [1.0], tmp_path / "c.png", "one cell", cell_deg=7.0)
    (h, w), _ = extents[0]
    assert h * w <= 2048 * 1024
    assert extents[1] == ((26, 52), (-180, -180 + 52 * 7.0, 90 - 26 * 7.0, 90))
    with pytest.raises(ValueError, match="use 0.0439453 degrees or more"):
        world_raster([0.0], [0.0], [1.0], 0.01)
    if importlib.util.find_spec("rasterio") is not None:
        import rasterio

        out = write_points_geotiff([1.0], [2.0], [0.5], tmp_path / "t.tif", cell_deg=2.0,
                                   tags={"query": "text query: forest", "score": "cosine"})
        with rasterio.open(out) as ds:
            assert ds.tags()["query"] == "text query: forest" and ds.tags()["software"] == "geobind"
