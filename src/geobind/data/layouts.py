"""Published dataset layouts, read into the same :class:`~geobind.data.manifest.Table` or
:class:`~geobind.data.shards.ShardSet` as GeoBind's own formats.

Choose one with ``layout:`` in a stage's ``data`` (options in ``layout_options:``) or
``--layout`` on the command line:

``shards``
    GeoBind's WebDataset shards (``<key>.satellite.jpg``, ``<key>.ground.jpg``,
    ``<key>.text.txt``, ``<key>.audio.flac``, ``<key>.json`` with ``id``, ``lat``, ``lon``).
``sat2cap``
    Sat2Cap's shards: ``overhead.jpg`` (satellite), ``groundlevel.jpg`` (ground) and
    ``metadata.json`` (``latitude``, ``longitude``, ``date_taken``); the sample key is the id.
``soundingearth``
    SoundingEarth / GeoCLAP: a CSV with ``key``, ``mp3name``, ``latitude``, ``longitude``,
    ``description`` (and ``caption``, ``address``, ``long_key`` when present). Options:
    ``image`` (default ``images/googleEarth/{key}.jpg``; e.g. ``images/sentinel/{key}.jpeg``),
    ``audio`` (default ``raw_audio/{long_key}/{mp3name}`` when the CSV has ``long_key``, else
    ``raw_audio/{mp3name}``), ``text`` (the caption column, default ``description``), ``root``
    (folder the templates are relative to; default the CSV's folder). Templates take any CSV
    column in braces.
``geotiff``
    A folder of georeferenced tiles (``.tif``/``.tiff``, searched recursively): the id is the
    path without suffix, lat/lon the raster centre transformed from its CRS to WGS84. Sidecar
    files with the same stem pair other modalities: ``<stem>.txt`` (text), ``<stem>.wav|flac|
    mp3|ogg`` (audio), ``<stem>.ground.jpg|png`` (ground). Options: ``bands`` (1-based band
    numbers shown as RGB, default the first three) and ``scale`` (``auto``: 8-bit as is, other
    types stretched per tile between the 2nd and 98th percentile; or a number mapped to 255,
    e.g. 3000 for Sentinel-2 reflectance). Needs ``pip install 'geobind[geo]'`` (rasterio).
    The ``manifest`` layout takes the same two options for the ``.tif``/``.tiff`` tiles its
    image columns name (see :func:`geobind.data.manifest.read_manifest`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geobind.data.errors import BadSampleError
from geobind.data.manifest import Table, bad_coordinates, read_text_table, register_layout
from geobind.data.media import stretch_bands
from geobind.data.shards import ShardSchema, ShardSet, geobind_schema, open_shards
from geobind.modality import AUDIO, GROUND, SATELLITE, TEXT

__all__ = [
    "SAT2CAP_SCHEMA",
    "read_shards",
    "read_sat2cap",
    "read_soundingearth",
    "read_geotiff",
    "read_raster_rgb",
    "check_raster_options",
    "raster_options_key",
    "load_raster_or_item",
    "RASTER_SUFFIXES",
]

SAT2CAP_SCHEMA = ShardSchema(
    "sat2cap",
    {SATELLITE: ("overhead.jpg", "overhead.png"), GROUND: ("groundlevel.jpg", "groundlevel.png")},
    meta_member="metadata.json",
    id_field=None,
    lat_field="latitude",
    lon_field="longitude",
)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
RASTER_SUFFIXES = (".tif", ".tiff")  # the files the bands and scale options apply to


@register_layout("shards", streaming=True)
def read_shards(spec: str, *, index_workers: int | None = None) -> ShardSet:
    """GeoBind's own WebDataset shards (a folder, ``.tar``, brace pattern or URLs)."""
    return open_shards(spec, geobind_schema(), workers=index_workers)


@register_layout("sat2cap", streaming=True)
def read_sat2cap(spec: str, *, index_workers: int | None = None) -> ShardSet:
    """Sat2Cap's WebDataset shards (``overhead.jpg``, ``groundlevel.jpg``, ``metadata.json``)."""
    return open_shards(spec, SAT2CAP_SCHEMA, workers=index_workers)


# ---------------------------------------------------------------------------------------------
# SoundingEarth


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("final_metadata_with_captions.csv", "metadata.csv"):
        if (path / name).is_file():
            return path / name
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    raise FileNotFoundError(
        f"{path}: expected a SoundingEarth CSV (final_metadata_with_captions.csv or metadata.csv); "
        f"found {len(csvs)} CSV files. Pass the CSV itself as the dataset path."
    )


def _fill(template: str, row: dict[str, Any], where: str) -> str:
    try:
        return template.format(**row)
    except KeyError as e:
        raise ValueError(
            f"{where}: the path template {template!r} names column {e.args[0]!r}, which the CSV "
            "lacks; fix the template in layout_options"
        ) from None


