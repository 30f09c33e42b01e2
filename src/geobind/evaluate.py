"""Evaluation: retrieval between every ordered pair of modalities a dataset and model share."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import permutations
from typing import Any

import torch

from geobind.binding.cache import embed_table
from geobind.data.manifest import Table
from geobind.encoders.base import unknown_texts
from geobind.metrics import retrieval_metrics
from geobind.model import GeoBind

__all__ = [
    "embed_all",
    "evaluate",
    "format_pairs",
    "format_skipped",
    "pair_report",
    "trained_pair_names",
    "trained_pairs",
]


def embed_all(
    model: GeoBind, table: Table, *, batch_size: int = 64, progress: bool = False,
    modalities: Sequence[str] | None = None,
    skipped: dict[str, dict[str, int]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{modality: (embeddings [N, D], valid [N])}`` for every modality both have. Rows that
    cannot be used are left out (``valid`` False); ``skipped``, if given, receives their count
    per modality and reason."""
    mods = modalities or [m for m in model.modalities if table.has(m)]
    out = {}
    for m in mods:
        emb, valid, bad = embed_table(model.encoder(m), table, m, batch_size=batch_size, progress=progress)
        out[m] = (emb, valid)
        if skipped is not None and bad:
            skipped[m] = dict(sorted(bad.items()))
    return out


def pair_report(
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], ks: Sequence[int] = (1, 5, 10),
    *, candidates: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Retrieval metrics for every ordered pair ``a->b``: query ``a`` of row i must find row i's
    ``b`` among all rows valid in both, or, with ``candidates``, among a seeded random subset of
    that many of them (Sat2Cap ranks among 10,000; the subset is drawn from one permutation of the
    rows, so pairs that share their valid rows share their subset)."""
    pairs = {}
    n = next(iter(embeddings.values()))[1].shape[0] if embeddings else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for a, b in permutations(embeddings, 2):
        (ea, va), (eb, vb) = embeddings[a], embeddings[b]
        keep = va & vb
        if int(keep.sum()) < 2:
            continue
        if candidates is not None and int(keep.sum()) > candidates:
            rows = order[keep[order]][:candidates].sort().values
            keep = torch.zeros_like(keep)
            keep[rows] = True
        pairs[f"{a}->{b}"] = retrieval_metrics(ea[keep], eb[keep], ks=ks)
    return pairs


def evaluate(model: GeoBind, table: Table, *, batch_size: int = 64, progress: bool = False,
             ks: Sequence[int] = (1, 5, 10), candidates: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The evaluation report: ``{"pairs": {"a->b": {"R@1", "R@5", "R@10", "median_rank",
    "mean_rank", "n"}}}`` (R@1, R@5 and R@10 always, plus one ``R@k`` per other k of ``ks``;
    ``candidates``: rank among a seeded random subset of that many rows, see :func:`pair_report`),
    plus ``trained_pairs`` (the pairs trained together, as ``"a<->b"``; the others are emergent)
    and ``skipped`` (rows left out as unusable, per modality and reason). Raises ``ValueError``
    when no pair has two usable rows to rank."""
    ks = tuple(sorted({int(k) for k in ks} | {1, 5, 10}))  # the report's contract; format_pairs reads them
    mods = [m for m in model.modalities if table.has(m)]
    if len(mods) < 2:  # before any embedding
        raise ValueError(
            f"{table.source}: needs at least two modalities the model knows; the data has "
            f"{', '.join(table.columns) or 'none'}, the model {', '.join(model.modalities)}"
        )
    skipped: dict[str, dict[str, int]] = {}
    emb = embed_all(model, table, batch_size=batch_size, progress=progress, modalities=mods, skipped=skipped)
    pairs = pair_report(emb, ks=ks, candidates=candidates, seed=seed)
    if not pairs:
        raise ValueError(
            f"{table.source}: no two modalities have 2 or more usable rows in common, so there is nothing "
            f"to rank (unusable rows: {_format_skipped(skipped) or 'none'}); `geobind data check` lists them"
        )
    report = {"data": table.source, "rows": len(table), "pairs": pairs, "skipped": skipped,
              "trained_pairs": trained_pair_names(model)}
    if candidates is not None:
        report["candidates"] = {"max": int(candidates), "seed": int(seed)}
    notes = _content_notes(model, table, emb)
    if notes:
        report["notes"] = notes
    unranked = [f"{a}->{b}" for a, b in permutations(emb, 2) if f"{a}->{b}" not in pairs]
    if unranked:  # fewer than 2 rows usable in both modalities
        report["unranked_pairs"] = unranked
    return report


