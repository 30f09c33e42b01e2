"""WebDataset tar shards: an indexed dataset that is streamed, never randomly accessed.

A shard set is a list of tar files read with the ``webdataset`` library. A sample is the group of
members sharing a key: ``<key>.satellite.jpg``, ``<key>.ground.jpg``, ``<key>.text.txt``,
``<key>.audio.flac`` and ``<key>.json`` (``{"id", "lat", "lon", ...}``). Published layouts map
other member names to modalities (Sat2Cap: ``overhead.jpg``, ``groundlevel.jpg``,
``metadata.json``) through a :class:`ShardSchema`.

**Index.** Training needs the number of samples (for the schedule), their ids and coordinates
(for splits, bad-coordinate checks and the anchor cache) before reading any image. ``geobind data
pack`` writes ``shards.json`` + ``index.parquet`` beside its shards; for other shards one pass
over the tars (metadata members only are parsed) builds the index and caches it under
``$GEOBIND_CACHE`` (default ``~/.cache/geobind``) keyed by the shards' names, sizes and mtimes.
Row ``r`` of a :class:`ShardSet` is the ``r``-th sample in shard order, so the anchor cache,
validity masks and evaluation align by row (the row's ``id`` is kept for people and joins).

**Streaming with exactly-once epochs.** :func:`plan_epoch` turns an epoch into a deterministic
plan from ``(seed, epoch, world size, loader workers)`` alone: shards are shuffled, the usable
rows of the epoch are cut into one contiguous chunk per (rank, worker) slot sized so every rank
gets the same number of batches (a slot reads only its own shards, plus at most a part of one
shard at each end), and each worker shuffles its chunk through a seeded buffer. Every usable
sample is therefore seen exactly once per epoch across ranks and workers (the last
``usable % batch_size`` samples of the epoch's shard order are left out, as ``drop_last`` does).

**Resume.** A checkpoint stores ``step_in_epoch`` and the epoch's *segments*: the
``(world size, workers, first step)`` of each differently laid-out run within the epoch. Resuming
on the same layout skips the already-consumed batches of the same plan (raw samples are read and
dropped without decoding), so it continues exactly where it stopped. Resuming on a different
number of ranks or workers replays the earlier segments' plans from the index (no tar is read) to
find the consumed samples and plans the rest of the epoch over the remaining ones: still exactly
once per epoch, but not the batches the old layout would have made.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import IterableDataset, get_worker_info

from geobind.data.errors import BadSampleError
from geobind.modality import get_modality, modalities

__all__ = [
    "ShardSchema",
    "ShardSet",
    "geobind_schema",
    "open_shards",
    "expand_shards",
    "plan_epoch",
    "buffer_shuffle",
    "EpochStream",
    "RowStream",
    "INDEX_FILE",
    "SHARDS_FILE",
]

INDEX_FILE = "index.parquet"
SHARDS_FILE = "shards.json"
INDEX_FORMAT = "geobind-shard-index"
INDEX_VERSION = 1
# Reason a sample is reported under when its shard ends early (truncated or corrupt tar).
BAD_SHARD = "bad-shard"


# ---------------------------------------------------------------------------------------------
# schema: member names <-> modalities


@dataclass(frozen=True)
class ShardSchema:
    """How one shard layout names its members."""

    name: str  # layout name (recorded in the index)
    members: dict[str, tuple[str, ...]]  # modality -> member suffixes, in order of preference
    meta_member: str = "json"  # member holding the sample's JSON metadata
    id_field: str | None = "id"  # metadata field with the sample id (None: the sample key)
    lat_field: str = "lat"  # metadata field with the latitude (degrees, WGS84)
    lon_field: str = "lon"  # metadata field with the longitude (degrees, WGS84)
    keep_meta: tuple[str, ...] | None = (
        None  # metadata fields kept in the index (None: all scalars)
    )

    def fingerprint(self) -> str:
        """A canonical JSON string of every field; equal fingerprints mean the same layout (it
        keys the shard index)."""
        return json.dumps(
            {
                "name": self.name,
                "members": {k: list(v) for k, v in sorted(self.members.items())},
                "meta": self.meta_member,
                "id": self.id_field,
                "lat": self.lat_field,
                "lon": self.lon_field,
                "keep": list(self.keep_meta) if self.keep_meta else None,
            },
            sort_keys=True,
        )


def geobind_schema() -> ShardSchema:
    """GeoBind's own shard keys (the README's shard format): one member per registered modality."""
    members = {}
    for m in modalities():
        spec = get_modality(m)
        if spec.source != "latlon" and spec.shard_keys:
            members[m] = tuple(spec.shard_keys)
    return ShardSchema("shards", members)


# ---------------------------------------------------------------------------------------------
# shard lists and reading (all tar handling is webdataset's)


def expand_shards(spec: str) -> list[str]:
    """Shard URLs of ``spec``: a ``.tar`` file, a brace pattern (``train-{000..099}.tar``,
    several joined by ``::``), a URL/``pipe:`` spec, or a folder (its ``*.tar``, sorted)."""
    from webdataset.shardlists import expand_urls

    spec = str(spec)
    if _is_remote(spec):
        return list(expand_urls(spec))
    p = Path(spec).expanduser()
    if p.is_dir():
        urls = sorted(str(q.resolve()) for q in p.glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"{p}: no .tar shards in this folder")
        return urls
    urls = [str(Path(u).expanduser().resolve()) for u in expand_urls(str(p))]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"shard {missing[0]} does not exist{more}; check the pattern {spec!r}"
        )
    return urls


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _base_plus_ext(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


class _Errors:
    """A webdataset handler that records the first error of a shard and moves on."""

    def __init__(self) -> None:
        self.first: str | None = None

    def __call__(self, exn: Exception) -> bool:
        if self.first is None:
            msg = str(exn.args[0]) if exn.args else str(exn)
            self.first = (
                f"{type(exn).__name__}: {msg.split(' @ ')[0]}"  # webdataset appends ' @ <stream>'
            )
        return True


def _samples(
    url: str,
    handler: Callable[[Exception], bool],
    select_files: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order (webdataset's tar reader and key grouping)."""
    import webdataset as wds

    pipe = wds.DataPipeline(
        wds.SimpleShardList([url]),
        wds.tarfile_to_samples(handler=handler, select_files=select_files),
    )
    return iter(pipe)


