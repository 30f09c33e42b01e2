"""Paired datasets as tables: one row per place, one column per modality.

A manifest is a CSV or Parquet file with columns ``id``, ``lat``, ``lon`` and one column per
modality (a path relative to the manifest, or the text itself), plus optional metadata. Every
reader (training, embedding, evaluation) goes through :func:`read_dataset`, which returns a
:class:`Table` (random access) or, for WebDataset shards, a
:class:`~geobind.data.shards.ShardSet` (streamed); further layouts register with
:func:`register_layout`. The built-in layouts are ``manifest``, ``shards``, ``sat2cap``,
``soundingearth`` and ``geotiff`` (see :mod:`geobind.data.layouts`).

The ``manifest`` layout takes the ``geotiff`` layout's ``bands`` and ``scale`` options, applied
to the ``.tif``/``.tiff`` tiles its image columns name (see :func:`read_manifest`).
"""

from __future__ import annotations

import array
import dataclasses
import functools
import hashlib
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geobind.data.errors import BadSampleError
from geobind.modality import get_modality

__all__ = [
    "REQUIRED",
    "Reader",
    "StringColumn",
    "Table",
    "bad_coordinates",
    "check_layout_options",
    "for_loader_workers",
    "layout_options",
    "layouts",
    "read_dataset",
    "read_manifest",
    "read_text_table",
    "register_layout",
    "row_detail",
]

REQUIRED = ("id", "lat", "lon")
# Column names that mean a modality but are kept as metadata (modality columns are named exactly).
_SYNONYMS = {
    "satellite": ("sat", "satellite_image", "satellite_path", "tile", "tiles", "overhead", "aerial", "sat_image"),
    "ground": ("ground_image", "ground_path", "photo", "image", "img", "groundlevel", "ground_level", "street"),
    "text": ("caption", "captions", "description", "label", "prompt"),
    "audio": ("sound", "audio_path", "audio_file", "wav", "mp3", "flac", "recording", "clip"),
}


