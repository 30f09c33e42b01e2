"""Training and embedding throughput: the plain step against GeoBind's step, on one device.

Plain (what Sat2Cap / GeoCLAP do): every step runs the frozen teacher on the paired input
(CLIP image tower on ground photos for stage 1; the stage-1 satellite ViT on tiles for stage 2),
then the trainable student forward + backward, non-fused AdamW.
GeoBind: the real training step (``geobind.binding.step.StepRunner`` over a ``BindingStage``,
``build_optimizer``'s fused AdamW on CUDA) fed with cached frozen-anchor embeddings, bf16
autocast on CUDA, optional ``torch.compile``; stage 2 computes mel features on the device.

FLOPs per sample (stated, not measured): ViT forward = patch embedding 2*T*(3*p*p)*h plus, per
layer, 24*T*h^2 (QKV, projection, 4h MLP) + 4*T^2*h (scores and weighted sum), T = tokens
(ViT-B/32 at 224 px: ~8.8 GFLOP; ViT-B/16: ~35 GFLOP); training = 3 x forward. MFU = samples/s x
training FLOPs / peak FLOP/s (``--peak-tflops``, default 800 for an H100's measured bf16 rate).

    python benchmarks/train_throughput.py --size b32 --out results.json     # on a GPU
    python benchmarks/train_throughput.py --size tiny --steps 2             # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from transformers import ClapAudioConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from geobind.binding.stage import BindingStage
from geobind.binding.step import StepRunner
from geobind.binding.trainer import build_optimizer
from geobind.config import DataConfig, OptimConfig, StageConfig
from geobind.encoders.audio import AudioSettings, ClapAudioEncoder, tiny_clap_audio_config
from geobind.encoders.clip import ClipVisionEncoder
from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform
from geobind.losses import LogitScale, contrastive_loss

SIZES = {
    # name: (vision overrides, image size, stage-1 batch, stage-2 batch, audio config, audio seconds, rate)
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=8, projection_dim=32), 32, 8, 4, "tiny", 1.0, 16000),
    "b32": (dict(patch_size=32, projection_dim=512), 224, 512, 128, "clap", 10.0, 48000),
    "b16": (dict(patch_size=16, projection_dim=512), 224, 256, 128, "clap", 10.0, 48000),
}


def vit_forward_flops(cfg: CLIPVisionConfig) -> float:
    """Forward FLOPs of one image through a ViT (multiply-add = 2 FLOPs)."""
    h, p = cfg.hidden_size, cfg.patch_size
    t = (cfg.image_size // p) ** 2 + 1
    inter = cfg.intermediate_size
    patch = 2 * (t - 1) * 3 * p * p * h
    per_layer = 2 * t * (4 * h * h + 2 * h * inter) + 4 * t * t * h
    return patch + cfg.num_hidden_layers * per_layer + 2 * h * cfg.projection_dim


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _autocast(device, precision):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def vision_config(size: str) -> tuple[CLIPVisionConfig, int]:
    over, img, *_ = SIZES[size]
    return CLIPVisionConfig(image_size=img, **over), img


def stage1(size: str, device, batch: int, steps: int, warmup: int, precision: str, compile_: bool) -> dict:
    cfg, img = vision_config(size)
    ac = _autocast(device, precision)
    student = CLIPVisionModelWithProjection(cfg).to(device)
    teacher = CLIPVisionModelWithProjection(cfg).to(device).eval().requires_grad_(False)
    scale = LogitScale().to(device)
    opt = torch.optim.AdamW(list(student.parameters()) + list(scale.parameters()), lr=5e-5, weight_decay=0.2,
                            betas=(0.9, 0.98), eps=1e-6)
    tiles = torch.randn(batch, 3, img, img, device=device)
    ground = torch.randn(batch, 3, img, img, device=device)

    def plain():
        with ac():
            with torch.no_grad():
                t = torch.nn.functional.normalize(teacher(pixel_values=ground).image_embeds.float(), dim=-1)
            s = torch.nn.functional.normalize(student(pixel_values=tiles).image_embeds.float(), dim=-1)
            loss = contrastive_loss(s, t, scale(), symmetric=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain_s = _timeit(plain, steps, warmup, device)

    enc = ClipVisionEncoder("satellite", student, ImageTransform(img, SATELLITE_MEAN, SATELLITE_STD))
    anchor = ClipVisionEncoder("ground", CLIPVisionModelWithProjection(cfg),
                               ImageTransform(img, SATELLITE_MEAN, SATELLITE_STD))
    stage = BindingStage(enc, anchor, symmetric=False).to(device)
    if compile_:
        enc.model = torch.compile(enc.model)
    scfg = StageConfig("s1", "satellite", "ground", {"type": "clip_vision"}, DataConfig("x"), OptimConfig())
    runner = StepRunner(stage, build_optimizer(stage, scfg, device), autocast=ac)
    cached = torch.nn.functional.normalize(torch.randn(batch, cfg.projection_dim, device=device), dim=-1)
    stage.train()
    fast_s = _timeit(lambda: runner(tiles, anchor_emb=cached), steps, warmup, device)

    stage.eval()

    @torch.no_grad()
    def infer():
        with ac():
            enc(tiles)

    infer_s = _timeit(infer, steps, warmup, device)
    flops = vit_forward_flops(cfg)
    return {"batch": batch, "plain_sps": batch / plain_s, "geobind_sps": batch / fast_s,
            "speedup": plain_s / fast_s, "infer_tiles_per_s": batch / infer_s,
            "fwd_gflop_per_sample": flops / 1e9, "train_flop_per_sample": 3 * flops}


def stage2(size: str, device, batch: int, steps: int, warmup: int, precision: str, compile_: bool) -> dict:
    from transformers import ClapAudioModelWithProjection

    cfg, img = vision_config(size)
    *_, audio_kind, seconds, rate = SIZES[size]
    ac = _autocast(device, precision)
    if audio_kind == "tiny":
        acfg = ClapAudioConfig(**tiny_clap_audio_config(cfg.projection_dim))
        settings = AudioSettings(sample_rate=rate, clip_seconds=seconds, n_fft=512, hop_length=160, n_mels=16,
                                 f_max=8000.0)
    else:
        acfg = ClapAudioConfig(enable_fusion=True, projection_dim=cfg.projection_dim)
        settings = AudioSettings()
    enc = ClapAudioEncoder("audio", cfg.projection_dim, ClapAudioModelWithProjection(acfg), settings).to(device)
    sat = CLIPVisionModelWithProjection(cfg).to(device).eval().requires_grad_(False)
    scale = LogitScale().to(device)
    waves = torch.randn(batch, settings.clip_samples, device=device) * 0.1
    tiles = torch.randn(batch, 3, img, img, device=device)
    with torch.no_grad():
        feats = enc.frontend(waves)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad] + list(scale.parameters()), lr=5e-5)
    is_longer = torch.zeros(batch, 1, dtype=torch.bool, device=device)

    def plain():
        # Features arrive precomputed (GeoCLAP's extractor runs in the loader); the frozen
        # satellite encoder runs every step.
        with ac():
            with torch.no_grad():
                t = torch.nn.functional.normalize(sat(pixel_values=tiles).image_embeds.float(), dim=-1)
            a = enc.backbone(input_features=feats, is_longer=is_longer).audio_embeds
            loss = contrastive_loss(torch.nn.functional.normalize(a.float(), dim=-1), t, scale(), symmetric=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain_s = _timeit(plain, steps, warmup, device)
    anchor = ClipVisionEncoder("satellite", sat, ImageTransform(img, SATELLITE_MEAN, SATELLITE_STD))
    stage = BindingStage(enc, anchor, symmetric=True).to(device)
    if compile_:
        enc.backbone = torch.compile(enc.backbone)
    scfg = StageConfig("s2", "audio", "satellite", {"type": "clap_audio"}, DataConfig("x"), OptimConfig())
    runner = StepRunner(stage, build_optimizer(stage, scfg, device), autocast=ac)
    cached = torch.nn.functional.normalize(torch.randn(batch, cfg.projection_dim, device=device), dim=-1)
    stage.train()
    fast_s = _timeit(lambda: runner(waves, anchor_emb=cached), steps, warmup, device)
    return {"batch": batch, "plain_sps": batch / plain_s, "geobind_sps": batch / fast_s, "speedup": plain_s / fast_s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=["b32", "b16"], choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trainable encoder")
    ap.add_argument("--stage2", action="store_true", help="also run the audio stage (once, at the first size)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default 800 on CUDA)")
    ap.add_argument("--out", help="write every figure to this JSON file")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    peak = a.peak_tflops or (800.0 if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "precision": precision, "compile": a.compile, "torch": torch.__version__, "stage1": {}, "stage2": {}}
    for size in a.size:
        r = stage1(size, device, SIZES[size][2], a.steps, a.warmup, precision, a.compile)
        if peak:
            r["mfu"] = r["geobind_sps"] * r["train_flop_per_sample"] / (peak * 1e12)
            r["plain_mfu"] = r["plain_sps"] * r["train_flop_per_sample"] / (peak * 1e12)
        r["infer_over_train"] = r["infer_tiles_per_s"] / r["geobind_sps"]
        results["stage1"][size] = r
    if a.stage2:
        size = a.size[0]
        results["stage2"][size] = stage2(size, device, SIZES[size][3], a.steps, a.warmup, precision, a.compile)
    rows = [("stage", "size", "batch", "plain/s", "geobind/s", "ratio", "MFU", "infer/s")]
    for size, r in results["stage1"].items():
        rows.append(("1 sat->ground", size, r["batch"], f"{r['plain_sps']:.1f}", f"{r['geobind_sps']:.1f}",
                     f"{r['speedup']:.2f}x", f"{r['mfu']:.1%}" if "mfu" in r else "-", f"{r['infer_tiles_per_s']:.1f}"))
    for size, r in results["stage2"].items():
        rows.append(("2 audio->sat", size, r["batch"], f"{r['plain_sps']:.1f}", f"{r['geobind_sps']:.1f}",
                     f"{r['speedup']:.2f}x", "-", "-"))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"device: {results['device']}  precision: {precision}  compile: {a.compile}")
    for row in rows:
        print("".join(f"{str(c):>16}" for c in row))
    return results


if __name__ == "__main__":
    main()
