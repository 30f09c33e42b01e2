"""Training and embedding throughput: the plain step against GeoBind's step, on one device.

Plain (what Sat2Cap / GeoCLAP do): every step runs the frozen teacher on the paired input
(CLIP image tower on ground photos for stage 1; the stage-1 satellite ViT on tiles for stage 2),
then the trainable student forward + backward, PyTorch's default AdamW (Sat2Cap's settings).
GeoBind: the real training step (``geobind.binding.step.StepRunner`` over a ``BindingStage``,
``build_optimizer``'s fused AdamW on CUDA) fed with cached float16 frozen-anchor embeddings and
uint8 tiles (normalised in the step, as the trainer's loader hands them over), bf16 autocast on CUDA, eager and ``torch.compile``d (``Module.compile``, as ``optim.compile: true``),
at the plain batch and at larger ones (the cache frees the teacher's memory); stage 2 computes mel
features on the device. Each variant builds fresh models; an out-of-memory (or any other failure
of one variant) is recorded, not fatal. A variant suffixed ``:hf`` (e.g. ``eager:2:hf``) is the
same step with transformers' own forward code where GeoBind has a leaner one (the satellite ViT
computes every token in its last layer; the audio tower's window attention runs in eager form and
its mel features are stretched to the Swin input size by bicubic ``interpolate`` rather than a
matrix product), so the gain of those is measured on its own; ``:ckpt`` turns on gradient checkpointing
(``optim.grad_checkpointing``), e.g. ``compile:8:ckpt`` for its cost at a batch that needs it. ``--profile`` (default on CUDA: the compiled
variants) runs 3 more steps under ``torch.profiler`` and records where the time goes: GPU kernel
time by category (matmul, attention, compiled fusions, optimiser, copies, ...), the busy fraction
(kernel time over wall time; well below 1 means the GPU waits for the host) and the top kernels.

FLOPs per sample (stated, not measured): ViT forward = patch embedding 2*T*(3*p*p)*h plus, per
layer, 24*T*h^2 (QKV, projection, 4h MLP) + 4*T^2*h (scores and weighted sum), T = tokens
(ViT-B/32 at 224 px: ~8.8 GFLOP; ViT-B/16: ~35 GFLOP); training = 3 x forward. MFU = samples/s x
training FLOPs / peak FLOP/s (``--peak-tflops``, default 800 for an H100's measured bf16 rate).

    python benchmarks/train_throughput.py --size b32 b16 --stage2 --out results.json   # on a GPU
    python benchmarks/train_throughput.py --size tiny --steps 2 --stage2               # CPU smoke run
    python benchmarks/train_throughput.py --size b32 --batch 16 --audio-batch 2 --stage2 \
        --steps 4 --warmup 2 --variants eager:1 eager:1:hf                             # CPU, real sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import ClapAudioConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from geobind.binding.stage import BindingStage
from geobind.binding.step import StepRunner
from geobind.binding.trainer import build_optimizer
from geobind.config import DataConfig, OptimConfig, StageConfig
from geobind.encoders.audio import (
    AudioSettings,
    ClapAudioEncoder,
    set_mel_resize,
    set_window_attention,
    tiny_clap_audio_config,
)
from geobind.encoders.base import l2_normalize
from geobind.encoders.clip import ClipVisionEncoder
from geobind.encoders.device_augment import model_input
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


_LAST_WARMUP_S = [0.0]
_LAST_TIMED_COMPILES = [0]


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _timeit(fn, steps: int, warmup: int, device) -> float:
    """Seconds per call after ``warmup`` untimed calls (their wall time, compilation included,
    is kept in ``_LAST_WARMUP_S``; graphs compiled during the timed calls, which should be none,
    in ``_LAST_TIMED_COMPILES``)."""
    t = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    _LAST_WARMUP_S[0] = time.perf_counter() - t
    graphs = _graphs_compiled()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    _LAST_TIMED_COMPILES[0] = _graphs_compiled() - graphs
    return (time.perf_counter() - t) / steps


def _autocast(device, precision):
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def counted_flops(fn) -> float:
    """FLOPs of ``fn()`` as ``torch.utils.flop_counter`` counts them: matrix products and
    convolutions, forward and backward (not the FFT, softmax or elementwise work)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def audio_train_flops(encoder, clip_samples: int, device) -> float:
    """Counted FLOPs of one clip's training forward + backward through an audio encoder (mel
    front end + HTS-AT), its window attention switched to transformers' eager form for the count
    so that the attention products are counted on every device (the FLOPs are the same), and its
    mel resize to transformers' ``interpolate`` (uncounted, as the model's FLOPs leave it; the
    matrix product that replaces it would add its own)."""
    set_window_attention(encoder.backbone, "eager")
    set_mel_resize(encoder.backbone, "interpolate")
    try:
        encoder.train()
        wave = torch.randn(1, clip_samples, device=device) * 0.1
        return counted_flops(lambda: encoder(wave).sum().backward())
    finally:
        set_window_attention(encoder.backbone, "sdpa")
        set_mel_resize(encoder.backbone, "matmul")


