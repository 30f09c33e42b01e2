"""A short real ``geobind train`` run on generated data: the trainer's own code path on a GPU.

The throughput benchmarks time the training step alone; this runs the whole trainer (anchor
cache, pre-resized shards, loader workers, device-side augmentation, ``torch.compile``, bf16,
fused AdamW, checkpoints, validation, the audio stage, saving) on a generated paired dataset,
then reads ``metrics.csv``: samples/s and the share of time spent waiting for the loader.

    python benchmarks/gpu/train_smoke.py --out smoke --size b32 --compile          # on a GPU
    python benchmarks/gpu/train_smoke.py --out smoke --size tiny --places 48       # CPU check

Sizes: ``b32`` binds a randomly initialised ViT-B/32 CLIP (224 px; tiles packed at 256 px) and
a tiny audio encoder; ``tiny`` uses the test suite's tiny models at 32 px. Nothing downloads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np

SIZES = {
    # name: (CLIP anchor config, tile px, pack px, stage-1 batch)
    "tiny": (
        {"projection_dim": 32,
         "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 32},
         "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8}},
        48, 37, 8),
    "b32": (
        {"projection_dim": 512, "text_config": {"max_position_embeddings": 77},
         "vision_config": {"image_size": 224, "patch_size": 32}},
        320, 256, 256),
}
WORDS = ("forest desert ocean city snow field river harbour mountain village road farm wetland "
         "beach island lake park bridge tower street market quiet busy green dry cold warm").split()


def _make_chunk(root: Path, start: int, stop: int, px: int, seed: int) -> list[dict]:
    """Places ``start..stop-1`` (their own seeded generator, so any split gives the same data)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng([seed, start])
    rows = []
    for i in range(start, stop):
        for kind in ("sat", "ground"):
            coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((px, px), Image.BICUBIC)
            img.save(root / kind / f"{i:05d}.jpg", quality=90)
        t = np.arange(16000) / 16000
        wav = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 4000) * t) + 0.05 * rng.normal(size=t.size)
        sf.write(root / "audio" / f"{i:05d}.wav", wav.astype(np.float32), 16000)
        rows.append({"id": f"p{i:05d}", "lat": float(rng.uniform(-60, 60)), "lon": float(rng.uniform(-170, 170)),
                     "satellite": f"sat/{i:05d}.jpg", "ground": f"ground/{i:05d}.jpg",
                     "text": "a photo of " + " ".join(rng.choice(WORDS, 4)), "audio": f"audio/{i:05d}.wav"})
    return rows


def make_places(root: Path, n: int, px: int, seed: int = 0, workers: int | None = None) -> dict[str, Path]:
    """``n`` places: a smooth random satellite tile and ground photo per place (JPEG), a
    caption, a 1 s sound (WAV, 16 kHz), random coordinates; manifests for both stages. Made in
    chunks of 256 places over ``workers`` processes (default: every core)."""
    from concurrent.futures import ProcessPoolExecutor

    import pandas as pd

    for d in ("sat", "ground", "audio"):
        (root / d).mkdir(parents=True, exist_ok=True)
    bounds = [(a, min(a + 256, n)) for a in range(0, n, 256)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(bounds)))
    if workers == 1:
        chunks = [_make_chunk(root, a, b, px, seed) for a, b in bounds]
    else:
        with ProcessPoolExecutor(workers) as pool:
            chunks = list(pool.map(_make_chunk, *zip(*[(root, a, b, px, seed) for a, b in bounds])))
    df = pd.DataFrame([row for chunk in chunks for row in chunk])
    cut = max(2, int(n * 0.9))
    paths = {}
    for name, part in (("train", df.iloc[:cut]), ("val", df.iloc[cut:])):
        paths[name] = root / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


