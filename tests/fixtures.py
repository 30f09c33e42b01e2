"""Seeded generators of tiny paired datasets and configs for the test suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
from PIL import Image

CLASSES = ["forest", "desert", "ocean", "city"]
COLORS = np.array([[40, 140, 50], [220, 190, 120], [30, 70, 200], [130, 130, 130]], dtype=np.float32)
TONES = [300.0, 900.0, 2000.0, 4000.0]


def make_dataset(root: Path, n: int = 48, seed: int = 0, image_size: int = 32) -> dict[str, Path]:
    """Write ``n`` places with satellite/ground PNGs, captions and 1 s WAVs whose content
    depends on one of four classes, and the manifests the tests use."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in ("sat", "ground", "audio"):
        (root / d).mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        c = i % len(CLASSES)
        base = COLORS[c]
        sat = np.clip(base + rng.normal(0, 25, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
        grd = np.clip(base[::-1] + rng.normal(0, 25, (image_size, image_size, 3)), 0, 255).astype(np.uint8)
        grd[: image_size // 3] = [135, 180, 235]  # sky
        Image.fromarray(sat).save(root / "sat" / f"{i:04d}.png")
        Image.fromarray(grd).save(root / "ground" / f"{i:04d}.png")
        t = np.arange(16000) / 16000
        wav = 0.3 * np.sin(2 * np.pi * TONES[c] * t * rng.uniform(0.95, 1.05)) + 0.05 * rng.normal(size=t.size)
        sf.write(root / "audio" / f"{i:04d}.wav", wav.astype(np.float32), 16000)
        rows.append(
            {
                "id": f"p{i:04d}",
                "lat": float(rng.uniform(-60, 60)),
                "lon": float(rng.uniform(-170, 170)),
                "satellite": f"sat/{i:04d}.png",
                "ground": f"ground/{i:04d}.png",
                "text": f"a photo of a {CLASSES[c]} near town {int(rng.integers(0, 9))}",
                "audio": f"audio/{i:04d}.wav",
                "scene": CLASSES[c],
            }
        )
    df = pd.DataFrame(rows)
    paths = {}
    cut = int(n * 0.75)
    for name, part, cols in [
        ("stage1", df.iloc[:cut], ["satellite", "ground", "text"]),
        ("stage2", df.iloc[:cut], ["satellite", "audio"]),
        ("test", df.iloc[cut:], ["satellite", "ground", "text", "audio"]),
    ]:
        p = root / f"{name}.csv"
        part[["id", "lat", "lon", *cols, "scene"]].to_csv(p, index=False)
        paths[name] = p
    texts = df["text"].tolist() + [f"a photo of a {c}" for c in CLASSES]
    # A realistic tokenizer has more than a handful of tokens (tiny ones are refused).
    texts += ["the quick brown fox jumps over lazy dogs in warm summer rain and cold winter snow",
              "busy streets with cars buses trains bridges towers parks rivers lakes hills valleys"]
    from geobind.encoders.tokenizer import train_tokenizer

    train_tokenizer(texts * 3, vocab_size=120, out_dir=root / "tokenizer")
    paths["tokenizer"] = root / "tokenizer"
    paths["root"] = root
    return paths


TINY_CLIP = {
    "projection_dim": 32,
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}
# A tiny trainable satellite tower (CLIPVisionConfig fields): the anchor's vision tower, 16-d.
TINY_VISION = {**TINY_CLIP["vision_config"], "projection_dim": 16}


def tiny_config(data: dict[str, Path], out: Path, steps: int = 4, audio: bool = True) -> dict:
    """A two-stage config (satellite -> ground, audio -> satellite) of tiny models."""
    from geobind.encoders.audio import tiny_clap_audio_spec

    stages = [
        {
            "name": "satellite",
            "train": "satellite",
            "bind_to": "ground",
            "encoder": {"type": "clip_vision", "init_from": "ground"},
            "data": {"train": str(data["stage1"])},
            "optim": {"batch_size": 8, "max_steps": steps, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                      "ckpt_every": 2},
        }
    ]
    if audio:
        stages.append(
            {
                "name": "audio",
                "train": "audio",
                "bind_to": "satellite",
                "encoder": {"type": "clap_audio", **tiny_clap_audio_spec(32)},
                "data": {"train": str(data["stage2"])},
                "optim": {"batch_size": 8, "max_steps": steps, "lr": 1e-3, "log_every": 1},
                "loss": {"symmetric": True},
            }
        )
    return {
        "output_dir": str(out),
        "seed": 0,
        "device": "cpu",
        "anchor": {"type": "clip", "config": TINY_CLIP, "tokenizer": str(data["tokenizer"])},
        "stages": stages,
        "eval": {"data": str(data["test"]), "batch_size": 16},
    }


def row_in_first_epoch(table_len: int, batch_size: int, seed: int) -> int:
    """A row the first epoch of a run trains on (the permutation leaves a remainder out): the
    second half of its first batch, which rank 1 of 2 loads."""
    from geobind.binding.trainer import _EpochBatches

    sampler = _EpochBatches(torch.ones(table_len, dtype=torch.bool), batch_size, seed, 0, 0, 0, 1)
    return sampler.perm[batch_size // 2 + 1]


def one_epoch_with_a_broken_tile(tiny_data: dict[str, Path], tmp_path: Path) -> dict:
    """Stage 1 for one epoch of 36 rows (4 batches of 8) over a copy of the data in which one
    tile that the epoch uses cannot be decoded."""
    data = tmp_path / "data"
    if not data.exists():
        shutil.copytree(tiny_data["root"], data)
        row = row_in_first_epoch(36, 8, seed=0)
        (data / "sat" / f"{row:04d}.png").write_bytes(b"\x89PNG truncated")
    d = tiny_config({**tiny_data, "stage1": data / "stage1.csv"}, tmp_path / "run", audio=False)
    d["stages"][0]["optim"].update(max_steps=0, epochs=1, num_workers=0, grad_clip=0.0)
    d["eval"] = None
    return d


@contextlib.contextmanager
def sigint_during_step(n: int, sig: int = signal.SIGINT):
    """Within the block, this process gets ``sig`` (default SIGINT, as from a Ctrl-C) inside its
    ``n``-th training step."""
    from geobind.binding.step import StepRunner

    original, calls = StepRunner.__call__, [0]

    def call(self, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), sig)
        return original(self, *a, **k)

    StepRunner.__call__ = call
    try:
        yield
    finally:
        StepRunner.__call__ = original


def bf16_outputs(encoder, switch, implementations, batch) -> dict:
    """``{implementation: float32 output}`` of ``encoder`` on ``batch`` under CPU bf16 autocast,
    after ``switch(encoder.backbone, implementation)`` for each (e.g. ``set_window_attention``)."""
    import torch

    outs = {}
    for implementation in implementations:
        switch(encoder.backbone, implementation)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[implementation] = encoder(batch).float()
    return outs
