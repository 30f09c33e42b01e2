"""The frozen-anchor cache: a frozen encoder's embeddings of a dataset, computed once.

Because the anchor is frozen, embedding it once gives what every step would compute (in the
stage's ``optim.precision``: bf16 on CUDA under ``auto``), up to the float16 storage below: every
epoch and every later run reuses the file, and the training step runs only the trainable
encoder. The cache is keyed by a
fingerprint of the anchor's weights and preprocessing, and of the dataset (manifest content
plus the size and modification time of each file the anchor reads), so a changed anchor or
changed data gives a new key and a fresh computation.

**Storage.** ``anchor-<modality>-<key>.safetensors`` holds ``embeddings`` ``[N, D]`` as float16
and ``valid`` ``[N]`` as uint8; ``anchor-<modality>-<key>.json`` beside it records the rows,
the bad samples per reason and the dtype. The embeddings are unit vectors, so float16 rounds
each component with a relative error of at most 2^-11 (about 5e-4), far below what contrastive
training notices, and halves the file and the memory (6M x 512 rows: 6 GB instead of 12 GB).
Training converts each batch's rows back to float32 on its device. A file written as float32 by
an earlier version is still read, under the same key, and converted in memory: the result is
exactly what a fresh float16 file would hold, so the two never disagree.

**Resuming.** While the file is computed, each finished piece of about 65,536 rows
(:func:`part_spans`) is saved in ``anchor-<modality>-<key>.parts/``; a run stopped or crashed
midway embeds only the pieces not there (same key: never another anchor's or dataset's), and
the folder is removed once the file is written.

**Memory.** A hit loads the file through safetensors, which maps it (copy-on-write) instead of
reading it into private memory: the ranks of one machine share one copy in the page cache, and
pages are read on first use. A float32 file is the exception (its float16 copy is private).

**Several ranks.** Under ``torchrun`` every rank calls :func:`cached_embeddings` together. The
file is a hit only if every rank can see it; otherwise the ranks split the rows into contiguous
shares (a manifest at batch boundaries; shards whole, so each rank streams its own tars),
embed their share, and exchange the results with ``all_gather`` in bounded chunks
(:func:`geobind.distributed.all_gather_blocks`), so no shared filesystem is needed and every
rank ends with identical embeddings, masks and summed bad counts. Rank 0 writes the file
(atomically: a temporary name, then a rename) while the others wait at a barrier; a machine
that cannot see rank 0's file (no shared filesystem) writes its own copy from its local rank 0,
so the next run is a hit there too. Peak memory per rank during the exchange is the float16
result plus ``gather_bytes`` of buffers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from geobind import distributed as gbdist
from geobind.binding.prefetch import map_tensors, outputs_one_behind
from geobind.data.errors import BadSampleError
from geobind.data.manifest import Table, for_loader_workers
from geobind.data.shards import RowStream, ShardSet
from geobind.encoders.base import Encoder, usual_mode
from geobind.model import autocast_for


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(table: Table | ShardSet, modality: str) -> str:
    """Manifest identity plus the size and mtime of every file of ``modality`` it names (for
    shards: the shard list with each shard's size and mtime, and the layout)."""
    h = hashlib.sha256(table.identity.encode())
    h.update(modality.encode())
    if isinstance(table, ShardSet):
        return h.hexdigest()
    for v in table.columns.get(modality, []):
        h.update(str(v).encode())
        if v is not None and os.path.isabs(str(v)):
            try:
                st = os.stat(v)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


class _ItemDataset(Dataset):
    """Rows ``start:stop`` of one modality, preprocessed for evaluation; bad rows come back as
    exceptions. Items are ``(row, encoder.load(item))``; ``encoder`` is an :class:`Encoder` or
    anything with the same ``load(item, *, train)``."""

    def __init__(self, table: Table, modality: str, encoder: Encoder, train: bool = False,
                 start: int = 0, stop: int | None = None):
        self.table, self.modality, self.encoder, self.train = table, modality, encoder, train
        self.start, self.stop = start, len(table) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        i += self.start
        try:
            return i, self.encoder.load(self.table.item(self.modality, i), train=self.train)
        except BadSampleError as e:
            return i, e


class _ShardItem:
    """``(row, sample) -> encoder input`` for a streamed shard sample (evaluation transform)."""

    def __init__(self, shards: ShardSet, modality: str, encoder: Encoder, train: bool = False):
        self.shards, self.modality, self.encoder, self.train = shards, modality, encoder, train

    def __call__(self, row: int, sample: dict):
        return self.shards.load(sample, row, self.modality, lambda x: self.encoder.load(x, train=self.train))


class _CollateItems:
    # A class, not a closure, so loader workers can be spawned processes.
    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, samples):
        good = [(i, x) for i, x in samples if not isinstance(x, BadSampleError)]
        bad = [(i, x) for i, x in samples if isinstance(x, BadSampleError)]
        idx = torch.tensor([i for i, _ in good], dtype=torch.long)
        batch = self.encoder.collate([x for _, x in good]) if good else None
        return idx, batch, bad