def _scan_shard(url: str, schema: ShardSchema) -> dict[str, Any]:
    """Keys and metadata of every sample of one shard, reading only the metadata members."""
    names: list[tuple[str, str]] = []
    meta_suffix = schema.meta_member.lower()

    def select(fname: str) -> bool:
        prefix, suffix = _base_plus_ext(fname)
        if prefix is None:
            return False
        suffix = suffix.lower()
        names.append((prefix, suffix))
        return suffix == meta_suffix

    errors = _Errors()
    with_meta = [(s["__key__"], s.get(meta_suffix)) for s in _samples(url, errors, select)]
    # Group member names the way webdataset's group_by_keys does (consecutive equal keys), so
    # the positions here are the positions a full read yields.
    keys: list[str] = []
    suffixes: set[str] = set()
    for prefix, suffix in names:
        if not keys or keys[-1] != prefix:
            keys.append(prefix)
        suffixes.add(suffix)
    metas: list[Any] = []
    j = 0
    for k in keys:
        if j < len(with_meta) and with_meta[j][0] == k:
            metas.append(with_meta[j][1])
            j += 1
        else:
            metas.append(None)
    return {
        "url": url,
        "keys": keys,
        "meta": metas,
        "suffixes": sorted(suffixes),
        "error": errors.first,
        "size": _size(url),
    }


def _size(url: str) -> int | None:
    try:
        return os.stat(url).st_size if not _is_remote(url) else None
    except OSError:
        return None


def _mtime(url: str) -> int | None:
    try:
        return os.stat(url).st_mtime_ns if not _is_remote(url) else None
    except OSError:
        return None


def _parse_meta(
    raw: Any, key: str, schema: ShardSchema
) -> tuple[str, float, float, dict, str | None]:
    """(id, lat, lon, kept metadata, problem) of one sample's metadata member."""
    if raw is None:
        return key, math.nan, math.nan, {}, f"missing-{schema.meta_member}"
    try:
        meta = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError):
        return key, math.nan, math.nan, {}, "bad-metadata"
    sid = key if schema.id_field is None else meta.get(schema.id_field, key)

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    lat, lon = num(meta.get(schema.lat_field)), num(meta.get(schema.lon_field))
    skip = {schema.id_field, schema.lat_field, schema.lon_field}
    kept = {
        k: v
        for k, v in meta.items()
        if k not in skip
        and (schema.keep_meta is None or k in schema.keep_meta)
        and (v is None or isinstance(v, (str, int, float, bool)))
    }
    return str(sid), lat, lon, kept, None


# ---------------------------------------------------------------------------------------------
# the shard set


