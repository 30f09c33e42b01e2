"""``geobind data pack | split | check``: prepare and inspect datasets."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from geobind.cli import whole_number

EPILOG_DATA = """\
examples:
  geobind data check data/train.csv                      # what would training skip, and why?
  geobind data split data/all.csv --cell-deg 1.0 --val 0.1 --test 0.1
  geobind data pack data/all.train.csv shards/train/ --shard-size 1000 --image-size 256
"""

EPILOG_PACK = """\
examples:
  geobind data pack data/train.csv shards/train/
  geobind data pack data/train.csv shards/train/ --shard-size 2000 --image-size 224 --workers 8
  geobind data pack data/audio.csv shards/audio/ --audio-rate 48000     # resample once, here
  geobind data pack data/audio.csv shards/audio/ --audio-rate 48000 --audio-format wav  # no decoding in training
  geobind data pack SoundingEarth/metadata.csv shards/se/ --layout soundingearth
  geobind data pack tiles/ shards/tiles/ --layout geotiff --layout-option scale=3000

Rerun the same command to resume after an interruption; a different source or different
settings into the same OUT is refused. Train from the result with `data: {train: shards/train/}`
(the layout is detected) or `--data shards/train/` for eval.
"""

EPILOG_SPLIT = """\
examples:
  geobind data split data/all.csv                        # 1-degree cells, 80/10/10 by samples
  geobind data split data/all.csv --cell-deg 0.5 --val 0.1 --test 0.2 --buffer-cells 1
  geobind data split data/all.parquet --out splits/ --seed 3
  geobind data split data/all.csv --random               # not spatial: only for comparisons
  geobind data split SoundingEarth/metadata.csv --layout soundingearth

Writes <name>.train|val|test.<csv|parquet> (same format as the input) and <name>.split.json.
"""

EPILOG_CHECK = """\
examples:
  geobind data check data/train.csv
  geobind data check shards/train/ --workers 4
  geobind data check sat2cap/train-{000000..000099}.tar --layout sat2cap
  geobind data check SoundingEarth/metadata.csv --layout soundingearth --strict   # exit 1 if anything is bad
  geobind data check data/train.csv --modalities satellite,ground --json check.json

