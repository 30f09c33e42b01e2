"""Zero-shot maps: the similarity of every raster tile or every place to a query.

Two sources:

* a **raster** (GeoTIFF or any georeferenced image rasterio reads): cut into ``tile_size``
  pixel tiles every ``stride`` pixels (only whole tiles), each embedded with the satellite
  encoder; raw values become 8-bit pixels as the ``geotiff`` layout makes them for training
  (``pixel_scale``: 8-bit as is, other rasters stretched per tile, or a fixed white value).
  Tiles are read window by window, so rasters larger than memory work. The output grid has
  one cell per tile, centred on the tile's centre and ``stride`` source pixels wide,
  in the raster's CRS: ``transform = raster.transform * translation((T - S) / 2) * scale(S)``
  (with ``stride == tile_size`` a cell is exactly its tile's footprint). Tiles that are more
  than half nodata (a scene's edge) get no score.
* **point embeddings** (``geobind embed`` output or an index): one score per place; the GeoTIFF
  grids them in EPSG:4326 at ``resolution`` degrees (the mean score of the places in each
  cell; empty cells are nodata).

Scores (written into every output so a reader knows what they mean):

* ``cosine`` (default): the cosine similarity between the place's embedding and the query's
  unit vector, in [-1, 1]. Only differences between places matter: absolute values depend on
  the model and the modality pair.
* ``softmax`` (when ``prompts`` are given): the probability that the query, rather than one of
  the prompts, describes the place: ``softmax_j(scale * cos(place, p_j))`` taken at the query,
  over the set ``[query, *prompts]``; ``scale`` is the model's learned logit scale (CLIP's is
  100) unless given. Values in [0, 1] that sum to 1 over the set.

Outputs: a float32 GeoTIFF (NaN nodata, the query and score kind in its tags), a PNG with a
colour bar and the query in the title, and a CSV of per-tile (or per-place) lat, lon and score.
Each is written atomically and never overwrites an existing file without ``force``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from geobind.data.media import stretch_bands
from geobind.search.common import atomic_path, atomic_paths, check_writable, writes_named

if TYPE_CHECKING:
    from geobind.model import GeoBind

GEO_HINT = "pip install 'geobind[geo]'"
SCORE_LABELS = {
    "cosine": "cosine similarity to the query",
    "softmax": "P(query | place), softmax over the query and {n} prompts",
}
CHUNK_ROWS = 262_144
# Largest point-map grid (4096 x 4096): the per-cell sums, the GeoTIFF and the PNG of a finer grid
# take gigabytes, and a PNG cannot show more cells than it has pixels anyway.
MAX_GRID_CELLS = 4096 * 4096
# Bytes per grid cell while a point map is made: a count and a sum (float64) and the value (float32).
GRID_CELL_BYTES = 20


def import_rasterio():
    """Import rasterio or raise an error naming the extra that installs it."""
    try:
        import rasterio
    except ImportError:
        raise ImportError(f"raster maps and GeoTIFF output need rasterio: {GEO_HINT}") from None
    return rasterio


# -- scores ----------------------------------------------------------------------------------
def score_matrix(
    vectors: np.ndarray | torch.Tensor, queries: np.ndarray | torch.Tensor, *, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """Cosine scores ``[N, Q]`` (float32) of ``N`` unit vectors against ``Q`` unit queries, in
    chunks of rows (float16 vectors are widened chunk by chunk), within [-1, 1] (float16
    rounding can carry a product of unit vectors just past 1)."""
    from geobind.search.index import _as_f32_tensor

    q = _as_f32_tensor(queries)
    if q.ndim == 1:
        q = q[None]
    n = vectors.shape[0]
    if isinstance(vectors, torch.Tensor) and vectors.dtype == torch.float32:
        return (vectors @ q.T).clamp_(-1.0, 1.0).numpy()
    out = np.empty((n, q.shape[0]), dtype=np.float32)
    for start in range(0, n, chunk_rows):
        block = _as_f32_tensor(vectors[start : start + chunk_rows])
        out[start : start + block.shape[0]] = (block @ q.T).clamp_(-1.0, 1.0).numpy()
    return out


def scores(
    vectors: np.ndarray | torch.Tensor,
    query: np.ndarray | torch.Tensor,
    *,
    prompts: np.ndarray | torch.Tensor | None = None,
    scale: float = 100.0,
) -> tuple[np.ndarray, str]:
    """Per-row scores of ``vectors`` for one query vector: ``(scores [N], kind)``.

    Without ``prompts``: cosine similarity. With ``prompts`` (unit vectors ``[P, D]``): the
    softmax probability of the query over ``[query, *prompts]`` at logit scale ``scale``."""
    q = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(1, -1)
    if prompts is None or len(prompts) == 0:
        return score_matrix(vectors, q)[:, 0], "cosine"
    p = torch.as_tensor(np.asarray(prompts, dtype=np.float32)).reshape(-1, q.shape[1])
    logits = torch.from_numpy(score_matrix(vectors, torch.cat([q, p]))) * float(scale)
    return torch.softmax(logits, dim=1)[:, 0].numpy(), "softmax"


# -- result ----------------------------------------------------------------------------------
@dataclass
class MapResult:
    """A map: a grid of scores with its georeferencing, plus the per-tile/per-place table."""

    # [rows, cols] float32 scores; NaN where there is no data.
    values: np.ndarray
    # Affine transform of the grid (rasterio / GDAL convention: pixel -> CRS coordinates).
    transform: Any
    # CRS of the grid (a rasterio CRS or an "EPSG:4326"-style string).
    crs: Any
    # The query in words ('"forest" + audio rain.wav').
    query: str
    # "cosine" or "softmax" (see the module doc).
    score: str
    # Per tile: row, col, x, y, lat, lon, score; per place: id, lat, lon, score.
    table: pd.DataFrame
    # "raster" or "points".
    source: str
    # Number of prompts the softmax ran over (0 for cosine).
    n_prompts: int = 0
    # Files written by :meth:`write` (kind -> path).
    paths: dict[str, Path] = field(default_factory=dict)
    # The prompts (texts) and logit scale of a softmax map, recorded in the GeoTIFF's tags.
    prompts: list[str] = field(default_factory=list)
    logit_scale: float | None = None

    @property
    def score_label(self) -> str:
        """What the scores are, in words (for legends and headers)."""
        return SCORE_LABELS[self.score].format(n=self.n_prompts)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)`` of the grid in its CRS."""
        t = self.transform
        rows, cols = self.values.shape
        xs = [t.c, t.c + t.a * cols]
        ys = [t.f, t.f + t.e * rows]
        return min(xs), min(ys), max(xs), max(ys)

    def bounds_latlon(self) -> tuple[float, float, float, float]:
        """``(west, south, east, north)`` in degrees (EPSG:4326), e.g. for a web map overlay."""
        if _is_4326(self.crs):
            return self.bounds
        from rasterio.warp import transform_bounds

        return tuple(transform_bounds(self.crs, "EPSG:4326", *self.bounds))

    def write(
        self,
        tif: str | Path | None = None,
        *,
        png: str | Path | None = None,
        csv: str | Path | None = None,
        force: bool = False,
    ) -> dict[str, Path]:
        """Write the GeoTIFF, PNG and CSV that are named (each atomic; none is overwritten
        without ``force``, and all are checked before any is written)."""
        check_writable(tif, png, csv, force=force)
        writers = {"tif": write_geotiff, "png": write_png, "csv": write_csv}
        wanted = {k: Path(p) for k, p in (("tif", tif), ("png", png), ("csv", csv)) if p is not None}
        # Each is written to its temporary, and all are renamed into place at the end: a full disk
        # or a Ctrl-C leaves no map without its PNG, and no GeoTIFF of one query beside the PNG
        # and CSV of another (--force).
        with atomic_paths(wanted, force=force) as tmps:
            for k, p in wanted.items():
                with writes_named(p):
                    writers[k](self, p, force=force, into=tmps[k])
        self.paths.update(wanted)
        return dict(self.paths)

    def overlay_png(
        self, *, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None
    ) -> bytes:
        """The grid as a bare RGBA PNG (no axes; nodata transparent), north up: an overlay for a
        web map over :meth:`bounds_latlon` (exact for EPSG:4326 grids)."""
        from matplotlib import colormaps
        from PIL import Image

        v = self.values
        lo, hi = _limits(v, vmin, vmax)
        norm = np.clip((v - lo) / (hi - lo), 0, 1)
        rgba = (colormaps[cmap](np.nan_to_num(norm)) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(np.isfinite(v), 210, 0)
        buf = io.BytesIO()
        # zlib's fastest level: a web overlay made per request (3x faster on a 700 x 2000 grid
        # than the default level 6, and no larger there)
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


def _is_4326(crs) -> bool:
    if isinstance(crs, str):
        return crs.upper() == "EPSG:4326"
    try:
        return crs.to_epsg() == 4326
    except Exception:
        return False


def _limits(v: np.ndarray, vmin, vmax) -> tuple[float, float]:
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if vmin is None and finite.size else float(vmin or 0.0)
    hi = (
        float(finite.max())
        if vmax is None and finite.size
        else float(vmax if vmax is not None else 1.0)
    )
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi


# -- writers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _target(path: str | Path, force: bool, into: Path | None):
    """``into`` (a temporary that :meth:`MapResult.write` renames with the others), or an atomic
    temporary of ``path`` of its own."""
    if into is not None:
        yield into
        return
    with atomic_path(path, force=force) as tmp:
        yield tmp


def write_geotiff(result: MapResult, path: str | Path, *, force: bool = False, into: Path | None = None) -> Path:
    """One float32 band (NaN nodata) in the map's CRS and transform; tags record the query and
    what the scores mean."""
    rasterio = import_rasterio()
    rows, cols = result.values.shape
    profile = {
        "driver": "GTiff",
        "height": rows,
        "width": cols,
        "count": 1,
        "dtype": "float32",
        "crs": result.crs,
        "transform": result.transform,
        "nodata": float("nan"),
        "compress": "deflate",
    }
    with _target(path, force, into) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(result.values.astype(np.float32), 1)
            dst.update_tags(
                query=result.query,
                score=result.score,
                score_meaning=result.score_label,
                source=result.source,
                software="geobind",
                **(
                    {"prompts": json.dumps(result.prompts), "logit_scale": f"{result.logit_scale:g}"}
                    if result.score == "softmax" and result.prompts
                    else {}
                ),
            )
            dst.set_band_description(1, f"{result.score}: {result.query}")
    return Path(path)


def write_csv(result: MapResult, path: str | Path, *, force: bool = False, into: Path | None = None) -> Path:
    """Per-tile or per-place rows with lat, lon and score (higher = more like the query)."""
    with _target(path, force, into) as tmp:
        # 10 significant digits: UTM metres to the millimetre, degrees to 1e-7 (about 1 cm).
        result.table.to_csv(tmp, index=False, float_format="%.10g")
    return Path(path)


def write_png(
    result: MapResult, path: str | Path, *, force: bool = False, cmap: str = "viridis", into: Path | None = None
) -> Path:
    """A figure: the map with a colour bar naming the score, the query in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    west, south, east, north = result.bounds
    aspect = (north - south) / max(east - west, 1e-9)
    fig = Figure(figsize=(9, max(3.0, min(9.0, 7.5 * aspect)) + 1.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = _limits(result.values, None, None)
    t = result.table
    if result.source == "points" and len(t) <= 50_000:
        # the dots show each place's own score: the colour scale spans those, not the cell means
        lo, hi = _limits(t["score"].to_numpy(dtype=np.float64), None, None)
        size = max(2.0, min(40.0, 20000.0 / max(len(t), 1)))
        lon = unwrap_longitudes(t["lon"].to_numpy(dtype=np.float64))  # as gridded (antimeridian)
        art = ax.scatter(
            lon, t["lat"], c=t["score"], s=size, cmap=cmap, vmin=lo, vmax=hi, linewidths=0
        )
        pad = 0.03 * max(east - west, north - south)
        ax.set_xlim(west - pad, east + pad)
        ax.set_ylim(south - pad, north + pad)
    else:
        art = ax.imshow(
            np.ma.masked_invalid(result.values),
            extent=(west, east, south, north),
            cmap=cmap,
            vmin=lo,
            vmax=hi,
            interpolation="nearest",
            origin="upper",
        )
    if _is_4326(result.crs):
        ax.set_xlabel("longitude (°)")
        ax.set_ylabel("latitude (°)")
        ax.set_aspect("equal")
    else:
        ax.set_xlabel(f"x ({_crs_name(result.crs)})")
        ax.set_ylabel(f"y ({_crs_name(result.crs)})")
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.set_aspect("equal")
    cb = fig.colorbar(art, ax=ax, shrink=0.85)
    cb.set_label(result.score_label)
    title = f"GeoBind map: {result.query}"
    title = title if len(title) < 100 else title[:97] + "..."
    scored = int(np.isfinite(t["score"]).sum()) if "score" in t else len(t)  # not the all-nodata tiles
    what = f"{scored} {'raster tiles' if result.source == 'raster' else 'places'}"
    ax.set_title(f"{title}\n{what}", fontsize=11)
    with _target(path, force, into) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def _crs_name(crs) -> str:
    try:
        epsg = crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else "CRS"
    except Exception:
        return str(crs)


# -- raster maps -----------------------------------------------------------------------------
def tile_grid(width: int, height: int, tile_size: int, stride: int) -> tuple[int, int]:
    """``(rows, cols)`` of whole tiles of ``tile_size`` px every ``stride`` px."""
    if tile_size < 1 or stride < 1:
        raise ValueError("tile size and stride must be positive")
    if width < tile_size or height < tile_size:
        raise ValueError(
            f"the raster ({width} x {height} px) is smaller than one tile ({tile_size} px)"
        )
    return (height - tile_size) // stride + 1, (width - tile_size) // stride + 1


def open_georeferenced(path: str | Path):
    """Open a raster with rasterio; an error naming the problem when it has no georeferencing."""
    rasterio = import_rasterio()
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"raster {path} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            src = rasterio.open(path)
        except RasterioIOError as e:
            raise ValueError(f"raster {path} cannot be read: {e}") from None
    if src.crs is None or src.transform.is_identity:
        src.close()
        missing = "a CRS" if src.crs is None else "a geotransform"
        raise ValueError(
            f"raster {path} has no georeferencing (it lacks {missing}); a map needs a georeferenced "
            "raster such as a GeoTIFF with a CRS (assign one with `gdal_translate -a_srs ... -a_ullr ...`)"
        )
    return src


PIXEL_SCALES = ("auto", "raster")
# A raster tile with more of its pixels nodata than this gets no score (NaN).
MAX_NODATA_SHARE = 0.5


def check_pixel_scale(pixel_scale: str | float) -> str | float:
    """``pixel_scale`` as :func:`raster_tiles` takes it: ``"auto"``, ``"raster"`` or a positive
    number (a string such as ``"3000"`` is read as one); a ``ValueError`` otherwise."""
    if isinstance(pixel_scale, str) and pixel_scale in PIXEL_SCALES:
        return pixel_scale
    try:
        value = float(pixel_scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"pixel scale {pixel_scale!r}: give auto (as the geotiff layout: 8-bit as is, other "
                         "rasters stretched per tile), raster (one stretch over the whole raster) or the "
                         "value shown as white, e.g. 3000 for Sentinel-2 reflectances")
    return value


def _scaler(src, bands: Sequence[int], pixel_scale: str | float = "auto") -> Callable[[np.ma.MaskedArray], np.ndarray]:
    """Map a tile's raw band values (no data masked) to uint8, as the ``geotiff`` layout reads
    its tiles for training and ``geobind embed`` (``pixel_scale`` is that layout's ``scale``):

    * ``"auto"``: 8-bit rasters as they are; other types stretched per tile and band between
      the 2nd and 98th percentiles of the valid values;
    * a number: the value shown as white (``x / pixel_scale * 255``, clipped);
    * ``"raster"``: one 2-98 percentile stretch per band for the whole raster, estimated from a
      decimated read (every tile scaled the same way; 8-bit rasters as they are).
    """
    pixel_scale = check_pixel_scale(pixel_scale)
    eight_bit = all(src.dtypes[b - 1] == "uint8" for b in bands)
    if isinstance(pixel_scale, float):
        return lambda x: np.clip(np.ma.filled(x.astype(np.float64), 0) / pixel_scale * 255.0, 0, 255).astype(np.uint8)
    if eight_bit:
        return lambda x: np.ma.filled(x, 0)
    if pixel_scale == "auto":
        return lambda x: stretch_bands(np.ma.filled(x.astype(np.float64), 0), ~np.ma.getmaskarray(x))
    step = max(1, int(np.ceil(max(src.width, src.height) / 1024)))
    small = src.read(
        list(bands),
        out_shape=(len(bands), max(1, src.height // step), max(1, src.width // step)),
        masked=True,
    ).astype(np.float64)
    lo, hi = [], []
    for b in range(len(bands)):
        v = small[b].compressed()
        v = v[np.isfinite(v)]
        lo.append(np.percentile(v, 2) if v.size else 0.0)
        hi.append(np.percentile(v, 98) if v.size else 1.0)
    lo_a = np.array(lo)[:, None, None]
    span = np.maximum(np.array(hi)[:, None, None] - lo_a, 1e-12)
    return lambda x: np.clip((np.ma.filled(x.astype(np.float64), 0) - lo_a) / span * 255.0, 0, 255).astype(np.uint8)


def _bands(src, bands: Sequence[int] | None) -> list[int]:
    if bands:
        if len(bands) not in (1, 3):
            raise ValueError(f"bands {list(bands)}: give 1 band (grey) or 3 (red, green, blue), e.g. --bands 4,3,2")
        bad = [b for b in bands if not 1 <= b <= src.count]
        if bad:
            raise ValueError(f"band(s) {bad} out of range: the raster has {src.count} band(s)")
        return list(bands)
    if src.count >= 3:
        return [1, 2, 3]
    return [1]


def raster_tiles(src, tile_size: int, stride: int, bands: Sequence[int] | None = None,
                 pixel_scale: str | float = "auto"):
    """Yield ``(row, col, tile)`` for every whole tile, ``tile`` an ``H x W x 3`` uint8 array
    (values scaled as :func:`_scaler` says for ``pixel_scale``) or ``None`` when more than
    ``MAX_NODATA_SHARE`` of its pixels are nodata. Reads one window per tile."""
    from rasterio.windows import Window

    bands = _bands(src, bands)
    rows, cols = tile_grid(src.width, src.height, tile_size, stride)
    to8 = _scaler(src, bands, pixel_scale)
    for r in range(rows):
        for c in range(cols):
            w = Window(c * stride, r * stride, tile_size, tile_size)
            # NaN is no data too, declared or not (float rasters often leave nodata unset).
            data = np.ma.masked_invalid(src.read(bands, window=w, masked=True))
            if np.ma.getmaskarray(data).any(axis=0).mean() > MAX_NODATA_SHARE:
                yield r, c, None  # a scene's edge: the encoder would see mostly fill, not ground
                continue
            arr = to8(data)
            if arr.shape[0] == 1:
                arr = np.repeat(arr, 3, axis=0)
            yield r, c, np.ascontiguousarray(arr.transpose(1, 2, 0))


def tile_transform(t, tile_size: int, stride: int):
    """The output grid's transform: ``t * translation((T - S) / 2) * scale(S)``: cell (r, c) is
    centred on tile (r, c)'s centre and ``stride`` source pixels wide."""
    from affine import Affine  # installed with rasterio, which raster maps need anyway

    off = (tile_size - stride) / 2.0
    return Affine(
        t.a * stride,
        t.b * stride,
        t.c + (t.a + t.b) * off,
        t.d * stride,
        t.e * stride,
        t.f + (t.d + t.e) * off,
    )


def map_raster(
    model: GeoBind,
    query: np.ndarray | torch.Tensor,
    raster: str | Path,
    tile_size: int,
    stride: int | None = None,
    *,
    modality: str = "satellite",
    bands: Sequence[int] | None = None,
    prompts: np.ndarray | torch.Tensor | None = None,
    scale: float = 100.0,
    label: str = "",
    batch_size: int = 32,
    progress: bool = False,
    pixel_scale: str | float = "auto",
) -> MapResult:
    """Score every tile of ``raster`` against the unit query vector ``query``; see the module
    doc for the grid, the transform and the scores. ``pixel_scale`` turns raw values into
    8-bit pixels as the ``geotiff`` layout's ``scale`` does (:func:`_scaler`)."""
    stride = int(stride or tile_size)
    tile_size = int(tile_size)
    src = open_georeferenced(raster)
    try:
        rows, cols = tile_grid(src.width, src.height, tile_size, stride)
        values = np.full((rows, cols), np.nan, dtype=np.float32)
        flat = values.reshape(-1)  # a view: tiles are scored batch by batch, never all held
        kind = "cosine" if prompts is None or len(prompts) == 0 else "softmax"
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rows * cols, desc=f"map {modality} tiles", unit="tile")
        pending: list[tuple[int, np.ndarray]] = []

        def flush():
            if pending:
                e = model.embed(modality, [t for _, t in pending], batch_size=batch_size)
                flat[[i for i, _ in pending]] = scores(e, query, prompts=prompts, scale=scale)[0]
                if bar is not None:
                    bar.update(len(pending))
                pending.clear()

        for r, c, tile in raster_tiles(src, tile_size, stride, bands, pixel_scale):
            if tile is None:
                if bar is not None:
                    bar.update(1)
                continue
            pending.append((r * cols + c, tile))
            if len(pending) >= batch_size:
                flush()
        flush()
        if bar is not None:
            bar.close()
        transform = tile_transform(src.transform, tile_size, stride)
        rr, cc = np.divmod(np.arange(rows * cols), cols)
        t = src.transform
        px, py = (
            cc * stride + tile_size / 2.0,
            rr * stride + tile_size / 2.0,
        )  # tile centres (pixels)
        xs, ys = t.a * px + t.b * py + t.c, t.d * px + t.e * py + t.f
        lon, lat = _to_latlon(src.crs, xs, ys)
        table = pd.DataFrame(
            {"row": rr, "col": cc, "lat": lat, "lon": lon, "x": xs, "y": ys, "score": flat}
        )
        crs = src.crs
    finally:
        src.close()
    return MapResult(
        values,
        transform,
        crs,
        label or "query",
        kind,
        table,
        "raster",
        n_prompts=0 if prompts is None else len(prompts),
    )


def _to_latlon(crs, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if _is_4326(crs):
        return xs, ys
    from rasterio.warp import transform

    lon, lat = transform(crs, "EPSG:4326", xs.tolist(), ys.tolist())
    return np.asarray(lon), np.asarray(lat)


def _affine(a: float, b: float, c: float, d: float, e: float, f: float):
    """An ``affine.Affine`` (installed with rasterio); a plain stand-in without it, so point maps
    still give their PNG and CSV when the geo extra is not installed."""
    try:
        from affine import Affine

        return Affine(a, b, c, d, e, f)
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(a=a, b=b, c=c, d=d, e=e, f=f)


# -- point maps ------------------------------------------------------------------------------
def auto_resolution(lat: np.ndarray, lon: np.ndarray, max_cells: int = 2048) -> float:
    """A grid step in degrees for point maps: the spacing of the points when they lie on a
    regular grid (the median gap between distinct coordinates), never finer than
    ``span / max_cells``."""
    steps = []
    spans = []
    for v in (np.asarray(lat), np.asarray(lon)):
        u = np.unique(np.round(v, 6))
        spans.append(float(u[-1] - u[0]) if u.size else 0.0)
        if u.size > 1:
            steps.append(float(np.median(np.diff(u))))
    span = max(spans)
    if not steps or span == 0:
        return 1.0
    res = min(steps)
    return float(max(res, span / max_cells))


def default_resolution(lat: np.ndarray, lon: np.ndarray) -> float:
    """Grid step (degrees) of a point map: the places' own spacing when they are dense (tiles on
    a grid, :func:`auto_resolution`), coarser when they are sparse (a few hundred places over
    the world would otherwise be specks in an empty grid), so that each place covers a visible
    cell; at most 10 degrees."""
    lat, lon = np.asarray(lat), np.asarray(lon)
    if len(lat) == 0:
        return 1.0
    base = auto_resolution(lat, lon)
    area = max(float(np.ptp(lat)), 1e-6) * max(float(np.ptp(lon)), 1e-6)
    sparse = float(np.sqrt(area / len(lat)) / 2)
    if sparse <= base:
        return base
    # Places evenly spaced but not on a lat/lon lattice (tile centres of a projected grid, whose
    # longitude spacing is wider than their latitude spacing away from the equator) would leave
    # a mesh of empty cells at half their spacing: take the finest step, up to three times that,
    # at which almost no cell between two filled ones in a row is empty. Scattered places never
    # get there (about a tenth of such cells stay empty at three times), and keep ``sparse``.
    for step in sparse * np.linspace(1.0, 3.0, 21):
        if step > 10.0 or _interior_holes(lat, lon, float(step)) > EVEN_HOLES:
            continue
        return float(step)
    return float(min(sparse, 10.0))


# The share of a row's inner cells that may be empty for places to count as evenly spaced.
EVEN_HOLES = 0.03


def _interior_holes(lat: np.ndarray, lon: np.ndarray, res: float) -> float:
    """The share of empty cells between the first and last filled cell of each row of the grid
    :func:`points_grid` lays over the places at ``res`` degrees."""
    rows, cols = _grid_shape(lat, lon, res)
    if rows * cols > MAX_GRID_CELLS:  # finer than any map is made: not a candidate
        return 1.0
    r, c, _, _ = _cells(lat, lon, res, rows, cols)
    filled = np.zeros((rows, cols), dtype=bool)
    filled[r, c] = True
    used = filled.any(axis=1)
    first = filled.argmax(axis=1)
    last = cols - 1 - filled[:, ::-1].argmax(axis=1)
    span = int((last - first + 1)[used].sum())
    return 1.0 - int(filled.sum()) / max(span, 1)


def map_points(
    vectors: np.ndarray | torch.Tensor,
    lat: np.ndarray,
    lon: np.ndarray,
    ids: Sequence[str],
    query: np.ndarray | torch.Tensor,
    *,
    resolution: float | None = None,
    prompts: np.ndarray | torch.Tensor | None = None,
    scale: float = 100.0,
    label: str = "",
) -> MapResult:
    """Score every place against the unit query vector ``query``; grid the scores in EPSG:4326
    at ``resolution`` degrees (mean per cell; default :func:`auto_resolution`)."""
    q = np.asarray(query, dtype=np.float32).reshape(1, -1)
    return map_points_many(
        vectors,
        lat,
        lon,
        ids,
        q,
        labels=[label or "query"],
        resolution=resolution,
        prompts=prompts,
        scale=scale,
    )[0]


def map_points_many(
    vectors: np.ndarray | torch.Tensor,
    lat: np.ndarray,
    lon: np.ndarray,
    ids: Sequence[str],
    queries: np.ndarray | torch.Tensor,
    *,
    labels: Sequence[str] | None = None,
    resolution: float | None = None,
    prompts: np.ndarray | torch.Tensor | None = None,
    scale: float = 100.0,
) -> list[MapResult]:
    """One map per row of ``queries`` ``[Q, D]`` over the same places: the vectors are read once
    (one ``[N, Q]`` matrix product) and the places are assigned to grid cells once."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if len(lat) == 0:
        raise ValueError("no places to map: the embeddings are empty")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
        raise ValueError("some places have no coordinates (NaN latitude or longitude): drop them before mapping")
    # Places on both sides of the antimeridian (Fiji, the Aleutians) are gridded in longitudes
    # that run on past 180 (GDAL and QGIS read EPSG:4326 grids beyond 180 degrees), not over the
    # whole world; the table keeps the places' own longitudes.
    glon = unwrap_longitudes(lon)
    # The grid first: a resolution too fine for memory is refused before any work.
    cell, rows, cols, transform = points_grid(lat, glon, float(resolution or default_resolution(lat, glon)))
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    q = q.reshape(-1, q.shape[-1])
    nq = q.shape[0]
    labels = list(labels) if labels is not None else [f"query {i + 1}" for i in range(nq)]
    n_prompts = 0 if prompts is None else len(prompts)
    if n_prompts:
        p = torch.as_tensor(np.asarray(prompts, dtype=np.float32)).reshape(n_prompts, -1)
        cos = torch.from_numpy(score_matrix(vectors, torch.cat([q, p])))
        all_scores = [
            torch.softmax(torch.cat([cos[:, i : i + 1], cos[:, nq:]], dim=1) * float(scale), dim=1)[
                :, 0
            ].numpy()
            for i in range(nq)
        ]
        kind = "softmax"
    else:
        m = score_matrix(vectors, q)
        all_scores = [m[:, i] for i in range(nq)]
        kind = "cosine"
    count = np.bincount(cell, minlength=rows * cols)
    id_col = np.asarray(ids, dtype=object)
    out = []
    for label, sc in zip(labels, all_scores):
        values = cell_means(cell, count, sc, rows, cols)
        table = pd.DataFrame({"id": id_col, "lat": lat, "lon": lon, "score": sc}, copy=False)
        out.append(
            MapResult(
                values, transform, "EPSG:4326", label, kind, table, "points", n_prompts=n_prompts
            )
        )
    return out


def cell_means(cell: np.ndarray, count: np.ndarray, scores: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The mean of ``scores`` per grid cell (``cell``: each place's cell; ``count``: places per
    cell), as a float32 ``rows x cols`` grid, NaN where a cell holds no place."""
    total = np.bincount(cell, weights=scores, minlength=rows * cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(np.float32).reshape(rows, cols)


def unwrap_longitudes(lon: np.ndarray) -> np.ndarray:
    """``lon`` shifted by 360 degrees when the places lie on both sides of the antimeridian
    within less than half the world: the grid then starts after the places' largest gap in
    longitude (unchanged when that gap already spans the antimeridian, or the places span
    more than 180 degrees)."""
    u = np.unique(np.asarray(lon, dtype=np.float64))
    if u.size < 2:
        return lon
    gaps = np.diff(u)
    i = int(np.argmax(gaps))
    # only places within half the world: a world-wide set keeps its -180..180 frame
    if gaps[i] <= max(360.0 - (u[-1] - u[0]), 180.0):
        return lon
    start = u[i + 1]
    return np.where(lon < start, lon + 360.0, lon)


def points_grid(lat: np.ndarray, lon: np.ndarray, res: float) -> tuple[np.ndarray, int, int, Any]:
    """The grid of a point map: ``res``-degree cells over the points' bounding box, a point at
    each cell's centre on a regular grid. Returns ``(cell index of each point, rows, cols,
    affine transform)``."""
    if not res > 0:
        raise ValueError("resolution must be positive")
    rows, cols = _grid_shape(lat, lon, res)
    if rows * cols > MAX_GRID_CELLS:
        fits, cells = res, rows * cols
        while cells > MAX_GRID_CELLS:  # cells shrink like 1/res^2 (1/res for places on a line)
            fits = max(fits * 1.05, fits * float(np.sqrt(cells / MAX_GRID_CELLS)))
            cells = int(np.prod(_grid_shape(lat, lon, fits)))
        fits = _round_up(fits)
        raise ValueError(
            f"a point map at a resolution of {res:g} degrees over the places (lat {lat.min():.4g} to "
            f"{lat.max():.4g}, lon {lon.min():.4g} to {lon.max():.4g}) is a {rows:,} x {cols:,} grid: "
            f"{rows * cols:,} cells, which would need at least {_bytes(rows * cols * GRID_CELL_BYTES)} of "
            f"memory (at most {MAX_GRID_CELLS:,} cells are made). Use a coarser resolution "
            f"(--resolution; {fits:g} or more here; leave it out to take one from the places), or map the "
            "embeddings of a smaller region"
        )
    r, c, west, north = _cells(lat, lon, res, rows, cols)
    return r * cols + c, rows, cols, _affine(res, 0.0, west, 0.0, -res, north)


def _cells(lat: np.ndarray, lon: np.ndarray, res: float, rows: int, cols: int):
    """``(row, col, west, north)``: each point's cell in the ``rows x cols`` grid of
    :func:`_grid_shape`."""
    west, north, _, _ = _frame(lat, lon, res)
    c = np.clip(np.floor((lon - west) / res).astype(np.int64), 0, cols - 1)
    r = np.clip(np.floor((north - lat) / res).astype(np.int64), 0, rows - 1)
    return r, c, west, north


def _grid_shape(lat: np.ndarray, lon: np.ndarray, res: float) -> tuple[int, int]:
    """``(rows, cols)`` of the ``res``-degree grid that :func:`points_grid` lays over the points."""
    return _frame(lat, lon, res)[2:]


def _frame(lat: np.ndarray, lon: np.ndarray, res: float) -> tuple[float, float, int, int]:
    """``(west, north, rows, cols)`` of the grid over the points: its first cells are centred on
    the westmost and northmost points, but the grid stops at the poles (cells past 90 degrees
    are no place on Earth): its north edge is at most 90 N, and its south edge is raised to 90 S where the rows allow."""
    west = float(lon.min()) - res / 2
    cols = max(1, int(np.ceil((float(lon.max()) + res / 2 - west) / res - 1e-9)))
    north = min(float(lat.max()) + res / 2, 90.0)
    south = max(float(lat.min()) - res / 2, -90.0)
    rows = max(1, int(np.ceil((north - south) / res - 1e-9)))
    if north - rows * res < -90.0:  # the last row reaches past the south pole: move the grid up
        north = min(90.0, -90.0 + rows * res)
    return west, north, rows, cols


def _round_up(x: float) -> float:
    """``x`` rounded up to two significant digits (a resolution to suggest)."""
    scale = 10.0 ** (np.floor(np.log10(x)) - 1)
    return float(np.ceil(x / scale - 1e-9) * scale)


def _bytes(n: float) -> str:
    """``n`` bytes in words: ``"3.2 GiB"``."""
    unit = "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            break
        n, unit = n / 1024, bigger
    return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"


# Suffixes of formats a map is not written in: a file so named would hold a GeoTIFF.
OTHER_FORMATS = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".json", ".parquet", ".txt", ".npy", ".geojson")


def default_outputs(out: str | Path) -> dict[str, Path]:
    """``map.tif`` -> ``{"tif": map.tif, "png": map.png, "csv": map.csv}``. A name ending in
    ``.png`` or ``.csv`` names that output, the others beside it (``map.png`` -> ``map.tif``,
    ``map.png``, ``map.csv``)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix in OTHER_FORMATS:
        raise ValueError(f"{out}: a map is written as a GeoTIFF (.tif), a PNG (.png) and a CSV (.csv), not "
                         f"{suffix}; name the map {out.with_suffix('.tif')}, or one of its outputs")
    if suffix in (".png", ".csv"):
        stem = out.with_suffix("")
        paths = {"tif": stem.with_suffix(".tif"), "png": stem.with_suffix(".png"), "csv": stem.with_suffix(".csv")}
        paths[suffix[1:]] = out
        return paths
    stem = out.with_suffix("") if suffix in (".tif", ".tiff") else out
    return {
        "tif": out if out.suffix else out.with_suffix(".tif"),
        "png": stem.with_suffix(".png"),
        "csv": stem.with_suffix(".csv"),
    }


def output_paths(out: str | Path | None, png: str | Path | None = None, csv: str | Path | None = None, *,
                 hint: str = "") -> dict[str, Path | None]:
    """:func:`default_outputs` of ``out``, with ``png`` and ``csv`` where given; without ``out``,
    only the ``png`` and ``csv`` given (the others ``None``). Raises ``ValueError`` (ending in
    ``hint``) when two outputs are one file."""
    if out is None:
        paths: dict[str, Path | None] = {"tif": None, "png": Path(png) if png else None,
                                         "csv": Path(csv) if csv else None}
        if png and csv and paths["png"].resolve() == paths["csv"].resolve():
            raise ValueError(f"the PNG and CSV outputs must be two different files; got {png} and {csv}{hint}")
        return paths
    paths = default_outputs(out)
    paths["png"] = Path(png) if png else paths["png"]
    paths["csv"] = Path(csv) if csv else paths["csv"]
    if len({p.resolve() for p in paths.values()}) < 3:
        raise ValueError(f"the GeoTIFF, PNG and CSV outputs must be three different files; got "
                         f"{paths['tif']}, {paths['png']} and {paths['csv']}{hint}")
    return paths


def describe(result: MapResult) -> str:
    """A short summary for the command line: the query, what the scores mean, their range and
    the best tile or place."""
    t = result.table[np.isfinite(result.table["score"])]
    points = "id" in t
    # A point map's grid holds the mean score of the places in each cell: summarise the places
    # themselves, so that the range agrees with the best place printed below.
    v = t["score"].to_numpy() if points else result.values[np.isfinite(result.values)]
    lines = [f"query: {result.query}", f"score: {result.score_label}"]
    lines.append(
        f"scores{' (per place)' if points else ''}: min {v.min():.4f}, mean {v.mean():.4f}, max {v.max():.4f}"
        if v.size
        else "scores: no data"
    )
    if len(t):
        b = t.loc[t["score"].idxmax()]
        where = (
            f"id {b['id']}, " if "id" in t else f"tile row {int(b['row'])} col {int(b['col'])}, "
        )
        lines.append(f"best: {where}lat {b['lat']:.4f}, lon {b['lon']:.4f}, score {b['score']:.4f}")
    return "\n".join(lines)


__all__ = [
    "MapResult",
    "auto_resolution",
    "default_outputs",
    "output_paths",
    "map_points",
    "map_points_many",
    "map_raster",
    "open_georeferenced",
    "raster_tiles",
    "score_matrix",
    "scores",
    "tile_grid",
    "tile_transform",
    "write_csv",
    "write_geotiff",
    "write_png",
]
