"""Input-pipeline and training throughput per data format, on this machine's CPUs.

Everything is generated in a scratch folder (seeded); nothing is downloaded.

Part 1, input pipeline: samples/s delivered by the trainer's own loader
(``geobind.binding.trainer.train_loader``) running the training transforms, no model:

* satellite tiles of ``--image-px`` px (JPEG q90) -> RandomResizedCrop 224 + overhead augmentation,
  from a manifest (files), from shards holding the original JPEGs (``pack --image-size 0``), and
  from shards pre-resized by ``geobind data pack`` (``--image-size 256``);
* recordings of ``--audio-seconds`` s, 44.1 kHz stereo -> CLAP's input (48 kHz mono, random 10 s
  crop), from a manifest of MP3s, of FLACs, and from shards pre-resampled to 48 kHz FLAC
  (``pack --audio-rate 48000``) and 16-bit WAV (``--audio-format wav``);

each with 0 (the main process, one torch thread: one core's rate) and ``--workers`` loader
workers. Rates include worker start-up and the shuffle buffer fill (100 samples), as an epoch
start does.

Part 1b, satellite augmentation in the loader or on the device (``augment_on``): the loader's
per-tile cost on the pre-resized 256 px shards in each mode (``loader``: decode + PIL crop, flips,
jitter, normalise; ``device``: decode + drawing the parameters only), one core, timed directly and
through the trainer's loader; and the cost of the batched device augmentation
(``geobind.encoders.device_augment.apply_overhead_augment``, 256 -> 224 px) per tile at
``--aug-batch`` on this machine's device (the CPU here unless a GPU is present).

Part 2, training: the stage-1 step (``geobind.binding.step.StepRunner``: satellite ViT forward and
backward against cached anchor embeddings, AdamW) at ``--model`` size (``b32`` = CLIP ViT-B/32
at 224 px, randomly initialised; ``tiny`` for a smoke run), fed from memory (one pre-made batch)
against fed from the manifest's files and from pre-resized shards through the trainer's loader.
``data_wait`` is the fraction of wall time spent blocked on the loader.

    python benchmarks/data_throughput.py --out results.json          # ~3 minutes on 2 CPU cores
    python benchmarks/data_throughput.py --quick                      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geobind.binding.prefetch import map_tensors
from geobind.binding.step import StepRunner
from geobind.binding.trainer import _CollateTrain, build_optimizer, train_items, train_loader
from geobind.data.manifest import read_dataset
from geobind.data.pack import pack


class _Load:
    """The data side of an encoder (load + collate) without its model."""

    def __init__(self, fn):
        self.fn = fn

    def load(self, item, *, train=False):
        return self.fn(item, train)

    def collate(self, samples):
        from geobind.encoders.images import collate_images

        return collate_images(samples)


class _SatLoad:
    def __init__(self, size, augment_on="loader"):
        from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform

        self.t = ImageTransform(
            size, SATELLITE_MEAN, SATELLITE_STD, augment="overhead", augment_on=augment_on
        )

    def __call__(self, item, train):
        return self.t(item, train=train)


class _AudioLoad:
    def __init__(self):
        from geobind.encoders.audio import AudioSettings

        self.audio = AudioSettings()

    def __call__(self, item, train):
        from geobind.encoders.audio import load_clip

        return load_clip(item, self.audio, train=train)


def make_data(
    root: Path, n_images: int, image_px: int, n_audio: int, audio_seconds: float, seed: int = 0
):
    """Seeded tiles (smooth fields + texture, like overhead imagery) and tone/noise recordings."""
    import pandas as pd
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "sat").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        img = np.asarray(
            Image.fromarray(coarse).resize((image_px, image_px), Image.BICUBIC), dtype=np.float32
        )
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "sat" / f"{i:05d}.jpg", quality=90)
        rows.append(
            {
                "id": f"t{i:05d}",
                "lat": float(rng.uniform(-60, 60)),
                "lon": float(rng.uniform(-170, 170)),
                "satellite": f"sat/{i:05d}.jpg",
            }
        )
    pd.DataFrame(rows).to_csv(root / "images.csv", index=False)
    rate = 44100
    t = np.arange(int(audio_seconds * rate)) / rate
    arows = {"mp3": [], "flac": []}
    for i in range(n_audio):
        w = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.normal(size=t.size)
        wave = np.stack([w, 0.7 * w], axis=1).astype(np.float32)
        for ext, fmt in (("mp3", "MP3"), ("flac", "FLAC")):
            sf.write(root / "audio" / f"{i:05d}.{ext}", wave, rate, format=fmt)
            arows[ext].append(
                {"id": f"a{i:05d}", "lat": 0.0, "lon": 0.0, "audio": f"audio/{i:05d}.{ext}"}
            )
    for ext, r in arows.items():
        pd.DataFrame(r).to_csv(root / f"audio_{ext}.csv", index=False)
    return {
        "images": root / "images.csv",
        "audio_mp3": root / "audio_mp3.csv",
        "audio_flac": root / "audio_flac.csv",
    }


def loader_rate(data, modality, fn, *, workers: int, batch: int, seed: int = 0) -> dict:
    """Samples/s of one epoch of the trainer's loader (start-up included)."""
    loader = loader_batches(data, _Load(fn), batch, workers, modality=modality, seed=seed)
    t0 = time.perf_counter()
    n = 0
    for idx, _x, _, bad in loader:
        assert not bad, bad
        n += len(idx)
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1)}


