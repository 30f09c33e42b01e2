"""Embedding a dataset to Parquet: ids, lat, lon and unit embeddings of one modality.

The output holds one row per usable place (bad rows are skipped and counted, as in training)
with columns ``id``, ``lat``, ``lon``, ``embedding`` (fixed-size list of float32, or float16 with
``float16=True``), and where known ``caption`` (the place's text) and ``item`` (the raw item:
a file path, or the text itself). The schema metadata key ``geobind`` holds a JSON header: the
model identity of the encoder (:meth:`GeoBind.identity`), modality, dimension, dtype, the
dataset's source and content hash, and the skip counts. Indexes and maps read that header to
refuse embeddings from another model.

The work is split into chunks of rows, each written atomically to ``OUT.parts/`` as it
finishes: an interrupted run resumes where it stopped, and under ``torchrun`` each rank embeds
every ``world_size``-th chunk and writes its own parts; rank 0 then merges them in row order into
``OUT`` (streamed, never holding every vector at once) and removes ``OUT.parts/``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geobind.search.common import atomic_path, check_writable

if TYPE_CHECKING:
    from geobind.model import GeoBind

FORMAT = "geobind-embeddings"
FORMAT_VERSION = 1
META_KEY = b"geobind"
CAPTION_COLUMNS = ("caption", "description", "title")
IMAGE_MODALITIES = ("satellite", "ground")


def is_image_modality(modality: str) -> bool:
    """Whether ``modality`` holds images (thumbnails are made of them): the built-in image
    modalities, and any registered one stored as ``.jpg``/``.png`` (a plugin's ``naip``, say)."""
    if modality in IMAGE_MODALITIES:
        return True
    from geobind.data.pack import member_kind

    try:
        return member_kind(modality) == "image"
    except ValueError:  # not registered here (its plugin not imported): no thumbnails
        return False


@dataclass(repr=False)
class Embeddings:
    """Embeddings of one modality read back from Parquet (or built in memory)."""

    # Place ids, one per row.
    ids: list[str]
    # Latitude and longitude in degrees (EPSG:4326), float64 [N].
    lat: np.ndarray
    lon: np.ndarray
    # Unit rows [N, D], float32 or float16 as stored.
    vectors: np.ndarray
    # The header (model identity, modality, dim, dtype, dataset, skips); see the module doc.
    header: dict[str, Any]
    # Caption per row where known (None elsewhere); None when the dataset has none.
    captions: list[str | None] | None = None
    # Raw item per row (file path or text); None when not recorded.
    items: list[str | None] | None = None
    # JPEG thumbnail per row (image modalities, when made); None when not recorded.
    thumbnails: list[bytes | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        # A summary: every id and thumbnail would make megabytes of text in a notebook.
        extras = [name for name in ("captions", "items", "thumbnails") if getattr(self, name) is not None]
        return (f"Embeddings(n={len(self)}, dim={self.dim if self.vectors.ndim == 2 else '?'}, "
                f"modality={self.header.get('modality')!r}, dtype={self.vectors.dtype}, "
                f"with={'+'.join(extras) or 'none'})")

    @property
    def dim(self) -> int:
        """The embedding dimension ``D``."""
        return int(self.vectors.shape[1])

    @property
    def modality(self) -> str:
        """The modality that was embedded (``""`` if the header does not say)."""
        return self.header.get("modality", "")

    @property
    def identity(self) -> str:
        """Identity of the model that made the embeddings (``""`` if the header lacks it)."""
        return self.header.get("model", {}).get("identity", "")


def _absolute_source(source: str) -> str:
    """A dataset's source as recorded in the embeddings' header: a local path made absolute
    (brace patterns included), URLs and ``pipe:`` specs as they are."""
    if "://" in source or source.startswith("pipe:"):
        return source
    return os.path.abspath(os.path.expanduser(source))


def read_embeddings(path: str | Path, *, extras: bool = True) -> Embeddings:
    """Read a file written by :func:`embed_dataset`; an error naming the problem otherwise.
    ``extras=False`` reads only ids, coordinates and vectors (``captions``, ``items`` and
    ``thumbnails`` are then None): what a map needs, without loading every thumbnail."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    try:
        columns = None
        if not extras:
            names = pq.read_schema(path).names
            columns = [c for c in names if c not in ("caption", "item", "thumbnail")]
        table = pq.read_table(path, columns=columns)
    except Exception as e:  # pyarrow raises several types for a non-Parquet file
        raise ValueError(f"{path} is not a Parquet file ({e}); embeddings files are written by "
                         "`geobind embed`") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None or "embedding" not in table.column_names:
        raise ValueError(
            f"{path} is not a GeoBind embeddings file (no 'embedding' column or geobind header); "
            "write one with `geobind embed`"
        )
    header = json.loads(raw)
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has embeddings format {header['format_version']}; upgrade geobind"
        )
    n = table.num_rows
    if n == 0:
        raise ValueError(f"embeddings file {path} has no rows")
    col = table.column("embedding").combine_chunks()
    dim = int(header["dim"])
    vectors = col.values.to_numpy(zero_copy_only=False).reshape(n, dim)
    names = table.column_names
    return Embeddings(
        ids=[str(x) for x in table.column("id").to_pylist()],
        lat=table.column("lat").to_numpy().astype(np.float64),
        lon=table.column("lon").to_numpy().astype(np.float64),
        vectors=vectors,
        header=header,
        captions=table.column("caption").to_pylist() if "caption" in names else None,
        items=table.column("item").to_pylist() if "item" in names else None,
        thumbnails=table.column("thumbnail").to_pylist() if "thumbnail" in names else None,
    )


def write_embeddings(emb: Embeddings, path: str | Path, *, force: bool = False) -> Path:
    """Write ``emb`` as an embeddings Parquet file (atomic; no overwrite without ``force``)."""
    import pyarrow.parquet as pq

    table = _arrow_table(
        emb.ids, emb.lat, emb.lon, emb.vectors, emb.captions, emb.items, emb.thumbnails
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(emb.header).encode()})
    with atomic_path(path, force=force) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _arrow_table(ids, lat, lon, vectors: np.ndarray, captions=None, items=None, thumbnails=None):
    import pyarrow as pa

    n, dim = vectors.shape
    vtype = pa.float16() if vectors.dtype == np.float16 else pa.float32()
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=vtype)
    cols = {
        "id": pa.array([str(x) for x in ids], type=pa.string()),
        "lat": pa.array(np.asarray(lat, dtype=np.float64)),
        "lon": pa.array(np.asarray(lon, dtype=np.float64)),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
    }
    if captions is not None:
        cols["caption"] = pa.array(list(captions), type=pa.string())
    if items is not None:
        cols["item"] = pa.array(list(items), type=pa.string())
    if thumbnails is not None:
        cols["thumbnail"] = pa.array(list(thumbnails), type=pa.binary())
    return pa.table(cols)


def _captions(table) -> list[str | None] | None:
    """The text column, else a caption-like metadata column; None when the dataset has none."""
    if "text" in table.columns and not getattr(table, "streaming", False):
        return list(table.columns["text"])
    meta = getattr(table, "meta", None)
    if meta is not None:
        for c in CAPTION_COLUMNS:
            if c in meta.columns:
                return [
                    None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                    for v in meta[c].tolist()
                ]
    return None


def thumbnail_bytes(item: Any, size: int) -> bytes | None:
    """A JPEG thumbnail (longest side ``size`` px) of an image item, or None if it does not decode."""
    from geobind.data.errors import BadSampleError
    from geobind.data.media import load_image

    try:
        return _thumbnail(load_image(item), size)
    except BadSampleError:
        return None


def _thumbnail(img, size: int) -> bytes:
    import io

    img = img.copy()
    # reducing_gap=1.0: shrink by a whole factor first (box filter), then resample (bicubic) the
    # rest; 5x faster than Pillow's default of 2.0 on 256 px tiles, and the thumbnails differ
    # from that by at most a few levels per pixel (about 48 dB), less than their JPEG coding
    img.thumbnail((size, size), reducing_gap=1.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@dataclass
class _Chunk:
    rows: np.ndarray  # dataset rows kept (valid), ascending
    vectors: np.ndarray  # [len(rows), D] float32
    counts: Counter  # skipped rows per reason
    captions: dict[int, str | None]  # row -> caption (streamed datasets)
    thumbnails: dict[int, bytes | None]  # row -> thumbnail


class _Prepare:
    """Loader-side work for one row: the encoder input, and the thumbnail (image modalities) and
    caption (streamed datasets) stored beside its vector. An image is decoded once for both, in
    the loader workers, so a GPU is not left waiting on thumbnails made one by one."""

    def __init__(self, encoder, modality: str, thumbnail_size: int, caption: bool):
        self.encoder, self.modality = encoder, modality
        self.thumbnail_size, self.caption = thumbnail_size, caption

    def load(self, item: Any, *, train: bool = False) -> tuple[Any, bytes | None, None]:
        """``(encoder input, thumbnail, None)``: an encoder-like ``load``, so the cache's row
        dataset serves tables here too (the caption slot is filled for streamed rows)."""
        if not self.thumbnail_size:
            return self.encoder.load(item, train=False), None, None
        from geobind.data.media import load_image

        img = load_image(item)
        return self.encoder.load(img, train=False), _thumbnail(img, self.thumbnail_size), None


class _ShardRows:
    """``(row, streamed sample) -> (input, thumb, caption)`` for :class:`RowStream`."""

    def __init__(self, shards, prep: _Prepare):
        self.shards, self.prep = shards, prep

    def __call__(self, row: int, sample: dict):
        from geobind.data.errors import BadSampleError

        x, thumb, _ = self.shards.load(sample, row, self.prep.modality, self.prep.load)
        caption = None
        if self.prep.caption:
            try:
                caption = self.shards.item(sample, row, "text")
            except BadSampleError:
                pass
        return x, thumb, caption


class _Collate:
    """``[(row, (input, thumb, caption) | BadSampleError)]`` -> ``(rows, batch, thumbs,
    captions, [(row, error)])``."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, samples):
        from geobind.data.errors import BadSampleError

        good = [(r, v) for r, v in samples if not isinstance(v, BadSampleError)]
        bad = [(r, v) for r, v in samples if isinstance(v, BadSampleError)]
        batch = self.encoder.collate([v[0] for _, v in good]) if good else None
        return [r for r, _ in good], batch, [v[1] for _, v in good], [v[2] for _, v in good], bad


def pad_batch(batch: Any, size: int) -> Any:
    """A collated batch (a tensor, or a dict of tensors with the batch first) grown to ``size``
    rows by repeating its last row."""
    import torch

    if isinstance(batch, dict):
        return {k: pad_batch(v, size) for k, v in batch.items()}
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"cannot pad a batch of type {type(batch).__name__}")
    extra = size - batch.shape[0]
    if extra <= 0:
        return batch
    padded = torch.cat([batch, batch[-1:].expand(extra, *batch.shape[1:])])
    if batch.dim() == 4 and not batch.is_contiguous() and batch.is_contiguous(memory_format=torch.channels_last):
        # Keep the image batch's memory layout: a compiled encoder guards on strides too.
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded


class _Pending:
    """What has come back so far for one chunk of rows."""

    def __init__(self, size: int, dim: int):
        self.left, self.dim = size, dim  # rows not yet seen (embedded or skipped); vector size
        self.rows: list[int] = []
        self.vectors: list[np.ndarray] = []
        self.counts: Counter = Counter()
        self.captions: dict[int, str | None] = {}
        self.thumbnails: dict[int, bytes | None] = {}

    def done(self) -> _Chunk:
        order = np.argsort(self.rows, kind="stable")
        vectors = np.concatenate(self.vectors)[order] if self.vectors else np.zeros((0, self.dim), np.float32)
        return _Chunk(np.asarray(self.rows, dtype=np.int64)[order], vectors, self.counts, self.captions,
                      self.thumbnails)


def _embed_chunks(
    encoder,
    data,
    modality: str,
    chunks: list[tuple[int, int, int]],
    chunk_rows: int,
    *,
    batch_size: int,
    num_workers: int,
    thumbnail_size: int,
    pad_batches: bool = False,
    on_rows: Callable[[int], None] | None = None,
):
    """Embed the rows of ``chunks`` (``(chunk, start, stop)``, ascending; chunk ``c`` starts at
    row ``c * chunk_rows``) of a table (random access) or a streamed shard set, and yield
    ``(chunk, _Chunk)`` as soon as all of a chunk's rows are back. Bad rows are skipped and counted.

    One loader serves every chunk, so its workers start once and keep decoding across chunk
    boundaries (a GPU is not left idle while a new loader fills). Batches never straddle a
    chunk, so a chunk's vectors do not depend on which other chunks are embedded with it (a
    resumed run writes what an uninterrupted one does). Streamed shards go to the workers in
    contiguous runs of chunks; chunks then finish a few at a time, in any order.
    ``pad_batches`` fills short batches (a chunk's last one, or one with skipped rows) up to
    ``batch_size`` by repeating their last row, and drops those vectors: a compiled encoder
    then always sees one shape and is not compiled again. ``on_rows(n)`` is told of every
    ``n`` rows done (embedded or skipped)."""
    import torch
    from torch.utils.data import DataLoader

    from geobind.binding.cache import _ItemDataset
    from geobind.binding.prefetch import map_tensors, outputs_one_behind
    from geobind.data.manifest import for_loader_workers
    from geobind.data.shards import ChunkStream, span_batches
    from geobind.model import autocast_for

    if not chunks:
        return
    pending = {c: _Pending(b - a, encoder.dim) for c, a, b in chunks}
    streaming = getattr(data, "streaming", False)
    prep = _Prepare(encoder, modality, thumbnail_size, caption=streaming and "text" in data.columns)
    # Its own generator: embedding never draws from the global RNG (training's dropout uses it).
    common = dict(num_workers=num_workers, collate_fn=_Collate(encoder), pin_memory=encoder.device.type == "cuda",
                  generator=torch.Generator())
    if streaming:
        stream = ChunkStream(data, _ShardRows(data, prep), [(a, b) for _, a, b in chunks], batch_size)
        loader = DataLoader(stream, batch_size=None, **common)
    else:
        batches = [list(range(a, b)) for a, b in span_batches([(a, b) for _, a, b in chunks], batch_size)]
        loader = DataLoader(_ItemDataset(for_loader_workers(data, num_workers), modality, prep),
                            batch_sampler=batches, **common)
    device = encoder.device

    def forward(item):
        batch_rows, batch = item[0], item[1]
        if batch is None:
            return None
        n = len(batch_rows)
        if pad_batches and n < batch_size:
            batch = pad_batch(batch, batch_size)
        with torch.no_grad(), autocast_for(device):
            return encoder(batch)[:n].float()

    def settle(item, vectors):
        """Account for a batch: the chunk it belongs to, if this completes it."""
        batch_rows, _, thumbs, caps, bad = item
        c = (batch_rows[0] if batch_rows else bad[0][0]) // chunk_rows  # batches never straddle chunks
        p = pending[c]
        for _, e in bad:
            p.counts[e.reason] += 1
        if batch_rows:
            p.rows.extend(batch_rows)
            p.vectors.append(vectors.numpy())
            if thumbnail_size:
                p.thumbnails.update(zip(batch_rows, thumbs))
            if prep.caption:
                p.captions.update(zip(batch_rows, caps))
        p.left -= len(batch_rows) + len(bad)
        if on_rows is not None:
            on_rows(len(batch_rows) + len(bad))
        return (c, pending.pop(c).done()) if p.left <= 0 else None

    was = encoder.training
    encoder.eval()
    # The next batch crosses to the GPU while this one computes, and each batch's vectors reach
    # the host one batch later.
    move = lambda item, to: (item[0], map_tensors(item[1], to), *item[2:])  # noqa: E731
    try:
        for item, vectors in outputs_one_behind(loader, device, move, forward):
            done = settle(item, vectors)
            if done is not None:
                yield done
    finally:
        encoder.train(was)
    for c in sorted(pending):  # rows a broken source never delivered: the chunk ends without them
        yield c, pending.pop(c).done()


def embed_dataset(
    model: GeoBind,
    data: Any,
    modality: str,
    out: str | Path,
    *,
    layout: str = "manifest",
    layout_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    float16: bool = False,
    thumbnails: bool | None = None,
    thumbnail_size: int = 128,
    chunk_rows: int = 4096,
    num_workers: int = 0,
    compile: bool = False,
    preprocess_on: str = "loader",
    force: bool = False,
    progress: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    model_name: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Embed ``modality`` of every row of a dataset into ``out`` (Parquet); see the module doc.

    ``data`` is a path read with :func:`geobind.data.manifest.read_dataset` in ``layout`` (with
    ``layout_options``), or
    an already-read table / shard set. ``thumbnails`` (default: on for image modalities) stores
    a ``thumbnail_size`` px JPEG per row, which indexes keep and ``geobind serve`` shows.
    Resumes from ``out``'s parts folder when one from the same model, data and settings exists.
    ``compile`` runs the encoder through ``torch.compile`` for this call (same vectors up to
    float rounding; the first batch includes the compilation, and short batches are padded to
    ``batch_size`` so the encoder compiles once). Image tiles always leave the loader as uint8
    and are normalised where the model runs; ``preprocess_on="device"`` (image encoders) also
    moves their resizing there, which unloads the loader workers on a GPU; the vectors then
    differ from the default PIL resize by resampling rounding only.
    ``rank``/``world_size`` default to the ``torch.distributed`` group (one process otherwise).
    Returns a summary: ``path``, ``rows`` written, ``skipped`` counts per reason.
    """
    from geobind import distributed as dist
    from geobind.data.manifest import read_dataset

    log = log or (lambda *_: None)
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    out = Path(out)
    if isinstance(data, (str, Path)) and Path(data).is_file() and out.resolve() == Path(data).resolve():
        raise ValueError(f"--out {out} is the dataset being embedded (--data): name a new .parquet file")
    check_writable(out, force=force)
    encoder = model.encoder(modality)
    if preprocess_on not in ("loader", "device"):
        raise ValueError(f"preprocess_on={preprocess_on!r}: use 'loader' or 'device'")
    from geobind.encoders.images import ImageTransform

    transform = getattr(encoder, "transform", None)
    if preprocess_on == "device" and not isinstance(transform, ImageTransform):
        raise ValueError(
            f"preprocess_on='device' needs an image encoder; {modality!r} uses {encoder.type_name}"
        )
    table = read_dataset(data, layout, **(layout_options or {})) if isinstance(data, (str, Path)) else data
    if len(table) == 0:
        raise ValueError(f"dataset {getattr(table, 'source', data)} has no rows")
    table.require(modality)
    if thumbnails is None:
        thumbnails = is_image_modality(modality)
    thumb_px = int(thumbnail_size) if thumbnails else 0
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modality": modality,
        "dim": model.dim,
        "dtype": "float16" if float16 else "float32",
        "model": {
            "identity": model.identity(modality),
            "encoder": encoder.type_name,
            **({"name": str(model_name)} if model_name else {}),
        },
        "dataset": {
            # Absolute for a local path: `geobind serve` finds the recordings of the places
            # from this record, whatever folder it is started in.
            "source": _absolute_source(str(table.source)),
            "identity": table.identity,
            "rows": len(table),
            "layout": layout,
            # Only when given, so parts written before they were recorded still resume. They are
            # part of the dataset's identity (a manifest's bands/scale): serve re-reads with them.
            **({"layout_options": dict(layout_options)} if layout_options else {}),
        },
        "chunk_rows": int(chunk_rows),
        "thumbnail_size": thumb_px,
        # Only when set, so parts written before the option existed still resume.
        **({"preprocess_on": preprocess_on} if preprocess_on != "loader" else {}),
    }
    parts = out.with_name(out.name + ".parts")
    lock = None
    if rank == 0:
        lock = _prepare_parts(parts, header, log, out)
    try:
        return _embed_into_parts(
            model, table, modality, out, parts, header, encoder, transform, rank=rank, world_size=world_size,
            chunk_rows=chunk_rows, batch_size=batch_size, num_workers=num_workers, thumb_px=thumb_px,
            float16=float16, compile=compile, preprocess_on=preprocess_on, force=force, progress=progress,
            log=log)
    finally:
        if lock is not None:
            lock.close()  # releases it (the folder itself is gone once the output is merged)


def _embed_into_parts(model, table, modality, out, parts, header, encoder, transform, *, rank, world_size,
                      chunk_rows, batch_size, num_workers, thumb_px, float16, compile, preprocess_on, force,
                      progress, log) -> dict[str, Any]:
    from geobind import distributed as dist

    dist.barrier()

    n = len(table)
    chunks = [(c, s, min(s + chunk_rows, n)) for c, s in enumerate(range(0, n, chunk_rows))]
    mine = [ch for ch in chunks if ch[0] % world_size == rank]
    if world_size > 1 and len(chunks) < world_size:
        log(f"note: {n} rows make {len(chunks)} chunk{'s' if len(chunks) > 1 else ''} of --chunk-rows {chunk_rows}, "
            f"so {world_size - len(chunks)} of the {world_size} ranks have nothing to embed; a smaller "
            "--chunk-rows spreads the rows over every rank")
    todo = [ch for ch in mine if not _part_path(parts, ch[0]).is_file()]
    if len(todo) < len(mine):
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} chunks already embedded in {parts}")
    captions = _captions(table)
    raw_items = None if getattr(table, "streaming", False) else table.columns.get(modality)
    ids, lat, lon = table.ids, table.lat, table.lon
    bar = None
    if progress:
        from tqdm.auto import tqdm

        share = f" (rank 0's share of {world_size} ranks)" if world_size > 1 else ""
        bar = tqdm(total=sum(b - a for _, a, b in todo), desc=f"embed {modality}{share}", unit="row")
    if compile and todo:
        from geobind.encoders.base import compile_for_inference

        compile_for_inference(encoder)
    if preprocess_on == "device":
        transform.eval_on_device = True
    try:
        for c, ch in _embed_chunks(
            encoder,
            table,
            modality,
            todo,
            chunk_rows,
            batch_size=batch_size,
            num_workers=num_workers,
            thumbnail_size=thumb_px,
            pad_batches=compile,
            on_rows=bar.update if bar is not None else None,
        ):
            rows = ch.rows.tolist()
            vectors = ch.vectors.astype(np.float16 if float16 else np.float32)
            if captions is not None:
                caps = [captions[r] for r in rows]
            elif ch.captions:
                caps = [ch.captions.get(r) for r in rows]
            else:
                caps = None
            part = _arrow_table(
                [ids[r] for r in rows],
                np.asarray([lat[r] for r in rows], np.float64),
                np.asarray([lon[r] for r in rows], np.float64),
                vectors,
                caps,
                [None if raw_items[r] is None else str(raw_items[r]) for r in rows]
                if raw_items is not None
                else None,
                [ch.thumbnails.get(r) for r in rows] if thumb_px else None,
            )
            part = part.replace_schema_metadata({b"bad": json.dumps(dict(ch.counts)).encode()})
            _write_part(part, _part_path(parts, c))
    finally:
        if compile:
            from geobind.encoders.base import uncompile

            uncompile(encoder)  # hand the model back as it came
        if preprocess_on == "device":
            del transform.eval_on_device  # back to the class default (the PIL path)
    if bar is not None:
        bar.close()
    dist.barrier()
    summary: dict[str, Any] = {}
    error: str | None = None
    if rank == 0:
        try:
            summary = _merge(parts, [c for c, _, _ in chunks], out, header, force=force)
        except (ValueError, RuntimeError, OSError) as e:
            if not dist.is_distributed():
                raise
            error = f"{type(e).__name__}: {e}"  # handed to every rank, so none waits forever
        else:
            shutil.rmtree(parts, ignore_errors=True)
            skipped = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
            log(
                f"embedded {summary['rows']} of {n} rows ({modality}, {header['dtype']}) -> {out}; "
                f"skipped: {skipped}"
            )
            from geobind.encoders.base import unknown_texts

            unknown = unknown_texts(encoder, raw_items) if raw_items is not None else []
            if unknown:
                summary["unknown_words"] = len(unknown)
                shown = ", ".join(str(ids[r]) for r in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
                log(f"warning: {len(unknown)} texts have no word the model's vocabulary knows (ids {shown}): "
                    "each embedded to the same vector, so they cannot be told apart")
    if dist.is_distributed():
        summary, error = dist.broadcast_object((summary, error))
        if error:
            raise RuntimeError(f"rank 0 could not merge the parts: {error}")
    return summary


def _part_path(parts: Path, chunk: int) -> Path:
    return parts / f"chunk-{chunk:07d}.parquet"


def _lock_parts(parts: Path, out: Path):
    """An exclusive lock on ``parts/.lock`` (held until the file is closed, or the process ends):
    a second ``embed`` into the same ``--out`` while one runs is refused, rather than deleting
    the first one's parts or writing the same chunks beside it."""
    from geobind.search.common import exclusive_lock

    f, holder = exclusive_lock(parts / ".lock")
    if holder is not None:
        raise FileExistsError(f"{out} is being written by another geobind embed (pid {holder}); wait for it to "
                              "end, or stop it, or choose another --out")
    return f


def _prepare_parts(parts: Path, header: dict, log, out: Path | None = None):
    """Keep a parts folder from the same run (resume); replace one from another run. Returns the
    lock that keeps other runs out of it (see :func:`_lock_parts`)."""
    out = out if out is not None else parts
    marker = parts / "header.json"
    if parts.is_dir():
        lock = _lock_parts(parts, out)  # before anything in it is looked at, or deleted
        try:
            same = json.loads(marker.read_text()) == header
        except (OSError, ValueError):
            same = False
        if same:
            return lock
        log(f"{parts} holds parts of a different model, dataset or setting; starting afresh")
        shutil.rmtree(parts)
        if lock is not None:
            lock.close()
    parts.mkdir(parents=True)
    lock = _lock_parts(parts, out)
    from geobind.search.common import write_text_atomic

    write_text_atomic(marker, json.dumps(header, indent=2))
    return lock


def _write_part(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _merge(
    parts: Path, chunks: list[int], out: Path, header: dict, *, force: bool
) -> dict[str, Any]:
    """Stream the parts, in chunk order, into ``out`` with the header in the schema metadata."""
    import pyarrow.parquet as pq

    missing = [c for c in chunks if not _part_path(parts, c).is_file()]
    if missing:
        raise FileNotFoundError(  # an OSError: the command line says it in one line
            f"{len(missing)} chunks of {parts} are missing (first: {missing[0]}); rerun to resume"
        )
    bad: Counter = Counter()
    rows = 0
    for c in chunks:
        f = pq.ParquetFile(_part_path(parts, c))
        bad.update(json.loads((f.schema_arrow.metadata or {}).get(b"bad", b"{}")))
        rows += f.metadata.num_rows
    if rows == 0:
        shutil.rmtree(parts, ignore_errors=True)
        reasons = ", ".join(f"{k}: {v}" for k, v in bad.items())
        raise ValueError(
            f"no usable rows in {header['dataset']['source']}: every row was skipped ({reasons})"
        )
    header = {**header, "rows": rows, "skipped": dict(bad)}
    with atomic_path(out, force=force) as tmp:
        writer = None
        for c in chunks:
            t = pq.read_table(_part_path(parts, c))
            t = t.replace_schema_metadata({META_KEY: json.dumps(header).encode()})
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t.cast(writer.schema))
        writer.close()
    return {"path": str(out), "rows": rows, "skipped": dict(bad), "header": header}


__all__ = ["Embeddings", "embed_dataset", "read_embeddings", "write_embeddings"]