def run(out: Path, size: str, places: int, steps: int, compile_: bool, augment_on: str, device: str,
        workers: str | int, log=print) -> dict:
    from geobind.binding.trainer import train
    from geobind.config import parse_config
    from geobind.data.pack import pack
    from geobind.encoders.audio import tiny_clap_audio_spec
    from geobind.encoders.tokenizer import train_tokenizer

    clip, px, pack_px, batch = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = make_places(out / "data", places, px)
    pack(paths["train"], out / "shards", shard_size=256, image_size=pack_px, workers=min(8, os.cpu_count() or 1),
         progress=False, log=None)
    captions = [" ".join(WORDS)] * 3 + [f"a photo of {w}" for w in WORDS]
    train_tokenizer(captions * 3, vocab_size=200, out_dir=out / "tokenizer")
    prepared = time.perf_counter() - t0
    optim = {"batch_size": batch, "max_steps": steps, "lr": 1e-4, "warmup_steps": 2, "log_every": 5,
             "ckpt_every": 1000, "compile": compile_, "num_workers": workers}
    cfg = {
        "output_dir": str(out / "run"), "seed": 0, "device": device,
        "anchor": {"type": "clip", "config": clip, "tokenizer": str(out / "tokenizer")},
        "stages": [
            {"name": "satellite", "train": "satellite", "bind_to": "ground",
             "encoder": {"type": "clip_vision", "init_from": "ground", "augment_on": augment_on},
             "data": {"train": str(out / "shards"), "val": str(paths["val"]), "shuffle_buffer": 256},
             "loss": {"queue_size": 4 * batch},
             "optim": {**optim, "val_every": max(1, steps // 2)}},
            {"name": "audio", "train": "audio", "bind_to": "satellite",
             "encoder": {"type": "clap_audio", **tiny_clap_audio_spec(32)},
             "data": {"train": str(paths["train"])},
             "loss": {"symmetric": True},
             # Eager: compiling the audio tower too would double the run's compile time.
             "optim": {**optim, "batch_size": min(batch, 64), "max_steps": max(2, steps // 4), "compile": False}},
        ],
        "eval": None,
    }
    t1 = time.perf_counter()
    model_dir = train(parse_config(cfg), progress=False, log=log)
    result = {"size": size, "places": places, "steps": steps, "compile": compile_, "augment_on": augment_on,
              "device": device, "prepare_s": round(prepared, 1), "train_s": round(time.perf_counter() - t1, 1),
              "model": str(model_dir), "stages": {}}
    for stage_dir in sorted((out / "run" / "stages").glob("0[1-9]-*")):
        rows = list(csv.DictReader((stage_dir / "metrics.csv").open()))
        timed = [r for r in rows if r.get("samples_per_s")]
        # The first log window holds compilation and the loader's start: report the others.
        steady = timed[1:] or timed
        result["stages"][stage_dir.name] = {
            "samples_per_s": round(float(np.median([float(r["samples_per_s"]) for r in steady])), 1),
            "data_wait": round(float(np.median([float(r["data_wait"]) for r in steady])), 4),
            "final_loss": float(timed[-1]["loss"]) if timed else None,
            "val": {k: v for k, v in rows[-1].items() if k.startswith("val_") and v} if rows else {},
        }
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="a new folder for the data, the run and result.json")
    ap.add_argument("--size", default="b32", choices=sorted(SIZES))
    ap.add_argument("--places", type=int, default=9000,
                    help="generated places, 90%% for training (default 9000: 30 steps of 256 in one epoch, "
                         "so no loader restart or epoch checkpoint falls among the timed steps)")
    ap.add_argument("--steps", type=int, default=40, help="stage-1 steps (stage 2 runs a quarter)")
    ap.add_argument("--compile", action="store_true", help="optim.compile: true for stage 1")
    ap.add_argument("--augment-on", default="device", choices=["loader", "device"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", default="auto", help="optim.num_workers (auto or a number)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; give a new folder")
    workers = a.workers if a.workers == "auto" else int(a.workers)
    r = run(out, a.size, a.places, a.steps, a.compile, a.augment_on, a.device, workers)
    (out / "result.json").write_text(json.dumps(r, indent=2))
    print(f"train smoke ({r['size']}, {r['places']} places, device {r['device']}, compile {r['compile']}, "
          f"augment_on {r['augment_on']}): data {r['prepare_s']} s, training {r['train_s']} s")
    for name, s in r["stages"].items():
        print(f"  {name:>14}: {s['samples_per_s']:>9} samples/s  data wait {s['data_wait']:.1%}  "
              f"final loss {s['final_loss']}")
    return r


if __name__ == "__main__":
    main()
