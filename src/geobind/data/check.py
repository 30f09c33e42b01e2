"""``geobind data check``: scan a dataset without training and report what is unusable.

Every sample's files are decoded the way training decodes them (images fully decoded, audio
decoded at its own rate, captions checked, coordinates validated; shards streamed through the
same reader), and each problem is counted under the same reason training skips it with
(``missing``, ``empty``, ``undecodable``, ``bad-coordinates``, ``missing-<modality>``,
``empty-text``, ``bad-shard``, ...).
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from geobind.data.errors import BadSampleError
from geobind.data.manifest import Table, read_dataset, row_detail
from geobind.data.pack import member_kind
from geobind.data.shards import RowStream, ShardSet

__all__ = ["CheckReport", "check_dataset", "check_item"]


@dataclass
class CheckReport:
    """Counts of a dataset scan."""

    source: str
    layout: str
    modalities: list[str]
    samples: int  # rows (or shard samples) scanned
    usable: int  # samples with no problem in any checked modality
    reasons: Counter = field(
        default_factory=Counter
    )  # problems per reason (a sample may have several)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # (file, reason, detail)
    shard_errors: dict[str, str] = field(default_factory=dict)  # shard url -> first read error

    @property
    def bad(self) -> int:
        """Samples with at least one problem."""
        return self.samples - self.usable

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serialisable dict, with ``bad`` and reasons sorted by name."""
        return {
            "source": self.source,
            "layout": self.layout,
            "modalities": self.modalities,
            "samples": self.samples,
            "usable": self.usable,
            "bad": self.bad,
            "reasons": dict(sorted(self.reasons.items())),
            "examples": [{"file": f, "reason": r, "detail": d} for f, r, d in self.examples],
            "shard_errors": self.shard_errors,
        }

    def format(self) -> str:
        """The report as multi-line text: counts, problems by reason (most frequent first),
        truncated shards and the first problem examples."""
        lines = [
            f"checked {self.samples} samples of {self.source} (layout {self.layout}; "
            f"modalities {', '.join(self.modalities)})",
            f"usable: {self.usable}",
            f"bad:    {self.bad}",
        ]
        if self.reasons:
            lines.append("problems by reason (a sample can have several):")
            width = max(len(r) for r in self.reasons)
            lines += [
                f"  {r:<{width}}  {n}"
                for r, n in sorted(self.reasons.items(), key=lambda x: (-x[1], x[0]))
            ]
        if self.shard_errors:
            lines.append("shards that end early (truncated or corrupt):")
            lines += [f"  {u}: {e}" for u, e in self.shard_errors.items()]
        if self.examples:
            lines.append(f"first {len(self.examples)} problems:")
            lines += [f"  {f}: {r}" + (f" ({d})" if d else "") for f, r, d in self.examples]
        return "\n".join(lines)


def check_item(modality: str, item: Any, name: str | None = None) -> None:
    """Decode one raw item of ``modality`` as training would; raise :class:`BadSampleError`."""
    kind = member_kind(modality)
    if kind == "image":
        from geobind.data.media import load_image

        load_image(item)
    elif kind == "audio":
        _check_audio(item, name)
    elif kind == "text":
        if not isinstance(item, str) or not item.strip():
            raise BadSampleError(name or "<text>", "empty-text", "caption is empty or not a string")
    elif kind == "file":
        if isinstance(item, (str, Path)):
            p = Path(item)
            if not p.is_file():
                raise BadSampleError(str(p), "missing", "file does not exist")
            if p.stat().st_size == 0:
                raise BadSampleError(str(p), "empty", "file is empty")
        from geobind.modality import get_modality

        decode = get_modality(modality).check
        if decode is not None:
            try:
                decode(item)
            except BadSampleError:
                raise
            except Exception as e:  # the plugin's own reader failed: the file is unusable
                where = str(item) if isinstance(item, (str, Path)) else (name or f"<{modality}>")
                raise BadSampleError(where, "undecodable", f"{type(e).__name__}: {e}") from None


def _check_audio(item: Any, name: str | None) -> None:
    import io

    import soundfile as sf

    from geobind.data.audio_io import load_audio

    if isinstance(item, tuple):
        load_audio(item, int(item[1]), name=name)
        return
    rate = None
    if isinstance(item, (bytes, bytearray)) and len(item):
        try:
            rate = sf.info(io.BytesIO(bytes(item))).samplerate
        except Exception as e:  # soundfile: LibsndfileError / RuntimeError
            raise BadSampleError(
                name or "<bytes>", "undecodable", f"cannot decode audio: {e}"
            ) from None
    elif isinstance(item, (str, Path)) and Path(item).is_file() and Path(item).stat().st_size:
        try:
            rate = sf.info(str(item)).samplerate
        except Exception as e:
            raise BadSampleError(
                name or str(item), "undecodable", f"cannot decode audio: {e}"
            ) from None
    # The full decode at the file's own rate (no resampling): truncated data fails here.
    load_audio(item, rate or 16000, name=name)


