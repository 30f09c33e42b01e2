"""``geobind demo``: GeoBind end to end on the embedded synthetic Earth, fully offline.

1. build the world (real geography, real Blue Marble satellite pixels; rendered ground photos,
   captions and soundscapes), split so that no training set holds every modality;
2. pretrain a small CLIP anchor on ground photos + captions (a stand-in for OpenAI's CLIP, which
   cannot be loaded offline);
3. stage 1: satellite -> frozen anchor image tower; stage 2: audio -> frozen satellite;
4. a direct audio-text baseline (the "modality-specific baseline");
5. evaluate on held-out cells: 12 retrieval pairs, zero-shot scene classification, emergent
   audio->text beside the direct baseline; zero-shot world maps;
6. write ``report.json``, ``report.md`` and the model directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEMO_EPILOG",
    "DEMO_FOLDER_MARK",
    "DEMO_MARK",
    "DIM",
    "IMAGE_SIZE",
    "NOTICE",
    "PRESETS",
    "SAMPLE_RATE",
    "SECONDS",
    "Preset",
    "add_demo_parser",
    "demo_audio_spec",
    "prepare_out",
    "run_demo",
    "write_configs",
    "write_places_index",
]

DEMO_EPILOG = """\
examples:
  geobind demo                         # the full demo (about 5 minutes on a 2-core CPU)
  geobind demo --quick --out /tmp/gb   # a smaller world and shorter training (about 1 minute)
  geobind demo --out demo --force      # replace an earlier demo folder
  geobind demo --out demo --resume     # finish a demo stopped by Ctrl-C (same --quick and --seed)