def _content_notes(model: GeoBind, table: Table, emb: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """What makes a modality's rows indistinguishable, so that its pairs score below what the
    model can do: texts none of whose words the vocabulary knows (they all embed to one vector)
    and rows whose text repeats another row's (a match ties with its copies, and ties rank
    pessimistically, so a caption shared by k or more rows is never within the top k)."""
    notes = []
    for m, (_, valid) in emb.items():
        cells = table.columns.get(m)
        if cells is None:
            continue
        texts = [c for i, c in enumerate(cells) if bool(valid[i]) and isinstance(c, str)]
        if len(texts) != int(valid.sum()):  # paths or other items: not compared by content here
            continue
        unknown = unknown_texts(model.encoder(m), texts)
        if unknown:
            notes.append(f"{m}: {len(unknown)} of {len(texts)} rows have no word the model's vocabulary knows "
                         f"(e.g. {texts[unknown[0]][:40]!r}): they embed to one vector and cannot be told apart")
        distinct = len(set(texts))
        if distinct < len(texts):
            notes.append(f"{m}: {len(texts)} rows hold {distinct} distinct values; a row's match ties with its "
                         "copies and ranks behind them, so pairs with this modality score below what the "
                         "model retrieves (and below the chance line, which assumes distinct rows)")
    return notes


def _format_skipped(skipped: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{m} {sum(r.values())} ({', '.join(f'{k} {v}' for k, v in r.items())})"
                     for m, r in skipped.items())


def format_skipped(report: dict[str, Any]) -> str:
    """One line on the rows an evaluation left out (and the pairs it could not rank), or ``""``
    when it used every row."""
    skipped = report.get("skipped") or {}
    lines = [f"skipped unusable rows: {_format_skipped(skipped)}"] if skipped else []
    lines += [f"note: {n}" for n in report.get("notes") or []]
    if report.get("unranked_pairs"):
        lines.append(f"not ranked (fewer than 2 rows usable in both): {', '.join(report['unranked_pairs'])}")
    return "\n".join(lines)


def format_pairs(pairs: dict[str, dict[str, float]], trained: set[str] | None = None) -> str:
    """A plain-text table of pair metrics (``*`` marks pairs never trained together)."""
    extra = [k for k in next(iter(pairs.values()), {}) if k.startswith("R@") and k not in ("R@1", "R@5", "R@10")]
    head = f"{'pair':<24}{'R@1':>8}{'R@5':>8}{'R@10':>8}" + "".join(f"{k:>8}" for k in extra) + f"{'median':>8}{'n':>7}"
    lines = [head, "-" * len(head)]
    emergent = False
    for name, m in pairs.items():
        mark = ""
        if trained is not None:
            a, b = name.split("->")
            mark = "" if frozenset((a, b)) in trained else " *"
            emergent = emergent or bool(mark)
        lines.append(
            f"{name + mark:<24}{m['R@1']:>8.3f}{m['R@5']:>8.3f}{m['R@10']:>8.3f}"
            + "".join(f"{m[k]:>8.3f}" for k in extra) + f"{m['median_rank']:>8.1f}{m['n']:>7d}"
        )
    if emergent:
        lines.append("* emergent: these two modalities were never trained together")
    ns = sorted({int(m["n"]) for m in pairs.values()})
    if ns:  # what a random ranking scores, to read the table against
        n = ns[-1]
        lines.append(f"chance (random ranking{'' if len(ns) == 1 else f', n={n}'}): R@1 {1 / n:.3f}, "
                     f"R@5 {min(1.0, 5 / n):.3f}, R@10 {min(1.0, 10 / n):.3f}, median rank {(n + 1) / 2:.1f}")
    small = sorted({k for m in pairs.values() for k in (1, 5, 10, *(int(e[2:]) for e in extra)) if m["n"] <= k})
    if small:
        lines.append(f"note: R@{'/R@'.join(map(str, small))} is 1.0 by construction for a pair of n <= {small[-1]} "
                     "rows (every row is within the top k)")
    return "\n".join(lines)


def trained_pairs(model: GeoBind) -> set[frozenset]:
    """Modality pairs trained together: each stage's pair plus the anchor's own image-text pair."""
    pairs = {frozenset((s["train"], s["bind_to"])) for s in model.meta.get("stages", [])}
    anchor = model.meta.get("anchor_modalities")
    if anchor:
        pairs.add(frozenset(anchor.values()))
    return pairs


def trained_pair_names(model: GeoBind) -> list[str]:
    """:func:`trained_pairs` as sorted ``"a<->b"`` names, as reports store them."""
    return sorted("<->".join(sorted(p)) for p in trained_pairs(model))