class _Rows(Dataset):
    def __init__(self, table: Table, mods: list[str]):
        self.table, self.mods = table, mods

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        if i in self.table.bad_rows:
            return i, [
                _problem(
                    BadSampleError(
                        f"{self.table.source}#{self.table.ids[i]}", self.table.bad_rows[i],
                        row_detail(self.table, i),
                    )
                )
            ]
        out = []
        for m in self.mods:
            try:
                check_item(m, self.table.item(m, i))
            except BadSampleError as e:
                out.append(_problem(e))
        return i, out


class _ShardRows:
    def __init__(self, shards: ShardSet, mods: list[str]):
        self.shards, self.mods = shards, mods

    def __call__(self, row: int, sample: dict):
        if row in self.shards.bad_rows:
            return [
                _problem(
                    BadSampleError(
                        f"{sample.get('__url__')}#{sample.get('__key__')}",
                        self.shards.bad_rows[row],
                        row_detail(self.shards, row),
                    )
                )
            ]
        out = []
        for m in self.mods:
            try:
                self.shards.load(sample, row, m, lambda x, m=m: check_item(m, x))
            except BadSampleError as e:
                out.append(_problem(e))
        return out


def _problem(e: BadSampleError) -> tuple[str, str, str]:
    return e.path, e.reason, e.detail


def _unbatched(x):
    return x


def check_dataset(
    path: str | Path,
    layout: str = "manifest",
    *,
    layout_options: dict | None = None,
    modalities: list[str] | None = None,
    num_workers: int = 0,
    max_examples: int = 10,
    progress: bool = False,
) -> CheckReport:
    """Scan ``path`` (any layout) and count usable samples and problems per reason."""
    data = read_dataset(path, layout, **(layout_options or {}))
    mods = (
        list(modalities) if modalities else [m for m in data.columns if member_kind(m) != "latlon"]
    )
    if not mods:
        hint = data.layout_hint() if isinstance(data, ShardSet) else ""
        raise ValueError(f"{getattr(data, 'source', path)}: no modality to check (found "
                         f"{', '.join(getattr(data, 'suffixes', None) or data.columns) or 'nothing'}).{hint}")
    data.require(*mods)
    if isinstance(data, ShardSet):
        ds = RowStream(data, _ShardRows(data, mods))
        layout_name = data.schema.name
    else:
        ds = _Rows(data, mods)
        layout_name = layout
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, collate_fn=_unbatched,
                        generator=torch.Generator())  # not the global RNG
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # Updated by hand: given the loader, tqdm.auto's bar would start a second pass over it.
        bar = tqdm(total=len(data), desc="check", unit="sample", leave=False)
    report = CheckReport(str(getattr(data, "source", path)), layout_name, mods, 0, 0)
    # The first max_examples problems in dataset order, kept as a bounded max-heap on (row, n):
    # a scan of millions of bad rows (a wrong folder) must not hold every problem in memory.
    found: list[tuple[int, int, tuple[str, str, str]]] = []
    seq = 0
    for row, problems in loader:
        if bar is not None:
            bar.update(1)
        if isinstance(problems, BadSampleError):
            problems = [_problem(problems)]
        report.samples += 1
        if not problems:
            report.usable += 1
        for p in problems:
            report.reasons[p[1]] += 1
            seq += 1
            if max_examples <= 0:
                continue
            entry = (-int(row), -seq, p)
            if len(found) < max_examples:
                heapq.heappush(found, entry)
            elif entry > found[0]:
                heapq.heapreplace(found, entry)
    if bar is not None:
        bar.close()
    # Workers finish out of order; report the first problems in dataset order.
    report.examples = [p for _, _, p in sorted(found, reverse=True)]
    if isinstance(data, ShardSet):
        report.shard_errors = {data.urls[s]: e for s, e in sorted(data.shard_errors.items())}
    return report


def write_report(report: CheckReport, path: str | Path, *, force: bool = False) -> None:
    """Write the report as JSON (atomically; an existing file only with ``force``)."""
    from geobind.search.common import atomic_path

    with atomic_path(path, force=force) as tmp:
        Path(tmp).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