def augment_costs(shards, workers: int, loader_batch: int, aug_batch: int, reps: int) -> dict:
    """Loader-side cost per tile with the augmentation in the loader vs on the device, and the
    batched device augmentation's cost per tile (256 px tiles -> 224 px)."""
    import random

    from geobind.encoders.device_augment import apply_overhead_augment
    from geobind.encoders.images import collate_images

    modes = {m: _SatLoad(224, m) for m in ("loader", "device")}
    items = [
        shards.item(sample, row, "satellite")
        for row, sample in shards.read_rows(np.arange(len(shards)))
    ]
    out: dict = {"tiles": len(items), "tile_px": 256, "per_tile_ms": {}, "pipeline": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):  # best of two passes over the tiles, modes alternating
            for mode, fn in modes.items():
                t0 = time.perf_counter()
                for i, item in enumerate(items):
                    random.seed(i)
                    fn(item, True)
                ms = 1000 * (time.perf_counter() - t0) / len(items)
                out["per_tile_ms"][mode] = round(min(ms, out["per_tile_ms"].get(mode, ms)), 3)
        for mode, fn in modes.items():
            for w in sorted({0, workers}):
                r = loader_rate(shards, "satellite", fn, workers=w, batch=loader_batch)
                out["pipeline"].append({"augment_on": mode, "workers": w, **r})
    finally:
        torch.set_num_threads(threads)
    t = modes["device"].t
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = []
    for i in range(aug_batch):
        random.seed(i)
        samples.append(t(items[i % len(items)], train=True))
    batch = {k: v.to(dev) for k, v in collate_images(samples).items()}

    def run():
        y = apply_overhead_augment(batch["pixels"], batch["aug"], t.size, t.mean, t.std)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return y

    run()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    out["device_apply"] = {
        "device": str(dev),
        "torch_threads": threads,
        "batch": aug_batch,
        "load_size": t.load_size,
        "size": t.size,
        "ms_per_batch": round(1000 * best, 2),
        "us_per_tile": round(1e6 * best / aug_batch, 1),
        "tiles_per_s": round(aug_batch / best, 1),
    }
    return out


def vision_model(size: str):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if size == "b32":
        cfg, px = CLIPVisionConfig(patch_size=32, image_size=224, projection_dim=512), 224
    else:
        cfg = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=8,
            image_size=32,
            projection_dim=32,
        )
        px = 32
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(cfg), px