class StringColumn(Sequence):
    """A read-only column of strings (``None`` for an empty cell) held in one Arrow array, with
    no Python object per row. Loader workers forked from a process holding a list of a million
    paths copy the memory pages of every string they read (reading one changes its reference
    count), so each worker ends up with its own copy of the table; reading this column touches
    none of the parent's pages. Indexing gives ``str`` or ``None``, as the list did."""

    __slots__ = ("_array",)

    def __init__(self, values: Any):
        import pyarrow as pa

        self._array = values if isinstance(values, pa.Array) else pa.array(values, type=pa.large_string())

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i):  # an int or a slice, as a list takes
        if isinstance(i, slice):
            return self._array[i].to_pylist()
        n = len(self._array)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"row {i} of a column of {n}")
        return self._array[j].as_py()

    def __iter__(self):
        return iter(self._array.to_pylist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (StringColumn, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # mutable-sequence semantics: equal to a list, so not hashable

    def __repr__(self) -> str:
        return f"StringColumn({len(self)} rows)"


def _compact(values: Any) -> Any:
    """``values`` as a :class:`StringColumn` when every value is a string or ``None``; as it is
    otherwise (a registered layout may hold other items)."""
    import pyarrow as pa

    if isinstance(values, StringColumn) or not all(v is None or type(v) is str for v in values):
        return values
    return StringColumn(pa.array(values, type=pa.large_string()))


def for_loader_workers(data: Any, num_workers: int) -> Any:
    """What a data loader with ``num_workers`` worker processes should read rows from:
    :meth:`Table.for_workers` of a table when there are workers, anything else as it is."""
    return data.for_workers() if isinstance(data, Table) and num_workers > 0 else data


def _floats(values: Any) -> Any:
    """``values`` as an ``array('d')`` (Python floats when indexed, as the list gives, but no
    object per row) when they are all numbers; as they are otherwise."""
    try:
        return array.array("d", values)
    except TypeError:
        return values


@dataclass
class Table:
    """Rows of a paired dataset. ``columns[modality][i]`` is row i's raw item for that modality
    (an absolute path, the text itself, or ``None`` when absent)."""

    source: str
    ids: list[str]
    lat: list[float]
    lon: list[float]
    columns: dict[str, list[Any]]
    meta: pd.DataFrame | None = None
    identity: str = ""  # content hash: changes when the data changes (keys the anchor cache)
    bad_rows: dict[int, str] = field(default_factory=dict)  # row -> reason (e.g. bad-coordinates)
    # modality -> function turning a cell into the item encoders take (e.g. a GeoTIFF path into
    # an RGB array); module-level functions, so the table still pickles into loader workers.
    loaders: dict[str, Callable[[Any], Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def for_workers(self) -> Table:
        """This table as data-loader workers should hold it: ids and string columns in Arrow
        arrays (:class:`StringColumn`), coordinates in ``array('d')``, no metadata. Items, places
        and errors are the same as this table's; forked workers then share its memory instead
        of each copying the rows it reads (at a million rows, hundreds of MB per worker)."""
        return dataclasses.replace(
            self,
            ids=_compact(self.ids),
            lat=_floats(self.lat),
            lon=_floats(self.lon),
            columns={m: _compact(v) for m, v in self.columns.items()},
            meta=None,
        )

    @property
    def modalities(self) -> list[str]:
        """The modalities with a column in this table, in column order."""
        return list(self.columns)

    def place(self, i: int) -> tuple[str, Any, Any]:
        """Row ``i``'s ``(id, lat, lon)``."""
        return self.ids[i], self.lat[i], self.lon[i]

    def has(self, modality: str) -> bool:
        """True if rows carry ``modality`` (a column, or lat/lon for location-like ones)."""
        return modality in self.columns or get_modality(modality).source == "latlon"

    def require(self, *modalities: str) -> None:
        """Raise a clear error if a needed modality column is missing (naming a metadata column
        that looks like it: ``sat`` for ``satellite``, say)."""
        for m in modalities:
            if self.has(m):
                continue
            other = [str(c) for c in self.meta.columns] if self.meta is not None else []
            like = [c for c in other if c.strip().lower() in _SYNONYMS.get(m, ())]
            hint = (f" The column {like[0]!r} looks like it: modality columns are named exactly, so rename it "
                    f"to {m!r}." if like else
                    f" Add {'an' if m[:1] in 'aeiou' else 'a'} {m!r} column with a path or value per row.")
            raise ValueError(
                f"{self.source}: no {m!r} column (modality columns: {', '.join(self.columns) or 'none'}"
                f"{'; others: ' + ', '.join(other[:12]) if other else ''}).{hint}"
            )

    def item(self, modality: str, i: int) -> Any:
        """Row ``i``'s raw item for ``modality``; raises :class:`BadSampleError` if unusable."""
        if i in self.bad_rows:
            raise BadSampleError(f"{self.source}#{self.ids[i]}", self.bad_rows[i], row_detail(self, i))
        if get_modality(modality).source == "latlon":
            return (self.lat[i], self.lon[i])
        value = self.columns[modality][i]
        if value is None:
            if get_modality(modality).source == "text":
                raise BadSampleError(f"{self.source}#{self.ids[i]}", "empty-text", "no caption (an empty cell, or no caption file)")
            raise BadSampleError(f"{self.source}#{self.ids[i]}", f"missing-{modality}", "empty cell")
        loader = self.loaders.get(modality)
        return loader(value) if loader is not None else value


Reader = Callable[..., Any]
_LAYOUTS: dict[str, Reader] = {}
_STREAMING: set[str] = set()


def register_layout(name: str, *, streaming: bool = False) -> Callable[[Reader], Reader]:
    """Decorator registering a reader for a dataset layout.

    A reader is called as ``reader(path, **options)`` and returns a :class:`Table`, or a
    :class:`~geobind.data.shards.ShardSet` when ``streaming`` (its ``path`` is then the string
    as given, so shard patterns such as ``train-{000000..000099}.tar`` and URLs pass through).
    ``options`` are the layout's keyword options (``layout_options`` in a config).
    """

    def wrap(fn: Reader) -> Reader:
        _LAYOUTS[name] = fn
        if streaming:
            _STREAMING.add(name)
        else:
            _STREAMING.discard(name)
        return fn

    return wrap


def layouts() -> list[str]:
    """Names of all registered dataset layouts."""
    _builtin_layouts()
    return sorted(_LAYOUTS)


def layout_options(layout: str) -> list[str] | None:
    """The option names a layout's reader takes (``layout_options`` in a config,
    ``--layout-option`` on the command line); ``None`` when it takes any."""
    _builtin_layouts()
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown dataset layout {layout!r}; known layouts: {', '.join(sorted(_LAYOUTS))}")
    params = list(inspect.signature(_LAYOUTS[layout]).parameters.values())[1:]  # after the path
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def check_layout_options(layout: str, options: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming every option ``layout`` does not take, and the ones it does."""
    known = layout_options(layout)
    unknown = sorted(set(options) - set(known)) if known is not None else []
    if unknown:
        takes = f"its options are {', '.join(known)}" if known else "it takes none"
        raise ValueError(f"layout {layout!r} has no option {', '.join(map(repr, unknown))}; {takes}")


def _builtin_layouts() -> None:
    # Imported here, not at module top: the layout modules import this one.
    import geobind.data.layouts  # noqa: F401


def _looks_like_shards(path: str) -> bool:
    """A ``.tar`` file, a brace pattern of them, a URL, or a folder of shards."""
    if path.endswith(".tar") or (".tar" in path and ("{" in path or "://" in path or path.startswith("pipe:"))):
        return True
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "shards.json").is_file() or any(p.glob("*.tar")))


def read_dataset(path: str | Path, layout: str = "manifest", **options: Any) -> Any:
    """Read a dataset in the given layout (default: a CSV/Parquet manifest).

    Returns a :class:`Table` (manifest, soundingearth, geotiff) or a
    :class:`~geobind.data.shards.ShardSet` (shards, sat2cap). With the default ``manifest``
    layout a ``.tar`` path, shard pattern or folder of shards is read as ``shards``.
    ``options`` are the layout's options (e.g. ``image=...`` for ``soundingearth``).
    """
    _builtin_layouts()
    if layout not in _LAYOUTS:
        raise ValueError(
            f"unknown dataset layout {layout!r}; known layouts: {', '.join(sorted(_LAYOUTS))}"
        )
    raw = str(path)
    if layout == "manifest" and _looks_like_shards(raw):
        layout = "shards"
    check_layout_options(layout, options)
    if layout in _STREAMING:
        data = _LAYOUTS[layout](raw, **options)
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset {path} does not exist")
        data = _LAYOUTS[layout](path, **options)
    if len(data) == 0:
        raise ValueError(f"dataset {raw} has no rows")
    return data


def row_detail(table: Any, i: int) -> str:
    """What made row ``i`` of a table or shard set bad, for its error message."""
    reason = table.bad_rows.get(i)
    sid, lat, lon = table.place(i)
    if reason == "bad-coordinates":
        return f"lat {lat!r}, lon {lon!r}: need -90..90 and -180..180"
    if reason == "duplicate-id":
        return f"an earlier sample has the id {sid!r}"
    return ""


def bad_coordinates(lat: list[Any], lon: list[Any]) -> dict[int, str]:
    """Rows whose latitude/longitude is missing, not a number or out of range."""
    bad = {}
    for i, (a, o) in enumerate(zip(lat, lon)):
        # Integer columns are fine (pandas reads "1,2" as ints); booleans and strings are not.
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, o))
        if not ok or math.isnan(a) or math.isnan(o) or not -90 <= a <= 90 or not -180 <= o <= 180:
            bad[i] = "bad-coordinates"
    return bad


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_text_table(path: Path, what: str = "CSV", **options: Any) -> pd.DataFrame:
    """``pd.read_csv(path, **options)``, with a file that is not UTF-8 or does not parse as
    ``what`` reported as a ``ValueError`` naming the file and the fix."""
    try:
        return pd.read_csv(path, **options)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save it as UTF-8 (CSV UTF-8 in a spreadsheet)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: cannot read it as {what} ({e})") from None


def drop_blank_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without rows whose every cell is empty (a spreadsheet's trailing blank rows are no
    places); what :func:`read_manifest` reads, row for row."""
    if not len(df.columns):
        return df
    blank = df.isna()
    for c in df.columns:
        if df[c].dtype == object or pd.api.types.is_string_dtype(df[c]):
            blank[c] |= df[c].astype(str).str.strip().eq("")
    return df[~blank.all(axis=1)].reset_index(drop=True)


def _empty(v: Any) -> bool:
    """An empty cell: None, NaN, pandas' NA or NaT, or blank text."""
    if isinstance(v, str):
        return not v.strip()
    try:
        return v is None or bool(pd.isna(v))
    except (TypeError, ValueError):  # a list or array cell is a value
        return False


def _resolve_path(v: Any, base: Path) -> str:
    """One manifest cell as the path it names: ``~`` expanded, relative to ``base``."""
    p = Path(str(v)).expanduser()
    p = p if p.is_absolute() else base / p
    if "\\" in str(v) and not p.exists():
        # A path written on Windows (tiles\0001.jpg) names these folders here.
        alt = base / Path(str(v).replace("\\", "/")).expanduser()
        p = alt if alt.exists() else p
    return str(p)


def _resolve_paths(values: list[Any], base: Path) -> list[str | None]:
    """:func:`_resolve_path` of every cell (``None`` for empty ones). A manifest's files sit in a
    few folders, so each folder is resolved once with pathlib and the file name appended to it:
    the same strings, at a fraction of the cost of a ``Path`` per row (a million rows: seconds
    instead of tens of seconds). Cells pathlib would treat otherwise (``~``, backslashes, a
    ``//`` root, a ``.`` or empty last component) take the per-cell way."""
    folders: dict[str, str] = {}
    out: list[str | None] = []
    fast = os.sep == "/"
    for v in values:
        if _empty(v):
            out.append(None)
            continue
        s = str(v)
        head, _, name = s.rpartition("/")
        if not fast or name in ("", ".") or "\\" in s or "~" in s or s.startswith("//"):
            out.append(_resolve_path(s, base))
            continue
        key = head if head or not s.startswith("/") else "/"
        folder = folders.get(key)
        if folder is None:
            folder = folders[key] = str(base / key) if key else str(base)
        out.append(name if folder == "." else folder + name if folder.endswith("/") else f"{folder}/{name}")
    return out


@register_layout("manifest")
def read_manifest(path: Path, *, bands: Any = None, scale: Any = "auto") -> Table:
    """CSV or Parquet manifest; paths relative to the manifest's folder.

    ``bands`` and ``scale`` are the ``geotiff`` layout's options (checked the same way), applied
    to every ``.tif``/``.tiff`` path of an image column (``satellite``, ``ground``, or any
    modality stored as an image); other paths are read as they are. Without them a tile is read
    with the defaults: the first three bands, 8-bit data as is, other types stretched per tile.
    Giving them for a manifest whose image columns name no such tile is an error: they would
    change nothing, so the manifest or the options are not the ones meant.
    """
    raster = bands is not None or scale != "auto"
    if raster:  # the options' form first, before any file is read (as the geotiff layout does)
        from geobind.data.layouts import check_raster_options

        bands, scale = check_raster_options(bands, scale)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; a manifest is a .csv or .parquet file (for a folder of "
            "GeoTIFF tiles use layout geotiff, for WebDataset shards layout shards)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            df = read_text_table(path, suffix[1:].upper(), sep="\t" if suffix == ".tsv" else ",",
                                 dtype={"id": str}, keep_default_na=False, na_values={"lat": [""], "lon": [""]})
        else:
            raise ValueError(f"{path}: a manifest must be .csv, .tsv or .parquet")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: a manifest needs a header row (id, lat, lon and one column "
                         "per modality) and a row per place") from None
    df = drop_blank_rows(df)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        hint = ""
        aliases = {"lat": ("latitude", "Latitude", "LAT"), "lon": ("longitude", "Longitude", "lng", "long", "LON")}
        renames = [f"{a} -> {c}" for c in missing for a in aliases.get(c, ()) if a in df.columns]
        if {"key", "mp3name", "latitude", "longitude"} <= set(df.columns):
            hint = " (this is a SoundingEarth CSV: read it with --layout soundingearth, layout: soundingearth in a config)"
        elif renames:
            hint = f" (rename {', '.join(renames)})"
        elif len(df.columns) == 1 and ";" in str(df.columns[0]):
            hint = " (its columns are separated by ';': save it with commas)"
        elif any(str(c) != str(c).strip() for c in df.columns):
            hint = " (some column names have spaces around them: remove the spaces after the commas)"
        found = ", ".join(map(str, df.columns[:12]))
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}{hint}; a manifest needs id, lat, "
                         f"lon (found: {found})")
    no_id = [i for i, v in enumerate(df["id"].tolist()) if _empty(v)]
    if no_id:
        raise ValueError(f"{path}: {len(no_id)} row(s) have no id (the first is data row {no_id[0] + 1}); "
                         "give every place an id")
    if df["id"].duplicated().any():
        dup = df["id"][df["id"].duplicated()].iloc[0]
        raise ValueError(f"{path}: duplicate id {dup!r}; ids must be unique")
    from geobind.modality import modalities

    named = {str(c).strip().lower(): str(c) for c in df.columns if str(c) not in modalities()}
    near = [(named[m], m) for m in modalities() if m in named and m not in df.columns]
    if near:  # "Satellite" would otherwise be kept as metadata, and the modality found missing
        raise ValueError(f"{path}: column {near[0][0]!r} looks like the modality {near[0][1]!r}; modality "
                         f"columns are named exactly ({', '.join(modalities())}): rename it")
    base = path.parent
    columns: dict[str, list[Any]] = {}
    for m in modalities():
        if m not in df.columns:
            continue
        if get_modality(m).source == "path":
            columns[m] = _resolve_paths(df[m].tolist(), base)
        else:
            columns[m] = [None if _empty(v) else str(v) for v in df[m].tolist()]
    # As float64 with NaN for missing values (nullable Float64 columns hold pd.NA).
    lat = pd.to_numeric(df["lat"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan).tolist()
    lon = pd.to_numeric(df["lon"], errors="coerce").to_numpy(dtype="float64", na_value=np.nan).tolist()
    bad = bad_coordinates(lat, lon)
    known = set(REQUIRED) | set(columns)
    meta = df[[c for c in df.columns if c not in known]].reset_index(drop=True)
    identity, loaders = _hash_file(path), {}
    if raster:
        identity, loaders = _raster_loaders(path, columns, identity, bands, scale)
    return Table(
        source=str(path),
        ids=[str(x) for x in df["id"].tolist()],
        lat=[float(x) for x in lat],
        lon=[float(x) for x in lon],
        columns=columns,
        meta=meta,
        identity=identity,
        bad_rows=bad,
        loaders=loaders,
    )


def _raster_loaders(
    path: Path, columns: dict[str, list[Any]], identity: str, bands: list[int] | None, scale: Any
) -> tuple[str, dict[str, Callable[[Any], Any]]]:
    """The identity and loaders of a manifest read with ``bands``/``scale``: a loader per image
    column that names a ``.tif``/``.tiff`` tile, and the options folded into the identity, so
    the anchor cache (keyed by it) never serves tiles read with other options. Without the
    options the identity stays the file's hash, as it was before they existed."""
    from geobind.data.layouts import (
        RASTER_SUFFIXES,
        _rasterio,
        load_raster_or_item,
        raster_options_key,
    )
    from geobind.data.pack import member_kind

    images = [m for m in columns if member_kind(m) == "image"]
    tiled = [m for m in images
             if any(v is not None and Path(v).suffix.lower() in RASTER_SUFFIXES for v in columns[m])]
    if not tiled:
        given = [n for n, v in (("bands", bands), ("scale", scale)) if v not in (None, "auto")]
        what = (f"layout option {given[0]} applies" if len(given) == 1 else
                f"layout options {' and '.join(given)} apply")
        where = f"its image columns ({', '.join(images)}) name none" if images else "it has no image column"
        it, them = ("it", "it") if len(given) == 1 else ("they", "them")
        raise ValueError(f"{path}: {what} to .tif/.tiff tiles, but {where}, so {it} would change nothing; "
                         f"remove {them}, or name the GeoTIFF tiles in an image column")
    _rasterio("reading tiles with the layout options bands and scale")
    h = hashlib.sha256(identity.encode())
    h.update(raster_options_key(bands, scale))
    load = functools.partial(load_raster_or_item, bands=tuple(bands) if bands else None, scale=scale)
    return h.hexdigest(), {m: load for m in tiled}
