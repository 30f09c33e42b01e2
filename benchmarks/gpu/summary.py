"""Print the short table of a ``run_all.sh`` output folder (what the goals ask for, per part)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(path: Path) -> dict | None:
    """A part's JSON, or None if it cannot be read (a part killed while writing it): the
    table is printed from the others."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"{path.name}: unreadable ({type(e).__name__}: {e})")
        return None


def rows(folder: Path) -> list[tuple]:
    out = [("part", "size", "plain/s", "best GeoBind", "samples/s", "vs plain", "MFU", "infer/s", "infer/train",
            "cache max")]
    runs = [(path, r) for path in sorted(folder.glob("train-*.json")) if (r := _read(path)) is not None]
    for stage in ("stage1", "stage2"):
        for path, r in runs:
            for size, s in r.get(stage, {}).items():
                best = s.get("best") or {}
                name = s.get("best_variant") or "-"
                plain = s["plain"]
                out.append((
                    f"{stage} {path.stem}", size, f"{plain['sps']:.0f}" if "sps" in plain else plain.get("error", "-"),
                    name,
                    f"{best['sps']:.0f}" if best else "-",
                    f"{best['ratio']:.2f}x" if best.get("ratio") else "-",
                    f"{best['mfu']:.1%}" if "mfu" in best else "-",
                    f"{s['best_infer_tiles_per_s']:.0f}" if "best_infer_tiles_per_s" in s else "-",
                    f"{s['infer_over_train']:.2f}x" if s.get("infer_over_train") else "-",
                    # What caching the anchor alone could give if time followed FLOPs.
                    f"{s['cache_ceiling']:.2f}x" if s.get("cache_ceiling") else "-",
                ))
    trainer = folder / "trainer.json"
    if trainer.is_file() and (t := _read(trainer)) is not None:
        out.append(("trainer stage", "size", "samples/s", "data wait", "final loss", "", "", "", "", ""))
        for name, r in t.get("stages", {}).items():
            out.append((name[:14], t.get("size", "-"), f"{r['samples_per_s']:.0f}", f"{r['data_wait']:.1%}",
                        f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-", "", "", "", "", ""))
    data = folder / "data.json"
    if data.is_file() and (d := _read(data)) is not None:
        out.append(("data feed", "workers", "samples/s", "data wait", "step s", "", "", "", "", ""))
        for name, r in d.get("train", {}).items():
            out.append((name.replace("shards_256_device_aug", "shards+gpu aug")[:14], d["settings"].get("workers", "-"), f"{r['samples_per_s']:.0f}",
                        f"{r['data_wait']:.1%}", f"{r['step_s']:.3f}", "", "", "", "", ""))
    embed = folder / "embed.json"
    if embed.is_file() and (e := _read(embed)) is not None:
        out.append(("geobind embed", "workers", "tiles/s", "steady/s", "cos min", "forward/s", "", "", "", ""))
        for name, r in e.get("variants", {}).items():
            out.append((name[:14], r.get("workers", "-"), r.get("tiles_per_s", "-"), r.get("steady_tiles_per_s", "-"),
                        r.get("cos_min", r.get("error", "-")), e.get("forward_tiles_per_s", "-"), "", "", "", ""))
    return out


def profile_lines(results: dict) -> list[str]:
    """One line per stage and size of a ``train_throughput.py`` result: where the step's time goes
    in the fastest profiled variant."""
    out = []
    for stage in ("stage1", "stage2"):
        for size, s in results.get(stage, {}).items():
            name = s.get("profiled_variant")
            if name:
                prof = s["geobind"][name]["profile"]
                cats = ", ".join(f"{k} {v:.1f}" for k, v in prof["categories_ms"].items())
                out.append(f"{stage} {size} {name}: {prof['what']} {prof['busy_ms']:.1f} of "
                           f"{prof['wall_ms']:.1f} ms per step ({cats})")
    return out


def profiles(folder: Path) -> list[str]:
    """:func:`profile_lines` of every ``train-*.json`` in ``folder``."""
    return [line for path in sorted(folder.glob("train-*.json")) if (r := _read(path)) is not None
            for line in profile_lines(r)]


def checks(folder: Path) -> list[str]:
    """One line: each correctness check of ``gpu/checks.py`` and whether it passed."""
    path = folder / "checks.json"
    if not path.is_file() or (r := _read(path)) is None:
        return []
    return ["checks: " + ", ".join(f"{'PASS' if c['ok'] else 'FAIL'} {name}" for name, c in r["checks"].items())]


def main(argv: list[str] | None = None) -> str:
    folder = Path((argv or sys.argv[1:] or ["gpu-results"])[0])
    lines = checks(folder) + ["".join(f"{str(c):>14}" for c in row) for row in rows(folder)] + profiles(folder)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