class ShardSet:
    """An indexed list of WebDataset shards (see the module docstring).

    It offers what training, embedding and evaluation need from a :class:`~geobind.data.manifest.Table`
    (``source``, ``ids``, ``lat``, ``lon``, ``meta``, ``identity``, ``bad_rows``, ``has``,
    ``require``, ``len``) but items come from streaming the tars (:class:`RowStream`,
    :class:`EpochStream`), not from ``item(modality, row)``.
    """

    streaming = True

    def __init__(
        self,
        source: str,
        urls: list[str],
        schema: ShardSchema,
        index: pd.DataFrame,
        counts: list[int],
        suffixes: list[str],
        identity: str,
        shard_errors: dict[int, str] | None = None,
    ):
        self.source = source
        self.urls = list(urls)
        self.schema = schema
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.identity = identity
        self.shard_errors = dict(shard_errors or {})
        present = set(suffixes)
        self.suffixes = sorted(present)  # member suffixes found in these shards
        self.columns: dict[str, tuple[str, ...]] = {
            m: tuple(s for s in sfx if s in present)
            for m, sfx in schema.members.items()
            if any(s in present for s in sfx)
        }  # modality -> member suffixes present in these shards (not per-row items)
        import pyarrow as pa

        self._keys = pa.array(index["key"].astype(str).tolist(), type=pa.string())
        self._ids = pa.array(index["id"].astype(str).tolist(), type=pa.string())
        self._lat = index["lat"].to_numpy(dtype=np.float64)
        self._lon = index["lon"].to_numpy(dtype=np.float64)
        self.meta = index.drop(
            columns=[c for c in ("key", "id", "lat", "lon", "problem") if c in index]
        )
        self.meta = self.meta.reset_index(drop=True)
        problems = (
            index["problem"].fillna("").astype(str).to_numpy()
            if "problem" in index
            else np.full(len(index), "", dtype=object)
        )
        with np.errstate(invalid="ignore"):  # NaN compares False: bad
            coords_ok = (np.abs(self._lat) <= 90) & (np.abs(self._lon) <= 180)
        bad: dict[int, str] = {int(i): "bad-coordinates" for i in np.flatnonzero(~coords_ok)}
        bad.update({int(i): str(problems[i]) for i in np.flatnonzero(problems != "")})
        # An id (from the metadata) seen before names another place: the later samples are
        # skipped, as a manifest would refuse them (a shard set is too large to refuse whole for
        # one repeat). Ids that are member keys may repeat across shards (keys need only be
        # unique within a tar), so those are left alone.
        if schema.id_field is not None:
            dup = index["id"].astype(str).duplicated().to_numpy()
            bad.update({int(i): "duplicate-id" for i in np.flatnonzero(dup) if int(i) not in bad})
        self.bad_rows = bad  # row -> reason (metadata problems win over coordinates)
        if len(self.counts) != len(self.urls) or int(self.offsets[-1]) != len(index):
            raise ValueError(
                f"{source}: shard index does not match the shards; delete the index and rerun"
            )

    # -- Table-like surface ---------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ShardSet({self.source!r}, {len(self.urls)} shards, {len(self)} samples, {self.schema.name})"

    @property
    def ids(self) -> list[str]:
        """Every sample's id, in row order (a new list on each access)."""
        return self._ids.to_pylist()

    @property
    def lat(self) -> list[float]:
        """Every sample's latitude in degrees, in row order (a new list on each access)."""
        return self._lat.tolist()

    @property
    def lon(self) -> list[float]:
        """Every sample's longitude in degrees, in row order (a new list on each access)."""
        return self._lon.tolist()

    @property
    def modalities(self) -> list[str]:
        """The modalities whose members appear in these shards (not checked per sample)."""
        return list(self.columns)

    def place(self, row: int) -> tuple[str, float, float]:
        """Row ``row``'s ``(id, lat, lon)`` (without building the whole id list)."""
        return self._ids[int(row)].as_py(), float(self._lat[row]), float(self._lon[row])

    def has(self, modality: str) -> bool:
        """Whether these shards hold ``modality`` (location modalities always count, from the
        coordinates)."""
        return modality in self.columns or get_modality(modality).source == "latlon"

    def require(self, *mods: str) -> None:
        """Raise :class:`ValueError` naming the expected member names if any of ``mods`` is
        missing from these shards."""
        for m in mods:
            if not self.has(m):
                wanted = (
                    ", ".join(f"<key>.{s}" for s in self.schema.members.get(m, ()))
                    or "(no member name)"
                )
                raise ValueError(
                    f"{self.source}: no {m!r} members in these shards (found modalities: "
                    f"{', '.join(self.columns) or 'none'}). Layout {self.schema.name!r} reads {m} "
                    f"from {wanted}.{self.layout_hint()}"
                )

    def layout_hint(self) -> str:
        """A sentence naming the other layout whose member names these shards use (``""`` if
        none does): Sat2Cap's shards read as GeoBind's, say."""
        from geobind.data.layouts import SAT2CAP_SCHEMA

        for name, schema in (("shards", geobind_schema()), ("sat2cap", SAT2CAP_SCHEMA)):
            if schema.name == self.schema.name:
                continue
            mods = [m for m, sfx in schema.members.items() if any(s in self.suffixes for s in sfx)]
            if len(mods) > len(self.columns):
                return (f" These shards hold {', '.join(mods)} under layout {name!r}'s member names: read "
                        f"them with --layout {name} (layout: {name} in a config).")
        return ""

    def key(self, row: int) -> str:
        """Row ``row``'s sample key (its tar members' shared name stem)."""
        return self._keys[int(row)].as_py()

    def id_of(self, row: int) -> str:
        """Row ``row``'s sample id."""
        return self._ids[int(row)].as_py()

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """The index into ``urls`` of the shard holding each of ``rows`` (same shape)."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    # -- items --------------------------------------------------------------------------------------
    def member_name(self, sample: dict[str, Any], suffix: str) -> str:
        """``<shard url>#<key>.<suffix>``: the member of a streamed ``sample``, for messages."""
        return f"{sample.get('__url__', self.source)}#{sample.get('__key__', '?')}.{suffix}"

    def item(self, sample: dict[str, Any], row: int, modality: str) -> Any:
        """The raw item of ``modality`` in a streamed ``sample`` (bytes for files, str for
        text, (lat, lon) for location modalities); a missing or unreadable member raises
        :class:`BadSampleError` naming the shard member."""
        if row in self.bad_rows:
            from geobind.data.manifest import row_detail

            raise BadSampleError(
                f"{sample.get('__url__', self.source)}#{sample.get('__key__', '?')}",
                self.bad_rows[row],
                row_detail(self, row),
            )
        spec = get_modality(modality)
        if spec.source == "latlon":
            return (float(self._lat[row]), float(self._lon[row]))
        for suffix in self.schema.members.get(modality, ()):
            data = sample.get(suffix)
            if data is None:
                continue
            name = self.member_name(sample, suffix)
            if spec.source == "text":
                try:
                    return bytes(data).decode("utf-8")
                except UnicodeDecodeError:
                    raise BadSampleError(name, "undecodable", "text member is not UTF-8") from None
            if len(data) == 0:
                raise BadSampleError(name, "empty", "member is empty (0 bytes)")
            return bytes(data)
        want = "|".join(self.schema.members.get(modality, ())) or "?"
        raise BadSampleError(
            f"{sample.get('__url__', self.source)}#{sample.get('__key__', '?')}",
            f"missing-{modality}",
            f"no {want} member",
        )

    def load(
        self, sample: dict[str, Any], row: int, modality: str, fn: Callable[[Any], Any]
    ) -> Any:
        """``fn(item)`` for the sample's ``modality``, with decoding errors renamed to the member."""
        item = self.item(sample, row, modality)
        try:
            return fn(item)
        except BadSampleError as e:
            if e.path.startswith("<"):
                suffix = next(
                    (s for s in self.schema.members.get(modality, ()) if s in sample), modality
                )
                raise BadSampleError(self.member_name(sample, suffix), e.reason, e.detail) from None
            raise

    # -- reading --------------------------------------------------------------------------------------
    def read_rows(
        self, rows: np.ndarray, *, handler_log: Callable[[str], None] | None = None
    ) -> Iterator[tuple[int, dict[str, Any] | BadSampleError]]:
        """Stream the samples of ``rows`` (any order of shards; rows of one shard ascending within
        each run), yielding ``(row, sample)``. Rows a broken shard never delivers come back as
        ``(row, BadSampleError(..., "bad-shard"))``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        shards = self.shard_of(rows)
        # Runs of consecutive rows in the same shard.
        cut = np.flatnonzero(np.diff(shards)) + 1
        for run in np.split(np.arange(rows.size), cut):
            s = int(shards[run[0]])
            want = rows[run] - self.offsets[s]
            yield from self._read_run(s, want, rows[run])

    def _read_run(self, s: int, positions: np.ndarray, rows: np.ndarray):
        url = self.urls[s]
        order = np.argsort(positions, kind="stable")
        positions, rows = positions[order], rows[order]
        errors = _Errors()
        j = 0
        last = int(positions[-1])
        for pos, sample in enumerate(_samples(url, errors)):
            if pos > last:
                break
            if pos != positions[j]:
                continue
            row = int(rows[j])
            key = self._keys[row].as_py()
            if sample.get("__key__") != key:
                raise RuntimeError(
                    f"{url}: sample {pos} has key {sample.get('__key__')!r} but the index says {key!r}; "
                    "the shards changed since they were indexed. Delete the index (shards.json / "
                    f"{INDEX_FILE} beside them, or $GEOBIND_CACHE/shard-index) and rerun."
                )
            yield row, sample
            j += 1
            if j == len(positions):
                break
        for row in rows[j:]:
            yield (
                int(row),
                BadSampleError(
                    f"{url}#{self._keys[int(row)].as_py()}",
                    BAD_SHARD,
                    errors.first or "shard ended before this sample",
                ),
            )


# ---------------------------------------------------------------------------------------------
# building / caching the index


def cache_root() -> Path:
    """Where GeoBind caches derived data it can rebuild (``$GEOBIND_CACHE``, default
    ``~/.cache/geobind``)."""
    return Path(os.environ.get("GEOBIND_CACHE") or Path.home() / ".cache" / "geobind").expanduser()


def _identity(urls: list[str], schema: ShardSchema) -> str:
    h = hashlib.sha256(schema.fingerprint().encode())
    for u in urls:
        h.update(f"{u}\0{_size(u)}\0{_mtime(u)}\n".encode())
    return h.hexdigest()


def _scan(
    urls: list[str], schema: ShardSchema, workers: int, progress: bool
) -> list[dict[str, Any]]:
    if workers > 1 and len(urls) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(urls))) as pool:
            it = pool.map(_scan_shard, urls, [schema] * len(urls))
            return list(_progress(it, len(urls), progress, "index shards"))
    return [_scan_shard(u, schema) for u in _progress(urls, len(urls), progress, "index shards")]


def _progress(it: Iterable, total: int, on: bool, desc: str):
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="shard", leave=False)


def build_index(
    urls: list[str], schema: ShardSchema, *, workers: int = 1, progress: bool = False
) -> tuple[pd.DataFrame, list[int], list[str], dict[int, str]]:
    """Scan shards: ``(index frame, samples per shard, member suffixes, shard errors)``."""
    scans = _scan(urls, schema, workers, progress)
    rows = []
    counts, suffixes, errors = [], set(), {}
    for s, sc in enumerate(scans):
        counts.append(len(sc["keys"]))
        suffixes.update(sc["suffixes"])
        if sc["error"]:
            errors[s] = sc["error"]
        for key, raw in zip(sc["keys"], sc["meta"]):
            sid, lat, lon, kept, problem = _parse_meta(raw, key, schema)
            rows.append(
                {"key": key, "id": sid, "lat": lat, "lon": lon, "problem": problem or "", **kept}
            )
    index = pd.DataFrame(rows, columns=None if rows else ["key", "id", "lat", "lon", "problem"])
    return index, counts, sorted(suffixes), errors


def _header(
    urls: list[str],
    base: Path | None,
    counts: list[int],
    suffixes: list[str],
    schema: ShardSchema,
    errors: dict[int, str],
) -> dict[str, Any]:
    def rel(u: str) -> str:
        return os.path.relpath(u, base) if base is not None and not _is_remote(u) else u

    return {
        "__kind__": "wids-shard-index-v1",  # readable by webdataset's wids.ShardListDataset too
        "wids_version": 1,
        "name": schema.name,
        "shardlist": [
            {"url": rel(u), "nsamples": int(n), "filesize": _size(u)} for u, n in zip(urls, counts)
        ],
        "geobind": {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "schema": json.loads(schema.fingerprint()),
            "suffixes": suffixes,
            "shard_errors": {str(k): v for k, v in errors.items()},
        },
    }


def _parquet_safe(index: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns whose values mix types (a field that is sometimes a number, sometimes
    text) are stored as text, which Parquet can hold."""
    out = index.copy()
    for c in out.columns:
        if out[c].dtype == object:
            kinds = {
                type(v)
                for v in out[c]
                if v is not None and not (isinstance(v, float) and math.isnan(v))
            }
            if len(kinds) > 1:
                out[c] = [None if v is None else str(v) for v in out[c]]
    return out