def train_rates(
    paths: dict, shards_dir: Path, size: str, batch: int, steps: int, workers: int, rounds: int = 2
) -> dict:
    """Stage-1 samples/s fed from memory vs from files vs from pre-resized shards."""
    from geobind.binding.stage import BindingStage
    from geobind.config import DataConfig, OptimConfig, StageConfig
    from geobind.encoders.clip import ClipVisionEncoder
    from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform

    model, px = vision_model(size)
    enc = ClipVisionEncoder(
        "satellite", model, ImageTransform(px, SATELLITE_MEAN, SATELLITE_STD, "overhead")
    )

    class _Anchor(torch.nn.Module):  # cached anchor embeddings: the anchor itself never runs
        dim = enc.dim

    stage = BindingStage(enc, _Anchor())
    cfg = StageConfig(
        name="s",
        train="satellite",
        bind_to="ground",
        encoder={"type": "clip_vision"},
        data=DataConfig(train=""),
        optim=OptimConfig(batch_size=batch),
    )
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage.to(dev)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    run = StepRunner(stage, build_optimizer(stage, cfg, dev), grad_clip=1.0, autocast=autocast)
    stage.train()
    g = torch.Generator().manual_seed(0)
    anchor_all = torch.nn.functional.normalize(torch.randn(100_000, enc.dim, generator=g), dim=1).half().to(dev)

    def step(idx, x):
        run(x, anchor_emb=anchor_all[idx.to(dev)])
        if dev.type == "cuda":
            torch.cuda.synchronize()  # the step's time is the device's, the wait is the loader's

    def timed(batches, label):
        # One warm-up step (worker start-up, first buffer fill), then `steps` timed ones.
        it = iter(batches)
        idx, x, _, _ = next(it)
        step(idx, x)
        wait = comp = 0.0
        n = 0
        t_prev = time.perf_counter()
        for _ in range(steps):
            idx, x, _, _ = next(it)
            t1 = time.perf_counter()
            step(idx, x)
            t2 = time.perf_counter()
            wait += t1 - t_prev
            comp += t2 - t1
            n += len(idx)
            t_prev = t2
        del it  # stops the loader's workers before the next feed is timed
        total = wait + comp
        return {
            "samples_per_s": round(n / total, 2),
            "step_s": round(comp / steps, 3),
            "data_wait": round(wait / total, 4),
            "steps": steps,
            "batch": batch,
            "feed": label,
        }

    table = read_dataset(paths["images"])
    shards = read_dataset(shards_dir)
    pin = dev.type == "cuda"
    # Already on the device: this feed times the step alone, no loading and no copy.
    mem = map_tensors(next(iter(loader_batches(table, enc, batch, workers=0))), lambda t: t.to(dev))
    loader_t, device_t = enc.transform, ImageTransform(px, SATELLITE_MEAN, SATELLITE_STD, "overhead", augment_on="device")
    feeds = {
        "memory": (lambda: _repeat(mem), "one pre-made batch", loader_t),
        "manifest": (
            lambda: loader_batches(table, enc, batch, workers=workers, pin_memory=pin),
            f"JPEG files, {workers} workers",
            loader_t,
        ),
        "shards_256": (
            lambda: loader_batches(shards, enc, batch, workers=workers, pin_memory=pin),
            f"pre-resized shards, {workers} workers",
            loader_t,
        ),
        "shards_256_device_aug": (
            lambda: loader_batches(shards, enc, batch, workers=workers, pin_memory=pin),
            f"pre-resized shards, {workers} workers, augment_on: device",
            device_t,
        ),
    }
    # Feeds alternate and each keeps its best round, so load from other processes on a shared
    # machine biases none of them in particular.
    out: dict = {}
    for _ in range(rounds):
        for name, (make, label, transform) in feeds.items():
            enc.transform = transform  # the loader and the forward both follow the transform
            r = timed(make(), label)
            r["device"] = str(dev)
            if name not in out or r["samples_per_s"] > out[name]["samples_per_s"]:
                out[name] = r
    return out


def _repeat(x):
    while True:
        yield x


