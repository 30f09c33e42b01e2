"""World maps of scores at points: a PNG for people and a GeoTIFF (EPSG:4326) for GIS tools.

Both rasterise the points onto one regular latitude/longitude grid (:func:`world_raster`): each
cell holds the mean score of the points inside it and NaN where there are none. Coastlines come
from the ``global-land-mask`` package (no cartopy or basemap downloads).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ArrayLike = Sequence[float] | np.ndarray
# Finest world grid: 4096 x 8192 cells (a float32 grid of 128 MiB; a PNG shows far fewer).
MIN_CELL_DEG = 180.0 / 4096
# GDAL/affine order: x = a * col + b * row + c, y = d * col + e * row + f.
Transform = tuple[float, float, float, float, float, float]


def infer_cell_deg(lats: ArrayLike, lons: ArrayLike) -> float:
    """Spacing of points on a regular grid: the smallest gap between distinct coordinates."""
    gaps = []
    for v in (np.asarray(lats, np.float64), np.asarray(lons, np.float64)):
        u = np.unique(np.round(v, 6))
        d = np.diff(u)
        d = d[d > 1e-6]
        if d.size:
            gaps.append(float(d.min()))
    return min(gaps) if gaps else 1.0


def world_raster(
    lats: ArrayLike, lons: ArrayLike, scores: ArrayLike, cell_deg: float
) -> tuple[np.ndarray, Transform]:
    """Rasterise point scores onto a global grid of ``cell_deg`` cells.

    Returns ``(values, transform)``: ``values`` is float32 of shape
    ``(ceil(180 / cell_deg), ceil(360 / cell_deg))``, row 0 at latitude 90 and column 0 at
    longitude -180, holding the mean score of the points in each cell and NaN elsewhere;
    ``transform`` maps (col, row) to (lon, lat) of the cell's top-left corner
    (``affine.Affine(*transform)``).
    """
    if not cell_deg > 0:
        raise ValueError(f"cell_deg must be positive, got {cell_deg}")
    if cell_deg < MIN_CELL_DEG:
        raise ValueError(f"cell_deg={cell_deg:g} makes a world grid of {np.ceil(180 / cell_deg):.0f} x "
                         f"{np.ceil(360 / cell_deg):.0f} cells; use {MIN_CELL_DEG:g} degrees or more")
    lat = np.asarray(lats, dtype=np.float64).ravel()
    lon = np.asarray(lons, dtype=np.float64).ravel()
    val = np.asarray(scores, dtype=np.float64).ravel()
    if not (lat.shape == lon.shape == val.shape):
        raise ValueError(
            f"lats, lons and scores differ in length: {lat.size}, {lon.size}, {val.size}"
        )
    h, w = int(np.ceil(180.0 / cell_deg - 1e-9)), int(np.ceil(360.0 / cell_deg - 1e-9))
    ok = np.isfinite(lat) & np.isfinite(lon) & np.isfinite(val) & (np.abs(lat) <= 90)
    lat, lon, val = lat[ok], lon[ok], val[ok]
    row = np.clip(np.floor((90.0 - lat) / cell_deg).astype(np.int64), 0, h - 1)
    col = np.floor(((lon + 180.0) % 360.0) / cell_deg).astype(np.int64) % w
    total = np.zeros(h * w)
    count = np.zeros(h * w)
    np.add.at(total, row * w + col, val)
    np.add.at(count, row * w + col, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(count > 0, total / count, np.nan).reshape(h, w).astype(np.float32)
    return values, (float(cell_deg), 0.0, -180.0, 0.0, -float(cell_deg), 90.0)


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    from geobind.encoders.base import usual_mode

    usual_mode(tmp)  # mkstemp makes it 0600, and os.replace keeps that
    return Path(tmp)


def land_fraction_grid() -> np.ndarray | None:
    """Land fraction on a 0.2-degree grid of the whole world (north up, from -180 degrees) from
    global-land-mask, or None if it is not installed."""
    try:
        from geobind.data.world.geodata import FEAT_BLOCK, _block_mean, land_at_bm_pixels

        land = land_at_bm_pixels()
    except ImportError:
        return None
    return _block_mean(land.astype(np.float32), FEAT_BLOCK)


def _coast_grid() -> np.ndarray | None:
    """:func:`land_fraction_grid`, with a warning when it is missing."""
    land = land_fraction_grid()
    if land is None:
        warnings.warn(
            "coastlines need global-land-mask: pip install 'geobind[world]'; drawing without",
            stacklevel=3,
        )
    return land


def plot_world_map(
    lats: ArrayLike,
    lons: ArrayLike,
    scores: ArrayLike,
    out_png: str | os.PathLike,
    title: str,
    *,
    cmap: str = "viridis",
    colorbar_label: str = "cosine similarity",
    cell_deg: float | None = None,
    coastlines: bool = True,
) -> Path:
    """Draw point scores as an equirectangular world map (lon -180..180, lat -90..90) with
    coastlines and a colour bar, and write it atomically to ``out_png``.

    ``title`` names the query (e.g. ``'text: "a busy city centre"'``). ``cell_deg`` defaults to
    the points' own grid spacing (:func:`infer_cell_deg`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # scattered places have a tiny smallest gap: never a grid finer than the PNG can show
    cell = cell_deg or max(infer_cell_deg(lats, lons), 360.0 / 2048)
    values, _ = world_raster(lats, lons, scores, cell)
    h, w = values.shape
    # A Figure with its own Agg canvas: no pyplot global state, no GUI backend.
    fig = Figure(figsize=(10, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#e8e8e8")
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    im = ax.imshow(
        np.ma.masked_invalid(values),
        # the grid's own extent: it ends past 180 / -90 when cell does not divide 360 / 180
        extent=(-180, -180 + w * cell, 90 - h * cell, 90),
        origin="upper",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax if vmax > vmin else vmin + 1e-6,
        interpolation="nearest",
        aspect="equal",
    )
    land = _coast_grid() if coastlines else None
    if land is not None:
        h, w = land.shape
        x = -180.0 + (np.arange(w) + 0.5) * 360.0 / w
        y = 90.0 - (np.arange(h) + 0.5) * 180.0 / h
        ax.contour(x, y, land, levels=[0.5], colors="black", linewidths=0.4)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xticks(range(-180, 181, 60))
    ax.set_yticks(range(-90, 91, 30))
    ax.set_xlabel("longitude (°)")
    ax.set_ylabel("latitude (°)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=colorbar_label, shrink=0.8)
    fig.tight_layout()
    out = Path(out_png)
    tmp = _atomic_target(out)
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_points_geotiff(
    lats: ArrayLike,
    lons: ArrayLike,
    scores: ArrayLike,
    out_tif: str | os.PathLike,
    *,
    cell_deg: float,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> Path:
    """Write point scores as a float32 GeoTIFF in EPSG:4326 (NaN nodata), atomically;
    ``description`` names the band (what its values are), as ``geobind map`` does.

    The raster covers the whole Earth in ``cell_deg`` cells (see :func:`world_raster`).
    """
    try:
        import rasterio
        from rasterio.transform import Affine
    except ImportError:
        raise ImportError(
            "GeoTIFF output needs rasterio: pip install 'geobind[geo]' (or 'geobind[world]')"
        ) from None
    values, transform = world_raster(lats, lons, scores, cell_deg)
    out = Path(out_tif)
    tmp = _atomic_target(out)
    try:
        with rasterio.open(
            tmp,
            "w",
            driver="GTiff",
            height=values.shape[0],
            width=values.shape[1],
            count=1,
            dtype="float32",
            crs="EPSG:4326",
            transform=Affine(*transform),
            nodata=float("nan"),
            compress="deflate",
        ) as dst:
            dst.write(values, 1)
            if tags:  # e.g. the query and what the scores are, for whoever opens the file
                dst.update_tags(software="geobind", **tags)
            if description:
                dst.set_band_description(1, description)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


__all__ = ["infer_cell_deg", "plot_world_map", "world_raster", "write_points_geotiff"]