def write_index(
    directory: Path,
    urls: list[str],
    index: pd.DataFrame,
    counts: list[int],
    suffixes: list[str],
    schema: ShardSchema,
    errors: dict[int, str] | None = None,
) -> None:
    """Write ``shards.json`` + ``index.parquet`` into ``directory`` (shard urls relative to it)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (INDEX_FILE + ".tmp")
    _parquet_safe(index).to_parquet(tmp, index=False)
    os.replace(tmp, directory / INDEX_FILE)
    head = _header(urls, directory, counts, suffixes, schema, errors or {})
    tmpj = directory / (SHARDS_FILE + ".tmp")
    tmpj.write_text(json.dumps(head, indent=1) + "\n")
    os.replace(tmpj, directory / SHARDS_FILE)


def _read_index(
    directory: Path, head_path: Path, index_path: Path, urls: list[str] | None, schema: ShardSchema
):
    """Load a stored index if it describes exactly these shards (names and sizes)."""
    if not (head_path.is_file() and index_path.is_file()):
        return None
    try:
        head = json.loads(head_path.read_text())
    except ValueError:
        return None
    g = head.get("geobind", {})
    if g.get("format") != INDEX_FORMAT or g.get("schema") != json.loads(schema.fingerprint()):
        return None
    listed = [
        e["url"] if _is_remote(e["url"]) else str((directory / e["url"]).resolve())
        for e in head["shardlist"]
    ]
    if urls is not None and listed != urls:
        return None
    for e, u in zip(head["shardlist"], listed):
        if e.get("filesize") is not None and _size(u) != e["filesize"]:
            warnings.warn(f"{u} changed size since it was indexed; re-indexing", stacklevel=3)
            return None
    index = pd.read_parquet(index_path)
    counts = [int(e["nsamples"]) for e in head["shardlist"]]
    errors = {int(k): v for k, v in g.get("shard_errors", {}).items()}
    return listed, index, counts, list(g.get("suffixes", [])), errors


def _check_pack_folder(folder: Path) -> None:
    """A ``geobind data pack`` output that was stopped before it finished holds only some of its
    shards, and one whose shard changed size lost samples: read as a dataset either would
    silently lack them."""
    try:
        state = json.loads((folder / "pack.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(state, dict) and state.get("complete") is False:
        written = len(list(folder.glob("*.tar")))
        raise ValueError(f"{folder} is an unfinished `geobind data pack` output ({written} shards written so far): "
                         "rerun the same pack command to finish it")
    # A finished pack recorded each shard's size: one that differs was cut short (an
    # interrupted copy, say) or replaced, and would lose its samples without a word.
    try:
        listed = json.loads((folder / SHARDS_FILE).read_text())["shardlist"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for e in listed:
        url, size = e.get("url"), e.get("filesize")
        if not url or size is None or _is_remote(url):
            continue
        now = _size(str(folder / url))
        if now != size:
            raise ValueError(
                f"{folder / url} is {now if now is not None else 'missing'}{' bytes' if now is not None else ''} where "
                f"`geobind data pack` wrote {size} bytes ({e.get('nsamples', '?')} samples): it was cut short or "
                "replaced. Pack again (or copy it again); to read the shards as they are now, delete "
                f"{SHARDS_FILE} and {INDEX_FILE} from {folder}")


def open_shards(
    spec: str,
    schema: ShardSchema | None = None,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> ShardSet:
    """Open a shard set: a folder (with ``shards.json`` + ``index.parquet`` from ``geobind data
    pack``, or any ``*.tar``), a ``.tar``, a brace pattern or URLs. Without a stored index the
    shards are scanned once and the index cached (see :func:`cache_root`)."""
    schema = schema or geobind_schema()
    spec = str(spec)
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    p = Path(spec).expanduser()
    if not _is_remote(spec) and p.is_dir():
        _check_pack_folder(p)
    if not _is_remote(spec) and p.is_dir() and (p / SHARDS_FILE).is_file():
        got = _read_index(p, p / SHARDS_FILE, p / INDEX_FILE, None, schema)
        if got is not None:
            urls, index, counts, suffixes, errors = got
            return ShardSet(
                str(p), urls, schema, index, counts, suffixes, _identity(urls, schema), errors
            )
    urls = expand_shards(spec)
    identity = _identity(urls, schema)
    cdir = cache_root() / "shard-index"
    head_path, index_path = cdir / f"{identity[:32]}.json", cdir / f"{identity[:32]}.parquet"
    got = _read_index(Path("/"), head_path, index_path, urls, schema)
    if got is None:
        index, counts, suffixes, errors = build_index(
            urls, schema, workers=workers, progress=progress
        )
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            tmp = index_path.with_suffix(f".tmp{os.getpid()}")
            _parquet_safe(index).to_parquet(tmp, index=False)
            os.replace(tmp, index_path)
            tmpj = head_path.with_suffix(f".tmp{os.getpid()}")
            tmpj.write_text(json.dumps(_header(urls, Path("/"), counts, suffixes, schema, errors)))
            os.replace(tmpj, head_path)
        except OSError as e:  # a read-only cache only costs a rescan next time
            warnings.warn(f"could not cache the shard index in {cdir}: {e}", stacklevel=2)
    else:
        _, index, counts, suffixes, errors = got
    return ShardSet(spec, urls, schema, index, counts, suffixes, identity, errors)


# ---------------------------------------------------------------------------------------------
# planning an epoch (pure functions of the index; no tar is read)


def buffer_shuffle(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Seeded buffer shuffle: keep ``bufsize`` items, emit a random one as each new one arrives.
    Deterministic given the input order and ``rng``, so a plan can be replayed on row numbers."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) >= bufsize:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def _rng(*parts: int) -> random.Random:
    return random.Random(
        int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")
    )


def epoch_rows(counts: np.ndarray, valid: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch's usable rows in read order: shards in a seeded order, rows in shard order."""
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = np.random.default_rng([int(seed), int(epoch), 77]).permutation(len(counts))
    rows = (
        np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in order])
        if len(order)
        else np.zeros(0, np.int64)
    )
    return rows[np.asarray(valid, dtype=bool)[rows]]


