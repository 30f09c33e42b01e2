"""Train/val/test splits. The default is spatial: whole geographic cells go to one split, so a
test place never shares a cell with a training place (PSM's 1-degree cells; a random split lets a
model pass by memorising neighbouring places). GeoCLAP's SoundingEarth split (70/10/20) is
random: compare with its numbers on its own split files.

Cells are ``cell_deg`` x ``cell_deg`` degrees in latitude/longitude. Cells are shuffled with the
seed and dealt to test, then val, then train until each held-out split has its share of the
samples (shares are met to within one cell). ``buffer_cells`` additionally keeps training samples
out of the cells within that many cells of any val/test cell (longitude wraps at the antimeridian),
so held-out places are not even next to training places; those samples are set aside as
``buffer``. Samples without valid coordinates are set aside as ``invalid``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from geobind.data.manifest import Table, read_dataset
from geobind.modality import get_modality

__all__ = ["SPLITS", "cells", "spatial_split", "random_split", "split_dataset", "write_split"]

SPLITS = ("train", "val", "test")


def cells(lat: np.ndarray, lon: np.ndarray, cell_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer cell coordinates (row from the south pole, column from the antimeridian)."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    n_rows = math.ceil(180 / cell_deg)
    n_cols = math.ceil(360 / cell_deg)
    r = np.clip(np.floor((lat + 90) / cell_deg), 0, n_rows - 1).astype(np.int64)
    c = np.clip(np.floor((lon + 180) / cell_deg), 0, n_cols - 1).astype(np.int64)
    return r, c


def _valid(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    return np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)


def _check_fractions(val: float, test: float) -> None:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(
            f"--val {val} and --test {test} must be fractions in [0, 1) that sum to less than 1"
        )


def spatial_split(
    lat: ArrayLike,
    lon: ArrayLike,
    *,
    cell_deg: float = 1.0,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    buffer_cells: int = 0,
) -> np.ndarray:
    """One label per sample: ``train``, ``val``, ``test``, ``buffer`` or ``invalid``."""
    _check_fractions(val, test)
    if cell_deg <= 0:
        raise ValueError(f"--cell-deg must be positive, got {cell_deg}")
    lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
    ok = _valid(lat, lon)
    labels = np.full(len(lat), "invalid", dtype=object)
    if not ok.any():
        return labels
    r, c = cells(lat[ok], lon[ok], cell_deg)
    n_cols = math.ceil(360 / cell_deg)
    cid = r * n_cols + c
    uniq, inverse, counts = np.unique(cid, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    n = int(ok.sum())
    targets = {"test": test * n, "val": val * n}
    role = np.full(len(uniq), "train", dtype=object)
    taken = {"test": 0, "val": 0}
    for u in order:
        for split in ("test", "val"):
            need = targets[split] - taken[split]
            # Take the cell when it brings the split closer to its share.
            if need > 0 and counts[u] < 2 * need:
                role[u] = split
                taken[split] += int(counts[u])
                break
    if buffer_cells > 0:
        held = {int(uniq[u]) for u in range(len(uniq)) if role[u] != "train"}
        n_rows = math.ceil(180 / cell_deg)
        for u in range(len(uniq)):
            if role[u] != "train":
                continue
            ur, uc = divmod(int(uniq[u]), n_cols)
            near = any(
                (rr * n_cols + (uc + dc) % n_cols) in held
                for rr in range(max(0, ur - buffer_cells), min(n_rows, ur + buffer_cells + 1))
                for dc in range(-buffer_cells, buffer_cells + 1)
            )
            if near:
                role[u] = "buffer"
    labels[ok] = role[inverse]
    return labels


def random_split(
    n: int, *, val: float = 0.1, test: float = 0.1, seed: int = 0,
    lat: ArrayLike | None = None, lon: ArrayLike | None = None,
) -> np.ndarray:
    """Labels of a uniformly random split (not the default: neighbours leak across splits)."""
    _check_fractions(val, test)
    labels = np.full(n, "invalid", dtype=object)
    ok = np.ones(n, dtype=bool) if lat is None else _valid(lat, lon)
    idx = np.flatnonzero(ok)
    perm = np.random.default_rng(seed).permutation(idx)
    n_test, n_val = round(test * len(idx)), round(val * len(idx))
    labels[perm[:n_test]] = "test"
    labels[perm[n_test : n_test + n_val]] = "val"
    labels[perm[n_test + n_val :]] = "train"
    return labels


def split_dataset(
    data: Table,
    *,
    method: str = "spatial",
    cell_deg: float = 1.0,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    buffer_cells: int = 0,
) -> np.ndarray:
    """Labels for the rows of a table (rows with bad coordinates are ``invalid``)."""
    lat = np.asarray(data.lat, dtype=np.float64)
    lon = np.asarray(data.lon, dtype=np.float64)
    bad = np.zeros(len(lat), dtype=bool)
    for i, reason in data.bad_rows.items():
        if reason == "bad-coordinates":
            bad[i] = True
    lat = np.where(bad, np.nan, lat)
    if method == "spatial":
        return spatial_split(
            lat, lon, cell_deg=cell_deg, val=val, test=test, seed=seed, buffer_cells=buffer_cells
        )
    if method == "random":
        if buffer_cells:
            raise ValueError("a buffer (buffer_cells, --buffer-cells) applies to spatial splits; a random "
                             "split has no cells to keep apart")
        return random_split(len(lat), val=val, test=test, seed=seed, lat=lat, lon=lon)
    raise ValueError(f"unknown split method {method!r}; use spatial or random")


def _read_source_frame(path: Path, layout: str) -> pd.DataFrame:
    """The source file's own rows (same order as the table), to write subsets of."""
    if layout == "manifest":
        from geobind.data.manifest import drop_blank_rows

        if path.suffix.lower() in (".parquet", ".pq"):
            return drop_blank_rows(pd.read_parquet(path))
        return drop_blank_rows(pd.read_csv(
            path,
            sep="\t" if path.suffix.lower() == ".tsv" else ",",
            dtype={"id": str},
            keep_default_na=False,
        ))
    return pd.read_csv(path, dtype={"key": str, "long_key": str}, keep_default_na=False)