"""

NOTICE = (
    "note: the anchor is a small CLIP pretrained here on the demo's own photos and captions. The paper "
    "binds to OpenAI's CLIP ViT-B/32, which cannot be downloaded offline; to use it, set "
    "`anchor: {pretrained: openai/clip-vit-base-patch32}` and the satellite encoder's `image_size: 224` "
    "in config.yaml (online, once)."
)


@dataclass(frozen=True)
class Preset:
    world: str  # world size preset (full | quick | tiny)
    anchor_epochs: int  # CLIP pretraining epochs on stage-1 ground/caption pairs
    stage1_epochs: int  # satellite -> ground epochs
    stage2_epochs: int  # audio -> satellite epochs
    baseline_epochs: int  # direct audio -> text epochs
    batch_size: int  # batch size of every stage


PRESETS = {
    "full": Preset("full", 30, 12, 25, 25, 128),
    "quick": Preset("quick", 25, 15, 25, 25, 32),
    "tiny": Preset("tiny", 2, 1, 1, 1, 16),
}

IMAGE_SIZE = 64
SAMPLE_RATE = 16_000
SECONDS = 2.0
DIM = 128


def demo_audio_spec() -> dict[str, Any]:
    """A small HTS-AT (the CLAP audio architecture) for 2 s clips at 16 kHz."""
    return {
        "type": "clap_audio",
        "config": {
            "num_mel_bins": 32,
            "spec_size": 64,
            "window_size": 4,
            "patch_embeds_hidden_size": 32,
            "depths": [1, 1],
            "num_attention_heads": [2, 4],
            "hidden_size": 64,
            "projection_dim": DIM,
            "enable_fusion": False,
        },
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": SECONDS,
        "n_fft": 1024,
        "hop_length": 320,
        "n_mels": 32,
        "f_min": 0.0,
        "f_max": 8000.0,
    }


def _stage(name, train, bind_to, encoder, data, val, epochs, batch, lr, symmetric):
    return {
        "name": name,
        "train": train,
        "bind_to": bind_to,
        "encoder": encoder,
        "data": {"train": data, **({"val": val} if val else {})},
        "loss": {"symmetric": symmetric},
        # Validation every 50 steps (and at the end), not every epoch: the epochs here are short.
        "optim": {"epochs": epochs, "batch_size": batch, "lr": lr, "weight_decay": 0.05,
                  "warmup_steps": 20, "log_every": 10, "ckpt_every": 500, "val_every": 50},
    }


def write_configs(out: Path, p: Preset, seed: int) -> tuple[Path, Path]:
    """The demo's run config (the paper's two stages) and its direct-baseline config."""
    anchor = {"type": "clip", "pretrained": "anchor"}
    run = {
        "output_dir": "run",
        "seed": seed,
        "anchor": anchor,
        "stages": [
            _stage("satellite", "satellite", "ground",
                   {"type": "clip_vision", "init_from": "ground", "image_size": IMAGE_SIZE},
                   "world/stage1_train.csv", "world/stage1_val.csv", p.stage1_epochs, p.batch_size, 5e-4, False),
            _stage("audio", "audio", "satellite", demo_audio_spec(), "world/stage2_train.csv",
                   "world/stage2_val.csv", p.stage2_epochs, p.batch_size, 5e-4, True),
        ],
        "eval": {"data": "world/test.csv", "batch_size": 128},
    }
    base = {
        "output_dir": "baseline",
        "seed": seed,
        "anchor": anchor,
        "stages": [
            _stage("audio_text", "audio", "text", demo_audio_spec(), "world/audiotext_train.csv", None,
                   p.baseline_epochs, p.batch_size, 5e-4, True),
        ],
    }
    header = (
        f"{DEMO_MARK}: the paper's two stages on the embedded synthetic Earth.\n"
        "# The anchor is a small CLIP pretrained by the demo (OpenAI's CLIP cannot be loaded offline).\n"
        "# To bind to the real CLIP instead (online, once), use this anchor line:\n"
        "#   anchor: {type: clip, pretrained: openai/clip-vit-base-patch32}\n"
        "# (and set image_size: 224 in the satellite encoder).\n"
    )
    run_p, base_p = out / "config.yaml", out / "baseline.yaml"
    run_p.write_text(header + yaml.safe_dump(run, sort_keys=False))
    base_p.write_text("# Direct audio -> text baseline (audio bound straight to CLIP's text tower).\n"
                      + yaml.safe_dump(base, sort_keys=False))
    return run_p, base_p


DEMO_MARK = "# GeoBind demo"
DEMO_FOLDER_MARK = ".geobind-demo"
# Held while a demo writes into its folder: a second demo there (--force, --resume) is refused.
DEMO_LOCK = ".geobind-demo.lock"
# Everything a demo writes at the top of its folder: what --force may delete.
DEMO_OUTPUTS = frozenset({DEMO_FOLDER_MARK, DEMO_LOCK, "world", "anchor", "run", "baseline", "model", "maps",
                          "config.yaml", "baseline.yaml", "report.json", "report.md", "places.parquet",
                          "places.parquet.parts", "places.index"})


def _lock_out(out: Path):
    """The demo's lock on ``out`` (an open file; ``None`` without advisory locks), or a
    FileExistsError naming the demo that holds it."""
    from geobind.search.common import exclusive_lock

    held, pid = exclusive_lock(out / DEMO_LOCK)
    if held is None and pid is not None:
        raise FileExistsError(f"another `geobind demo` (pid {pid}) is writing into {out}; wait for it to "
                              "finish, or choose another --out")
    return held


def prepare_out(out: Path, force: bool):
    """Refuse a non-empty output folder unless ``force`` (then it is replaced); even with
    ``force`` only an earlier demo's folder is deleted, never a folder of other files, and never
    one another demo is writing into. Returns the lock that keeps other demos out of the folder
    (released when closed or when the process ends)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out names a folder for the demo's outputs")
    lock = _lock_out(out) if (out / DEMO_LOCK).is_file() else None  # a demo that runs there says so first
    try:
        # A folder holding only the mark is a start that failed before it wrote anything.
        if out.exists() and any(p.name not in (DEMO_FOLDER_MARK, DEMO_LOCK) for p in out.iterdir()):
            if not force:
                raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it, or choose --out")
            config = out / "config.yaml"
            # The mark, or (a demo of an earlier version) its config, baseline and world together.
            ours = (out / DEMO_FOLDER_MARK).is_file() or (
                config.is_file() and config.read_text(errors="replace").startswith(DEMO_MARK)
                and (out / "baseline.yaml").is_file() and (out / "world").is_dir())
            if not ours:
                raise FileExistsError(f"{out} holds files that are not an earlier demo's; not deleting them: "
                                      "choose another --out")
            # Files the user added (embeddings, notes...) are named rather than deleted with the rest.
            others = sorted(p.name for p in out.iterdir() if p.name not in DEMO_OUTPUTS)
            if others:
                raise FileExistsError(f"{out} is an earlier demo's folder but also holds {', '.join(others[:5])}"
                                      f"{' ...' if len(others) > 5 else ''}, which the demo did not write: move "
                                      "them out, or choose another --out")
            for p in out.iterdir():  # all but the lock, which this run holds
                if p.name == DEMO_LOCK:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        lock = lock or _lock_out(out)
        # Marks the folder as the demo's from the start, so --force can replace an interrupted run.
        (out / DEMO_FOLDER_MARK).write_text("outputs of `geobind demo`\n")
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