def _batches_of_worker(steps: int, workers: int, w: int) -> int:
    return len(range(w, steps, workers))


def _slots(rows: np.ndarray, batch_size: int, world: int, workers: int) -> list[np.ndarray]:
    """Cut ``rows`` (a multiple of ``batch_size`` long) into contiguous chunks, slot
    ``rank * workers + worker``; each worker of each rank gets whole per-rank batches, the
    workers of a rank taking batches round-robin (the DataLoader's order)."""
    per = batch_size // world
    steps = len(rows) // batch_size
    sizes = [
        _batches_of_worker(steps, workers, w) * per for _ in range(world) for w in range(workers)
    ]
    return np.split(rows, np.cumsum(sizes)[:-1])


def _emitted(
    slot: np.ndarray, bufsize: int, seed: int, epoch: int, segment: int, slot_id: int
) -> list[int]:
    return list(buffer_shuffle(slot.tolist(), bufsize, _rng(seed, epoch, segment, slot_id)))


@dataclass
class EpochPlan:
    """One segment of one epoch: for every slot (rank * workers + worker) its rows in read
    order, the seed of its shuffle, and how many of its batches are already consumed."""

    world: int
    workers: int
    per_rank_batch: int
    steps: int  # batches per rank in this segment
    slots: list[np.ndarray]
    segment: int
    skip_batches: list[int] = field(default_factory=list)  # per slot
    # The DataLoader asks its workers round-robin starting at worker 0, so after ``done`` batches
    # loader worker j serves slot (j + done) % workers, whose next batch is the next one due.
    rotation: int = 0
    seed: int = 0
    epoch: int = 0
    bufsize: int = 1000

    def slot_rng(self, slot_id: int) -> random.Random:
        return _rng(self.seed, self.epoch, self.segment, slot_id)