def cache_ceiling(train_flops: float, teacher_fwd_flops: float) -> float:
    """The most the anchor cache alone can give if time followed FLOPs: the plain step's FLOPs
    (student training + teacher forward) over GeoBind's (student training)."""
    return (train_flops + teacher_fwd_flops) / train_flops


def vision_config(size: str) -> tuple[CLIPVisionConfig, int]:
    over, img, *_ = SIZES[size]
    return CLIPVisionConfig(image_size=img, **over), img


def _fresh_peak(device):
    if device.type == "cuda":
        # A compiled module refers to itself (Module.compile keeps a compiled wrapper of its own
        # bound method), so an earlier variant's weights and gradients live on until the cyclic
        # collector runs: collect them before this variant's peak is counted.
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def host_syncs(step, device) -> dict:
    """Run one more step with CUDA's sync debug mode on: how many operations made the host wait
    for the GPU, and where the first ones were (a fast step has none). If there were any, one
    more step in the mode that raises at the first: its traceback's last frames
    (``host_sync_trace``) locate it where the warnings' file and line cannot (a warning raised
    inside compiled code is reported at a later Python call). Empty off CUDA."""
    if device.type != "cuda":
        return {}
    import traceback
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    except Exception as e:  # a diagnostic: never the reason a timing run stops
        return {"host_syncs_error": f"{type(e).__name__}: {e}"}
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    out = {"host_syncs": len(syncs), "host_sync_sites": [f"{w.filename}:{w.lineno}" for w in syncs[:5]]}
    if syncs:
        try:
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        except RuntimeError:
            frames = traceback.format_exc().strip().splitlines()
            out["host_sync_trace"] = frames[-12:]
        except Exception as e:  # noqa: BLE001 - a diagnostic
            out["host_sync_trace"] = [f"{type(e).__name__}: {e}"]
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
    return out