def run_demo(
    out: str | Path = "geobind-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    force: bool = False,
    resume: bool = False,
    preset: str | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run the whole demo into ``out``; returns the report (also written to ``out/report.json``).
    ``resume`` continues a demo that was stopped (Ctrl-C): a finished world and anchor are kept
    and the binding stages resume from their checkpoints. One demo at a time writes into a
    folder: another one there is refused while this one runs."""
    from geobind.data.world.geodata import check_world_data

    out = Path(out)
    p = PRESETS[preset or ("quick" if quick else "full")]
    check_world_data()  # before the output folder is made: a failed start leaves nothing behind
    if resume:
        if force:
            raise ValueError("--resume continues the demo in --out and --force replaces it: pass one of them")
        if not (out / DEMO_FOLDER_MARK).is_file():
            raise FileNotFoundError(f"{out} holds no stopped demo to resume; run `geobind demo` without --resume")
        lock = _lock_out(out)
    else:
        lock = prepare_out(out, force)
    with contextlib.closing(lock) if lock is not None else contextlib.nullcontext():
        return _run_demo(out, p, seed, resume, progress, log)


def _run_demo(out: Path, p: Preset, seed: int, resume: bool, progress: bool, log) -> dict[str, Any]:
    from geobind.binding.trainer import train
    from geobind.config import load_config
    from geobind.data.manifest import read_dataset
    from geobind.data.world import build_world
    from geobind.demo.anchor import pretrain_clip
    from geobind.demo.report import evaluate_demo, write_markdown

    log = log or (lambda *_: None)
    log(NOTICE)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    world_json = out / "world" / "world.json"  # written last: the world is complete
    if resume and world_json.is_file():
        world = json.loads(world_json.read_text())
        if (world.get("seed"), world.get("size")) != (seed, p.world):
            raise ValueError(f"--resume: {out} was started with --seed {world.get('seed')} and the "
                             f"{world.get('size')} preset; resume with those, or pass --force to start again")
    else:
        if resume and (out / "world").exists():
            shutil.rmtree(out / "world")
        world = build_world(out / "world", seed=seed, size=p.world, image_size=IMAGE_SIZE,
                            sample_rate=SAMPLE_RATE, seconds=SECONDS, progress=progress)
    seconds["world"] = round(time.perf_counter() - t, 1)
    log(f"world: {json.dumps(world.get('counts', {}))} in {seconds['world']}s")

    t = time.perf_counter()
    anchor_json = out / "anchor" / "demo-anchor.json"  # written once the anchor is saved
    if resume and anchor_json.is_file():
        anchor = json.loads(anchor_json.read_text())
        log("anchor CLIP: kept from the stopped run")
    else:
        if (out / "anchor").exists():
            shutil.rmtree(out / "anchor")
        anchor = pretrain_clip(read_dataset(out / "world" / "stage1_train.csv"), out / "anchor", dim=DIM,
                               image_size=IMAGE_SIZE, epochs=p.anchor_epochs, batch_size=p.batch_size, seed=seed,
                               progress=progress, log=log)
        anchor_json.write_text(json.dumps(anchor, indent=2) + "\n")
    seconds["anchor"] = round(time.perf_counter() - t, 1)

    run_cfg, base_cfg = write_configs(out, p, seed)
    t = time.perf_counter()
    model_dir = train(load_config(run_cfg), resume=resume and (out / "run").is_dir(), progress=progress, log=log)
    seconds["stages"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    base_dir = train(load_config(base_cfg), resume=resume and (out / "baseline").is_dir(), progress=progress,
                     log=log)
    seconds["baseline"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    report = evaluate_demo(out, model_dir, base_dir, world, progress=progress)
    seconds["evaluation"] = round(time.perf_counter() - t, 1)

    from geobind.model import GeoBind

    final = GeoBind.from_pretrained(model_dir)
    final.save_pretrained(out / "model")
    t = time.perf_counter()
    for stale in ("places.parquet", "places.parquet.parts", "places.index"):  # a stopped run's, remade
        if (out / stale).is_dir():
            shutil.rmtree(out / stale)
        elif (out / stale).exists():
            (out / stale).unlink()
    index = write_places_index(final, out, progress=progress)
    seconds["index"] = round(time.perf_counter() - t, 1)
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    report["seconds"] = seconds
    report["anchor"] = {**anchor, "note": NOTICE}
    report["preset"] = p.world
    from geobind.demo.report import format_summary, next_steps

    report["next_steps"] = next_steps(out, report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "report.md")

    log(format_summary(report))
    log(f"\nwrote: model {out / 'model'}, report {out / 'report.md'} (+ report.json), maps {out / 'maps'} "
        f"(PNG + GeoTIFF), index {index}")
    log("try next:")
    for what, cmd in report["next_steps"]:
        log(f"  {what + ':':<38}{cmd}")
    return report


def write_places_index(model, out: Path, *, progress: bool = True) -> Path:
    """Satellite embeddings of every demo place with a tile (captions where known, thumbnails)
    as an exact index, ``out/places.index``, for ``geobind search`` and ``geobind serve``."""
    import pandas as pd

    from geobind.search.embed import embed_dataset
    from geobind.search.index import build_index

    world = out / "world"
    parts = []
    for name in ("test", "stage1_train", "stage1_val", "stage2_train", "stage2_val"):
        df = pd.read_csv(world / f"{name}.csv", dtype={"id": str}, keep_default_na=False)
        # With the recordings where a place has one: the explorer plays them in its popups.
        cols = [c for c in ("id", "lat", "lon", "satellite", "text", "audio", "scene") if c in df.columns]
        parts.append(df[cols])
    places = pd.concat(parts, ignore_index=True).drop_duplicates("id")
    for col in ("text", "audio"):
        places[col] = places[col].fillna("") if col in places else ""
    manifest = world / "places.csv"
    places.to_csv(manifest, index=False)
    emb = out / "places.parquet"
    embed_dataset(model, manifest, "satellite", emb, batch_size=256, thumbnails=True, progress=progress,
                  log=None)
    index = out / "places.index"
    build_index(emb, index, kind="exact", log=None)
    return index


def add_demo_parser(sub) -> None:
    """Add the ``demo`` subcommand to ``sub``, the subparsers of the ``geobind`` command line."""
    d = sub.add_parser(
        "demo", help="train and evaluate GeoBind on the embedded synthetic Earth (offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DEMO_EPILOG,
        description=__doc__.split("\n\n")[0].replace("``", ""),
    )
    d.add_argument("--out", default="geobind-demo", help="output folder (default: geobind-demo)")
    d.add_argument("--quick", action="store_true", help="a smaller world and shorter training")
    d.add_argument("--seed", type=int, default=0, help="world and training seed (default: 0)")
    d.add_argument("--force", action="store_true",
                   help="replace a non-empty --out folder (never one another demo is writing into)")
    d.add_argument("--resume", action="store_true",
                   help="finish a demo stopped in --out (Ctrl-C): keeps its world, anchor and checkpoints")
    d.add_argument("--preset", choices=sorted(PRESETS), help=argparse.SUPPRESS)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    run_demo(args.out, quick=args.quick, seed=args.seed, force=args.force, resume=args.resume, preset=args.preset,
             progress=not args.no_progress)
    return 0