def plan_epoch(
    counts: np.ndarray,
    valid: np.ndarray,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    segments: list[tuple[int, int, int]],
    step_in_epoch: int,
    bufsize: int,
) -> EpochPlan:
    """Plan the current segment of an epoch (see the module docstring).

    ``segments`` lists ``(world, workers, first_step)`` of every layout used so far in this
    epoch, the last being the current one; ``step_in_epoch`` is the next batch to deliver.
    """
    if not segments:
        raise ValueError("plan_epoch needs at least the current segment")
    rows = epoch_rows(counts, valid, seed, epoch)
    steps = len(rows) // batch_size
    remaining = rows[: steps * batch_size]
    for i, (world, workers, start) in enumerate(segments[:-1]):
        done = segments[i + 1][2] - start
        per = batch_size // world
        consumed = []
        for sid, slot in enumerate(_slots(remaining, batch_size, world, workers)):
            nb = _batches_of_worker(done, workers, sid % workers)
            if nb:
                consumed.extend(_emitted(slot, bufsize, seed, epoch, i, sid)[: nb * per])
        remaining = remaining[~np.isin(remaining, np.asarray(consumed, dtype=np.int64))]
    world, workers, start = segments[-1]
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} is not divisible by {world} ranks")
    seg_steps = len(remaining) // batch_size
    done = step_in_epoch - start
    if not 0 <= done <= seg_steps:
        raise ValueError(
            f"step {step_in_epoch} is outside this epoch's plan ({start}..{start + seg_steps})"
        )
    return EpochPlan(
        world=world,
        workers=workers,
        per_rank_batch=batch_size // world,
        steps=seg_steps,
        slots=_slots(remaining, batch_size, world, workers),
        segment=len(segments) - 1,
        skip_batches=[
            _batches_of_worker(done, workers, sid % workers) for sid in range(world * workers)
        ],
        seed=seed,
        epoch=epoch,
        bufsize=bufsize,
        rotation=done % workers,
    )