def collate_items(encoder: Encoder):
    """Collate ``(index, input|BadSampleError)`` pairs into ``(indices, batch, bad)``."""
    return _CollateItems(encoder)


# Rows per resumable part of an anchor cache being computed (a multiple of the batch for a
# manifest; whole shards for a shard set): a stopped or crashed run loses at most one part.
PART_ROWS = 65_536


def part_spans(table: Table | ShardSet, start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """Rows ``start:stop`` cut into ``(a, b)`` pieces of about :data:`PART_ROWS` rows, at fixed
    places (multiples of a multiple of ``batch_size`` for a table, so the batches are those of
    one pass; shard boundaries for a shard set), so runs with other rank shares find the same
    pieces."""
    n = len(table)
    if isinstance(table, ShardSet):
        edges, last = [0], 0
        for c in (int(o) for o in table.offsets[1:]):
            if c - last >= PART_ROWS or c == n:
                edges.append(c)
                last = c
    else:
        step = max(1, PART_ROWS // max(1, batch_size)) * max(1, batch_size)
        edges = [*range(0, n, step), n]
    cuts = sorted({start, stop, *(e for e in edges if start < e < stop)})
    return list(zip(cuts[:-1], cuts[1:]))


def _part_path(parts: Path, a: int, b: int) -> Path:
    return parts / f"rows-{a:012d}-{b:012d}.safetensors"


def _load_part(path: Path, emb: torch.Tensor, valid: torch.Tensor, a: int, b: int,
               batch_size: int) -> Counter | None:
    """Rows ``a:b`` from a finished part into ``emb``/``valid``; their bad counts, or None when
    the part does not read or was embedded in batches of another size (whose numbers may
    differ in the last bit): it is then embedded again."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("batch_size") != str(batch_size):
                return None
            bad = json.loads(meta.get("bad", "{}"))
            e, v = f.get_tensor("embeddings"), f.get_tensor("valid")
    except Exception:  # noqa: BLE001 - a damaged part: embed it again
        return None
    if e.shape != (b - a, emb.shape[1]) or v.shape != (b - a,):
        return None
    # Every row is a vector or a counted bad sample: a part whose pages were lost (zeros under
    # an intact header, as a crash can leave a file renamed before it reached the disk) is not.
    v = v.bool()
    if int((~v).sum()) != sum(bad.values()) or bool((e[v] == 0).all(dim=1).any()):
        return None
    emb[a:b] = e.to(emb.dtype)
    valid[a:b] = v
    return Counter(bad)


def _save_part(path: Path, emb: torch.Tensor, valid: torch.Tensor, a: int, b: int, bad: Counter,
               batch_size: int) -> None:
    # safetensors' writer under a name of its own: save_file is the cache file's writer alone.
    from safetensors.torch import save_file as save_tensors

    _tensors_to_temp(path, emb[a:b], valid[a:b], save_tensors,
                     {"bad": json.dumps(dict(bad)), "batch_size": str(batch_size)}).replace(path)


@torch.no_grad()
def _embed_rows(
    encoder: Encoder,
    table: Table | ShardSet,
    modality: str,
    emb: torch.Tensor,
    valid: torch.Tensor,
    start: int,
    stop: int,
    *,
    batch_size: int,
    num_workers: int,
    progress: bool,
    strict: bool,
    autocast=None,
    parts: Path | None = None,
    report=None,
) -> Counter:
    """Embed rows ``start:stop`` into ``emb`` and ``valid`` (indexed by row); returns the bad
    counts. Each batch runs under ``autocast()`` (default :func:`autocast_for`: bf16 on CUDA,
    float32 elsewhere), its output is taken as float32 and then cast to ``emb``'s dtype, so a
    float16 ``emb`` holds exactly ``embed_table(...)[0].half()``.

    With ``parts`` (a folder), the rows are embedded in the pieces of :func:`part_spans`, each
    saved there as it finishes; pieces already there (an interrupted run's) are read instead
    of embedded again. ``report(rows_done, rows)``, if given, is told after each piece (a log
    line per piece where no progress bar is shown)."""
    counts: Counter = Counter()
    if stop <= start:
        return counts
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"embed {modality}", unit="batch", leave=False,
                   total=math.ceil((stop - start) / batch_size) if num_workers <= 1 else None)
    try:
        spans = part_spans(table, start, stop, batch_size) if parts is not None else [(start, stop)]
        table = for_loader_workers(table, num_workers)  # once for every span's loader
        for a, b in spans:
            path = _part_path(parts, a, b) if parts is not None else None
            done = _load_part(path, emb, valid, a, b, batch_size) if path is not None and path.is_file() else None
            if done is not None:
                counts.update(done)
                if bar is not None:
                    bar.update(math.ceil((b - a) / batch_size))
                continue
            got = _embed_span(encoder, table, modality, emb, valid, a, b, batch_size=batch_size,
                              num_workers=num_workers, strict=strict, autocast=autocast, bar=bar)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                _save_part(path, emb, valid, a, b, got, batch_size)
            counts.update(got)
            if report is not None:
                report(b - start, stop - start)
    finally:
        if bar is not None:
            bar.close()
    return counts


def _embed_span(encoder, table, modality, emb, valid, start, stop, *, batch_size, num_workers, strict, autocast,
                bar) -> Counter:
    counts: Counter = Counter()
    if isinstance(table, ShardSet):
        # One streamed pass over the shards, in index order, split over the loader workers.
        data = RowStream(table, _ShardItem(table, modality, encoder), rows=np.arange(start, stop))
    else:
        data = _ItemDataset(table, modality, encoder, start=start, stop=stop)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_items(encoder),
                        pin_memory=encoder.device.type == "cuda", generator=torch.Generator())  # not the global RNG
    was = encoder.training
    encoder.eval()

    def forward(item):
        if item[1] is None:
            return None
        with (autocast() if autocast is not None else autocast_for(encoder.device)):
            return encoder(item[1]).float()

    # On CUDA the next batch is copied while this one computes, and each batch's vectors reach
    # the host one batch later (the device is not idle while the host takes them).
    move = lambda item, to: (item[0], map_tensors(item[1], to), item[2])  # noqa: E731  (indices stay here)
    try:
        # The progress bar is updated by hand: given the loader, tqdm.auto's bar would call
        # iter() on it at once, a second pass start (worker processes, and a base seed from
        # the torch generator).
        for (idx, _, bad), vectors in outputs_one_behind(loader, encoder.device, move, forward):
            if bar is not None:
                bar.update(1)
            for _, e in bad:
                if strict:
                    raise e
                counts[e.reason] += 1
            if vectors is not None:
                emb[idx] = vectors.to(emb.dtype)
                valid[idx] = True
    finally:
        encoder.train(was)
    return counts


def embed_table(
    encoder: Encoder,
    table: Table | ShardSet,
    modality: str,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Counter]:
    """Embed every row: ``(embeddings [N, D] float32, valid [N] bool, bad counts per reason)``.
    Bad rows get zero vectors and ``valid=False``; under ``strict`` the first raises. ``table``
    is a :class:`Table` or a :class:`ShardSet` (streamed once; rows align with its index).
    Runs in this process only (see :func:`cached_embeddings` for the multi-rank cache)."""
    n = len(table)
    emb = torch.zeros(n, encoder.dim)
    valid = torch.zeros(n, dtype=torch.bool)
    counts = _embed_rows(encoder, table, modality, emb, valid, 0, n, batch_size=batch_size,
                         num_workers=num_workers, progress=progress, strict=strict)
    return emb, valid, counts


def embed_table_shared(
    encoder: Encoder, table: Table | ShardSet, modality: str, *, batch_size: int = 64, num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`embed_table`'s ``(embeddings, valid)`` with the rows shared out over the ranks
    (:func:`rank_bounds`: the batches one process would make) and exchanged, on every rank; the
    same numbers as one process. Under ``torch.distributed`` every rank must call it; an error
    on one rank stops every rank. Bad rows are zero vectors with ``valid=False``."""
    world, r = gbdist.world_size(), gbdist.rank()
    n = len(table)
    bounds = rank_bounds(table, world, batch_size)
    emb = torch.zeros(n, encoder.dim)
    valid = torch.zeros(n, dtype=torch.bool)
    error: Exception | None = None
    try:
        _embed_rows(encoder, table, modality, emb, valid, bounds[r], bounds[r + 1], batch_size=batch_size,
                    num_workers=num_workers, progress=False, strict=False)
    except Exception as e:  # raised below, once the other ranks have heard of it
        if world == 1:
            raise
        error = e
    if world > 1:
        _agree(error, None, "embedding")
        gbdist.all_gather_blocks(emb, bounds)
        valid = gbdist.all_gather_blocks(valid.to(torch.uint8), bounds).bool()
    return emb, valid


def rank_bounds(table: Table | ShardSet, world: int, batch_size: int) -> list[int]:
    """Row bounds of each rank's contiguous share: ``world + 1`` ascending numbers from 0 to N.

    Cuts fall on batch boundaries for a :class:`Table` (so every batch is the one a single
    process would embed, and so are the numbers) and on shard boundaries for a
    :class:`ShardSet` (each rank streams whole shards), each as near an equal share as they
    allow.
    """
    n = len(table)
    if isinstance(table, ShardSet):
        cuts = np.asarray(table.offsets, dtype=np.int64)
    else:
        cuts = np.append(np.arange(0, n, max(1, batch_size), dtype=np.int64), n)
    targets = np.arange(world + 1) * (n / world)
    # The nearest cut to each target (ties: the earlier), which keeps the bounds ascending.
    bounds = cuts[np.abs(cuts[:, None] - targets[None, :]).argmin(axis=0)]
    bounds[0], bounds[-1] = 0, n
    return [int(b) for b in bounds]


def tokenizer_fingerprint(encoder: Encoder) -> str:
    """sha256 of a text encoder's tokenizer (its vocabulary and merges), which its weights and
    settings do not cover: another tokenizer of the same size gives other token ids, so other
    embeddings. Empty for encoders that read no text (their keys stay as they were)."""
    tok = getattr(encoder, "tokenizer", None)
    if tok is None or getattr(encoder, "input_kind", None) != "text":
        return ""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_key(encoder: Encoder, table: Table | ShardSet, modality: str, extra: str = "") -> str:
    # The storage dtype is not part of the key: a float32 file from an earlier version holds the
    # same embeddings and is read (and rounded to float16) in place of a recomputation.
    return hashlib.sha256(
        (
            weights_fingerprint(encoder)
            + json.dumps(encoder.settings(), sort_keys=True)
            + tokenizer_fingerprint(encoder)
            + dataset_fingerprint(table, modality)
            + extra  # empty for the default precision, so existing keys stay valid
        ).encode()
    ).hexdigest()[:24]


class CacheFileError(ValueError):
    """An anchor cache file that cannot be read (truncated or damaged)."""


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(float16 embeddings, bool valid, meta)`` of a cache file; float16 files stay mapped.
    :class:`CacheFileError` if it is damaged."""
    try:
        data = load_file(str(path))
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        emb, valid = data["embeddings"], data["valid"]
    except Exception as e:  # safetensors raises its own SafetensorError; a missing tensor, KeyError
        raise CacheFileError(f"anchor cache {path} cannot be read ({type(e).__name__}: {e})") from e
    if emb.dtype != torch.float16:
        emb = emb.to(torch.float16)  # a float32 file from an earlier version
    return emb, valid.bool(), meta


def _temp_tag() -> str:
    """A temporary name's suffix unique to this rank and process."""
    return f".tmp{gbdist.rank()}-{os.getpid()}"


def _tensors_to_temp(path: Path, emb: torch.Tensor, valid: torch.Tensor, save, metadata: dict | None = None) -> Path:
    """``emb`` and ``valid`` written by ``save`` (safetensors' ``save_file``) to a temporary
    file beside ``path``, with the usual file mode; the caller renames it into place."""
    tmp = path.with_name(path.name + _temp_tag())
    save({"embeddings": emb.contiguous(), "valid": valid.to(torch.uint8).contiguous()}, str(tmp),
         **({"metadata": metadata} if metadata else {}))
    usual_mode(tmp)  # a shared cache: safetensors alone would make it 0600
    return tmp


def _write(path: Path, emb: torch.Tensor, valid: torch.Tensor, meta: dict) -> None:
    """Write the tensors and the meta atomically (temporary names unique to this rank and
    process, then renames; the tensor file last, since its presence means a complete entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tensors_to_temp(path, emb, valid, save_file)
    mtmp = path.with_suffix(".json" + _temp_tag())
    mtmp.write_text(json.dumps(meta, indent=2))
    mtmp.replace(path.with_suffix(".json"))
    tmp.replace(path)


def _agree(error: Exception | None, payload, what: str) -> list:
    """Collective: every rank's ``payload``, or an error on every rank if any rank failed: its
    own error on the rank that failed and, elsewhere, the same error (a bad sample under
    ``strict`` is then reported by every rank as a bad sample, not as a crash), or a
    ``RuntimeError`` naming that rank where the error does not travel between processes."""
    note = None
    if error is not None:
        try:
            note = pickle.dumps(error)
            pickle.loads(note)
        except Exception:  # noqa: BLE001 - not every exception pickles
            note = f"{type(error).__name__}: {error}"
    reports = gbdist.all_gather_object((payload, note))
    if error is not None:
        raise error
    failed = [(s, msg) for s, (_, msg) in enumerate(reports) if msg is not None]
    if failed:
        s, msg = failed[0]
        if isinstance(msg, bytes):
            raise pickle.loads(msg)
        raise RuntimeError(f"{what} failed on rank {s}: {msg}")
    return [p for p, _ in reports]


def cached_embeddings(
    encoder: Encoder,
    table: Table | ShardSet,
    modality: str,
    cache_dir: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    strict: bool = False,
    gather_bytes: int = 256 * 2**20,
    say=None,
    autocast=None,
    key_extra: str = "",
    log=None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Anchor embeddings of ``table`` from the cache, computing and storing them on a miss
    (a damaged file too, with a warning through ``say``, default ``print``).

    Returns ``(embeddings [N, D] float16, valid [N] bool, info)``; ``info`` has ``path``,
    ``hit`` and ``bad`` counts (summed over ranks). Under ``torch.distributed`` every rank must
    call it with the same arguments: the ranks share the computation and all return the same
    result (see the module docstring). ``gather_bytes`` bounds the exchange buffers.
    ``autocast`` (a context factory) is the precision the anchor runs in (default: bf16 on CUDA);
    give one other than the default together with a ``key_extra`` naming it. ``log``, if given,
    is told when a computation starts and, without ``progress``, after each finished piece.
    """
    path = Path(cache_dir) / f"anchor-{modality}-{_cache_key(encoder, table, modality, key_extra)}.safetensors"
    seen = path.is_file()
    if gbdist.is_distributed():
        # A hit only if every rank can read the file; otherwise all compute (collectives below).
        seen = bool(gbdist.all_reduce_min_int(int(seen)))
    if seen:
        try:
            emb, valid, meta = _read(path)
        except CacheFileError as e:
            if gbdist.is_distributed():  # every rank must take the same way: no recomputation here
                raise CacheFileError(f"{e}; delete it to have it computed again") from None
            (say or print)(f"warning: {e}; computing it again")
        else:
            if gbdist.local_rank() == 0:
                # Left by a run stopped after it wrote the file but before it removed them.
                shutil.rmtree(path.with_suffix(".parts"), ignore_errors=True)
            return emb, valid, {"path": str(path), "hit": True, "bad": meta.get("bad", {})}

    world, r = gbdist.world_size(), gbdist.rank()
    n = len(table)
    bounds = rank_bounds(table, world, batch_size)
    emb = torch.zeros(n, encoder.dim, dtype=torch.float16)
    valid = torch.zeros(n, dtype=torch.bool)
    counts: Counter = Counter()
    error: Exception | None = None
    # Finished pieces are kept beside the file-to-be (same key), so a run stopped or crashed
    # while embedding millions of rows resumes from them instead of starting over.
    parts = path.with_suffix(".parts")
    if gbdist.is_main() and parts.is_dir():
        kept = sum(1 for _ in parts.glob("rows-*.safetensors"))
        if kept:
            (say or print)(f"anchor cache: {kept} finished part{'s' if kept > 1 else ''} of an interrupted run "
                           f"in {parts}; embedding the rest")
    report = None
    if log is not None and gbdist.is_main():
        # Without a progress bar (a batch job's log), a line per piece: embedding millions of
        # rows takes long enough that silence looks like a hang.
        log(f"anchor cache: embedding {modality} for {n} rows (once; {path.name})")
        if not progress:
            share = " (rank 0's share)" if world > 1 else ""
            report = lambda done, total: log(f"anchor cache: {done} of {total} rows{share} embedded")  # noqa: E731
    try:
        counts = _embed_rows(encoder, table, modality, emb, valid, bounds[r], bounds[r + 1],
                             batch_size=batch_size, num_workers=num_workers, progress=progress,
                             strict=strict, autocast=autocast, parts=parts, report=report)
    except Exception as e:  # raised below, once the other ranks have heard of it
        if world == 1:
            raise
        error = e
    if world > 1:
        # A rank whose share was read from an interrupted run's parts may wait here for another
        # rank's whole share: longer than a collective's timeout allows.
        gbdist.wait_for_ranks()
        # Agree on failures first, so one rank's error (e.g. a bad sample under strict) stops
        # every rank instead of leaving the others waiting in the exchange.
        reports = _agree(error, dict(counts), "anchor cache: embedding")
        counts = sum((Counter(c) for c in reports), Counter())
        gbdist.all_gather_blocks(emb, bounds, max_bytes=gather_bytes)
        mask = gbdist.all_gather_blocks(valid.to(torch.uint8), bounds, max_bytes=gather_bytes)
        valid = mask.bool()

    counts = Counter(dict(sorted(counts.items())))
    meta = {"source": table.source, "modality": modality, "rows": n, "bad": dict(counts),
            "encoder": encoder.type_name, "dtype": "float16"}
    error = None
    try:
        if gbdist.is_main():
            _write(path, emb, valid, meta)
    except Exception as e:  # e.g. a full disk: tell the ranks waiting for the file
        if world == 1:
            raise
        error = e
    if world > 1:
        # Also the barrier: nobody looks for the file before rank 0 has finished writing it.
        _agree(error, None, "anchor cache: writing the cache")
        if gbdist.local_rank() == 0 and not path.is_file():
            _write(path, emb, valid, meta)  # this machine does not share rank 0's filesystem
        gbdist.barrier()
    if path.is_file():
        if gbdist.local_rank() == 0:
            shutil.rmtree(parts, ignore_errors=True)  # the file now holds every part
        # Drop the private copy for the mapped file, shared by the ranks of this machine.
        emb, valid, _ = _read(path)
    return emb, valid, {"path": str(path), "hit": False, "bad": dict(counts)}