def loader_batches(data, enc, batch, workers, *, modality: str = "satellite", seed: int = 0,
                   pin_memory: bool = False):
    """The trainer's loader for one epoch over every row of ``data``."""
    valid = torch.ones(len(data), dtype=torch.bool)
    loader, _ = train_loader(
        data,
        train_items(data, modality, enc, seed),
        valid=valid,
        batch_size=batch,
        seed=seed,
        epoch=0,
        step_in_epoch=0,
        rank=0,
        world=1,
        num_workers=workers,
        collate_fn=_CollateTrain(enc, None),
        shuffle_buffer=100,
        pin_memory=pin_memory,
    )
    return loader


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--images", type=int, default=512, help="satellite tiles to generate (default: 512)"
    )
    p.add_argument("--image-px", type=int, default=512, help="tile side in pixels (default: 512)")
    p.add_argument("--audio", type=int, default=48, help="recordings to generate (default: 48)")
    p.add_argument(
        "--audio-seconds", type=float, default=20.0, help="recording length (default: 20 s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="loader workers (default: 2)",
    )
    p.add_argument("--batch", type=int, default=32, help="loader batch size (default: 32)")
    p.add_argument(
        "--model",
        choices=("b32", "tiny"),
        default="b32",
        help="stage-1 model for part 2 (default: b32)",
    )
    p.add_argument("--train-batch", type=int, default=16, help="training batch size (default: 16)")
    p.add_argument(
        "--train-steps", type=int, default=3, help="timed training steps per feed (default: 3)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds over the training feeds; best kept (default: 2)",
    )
    p.add_argument(
        "--aug-batch",
        type=int,
        default=64,
        help="batch of the timed device augmentation (default: 64)",
    )
    p.add_argument("--skip-train", action="store_true", help="input pipeline only")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and model")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.image_px, a.audio, a.audio_seconds, a.batch = 24, 64, 4, 2.0, 8
        a.model, a.train_batch, a.train_steps, a.rounds, a.aug_batch = "tiny", 8, 1, 1, 8
    if not a.skip_train and (a.train_steps + 1) * a.train_batch > a.images:
        # Each feed is one epoch of the trainer's loader: a warm-up batch, then the timed ones.
        p.error(f"--train-steps {a.train_steps} at --train-batch {a.train_batch} needs "
                f"{(a.train_steps + 1) * a.train_batch} images (one warm-up batch first); "
                f"--images is {a.images}: raise --images or lower --train-steps")
    os.environ.setdefault("GEOBIND_CACHE", tempfile.mkdtemp(prefix="geobind-bench-cache-"))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="geobind-bench-"))
    res = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "work")},
    }
    try:
        t = time.perf_counter()
        paths = make_data(work / "raw", a.images, a.image_px, a.audio, a.audio_seconds)
        res["generate_s"] = round(time.perf_counter() - t, 1)
        packs = {}
        for name, src, kw in [
            ("shards_orig", paths["images"], {"image_size": 0}),
            ("shards_256", paths["images"], {"image_size": 256}),
            ("shards_audio48k", paths["audio_mp3"], {"audio_rate": 48000}),
            ("shards_audio48k_wav", paths["audio_mp3"], {"audio_rate": 48000, "audio_format": "wav"}),
        ]:
            t = time.perf_counter()
            pack(src, work / name, shard_size=64, progress=False, log=None, workers=a.workers, **kw)
            packs[name] = work / name
            res.setdefault("pack_s", {})[name] = round(time.perf_counter() - t, 2)
            size = sum(f.stat().st_size for f in (work / name).glob("*.tar"))
            res.setdefault("pack_mb", {})[name] = round(size / 2**20, 1)
        sat = _SatLoad(224)
        aud = _AudioLoad()
        feeds = [
            ("satellite", "manifest (JPEG files)", read_dataset(paths["images"]), sat),
            ("satellite", "shards, original JPEGs", read_dataset(packs["shards_orig"]), sat),
            ("satellite", "shards, pre-resized 256", read_dataset(packs["shards_256"]), sat),
            ("audio", "manifest (MP3 44.1k stereo)", read_dataset(paths["audio_mp3"]), aud),
            ("audio", "manifest (FLAC 44.1k stereo)", read_dataset(paths["audio_flac"]), aud),
            (
                "audio",
                "shards, FLAC 48k mono (pre-resampled)",
                read_dataset(packs["shards_audio48k"]),
                aud,
            ),
            ("audio", "shards, WAV 16-bit 48k mono", read_dataset(packs["shards_audio48k_wav"]), aud),
        ]
        res["pipeline"] = []
        # One torch thread in the main process too (loader workers use one each), so that
        # workers=0 is the rate of one core rather than of OpenMP threads fighting over it.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for modality, label, data, fn in feeds:
            for w in sorted({0, a.workers}):
                batch = a.batch if modality == "satellite" else max(2, min(a.batch, len(data) // 4))
                r = loader_rate(data, modality, fn, workers=w, batch=batch)
                res["pipeline"].append({"modality": modality, "format": label, "workers": w, **r})
                print(
                    f"{modality:<10}{label:<40} workers={w}  {r['samples_per_s']:>8.1f} samples/s",
                    flush=True,
                )
        torch.set_num_threads(threads)
        aug = augment_costs(
            read_dataset(packs["shards_256"]), a.workers, a.batch, a.aug_batch, 3 if a.quick else 10
        )
        res["satellite_augment"] = aug
        for mode, ms in aug["per_tile_ms"].items():
            print(
                f"satellite 256 px tile, augment_on={mode:<7} loader side {ms:>7.3f} ms/tile (one core)",
                flush=True,
            )
        for r in aug["pipeline"]:
            print(
                f"satellite shards 256, augment_on={r['augment_on']:<7} workers={r['workers']}  "
                f"{r['samples_per_s']:>8.1f} samples/s",
                flush=True,
            )
        d = aug["device_apply"]
        print(
            f"device augmentation on {d['device']}, batch {d['batch']}, {d['load_size']} -> {d['size']} px: "
            f"{d['ms_per_batch']} ms/batch, {d['us_per_tile']} us/tile",
            flush=True,
        )
        if not a.skip_train:
            res["train"] = train_rates(
                paths,
                packs["shards_256"],
                a.model,
                a.train_batch,
                a.train_steps,
                a.workers,
                a.rounds,
            )
            for k, v in res["train"].items():
                print(
                    f"train {a.model} fed from {k:<11} {v['samples_per_s']:>8.2f} samples/s  "
                    f"data_wait {v['data_wait']:.1%}",
                    flush=True,
                )
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
        if a.out:  # also after a failure: what was measured before it is kept
            Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    # A time limit's SIGTERM ends the run through `finally`, which writes what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