def next_segments(
    segments: list[list[int]] | None, world: int, workers: int, step_in_epoch: int
) -> list[list[int]]:
    """The epoch's segments after (re)starting at ``step_in_epoch`` with this layout."""
    segments = [list(s) for s in (segments or [])]
    if not segments or step_in_epoch == 0:
        # Without a record (a checkpoint from before segments existed) the best guess is that
        # the epoch so far ran with this layout.
        return [[world, workers, 0]]
    if segments[-1][:2] == [world, workers]:
        return segments
    return segments + [[world, workers, step_in_epoch]]


# ---------------------------------------------------------------------------------------------
# iterable datasets


class EpochStream(IterableDataset):
    """One rank's training stream for one epoch segment: the DataLoader worker ``w`` reads slot
    ``rank * workers + w`` and yields ``(row, process(row, sample) | BadSampleError)`` in batch
    order. Use with ``DataLoader(batch_size=plan.per_rank_batch, num_workers=plan.workers or 0)``."""

    def __init__(
        self,
        shards: ShardSet,
        plan: EpochPlan,
        rank: int,
        process: Callable[[int, dict[str, Any]], Any],
    ):
        self.shards, self.plan, self.rank, self.process = shards, plan, rank, process

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        n = info.num_workers if info is not None else 1
        if n != self.plan.workers:
            raise RuntimeError(
                f"the plan is for {self.plan.workers} loader workers, the loader has {n}"
            )
        sid = self.rank * self.plan.workers + (w + self.plan.rotation) % n
        slot = self.plan.slots[sid]
        skip = self.plan.skip_batches[sid] * self.plan.per_rank_batch
        stream = buffer_shuffle(
            self.shards.read_rows(slot), self.plan.bufsize, self.plan.slot_rng(sid)
        )
        # Samples consumed before a resume are read, never decoded.
        yield from _processed(itertools.islice(stream, skip, None), self.process)