# Kernel or operator name fragments (lower case) -> where the step's time goes. First match wins:
# convolutions before matrix products (cuDNN's implicit-GEMM convolutions have "gemm" in their
# names), compiled fusions before copies (inductor names a fusion after its ops, "_to_copy" too).
_CATEGORIES = (
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("convolution", ("conv", "cudnn", "implicit")),
    ("matmul", ("gemm", "cutlass", "xmma", "cublas", "nvjet", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "clip_grad")),
    ("communication", ("nccl", "gloo")),
    ("compiled (fused)", ("triton", "compiledfunction", "torchdynamo", "inductor")),
    ("copy", ("memcpy", "memset", "copy_", "aten::to", "aten::_to_copy")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, parts in _CATEGORIES:
        if any(p in low for p in parts):
            return cat
    return "other"


def profile_step(step, device, steps: int = 3) -> dict:
    """Where a step's time goes: ``steps`` more steps under ``torch.profiler``. On CUDA, GPU
    kernel time per step by category (matmul, attention, optimizer, compiled fusions, ...),
    the busy fraction (kernel time / wall time: well below 1 means the GPU waits for the host),
    and the top kernels; on CPU the same from operators' self time. A diagnostic: failures are
    recorded, never fatal."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        _sync(device)
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            wall = (time.perf_counter() - t) / steps
        totals = time_by_name(prof, cuda)
        if not totals:  # e.g. no CUPTI: an empty trace is no reading, not an idle GPU
            raise RuntimeError("the profiler recorded no " + ("GPU kernels" if cuda else "operators"))
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return {"profile_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    return {"profile": summarise_profile(totals, wall, steps, cuda)}


def time_by_name(prof, cuda: bool) -> dict[str, float]:
    """Microseconds per kernel name (CUDA: every GPU kernel, memcpy and memset event) or per
    operator (CPU: self time, so nested operators are not counted twice)."""
    totals: dict[str, float] = {}
    if cuda:
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                totals[evt.name] = totals.get(evt.name, 0.0) + evt.time_range.elapsed_us()
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                totals[avg.key] = totals.get(avg.key, 0.0) + avg.self_cpu_time_total
    return totals


def summarise_profile(totals: dict[str, float], wall: float, steps: int, cuda: bool) -> dict:
    """Per-step milliseconds by category and top names, and the busy fraction, from
    :func:`time_by_name`'s totals over ``steps`` steps of ``wall`` seconds each."""
    per_step = {k: v / 1e3 / steps for k, v in totals.items()}  # microseconds -> ms per step
    cats: dict[str, float] = {}
    for name, ms in per_step.items():
        cats[_category(name)] = cats.get(_category(name), 0.0) + ms
    busy = sum(per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:8]
    return {
        "wall_ms": round(wall * 1e3, 3),
        "busy_ms": round(busy, 3),
        "busy_fraction": round(busy / (wall * 1e3), 3) if wall > 0 else None,
        "what": "GPU kernel time" if cuda else "CPU operator self time",
        "categories_ms": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_ms": [[name[:90], round(ms, 3)] for name, ms in top],
    }


def _guarded(fn) -> dict:
    """Run one variant; an out-of-memory or any other failure (a compiler error, say) is
    recorded instead of ending the run, so the other variants are still measured."""
    import traceback

    try:
        return fn()
    except torch.OutOfMemoryError as e:
        failed = {"error": "out of memory", "detail": str(e).splitlines()[0]}
    except Exception as e:  # noqa: BLE001 - reported in the JSON and the table
        lines = (str(e).strip() or type(e).__name__).splitlines()
        failed = {"error": type(e).__name__, "detail": lines[0][:300],
                  "where": traceback.format_exc().strip().splitlines()[-3:]}
    # Outside the handlers: the exception's frames, and the variant's tensors, are gone by now.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return failed


def _time_plain(forward, opt, scale, symmetric: bool, batch: int, steps: int, warmup: int, device) -> dict:
    """Time the plain step: ``forward()`` -> (student, teacher) embeddings, InfoNCE, AdamW."""
    normalize = torch.nn.functional.normalize

    def step():
        s, t = forward()
        loss = contrastive_loss(normalize(s.float(), dim=-1), normalize(t.float(), dim=-1), scale(),
                                symmetric=symmetric)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec = _timeit(step, steps, warmup, device)
    return {"batch": batch, "sps": batch / sec, "step_s": sec, "peak_gib": _peak_gib(device)}


def _plain_steps(out: dict, plain_variant, batch: int, scales: tuple[int, ...], report) -> None:
    """The plain step at each multiple of ``batch`` (``plain_by_batch``); ``plain`` is the fastest,
    so that GeoBind's larger batches are not compared with a smaller plain one."""
    out["plain_by_batch"] = {}
    for k in scales:
        out["plain_by_batch"][f"b{batch * k}"] = _guarded(lambda k=k: plain_variant(batch * k))
        ok = [v for v in out["plain_by_batch"].values() if "sps" in v]
        out["plain"] = max(ok, key=lambda v: v["sps"]) if ok else next(iter(out["plain_by_batch"].values()))
        report(out)


def _time_geobind_step(stage: BindingStage, step, batch: int, steps: int, warmup: int, device,
                       profile: bool) -> dict:
    """Time GeoBind's ``step()`` on ``stage`` in training mode: samples/s, warm-up (compilation)
    seconds, peak memory, host syncs and, if ``profile``, where the time goes."""
    stage.train()
    sec = _timeit(step, steps, warmup, device)
    r = {"batch": batch, "sps": batch / sec, "step_s": sec, "warmup_s": round(_LAST_WARMUP_S[0], 2),
         "compiles_in_timed_steps": _LAST_TIMED_COMPILES[0], "peak_gib": _peak_gib(device),
         **host_syncs(step, device)}
    if profile:
        r.update(profile_step(step, device))
    return r


def _geobind_runner(stage: BindingStage, name: str, train: str, bind_to: str, enc_type: str, device, ac):
    scfg = StageConfig(name, train, bind_to, {"type": enc_type}, DataConfig("x"), OptimConfig())
    # The trainer's defaults: gradient clipping on (1.0), like `geobind train`.
    return StepRunner(stage, build_optimizer(stage, scfg, device), autocast=ac, grad_clip=scfg.optim.grad_clip)


class _HfVisionEncoder(ClipVisionEncoder):
    """The satellite encoder with transformers' full forward (every token in every layer)."""

    def forward(self, batch):
        pixels = model_input(batch, self.transform, self.device)
        return l2_normalize(self.model(pixel_values=pixels).image_embeds)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        if enabled:  # transformers' own checkpointing of its encoder layers
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()


def variant_name(compile_: bool, batch: int, hf: bool, ckpt: bool = False) -> str:
    """``eager-b512``, ``compile-b1024``, ``eager-b1024-hf``, ``compile-b4096-ckpt``."""
    return f"{'compile' if compile_ else 'eager'}-b{batch}{'-hf' if hf else ''}{'-ckpt' if ckpt else ''}"


def stage1(size: str, device, batch: int, steps: int, warmup: int, precision: str,
           variants: list[Variant], profile: str = "none", report=None, plain_scales: tuple[int, ...] = (1,)) -> dict:
    """Plain step, GeoBind's step for each (compile, batch scale) and inference tiles/s.
    ``report(partial)`` is called after the plain step and after every variant."""
    report = report or (lambda r: None)
    cfg, img = vision_config(size)
    ac = _autocast(device, precision)
    flops = vit_forward_flops(cfg)
    out = {"batch": batch, "fwd_gflop_per_sample": flops / 1e9, "train_flop_per_sample": 3 * flops,
           "teacher_fwd_flop_per_sample": flops, "cache_ceiling": cache_ceiling(3 * flops, flops),
           "geobind": {}, "infer": {}}

    def plain_variant(batch: int):
        _fresh_peak(device)
        student = CLIPVisionModelWithProjection(cfg).to(device)
        teacher = CLIPVisionModelWithProjection(cfg).to(device).eval().requires_grad_(False)
        scale = LogitScale().to(device)
        opt = torch.optim.AdamW(list(student.parameters()) + list(scale.parameters()), lr=5e-5,
                                weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
        tiles = torch.randn(batch, 3, img, img, device=device)
        ground = torch.randn(batch, 3, img, img, device=device)

        def plain():
            with ac():
                with torch.no_grad():
                    t = teacher(pixel_values=ground).image_embeds
                s = student(pixel_values=tiles).image_embeds
            return s, t

        return _time_plain(plain, opt, scale, False, batch, steps, warmup, device)

    _plain_steps(out, plain_variant, batch, plain_scales, report)

    def geobind_variant(compile_: bool, b: int, hf: bool, ckpt: bool, key: str):
        _fresh_peak(device)
        enc = (_HfVisionEncoder if hf else ClipVisionEncoder)(
            "satellite", CLIPVisionModelWithProjection(cfg), ImageTransform(img, SATELLITE_MEAN, SATELLITE_STD))
        enc.set_grad_checkpointing(ckpt)
        anchor = ClipVisionEncoder("ground", CLIPVisionModelWithProjection(cfg),
                                   ImageTransform(img, SATELLITE_MEAN, SATELLITE_STD))
        stage = BindingStage(enc, anchor, symmetric=False).to(device)
        if compile_:
            # A fresh compile cache: one is shared per forward code object, so this variant at
            # another batch would otherwise be compiled with dynamic shapes (the trainer compiles
            # once, at one batch).
            torch._dynamo.reset()
            enc.compile()  # what the trainer does for optim.compile: true
        runner = _geobind_runner(stage, "s1", "satellite", "ground", "clip_vision", device, ac)
        # As the trainer's loader hands them over: uint8 tiles, normalised inside the step.
        tiles = {"pixels": torch.randint(0, 256, (b, 3, img, img), dtype=torch.uint8, device=device)}
        # The cache stores float16 unit vectors; the step widens its batch on the device.
        cached = torch.nn.functional.normalize(torch.randn(b, cfg.projection_dim, device=device), dim=-1).half()
        r = _time_geobind_step(stage, lambda: runner(tiles, anchor_emb=cached), b, steps, warmup, device,
                               profile == "all" or (profile == "compiled" and compile_))
        # The training figure is recorded (and written) before the inference half starts: a
        # failure there (its own, frozen compilation) or the part's time limit cannot take it.
        out["geobind"][key] = r
        report(out)

        def timed_infer():
            stage.eval()
            if compile_:
                # As `geobind embed --compile` embeds: a fresh graph with the weights frozen.
                from geobind.encoders.base import compile_for_inference

                torch._dynamo.reset()
                compile_for_inference(enc)

            @torch.no_grad()
            def infer():
                with ac():
                    enc(tiles)

            isec = _timeit(infer, steps, warmup, device)
            return {"batch": b, "tiles_per_s": b / isec, "warmup_s": round(_LAST_WARMUP_S[0], 2),
                    "compiles_in_timed_steps": _LAST_TIMED_COMPILES[0]}

        return r, _guarded(timed_infer)

    for c, k, hf, ckpt in variants:
        key = variant_name(c, batch * k, hf, ckpt)
        res = _guarded(lambda c=c, k=k, hf=hf, ckpt=ckpt, key=key: geobind_variant(c, batch * k, hf, ckpt, key))
        if "error" in res:
            out["geobind"][key] = out["infer"][key] = res
        else:
            out["geobind"][key], out["infer"][key] = res
        report(out)
    return out


def stage2(size: str, device, batch: int, steps: int, warmup: int, precision: str,
           variants: list[Variant], profile: str = "none", report=None, plain_scales: tuple[int, ...] = (1,)) -> dict:
    """Plain audio step (loader-side features, frozen satellite ViT every step) vs GeoBind's;
    ``report`` as for :func:`stage1`."""
    report = report or (lambda r: None)
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

    def encoder():
        return ClapAudioEncoder("audio", cfg.projection_dim, ClapAudioModelWithProjection(acfg), settings).to(device)

    teacher = vit_forward_flops(cfg)
    counted = _guarded(lambda: {"flops": audio_train_flops(encoder(), settings.clip_samples, device)})
    train_flops = counted.get("flops")  # None if counting failed: no MFU then, the timings still run
    out = {"batch": batch, "train_flop_per_sample": train_flops, "teacher_fwd_flop_per_sample": teacher,
           "cache_ceiling": cache_ceiling(train_flops, teacher) if train_flops else None, "geobind": {}}
    if train_flops is None:
        out["flop_count_error"] = counted

    def plain_variant(batch: int):
        _fresh_peak(device)
        # transformers' own model, as GeoCLAP runs it (fusion branch, is_longer lookup).
        backbone = ClapAudioModelWithProjection(acfg).to(device)
        sat = CLIPVisionModelWithProjection(cfg).to(device).eval().requires_grad_(False)
        scale = LogitScale().to(device)
        waves = torch.randn(batch, settings.clip_samples, device=device) * 0.1
        tiles = torch.randn(batch, 3, img, img, device=device)
        with torch.no_grad():
            feats = encoder().frontend(waves)  # features arrive precomputed from the loader
        opt = torch.optim.AdamW(list(backbone.parameters()) + list(scale.parameters()), lr=5e-5)
        is_longer = torch.zeros(batch, 1, dtype=torch.bool, device=device)

        def plain():
            with ac():
                with torch.no_grad():
                    t = sat(pixel_values=tiles).image_embeds
                a = backbone(input_features=feats, is_longer=is_longer).audio_embeds
            return a, t

        return _time_plain(plain, opt, scale, True, batch, steps, warmup, device)

    _plain_steps(out, plain_variant, batch, plain_scales, report)

    def geobind_variant(compile_: bool, b: int, hf: bool, ckpt: bool):
        _fresh_peak(device)
        enc = encoder()
        if hf:
            set_window_attention(enc.backbone, "eager")
            set_mel_resize(enc.backbone, "interpolate")
        enc.set_grad_checkpointing(ckpt)
        anchor = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(cfg),
                                   ImageTransform(img, SATELLITE_MEAN, SATELLITE_STD))
        stage = BindingStage(enc, anchor, symmetric=True).to(device)
        if compile_:
            torch._dynamo.reset()  # a fresh compile cache, as for stage 1
            enc.compile()
        runner = _geobind_runner(stage, "s2", "audio", "satellite", "clap_audio", device, ac)
        waves = torch.randn(b, settings.clip_samples, device=device) * 0.1
        cached = torch.nn.functional.normalize(torch.randn(b, cfg.projection_dim, device=device), dim=-1).half()
        return _time_geobind_step(stage, lambda: runner(waves, anchor_emb=cached), b, steps, warmup, device,
                                  profile == "all" or (profile == "compiled" and compile_))

    for c, k, hf, ckpt in variants:
        out["geobind"][variant_name(c, batch * k, hf, ckpt)] = _guarded(
            lambda c=c, k=k, hf=hf, ckpt=ckpt: geobind_variant(c, batch * k, hf, ckpt))
        report(out)
    return out


def _summarise(r: dict, peak: float | None, train_flops: float | None = None) -> None:
    """Add each variant's ratio to the plain step (and MFU), and the best variant."""
    base = r["plain"].get("sps")  # None if the plain step failed (out of memory, say)
    best, best_name = None, None
    for name, v in r["geobind"].items():
        if "sps" not in v:
            continue
        v["ratio"] = v["sps"] / base if base else None
        if peak and train_flops:
            v["mfu"] = v["sps"] * train_flops / (peak * 1e12)
        if best is None or v["sps"] > best["sps"]:
            best, best_name = v, name
    if peak and train_flops:
        for p in r.get("plain_by_batch", {"": r["plain"]}).values():
            if "sps" in p:
                p["mfu"] = p["sps"] * train_flops / (peak * 1e12)
    r["best"], r["best_variant"] = best, best_name
    profiled = [(v["sps"], n) for n, v in r["geobind"].items() if "sps" in v and "profile" in v]
    r["profiled_variant"] = max(profiled)[1] if profiled else None
    if "infer" in r:
        for name, v in r["infer"].items():  # each variant's forward against its own training step
            if "tiles_per_s" in v and "sps" in r["geobind"].get(name, {}):
                v["over_train"] = v["tiles_per_s"] / r["geobind"][name]["sps"]
        ok = [v["tiles_per_s"] for v in r["infer"].values() if "tiles_per_s" in v]
        if ok and best:
            r["best_infer_tiles_per_s"] = max(ok)
            # The goal's ratio: the fastest training variant's own forward over its step.
            r["infer_over_train"] = r["infer"].get(best_name, {}).get("over_train")
            r["best_infer_over_best_train"] = max(ok) / best["sps"]


class Variant(NamedTuple):
    """One GeoBind step variant of ``--variants``."""

    compiled: bool  # torch.compile the trainable encoder
    scale: int  # batch = scale x the plain step's batch
    hf: bool = False  # transformers' forward code instead of GeoBind's lean one
    ckpt: bool = False  # optim.grad_checkpointing: layers recomputed in the backward pass


def parse_variants(specs: list[str]) -> list[Variant]:
    """``["eager:1", "compile:2", "eager:2:hf", "compile:8:ckpt"]`` -> variants: eager or compiled,
    a multiple of the plain batch, and optional flags ``hf`` (transformers' forward code) and
    ``ckpt`` (gradient checkpointing)."""
    out = []
    for spec in specs:
        parts = spec.split(":")
        mode, scale, flags = parts[0], (parts[1] if len(parts) > 1 else ""), parts[2:]
        if (mode not in ("eager", "compile") or not scale.isdigit() or int(scale) < 1
                or not set(flags) <= {"hf", "ckpt"} or len(set(flags)) != len(flags)):
            raise SystemExit(f"--variants {spec!r}: use eager:N or compile:N (N a positive integer), "
                             "optionally with :hf and/or :ckpt")
        out.append(Variant(mode == "compile", int(scale), "hf" in flags, "ckpt" in flags))
    return out


def _write(path: str | None, results: dict) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", nargs="+", default=["b32", "b16"], choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--batch", type=int, default=None,
                    help="the plain stage-1 step's batch (default: 512 at b32, 256 at b16, 8 at tiny); "
                         "variants scale it")
    ap.add_argument("--audio-batch", type=int, default=None,
                    help="the plain stage-2 step's batch (default: 128, 4 at tiny); variants scale it")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--variants", nargs="+", default=None, metavar="MODE:SCALE",
                    help="GeoBind step variants: eager|compile : multiple of the plain batch [:hf for "
                         "transformers' forward code] [:ckpt for gradient checkpointing, e.g. compile:8:ckpt] "
                         "(default on CUDA: compile:2 eager:2 eager:2:hf "
                         "eager:1 compile:4, the full step first, the largest batch last; on CPU: eager:1)")
    ap.add_argument("--stage2", action="store_true", help="also run the audio stage (once, at the first size)")
    ap.add_argument("--stage2-only", action="store_true",
                    help="only the audio stage (its satellite teacher at the first --size)")
    ap.add_argument("--profile", choices=["none", "compiled", "all"], default=None,
                    help="profile 3 more steps of these GeoBind variants: time by kernel category, GPU busy "
                         "fraction, top kernels (default: compiled on CUDA, none on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak FLOP/s for MFU (default 800, an H100's or H200's measured bf16 rate, on those "
                         "cards; other cards: give it, or MFU is left out)")
    ap.add_argument("--plain-scales", nargs="+", type=int, default=None, metavar="N",
                    help="multiples of the plain step's batch to run it at; the fastest is the baseline "
                         "(default on CUDA: 1 2, as GeoBind's variants run at larger batches; on CPU: 1)")
    ap.add_argument("--out", help="write every figure to this JSON file")
    a = ap.parse_args(argv)
    for flag, value in (("--batch", a.batch), ("--audio-batch", a.audio_batch)):
        if value is not None and value < 2:
            ap.error(f"{flag} must be at least 2 (the contrastive loss needs negatives), got {value}")
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    precision = a.precision or ("bf16" if cuda else "fp32")
    known_peak = cuda and any(n in torch.cuda.get_device_name(device) for n in ("H100", "H200"))
    peak = a.peak_tflops or (800.0 if known_peak else None)
    if cuda and peak is None:
        print(f"MFU left out: give --peak-tflops for {torch.cuda.get_device_name(device)}")
    plain_scales = tuple(a.plain_scales or ((1, 2) if cuda else (1,)))
    if min(plain_scales) < 1:
        ap.error("--plain-scales are positive multiples of the plain batch")
    profile = a.profile or ("compiled" if cuda else "none")
    # The full step first: if a part hits its time limit, the variant the goals rest on is in.
    variants = parse_variants(a.variants or (["compile:2", "eager:2", "eager:2:hf", "eager:1", "compile:4"] if cuda
                                             else ["eager:1"]))
    results = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "precision": precision,
               "variants": a.variants, "torch": torch.__version__, "peak_tflops": peak, "stage1": {}, "stage2": {}}
    def reporter(stage: str, size: str):
        def report(r: dict) -> None:
            # After every variant, so a run stopped at its time limit keeps what it measured.
            _summarise(r, peak, r.get("train_flop_per_sample"))
            results[stage][size] = r
            _write(a.out, results)
        return report

    for size in ([] if a.stage2_only else a.size):
        stage1(size, device, a.batch or SIZES[size][2], a.steps, a.warmup, precision, variants, profile,
               report=reporter("stage1", size), plain_scales=plain_scales)
    if a.stage2 or a.stage2_only:
        size = a.size[0]
        stage2(size, device, a.audio_batch or SIZES[size][3], a.steps, a.warmup, precision, variants, profile,
               report=reporter("stage2", size), plain_scales=plain_scales)
    print(table(results))
    return results