Counts use the reasons training skips samples with (missing, empty, undecodable,
bad-coordinates, missing-<modality>, empty-text, bad-shard, ...).
"""

LAYOUT_HELP = "dataset layout: manifest (default; shard folders/patterns are detected), shards, sat2cap, soundingearth, geotiff"


def add_data_parser(subparsers) -> None:
    """Register ``geobind data`` and its subcommands on the top-level subparsers."""
    d = subparsers.add_parser(
        "data",
        help="prepare and inspect datasets: pack, split, check",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_DATA,
        description="Prepare and inspect paired datasets.",
    )
    sub = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    d.set_defaults(func=lambda args: (d.print_help(), 0)[1])

    p = sub.add_parser(
        "pack",
        help="write WebDataset shards from a manifest, pre-resizing images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_PACK,
        description="Write WebDataset shards (satellite.jpg, ground.jpg, text.txt, audio.flac, json) "
        "from a manifest or table layout.",
    )
    p.add_argument("manifest", help="manifest CSV/Parquet (or a dataset in --layout)")
    p.add_argument(
        "out", help="output folder for the shards (created; resumed if it holds an unfinished pack)"
    )
    p.add_argument(
        "--shard-size", type=_at_least_one, default=1000, metavar="N", help="rows per shard (default: 1000)"
    )
    p.add_argument(
        "--image-size",
        type=_size_arg,
        default=256,
        metavar="S",
        help="shorter image side after resizing, never upscaled; 0 keeps the size (default: 256)",
    )
    p.add_argument(
        "--image-format",
        choices=("jpg", "png"),
        default="jpg",
        help="stored image format (default: jpg)",
    )
    p.add_argument(
        "--audio-rate",
        type=_rate_arg,
        default=None,
        metavar="HZ",
        help="decode, downmix and resample audio to this rate, stored as --audio-format (default: copy files)",
    )
    p.add_argument(
        "--audio-format",
        choices=("flac", "wav"),
        default="flac",
        help="with --audio-rate: 24-bit FLAC (default), or 16-bit WAV, which training reads without "
        "decoding (clips of 20 s recordings loaded 2.4x faster on the benchmark VM; 2 bytes per "
        "sample, where FLAC's size depends on the audio)",
    )
    p.add_argument(
        "--workers", type=_at_least_one, default=1, metavar="N",
        help="processes writing shards in parallel (default: 1)"
    )
    add_layout_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pack)

    s = sub.add_parser(
        "split",
        help="spatial (default) or random train/val/test split of a manifest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_SPLIT,
        description="Assign whole geographic cells to train, val and test, so held-out places "
        "never share a cell with training places.",
    )
    s.add_argument(
        "manifest", help="manifest CSV/Parquet (or a SoundingEarth CSV with --layout soundingearth)"
    )
    s.add_argument(
        "--cell-deg",
        type=float,
        default=1.0,
        metavar="DEG",
        help="cell size in degrees (default: 1.0)",
    )
    s.add_argument(
        "--val", type=float, default=0.1, help="fraction of samples for validation (default: 0.1)"
    )
    s.add_argument(
        "--test", type=float, default=0.1, help="fraction of samples for test (default: 0.1)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the cell assignment (default: 0)")
    s.add_argument(
        "--buffer-cells",
        type=_count_arg,
        default=0,
        metavar="K",
        help="also keep training samples out of cells within K cells of a val/test cell",
    )
    s.add_argument(
        "--random", action="store_true", help="random split of samples instead (not spatial)"
    )
    s.add_argument("--out", help="folder for the split files (default: beside the manifest)")
    s.add_argument("--force", action="store_true", help="overwrite existing split files")
    add_layout_arguments(s)  # split itself says what to do with a layout it does not write
    s.set_defaults(func=cmd_split)

    c = sub.add_parser(
        "check",
        help="scan a dataset and count usable and bad samples per reason",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_CHECK,
        description="Decode every sample as training would, without training.",
    )
    c.add_argument("path", help="manifest, shard folder/pattern, or dataset in --layout")
    c.add_argument(
        "--modalities", help="comma-separated modalities to check (default: all present)"
    )
    c.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any sample is bad (without it: only if none is usable)")
    c.add_argument(
        "--workers", type=_count_arg, default=0, metavar="N", help="decoding worker processes (default: 0)"
    )
    c.add_argument(
        "--examples",
        type=_count_arg,
        default=10,
        metavar="N",
        help="how many problems to list (default: 10)",
    )
    c.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    c.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    add_layout_arguments(c)
    c.set_defaults(func=cmd_check)


def _count_arg(text: str) -> int:
    return whole_number(text, 0)


def _at_least_one(text: str) -> int:
    return whole_number(text, 1)


def _rate_arg(text: str) -> int:
    return whole_number(text, 1, "a sample rate in Hz, e.g. 48000")


def _size_arg(text: str) -> int:
    return whole_number(text, 0, "0 (keep the size) or a side in pixels")


def add_layout_arguments(p: argparse.ArgumentParser, choices: list[str] | None = None) -> None:
    """``--layout`` (one of ``choices`` where a command reads only some) and the repeatable
    ``--layout-option`` of every command that reads a dataset."""
    if choices:
        p.add_argument("--layout", default=choices[0], choices=choices,
                       help=f"dataset layout: {' or '.join(choices)} (default: {choices[0]})")
    else:
        p.add_argument("--layout", default="manifest", help=LAYOUT_HELP)
    p.add_argument(
        "--layout-option",
        dest="layout_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a layout option, e.g. image=images/sentinel/{key}.jpeg (value parsed as YAML); repeatable",
    )


def parse_layout_options(items: list[str]) -> dict:
    """``--layout-option KEY=VALUE`` items as a dict (values parsed as YAML)."""
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--layout-option {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_pack(args) -> int:
    """``geobind data pack``: pack a dataset into WebDataset shards; returns the exit code."""
    from geobind.data.pack import pack

    res = pack(
        args.manifest,
        args.out,
        layout=args.layout,
        layout_options=parse_layout_options(args.layout_options),
        shard_size=args.shard_size,
        image_size=args.image_size,
        image_format=args.image_format,
        audio_rate=args.audio_rate,
        audio_format=args.audio_format,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"{res.samples} samples in {res.shards} shard{'s' if res.shards != 1 else ''} in {res.out}")
    if res.bad:
        print(
            "left out (a bad file drops that member only, bad coordinates the whole row): "
            + ", ".join(f"{k} {v}" for k, v in sorted(res.bad.items())),
            file=sys.stderr,
        )
        for e in res.examples[:10]:
            print(f"  {e}", file=sys.stderr)
    return 0


def cmd_split(args) -> int:
    """``geobind data split``: split a dataset into train/val/test manifests; returns the exit code."""
    from geobind.data.splits import write_split

    summary = write_split(
        args.manifest,
        args.out,
        layout=args.layout,
        layout_options=parse_layout_options(args.layout_options),
        method="random" if args.random else "spatial",
        cell_deg=args.cell_deg,
        val=args.val,
        test=args.test,
        seed=args.seed,
        buffer_cells=args.buffer_cells,
        force=args.force,
    )
    n = summary["counts"]
    cells = summary.get("cells") or {}
    for k in ("train", "val", "test"):
        extra = f" in {cells[k]} cells" if k in cells else ""
        print(f"{k:<6}{n[k]:>8} samples{extra} -> {summary['files'][k]}")
    if n["buffer"]:
        print(f"buffer{n['buffer']:>8} samples next to held-out cells, left out")
    if n["invalid"]:
        print(f"invalid{n['invalid']:>7} samples without valid coordinates, left out")
    for k in ("val", "test"):
        if getattr(args, k) > 0 and n[k] == 0:
            print(
                f"warning: no {k} samples; use a smaller --cell-deg (cells are larger than the {k} share)",
                file=sys.stderr,
            )
    if summary.get("note"):
        print(f"note: {summary['note']}")
    return 0


def cmd_check(args) -> int:
    """``geobind data check``: scan a dataset for bad samples; returns the exit code (1: failed)."""
    from geobind.data.check import check_dataset, write_report
    from geobind.search.common import check_writable

    check_writable(args.json, force=args.force)  # before the check, which can take a while
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()] if args.modalities else None
    report = check_dataset(
        args.path,
        args.layout,
        layout_options=parse_layout_options(args.layout_options),
        modalities=mods,
        num_workers=args.workers,
        max_examples=args.examples,
        progress=sys.stderr.isatty(),
    )
    print(report.format())
    if args.json:
        write_report(report, Path(args.json), force=args.force)
    if args.strict and report.bad:
        print(f"geobind data check: {report.bad} bad samples (--strict)", file=sys.stderr)
        return 1
    if report.samples and not report.usable:
        print("geobind data check: no sample is usable", file=sys.stderr)
        return 1
    return 0