def _relpaths(paths: list[str | None], start: Path) -> list[str]:
    """``os.path.relpath(p, start)`` of every path (``""`` for None), each folder's relative path
    worked out once: the files of a manifest sit in a few folders, and ``relpath`` per row (two
    ``getcwd`` calls and two normalisations each) took half of a million-row split."""
    start_abs = os.path.abspath(start)
    folders: dict[str, str] = {}
    out = []
    for p in paths:
        if p is None:
            out.append("")
            continue
        folder, name = os.path.split(p)
        if name in ("", ".", ".."):  # normalised away by relpath: take the slow way
            out.append(os.path.relpath(p, start_abs))
            continue
        rel = folders.get(folder)
        if rel is None:
            rel = folders[folder] = os.path.relpath(folder or os.curdir, start_abs)
        out.append(name if rel == os.curdir else os.path.join(rel, name))
    return out


def write_split(
    source: str | Path,
    out: str | Path | None = None,
    *,
    layout: str = "manifest",
    layout_options: dict | None = None,
    method: str = "spatial",
    cell_deg: float = 1.0,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    buffer_cells: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Split a manifest (or SoundingEarth CSV) into ``train``/``val``/``test`` files of the same
    format in ``out`` (default: beside the source). Manifest paths are rewritten relative to
    ``out``. Returns a summary (also written as ``split.json``)."""
    if layout not in ("manifest", "soundingearth"):
        how = ("list the tiles in a manifest (id, lat, lon, satellite: the .tif path) and split that"
               if layout == "geotiff" else
               "split the manifest the shards were packed from, then pack each part (geobind data split, "
               "then geobind data pack)")
        raise ValueError(f"split writes manifests or SoundingEarth CSVs, not layout {layout!r}: {how}")
    data = read_dataset(source, layout, **(layout_options or {}))
    if not isinstance(data, Table):
        raise ValueError(f"{source}: split the manifest before packing it into shards")
    src = Path(data.source)
    out = Path(out) if out else src.parent
    suffix = (
        src.suffix.lower() if src.suffix.lower() in (".csv", ".tsv", ".parquet", ".pq") else ".csv"
    )
    stem = src.stem
    targets = {s: out / f"{stem}.{s}{suffix}" for s in SPLITS}
    summary_path = out / f"{stem}.split.json"
    clash = [str(p) for p in (*targets.values(), summary_path) if p.exists()]
    if clash and not force:
        raise FileExistsError(
            f"{clash[0]} exists; pass --force to overwrite, or --out another folder"
        )
    from geobind.search.common import atomic_paths, check_writable, writes_named

    check_writable(*targets.values(), summary_path, force=force)  # a folder there, or one not writable
    labels = split_dataset(
        data,
        method=method,
        cell_deg=cell_deg,
        val=val,
        test=test,
        seed=seed,
        buffer_cells=buffer_cells,
    )
    frame = _read_source_frame(src, layout)
    if len(frame) != len(data):
        raise RuntimeError(f"{src}: read {len(frame)} rows but the table has {len(data)}")
    out.mkdir(parents=True, exist_ok=True)
    if layout == "manifest" and out.resolve() != src.parent.resolve():
        for m in data.columns:
            if get_modality(m).source != "path":
                continue
            frame[m] = _relpaths(data.columns[m], out)
    written = {}
    # Every part is written to a temporary file first, and they are renamed into place together
    # at the end: a full disk or a Ctrl-C leaves no cut-short part, and no mix of two splits.
    with atomic_paths({**targets, "json": summary_path}, force=force) as tmps:
        for s in SPLITS:
            part = frame[labels == s]
            with writes_named(targets[s]):
                if suffix in (".parquet", ".pq"):
                    part.to_parquet(tmps[s], index=False)
                else:
                    part.to_csv(tmps[s], index=False, sep="\t" if suffix == ".tsv" else ",")
            written[s] = str(targets[s])
        summary = _split_summary(data, labels, src, layout, layout_options, out, method, cell_deg, val, test,
                                 seed, buffer_cells, written)
        tmps["json"].write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _split_summary(data, labels, src, layout, layout_options, out, method, cell_deg, val, test, seed,
                   buffer_cells, written) -> dict[str, Any]:
    count = Counter(labels.tolist())
    ok = labels != "invalid"
    n_cols = math.ceil(360 / cell_deg)
    r, c = cells(np.asarray(data.lat, float)[ok], np.asarray(data.lon, float)[ok], cell_deg)
    cid = r * n_cols + c
    n_cells = {k: len(set(cid[labels[ok] == k].tolist())) for k in (*SPLITS, "buffer")}
    summary = {
        "source": str(src),
        "layout": layout,
        "method": method,
        "cell_deg": cell_deg,
        "val": val,
        "test": test,
        "seed": seed,
        "buffer_cells": buffer_cells,
        "counts": {k: int(count.get(k, 0)) for k in (*SPLITS, "buffer", "invalid")},
        "cells": n_cells if method == "spatial" else None,
        "files": written,
    }
    root = (layout_options or {}).get("root")
    base = (src.parent / Path(root).expanduser() if root else src.parent).resolve()
    if layout == "soundingearth" and out.resolve() != base:
        summary["note"] = (
            f"the image/audio templates stay relative to {base}; read the parts with "
            f"layout_options root: {base} (--layout-option root={base} on the command line)"
        )
    return summary