def table(results: dict) -> str:
    """The short text table printed last (one row per measured variant)."""
    rows = [("stage", "size", "variant", "batch", "samples/s", "vs plain", "MFU", "infer/s", "peak GiB",
             "host syncs")]

    def fmt(v, f):
        return f.format(v) if v is not None else "-"

    for stage, label in (("stage1", "1 sat->ground"), ("stage2", "2 audio->sat")):
        for size, r in results[stage].items():
            base = r["plain"].get("sps")
            for p in r.get("plain_by_batch", {"": r["plain"]}).values():
                rows.append((label, size, "plain", p.get("batch", r["batch"]),
                             fmt(p.get("sps"), "{:.1f}") if "error" not in p else p["error"],
                             fmt(p["sps"] / base if base and "sps" in p else None, "{:.2f}x"),
                             fmt(p.get("mfu"), "{:.1%}"), "-", fmt(p.get("peak_gib"), "{:.1f}"), "-"))
            for name, v in r["geobind"].items():
                if "sps" not in v:
                    rows.append((label, size, name, "-", v.get("error", "?"), "-", "-", "-", "-", "-"))
                    continue
                inf = r.get("infer", {}).get(name, {}).get("tiles_per_s")
                rows.append((label, size, name, v["batch"], fmt(v["sps"], "{:.1f}"), fmt(v.get("ratio"), "{:.2f}x"),
                             fmt(v.get("mfu"), "{:.1%}"), fmt(inf, "{:.1f}"), fmt(v.get("peak_gib"), "{:.1f}"),
                             v.get("host_syncs", "-")))
    head = (f"device: {results['device']}  precision: {results['precision']}  "
            f"torch: {results['torch']}")
    lines = [head] + ["".join(f"{str(c):>15}" for c in row) for row in rows]
    return "\n".join(lines + _summary_module().profile_lines(results))


def _summary_module():
    """``benchmarks/gpu/summary.py`` (plain JSON formatting, shared with the GPU suite's table)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "gpu" / "summary.py"
    spec = importlib.util.spec_from_file_location("geobind_gpu_summary", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