@register_layout("soundingearth")
def read_soundingearth(
    path: Path,
    *,
    image: str = "images/googleEarth/{key}.jpg",
    audio: str | None = None,
    text: str = "description",
    root: str | None = None,
) -> Table:
    """SoundingEarth's CSV with its images and recordings (see the module docstring)."""
    csv = _find_csv(path)
    df = read_text_table(csv, dtype={"key": str, "long_key": str}, keep_default_na=False,
                         na_values={"latitude": [""], "longitude": [""]})
    need = ["key", "mp3name", "latitude", "longitude"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(
            f"{csv}: missing column(s) {', '.join(missing)}; a SoundingEarth CSV has key, mp3name, "
            f"latitude, longitude, description (found: {', '.join(df.columns)})"
        )
    if text not in df.columns:
        raise ValueError(
            f"{csv}: no text column {text!r}; set layout_options.text to one of {', '.join(df.columns)}"
        )
    if df["key"].duplicated().any():
        raise ValueError(
            f"{csv}: duplicate key {df['key'][df['key'].duplicated()].iloc[0]!r}; keys must be unique"
        )
    if audio is None:
        audio = (
            "raw_audio/{long_key}/{mp3name}" if "long_key" in df.columns else "raw_audio/{mp3name}"
        )
    base = csv.parent
    if root:  # a relative root is relative to the CSV's folder
        base = Path(root).expanduser()
        if not base.is_absolute():
            base = csv.parent / base
    sats, auds, texts = [], [], []
    for rec in df.astype(str).to_dict("records"):
        sats.append(str(base / _fill(image, rec, str(csv))))
        auds.append(str(base / _fill(audio, rec, str(csv))) if rec["mp3name"].strip() else None)
        t = rec[text].strip()
        texts.append(t if t else None)
    lat = pd.to_numeric(df["latitude"], errors="coerce").astype(float).tolist()
    lon = pd.to_numeric(df["longitude"], errors="coerce").astype(float).tolist()
    known = {"key", "latitude", "longitude", text}
    meta = df[[c for c in df.columns if c not in known]].reset_index(drop=True)
    h = hashlib.sha256(csv.read_bytes())
    h.update(
        json.dumps(
            {
                "layout": "soundingearth",
                "image": image,
                "audio": audio,
                "text": text,
                "root": str(base),
            },
            sort_keys=True,
        ).encode()
    )
    return Table(
        source=str(csv),
        ids=df["key"].astype(str).tolist(),
        lat=lat,
        lon=lon,
        columns={SATELLITE: sats, AUDIO: auds, TEXT: texts},
        meta=meta,
        identity=h.hexdigest(),
        bad_rows=bad_coordinates(lat, lon),
    )


# ---------------------------------------------------------------------------------------------
# GeoTIFF tiles


def _rasterio(what: str = "the geotiff layout"):
    try:
        import rasterio
        import rasterio.warp  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs rasterio: pip install 'geobind[geo]'") from None
    return rasterio


@contextlib.contextmanager
def _no_georeference_warning():
    """Silence rasterio's warning for tiles without a CRS: the layout counts them itself
    (``no-georeference``), and a tile's pixels need none."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def read_raster_rgb(
    path: str, bands: tuple[int, ...] | None = None, scale: Any = "auto"
) -> np.ndarray:
    """A raster as an ``HxWx3`` uint8 array: ``bands`` (1-based; default the first three, or
    the single band as grey), 8-bit data as is and other types stretched per tile (2nd-98th
    percentile) unless ``scale`` gives the value shown as white."""
    p = Path(path)
    if not p.is_file():
        raise BadSampleError(path, "missing", "file does not exist")
    if p.stat().st_size == 0:
        raise BadSampleError(path, "empty", "file is empty")
    rasterio = _rasterio()
    try:
        with _no_georeference_warning(), rasterio.open(path) as src:
            use = list(bands) if bands else ([1, 2, 3] if src.count >= 3 else [1])
            if max(use) > src.count:
                raise BadSampleError(
                    path, "bad-bands", f"asked for bands {use}, the raster has {src.count}"
                )
            data = src.read(use)
            nodata = src.nodata
    except BadSampleError:
        raise
    except Exception as e:  # rasterio raises RasterioIOError, CPLE_* and friends
        raise BadSampleError(path, "undecodable", f"cannot read raster ({e})") from None
    if data.dtype == np.uint8 and scale == "auto":
        out = data
    else:
        x = data.astype(np.float32)
        valid = np.isfinite(x) if nodata is None else (np.isfinite(x) & (x != nodata))
        if scale == "auto":
            out = stretch_bands(x, valid)
        else:
            out = np.clip(np.nan_to_num(x) / float(scale) * 255, 0, 255).astype(np.uint8)
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _centre_wgs84(src) -> tuple[float, float, str | None]:
    from rasterio.warp import transform

    # A CRS without a geotransform (the identity: pixel coordinates) places nothing either.
    if src.crs is None or src.transform.is_identity:
        return float("nan"), float("nan"), "no-georeference"
    b = src.bounds
    cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
    xs, ys = transform(src.crs, "EPSG:4326", [cx], [cy])
    lon = float(xs[0])
    if src.crs.is_geographic and 180 < lon <= 360:  # 0-360 degree longitudes
        lon -= 360
    return float(ys[0]), lon, None


def check_raster_options(bands: Any, scale: Any) -> tuple[list[int] | None, Any]:
    """``bands`` as 1 or 3 band numbers (1-based; ``[4, 3, 2]`` or ``"4,3,2"``) and ``scale`` as
    ``auto`` or a positive number, checked before any tile is read; returns them normalised
    (``bands`` a list of ints or ``None``, ``scale`` ``"auto"`` or a float). A ``ValueError``
    names the option and gives an example."""
    if bands is not None:
        items = bands.split(",") if isinstance(bands, str) else bands if isinstance(bands, (list, tuple)) else [bands]
        try:
            bands = [int(str(b).strip()) for b in items]
        except ValueError:
            bands = None
        if not bands or len(bands) not in (1, 3) or min(bands) < 1:
            raise ValueError(f"layout option bands={items!r}: give 1 or 3 band numbers counted from 1, "
                             "e.g. bands=[4,3,2] (red, green, blue of Sentinel-2) or bands=[1]")
    if scale != "auto":
        try:
            value = float(scale)
        except (TypeError, ValueError):
            value = float("nan")
        if not value > 0:
            raise ValueError(f"layout option scale={scale!r}: give auto (stretch each tile) or the value "
                             "shown as white, e.g. scale=3000 for Sentinel-2 reflectance")
        scale = value
    return bands, scale


def raster_options_key(bands: list[int] | None, scale: Any) -> bytes:
    """Normalised ``bands`` and ``scale`` (from :func:`check_raster_options`) as the bytes a
    dataset's identity hashes: the same tiles read with other options are other pixels, so the
    anchor cache must not reuse their embeddings."""
    return json.dumps({"bands": bands, "scale": scale}).encode()


def load_raster_or_item(item: Any, bands: tuple[int, ...] | None = None, scale: Any = "auto") -> Any:
    """A ``.tif``/``.tiff`` path as :func:`read_raster_rgb` reads it with ``bands`` and
    ``scale``; any other item (a JPEG or PNG path, say) unchanged, for the encoder to decode."""
    if isinstance(item, (str, Path)) and Path(item).suffix.lower() in RASTER_SUFFIXES:
        return read_raster_rgb(str(item), bands=bands, scale=scale)
    return item


@register_layout("geotiff")
def read_geotiff(path: Path, *, bands: list[int] | None = None, scale: Any = "auto") -> Table:
    """A folder (or one file) of georeferenced satellite tiles, plus same-stem sidecars."""
    rasterio = _rasterio()
    bands, scale = check_raster_options(bands, scale)
    if path.is_file():
        root, files = path.parent, [path]
    else:
        root = path
        files = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES and p.is_file()
        )
    if not files:
        raise FileNotFoundError(f"{path}: no .tif/.tiff files found")
    ids, lat, lon, sats, bad = [], [], [], [], {}
    side: dict[str, list[Any]] = {TEXT: [], AUDIO: [], GROUND: []}
    h = hashlib.sha256(raster_options_key(bands, scale))
    for i, f in enumerate(files):
        rel = f.relative_to(root).with_suffix("").as_posix()
        ids.append(rel)
        sats.append(str(f))
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        try:
            with _no_georeference_warning(), rasterio.open(f) as src:
                a, o, problem = _centre_wgs84(src)
        except Exception:  # unreadable header: the tile itself is reported when loaded
            a, o, problem = float("nan"), float("nan"), "undecodable"
        lat.append(a)
        lon.append(o)
        if problem:
            bad[i] = problem
        stem = f.with_suffix("")
        txt = stem.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else None
        except UnicodeDecodeError:
            raise ValueError(f"{txt}: not UTF-8 text; save the caption as UTF-8") from None
        side[TEXT].append(caption)
        side[AUDIO].append(
            next(
                (str(stem.with_suffix(s)) for s in AUDIO_SUFFIXES if stem.with_suffix(s).is_file()),
                None,
            )
        )
        side[GROUND].append(
            next(
                (
                    str(stem.parent / (stem.name + s))
                    for s in (".ground.jpg", ".ground.png")
                    if (stem.parent / (stem.name + s)).is_file()
                ),
                None,
            )
        )
    for i, (a, o) in enumerate(zip(lat, lon)):
        if i not in bad and not (-90 <= a <= 90 and -180 <= o <= 180):
            bad[i] = "bad-coordinates"
    seen: dict[str, Path] = {}
    for i, f in enumerate(files):  # x.tif and x.TIFF would both be place "x"
        if ids[i] in seen:
            raise ValueError(f"{f} and {seen[ids[i]]} both give the place id {ids[i]!r} (ids are paths "
                             "without the extension); rename one of them")
        seen[ids[i]] = f
    columns = {SATELLITE: sats}
    for m, vals in side.items():
        if any(v is not None for v in vals):
            columns[m] = vals
    loader = functools.partial(read_raster_rgb, bands=tuple(bands) if bands else None, scale=scale)
    return Table(
        source=str(path),
        ids=ids,
        lat=lat,
        lon=lon,
        columns=columns,
        meta=pd.DataFrame({"file": [str(f) for f in files]}),
        identity=h.hexdigest(),
        bad_rows=bad,
        loaders={SATELLITE: loader},
    )
