"""The frozen-anchor cache: a frozen encoder's embeddings of a dataset, computed once.

Because the anchor is frozen, embedding it once is exact: every epoch and every later run reuses
the file, and the training step runs only the trainable encoder. The cache is keyed by a
fingerprint of the anchor's weights and preprocessing, and of the dataset (manifest content
plus the size and modification time of each file the anchor reads), so a changed anchor or
changed data gives a new key and a fresh computation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from geobind.data.errors import BadSampleError
from geobind.data.manifest import Table
from geobind.data.shards import RowStream, ShardSet
from geobind.encoders.base import Encoder
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
    """Rows of one modality, preprocessed for evaluation; bad rows come back as exceptions."""

    def __init__(self, table: Table, modality: str, encoder: Encoder, train: bool = False):
        self.table, self.modality, self.encoder, self.train = table, modality, encoder, train

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
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


@torch.no_grad()
def embed_table(
    encoder: Encoder,
    table: Table,
    modality: str,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Counter]:
    """Embed every row: ``(embeddings [N, D] float32, valid [N] bool, bad counts per reason)``.
    Bad rows get zero vectors and ``valid=False``; under ``strict`` the first raises. ``table``
    is a :class:`Table` or a :class:`ShardSet` (streamed once; rows align with its index)."""
    n = len(table)
    emb = torch.zeros(n, encoder.dim)
    valid = torch.zeros(n, dtype=torch.bool)
    counts: Counter = Counter()
    if isinstance(table, ShardSet):
        # One streamed pass over the shards, in index order, split over the loader workers.
        data = RowStream(table, _ShardItem(table, modality, encoder))
    else:
        data = _ItemDataset(table, modality, encoder)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_items(encoder))
    was = encoder.training
    encoder.eval()
    it = loader
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=f"embed {modality}", unit="batch", leave=False,
                  total=math.ceil(n / batch_size) if num_workers <= 1 else None)
    try:
        for idx, batch, bad in it:
            for _, e in bad:
                if strict:
                    raise e
                counts[e.reason] += 1
            if batch is not None:
                with autocast_for(encoder.device):
                    emb[idx] = encoder(batch).float().cpu()
                valid[idx] = True
    finally:
        encoder.train(was)
    return emb, valid, counts


def cached_embeddings(
    encoder: Encoder,
    table: Table,
    modality: str,
    cache_dir: str | Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    strict: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Anchor embeddings of ``table`` from the cache, computing and storing them on a miss.

    Returns ``(embeddings, valid, info)``; ``info`` has ``path``, ``hit`` and ``bad`` counts.
    """
    key = hashlib.sha256(
        (
            weights_fingerprint(encoder)
            + json.dumps(encoder.settings(), sort_keys=True)
            + dataset_fingerprint(table, modality)
        ).encode()
    ).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"anchor-{modality}-{key}.safetensors"
    if path.is_file():
        data = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
        return data["embeddings"], data["valid"].bool(), {"path": str(path), "hit": True, "bad": meta.get("bad", {})}
    emb, valid, counts = embed_table(
        encoder, table, modality, batch_size=batch_size, num_workers=num_workers, progress=progress, strict=strict
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"embeddings": emb.contiguous(), "valid": valid.to(torch.uint8)}, str(tmp))
    meta = {"source": table.source, "modality": modality, "rows": len(table), "bad": dict(counts),
            "encoder": encoder.type_name}
    mtmp = path.with_suffix(f".json.tmp{os.getpid()}")
    mtmp.write_text(json.dumps(meta, indent=2))
    mtmp.replace(path.with_suffix(".json"))
    tmp.replace(path)
    return emb, valid, {"path": str(path), "hit": False, "bad": dict(counts)}