class RowStream(IterableDataset):
    """Every listed row once, in index order, split into contiguous chunks over the DataLoader's
    workers (embedding, evaluation, checks). Yields ``(row, process(row, sample) | error)``."""

    def __init__(
        self,
        shards: ShardSet,
        process: Callable[[int, dict[str, Any]], Any],
        rows: np.ndarray | None = None,
    ):
        self.shards, self.process = shards, process
        self.rows = (
            np.arange(len(shards), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk = np.array_split(self.rows, n)[w]
        yield from _processed(self.shards.read_rows(chunk), self.process)


def span_batches(spans: list[tuple[int, int]], batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each batch of up to ``batch_size`` rows within each span (``(start,
    stop)``, in order): no batch straddles two spans."""
    return [(s, min(s + batch_size, b)) for a, b in spans for s in range(a, b, batch_size)]


class ChunkStream(IterableDataset):
    """The rows of ``spans`` (``(start, stop)``, ascending) as batches of up to ``batch_size``
    that never straddle a span, so a span's batches are the same whichever other spans are
    read with it. The DataLoader's workers (use ``batch_size=None``) take the spans in
    contiguous runs, so each reads its own stretch of the shards once. Yields lists of
    ``(row, process(row, sample) | error)``."""

    def __init__(
        self,
        shards: ShardSet,
        process: Callable[[int, dict[str, Any]], Any],
        spans: list[tuple[int, int]],
        batch_size: int,
    ):
        self.shards, self.process, self.spans, self.batch_size = shards, process, spans, batch_size

    def __len__(self) -> int:  # batches
        return len(span_batches(self.spans, self.batch_size))

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = [self.spans[i] for i in np.array_split(np.arange(len(self.spans)), n)[w]]
        if not mine:
            return
        bounds = span_batches(mine, self.batch_size)
        starts = np.array([a for a, _ in bounds])
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in mine])
        batches: dict[int, list] = {}
        for row, value in _processed(self.shards.read_rows(rows), self.process):
            k = int(np.searchsorted(starts, row, side="right")) - 1
            batches.setdefault(k, []).append((row, value))
            if len(batches[k]) == bounds[k][1] - bounds[k][0]:
                yield batches.pop(k)
        for k in sorted(batches):  # rows a broken shard never delivered: the batch goes without them
            yield batches.pop(k)


def _processed(rows, process: Callable[[int, dict[str, Any]], Any]):
    """``(row, sample | error)`` -> ``(row, process(row, sample) | error)``: a bad sample is
    passed on, never raised, so a long run skips and counts it."""
    for row, sample in rows:
        if isinstance(sample, BadSampleError):
            yield row, sample
            continue
        try:
            yield row, process(row, sample)
        except BadSampleError as e:
            yield row, e


def worker_count(num_workers: int) -> int:
    """Slots per rank for a DataLoader with ``num_workers`` (0: the main process, one slot)."""
    return max(1, int(num_workers))
