"""GPU-only correctness checks of GeoBind's fast paths, against their plain references, on the
kernels a GPU actually runs (flash / memory-efficient attention, inductor's CUDA code).

The test suite checks the same things on a CPU; here each check runs where it matters:

* ``vit``: the class-token-only CLIP forward, its patch embedding a matrix product, against
  transformers' (a strided convolution there; fp32, and bf16 autocast).
* ``window_attention``: the audio tower's SDPA window attention (additive bias with gradient,
  broadcast over the batch) against the eager form: outputs and every gradient.
* ``mel_resize``: the audio tower's mel resize as a product with an interpolation matrix against
  transformers' bicubic ``interpolate``: outputs and every gradient (batch norm's included).
* ``attention_backends``: the satellite ViT's attention through each SDPA kernel (flash,
  memory-efficient, cuDNN, math): time per layer and agreement with the math kernel.
* ``compile_once``: tiny satellite and audio encoders compiled with inductor train 3 steps
  without recompiling, and match the eager encoder.
* ``device_augment``: the batched overhead augmentation on the GPU against the same on the CPU.
* ``prefetch``: the training loop's one-batch-ahead copies on a side stream deliver every batch
  intact; the time per batch with and without it (copies of 50 MB batches against compute).

    python benchmarks/gpu/checks.py --out checks.json        # on a GPU
    python benchmarks/gpu/checks.py --device cpu              # runs anywhere (tiny models)

Prints one PASS/FAIL line per check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def _grads_rel(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest gradient difference over all parameters, relative to the largest reference
    gradient (a parameter whose gradient is nearly zero would make a per-tensor ratio noise)."""
    # Reduced with torch, not Python's max(): a NaN must fail the check (max(x, nan) is x).
    diff = float(torch.stack([(a.float() - b.float()).abs().max() for a, b in zip(ours, ref)]).max())
    scale = float(torch.stack([b.float().abs().max() for b in ref]).max())
    return diff / max(scale, 1e-12)


def _vision_config(size: str):
    from transformers import CLIPVisionConfig

    if size == "tiny":
        return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                patch_size=8, image_size=32, projection_dim=16)
    return CLIPVisionConfig(patch_size=32, image_size=224, projection_dim=512)


def check_vit(device, size: str) -> dict:
    from transformers import CLIPVisionModelWithProjection

    from geobind.encoders.vit import pooled_class_token

    torch.manual_seed(0)
    cfg = _vision_config(size)
    model = CLIPVisionModelWithProjection(cfg).to(device).train()
    x = torch.randn(8, 3, cfg.image_size, cfg.image_size, device=device)
    params = list(model.vision_model.parameters())
    ref = model.vision_model(pixel_values=x).pooler_output
    ours = pooled_class_token(model.vision_model, x)
    w = torch.randn_like(ref)
    grad_err = _grads_rel(_grads((ours * w).sum(), params), _grads((ref * w).sum(), params))
    out = {"fp32_out_rel": _rel(ours, ref), "fp32_grad_rel": grad_err}
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref16 = model.vision_model(pixel_values=x).pooler_output
            ours16 = pooled_class_token(model.vision_model, x)
        out["bf16_cos_min"] = float(torch.nn.functional.cosine_similarity(ours16.float(), ref16.float(), dim=-1).min())
    # TF32 may be on for fp32 matrix products on a GPU: allow its rounding there.
    tol = 1e-3 if device.type == "cuda" else 1e-4
    out["ok"] = out["fp32_out_rel"] < tol and grad_err < 10 * tol and out.get("bf16_cos_min", 1.0) > 0.99
    return out


def _audio_encoder(device, size: str, depths=None):
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    from geobind.encoders.audio import AudioSettings, ClapAudioEncoder, tiny_clap_audio_spec

    torch.manual_seed(0)
    if size == "tiny":
        spec = tiny_clap_audio_spec(32)
        spec["config"]["depths"] = depths or [2, 2]
        return ClapAudioEncoder.create("audio", spec, 32, {}).to(device)
    backbone = ClapAudioModelWithProjection(ClapAudioConfig(enable_fusion=True, projection_dim=512))
    return ClapAudioEncoder("audio", 512, backbone, AudioSettings()).to(device)


def _audio_switch(device, size: str, switch, reference: str, ours: str) -> dict:
    """The audio encoder with ``switch(backbone, reference)`` against ``switch(backbone, ours)``:
    outputs and every trainable parameter's gradient in fp32, and the bf16 outputs' cosine."""
    enc = _audio_encoder(device, size).train()
    x = torch.randn(4, enc.audio.clip_samples, device=device) * 0.1
    params = [p for p in enc.parameters() if p.requires_grad]
    res = {}
    for impl in (reference, ours):
        switch(enc.backbone, impl)
        torch.manual_seed(1)
        y = enc(x)
        w = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
        res[impl] = (y, _grads((y * w).sum(), params))
    out = {"fp32_out_rel": _rel(res[ours][0], res[reference][0]),
           "fp32_grad_rel": _grads_rel(res[ours][1], res[reference][1])}
    if device.type == "cuda":
        cos = {}
        for impl in (reference, ours):
            switch(enc.backbone, impl)
            torch.manual_seed(1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                cos[impl] = enc(x).float()
        out["bf16_cos_min"] = float(torch.nn.functional.cosine_similarity(cos[ours], cos[reference], dim=-1).min())
    tol = 1e-3 if device.type == "cuda" else 1e-4
    out["ok"] = out["fp32_out_rel"] < tol and out["fp32_grad_rel"] < 10 * tol and out.get("bf16_cos_min", 1.0) > 0.99
    return out


def check_window_attention(device, size: str) -> dict:
    from geobind.encoders.audio import set_window_attention

    return _audio_switch(device, size, set_window_attention, "eager", "sdpa")


def check_mel_resize(device, size: str) -> dict:
    from geobind.encoders.audio import set_mel_resize

    return _audio_switch(device, size, set_mel_resize, "interpolate", "matmul")


def check_compile_once(device, size: str) -> dict:
    from transformers import CLIPVisionModelWithProjection

    from geobind.encoders.base import uncompile
    from geobind.encoders.clip import ClipVisionEncoder
    from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform

    cfg = _vision_config("tiny")  # what matters is the device's guards and kernels, not the size
    torch.manual_seed(0)
    sat = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(cfg),
                            ImageTransform(cfg.image_size, SATELLITE_MEAN, SATELLITE_STD)).to(device)
    cases = {"satellite": (sat, torch.randn(8, 3, cfg.image_size, cfg.image_size, device=device))}
    audio = _audio_encoder(device, "tiny", depths=[1, 1])
    cases["audio"] = (audio, torch.randn(4, audio.audio.clip_samples, device=device) * 0.1)
    out = {}
    for name, (enc, batch) in cases.items():
        enc.train()
        torch._dynamo.reset()
        enc.compile()
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(3):
                    enc(batch).sum().backward()
            enc.eval()
            with torch.no_grad():
                compiled = enc(batch)
        finally:
            uncompile(enc)
            torch._dynamo.reset()
        # Eager afterwards: training-mode steps move batch-norm statistics.
        with torch.no_grad():
            eager = enc(batch)
        out[f"{name}_out_rel"] = _rel(compiled, eager)
    out["ok"] = all(v < 1e-2 for v in out.values())
    return out


def check_device_augment(device, size: str) -> dict:
    from geobind.encoders.device_augment import apply_overhead_augment
    from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD

    g = torch.Generator().manual_seed(0)
    n, load, side = 16, 256, 224
    pixels = torch.randint(0, 256, (n, 3, load, load), dtype=torch.uint8, generator=g)
    x0 = torch.rand(n, generator=g) * 0.3
    y0 = torch.rand(n, generator=g) * 0.3
    aug = torch.stack([x0, y0, x0 + 0.6, y0 + 0.6, (torch.rand(n, generator=g) < 0.5).float(),
                       torch.randint(0, 4, (n,), generator=g).float(), 0.8 + 0.4 * torch.rand(n, generator=g),
                       0.8 + 0.4 * torch.rand(n, generator=g)], dim=1)
    cpu = apply_overhead_augment(pixels, aug, side, SATELLITE_MEAN, SATELLITE_STD)
    dev = apply_overhead_augment(pixels.to(device), aug.to(device), side, SATELLITE_MEAN, SATELLITE_STD).cpu()
    out = {"max_abs": float((dev - cpu).abs().max()), "mean_abs": float((dev - cpu).abs().mean())}
    out["ok"] = out["mean_abs"] < 1e-3 and out["max_abs"] < 0.05
    return out


def check_prefetch(device, size: str) -> dict:
    """The training loop's one-ahead prefetcher: every batch arrives intact (no memory reused
    while still in use), and on CUDA how much of the copies it hides behind compute."""
    import time

    from geobind.binding.prefetch import DevicePrefetcher, map_tensors

    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    shape = (256, 3, 256, 256) if cuda else (8, 3, 32, 32)  # 50 MB of uint8 tiles per batch on CUDA
    host = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for _ in range(12)]
    if cuda:
        host = [h.pin_memory() for h in host]
    expected = [int(h.sum(dtype=torch.int64)) for h in host]
    side = 2048 if cuda else 256
    w = torch.randn(side, side, device=device) / side**0.5

    def consume(batches) -> tuple[list[int], float]:
        sums = []
        t = time.perf_counter()
        for batch in batches:
            x = batch.to(device, non_blocking=True)  # a no-op for prefetched batches
            y = w
            for _ in range(8 if cuda else 1):  # a step's worth of compute
                y = torch.tanh(y @ w)
            sums.append(x.sum(dtype=torch.int64) + (y.sum() * 0).long())
        out = [int(v) for v in sums]
        if cuda:
            torch.cuda.synchronize()
        return out, (time.perf_counter() - t) / len(host)

    consume(host)  # warm-up
    plain, plain_s = consume(host)
    fetched, fetched_s = consume(DevicePrefetcher(host, device, lambda item, to: map_tensors(item, to)))
    out = {"plain_ms": plain_s * 1e3, "prefetch_ms": fetched_s * 1e3}
    out["ok"] = plain == expected and fetched == expected
    return out


def check_one_behind(device, size: str) -> dict:
    """Inference's loop (embed, the anchor cache): each batch's output, copied to the host without
    waiting and taken one batch later, is that batch's own, with copies and compute overlapping."""
    from geobind.binding.prefetch import map_tensors, outputs_one_behind

    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    side = 1024 if cuda else 64
    w = torch.randn(side, side, generator=g) / side**0.5
    batches = [(i, torch.randn(64, side, generator=g)) for i in range(24)]
    if cuda:
        batches = [(i, x.pin_memory()) for i, x in batches]
    wd = w.to(device)

    def forward(item):
        y = item[1]
        for _ in range(6 if cuda else 1):  # enough work that a missed wait would show
            y = torch.tanh(y @ wd)
        return y

    got = {i: out for (i, _), out in outputs_one_behind(batches, device, lambda it, to: (it[0], map_tensors(it[1], to)),
                                                         forward)}
    worst = 0.0
    for i, x in batches:
        y = x
        for _ in range(6 if cuda else 1):
            y = torch.tanh(y @ w)
        worst = float(torch.stack([torch.tensor(worst), (got[i] - y).abs().max()]).max())  # NaN stays NaN
    out = {"max_abs": worst}
    out["ok"] = sorted(got) == list(range(len(batches))) and worst < 1e-3
    return out


def check_attention_backends(device, size: str) -> dict:
    """The satellite ViT's attention (no mask; queries, keys and values laid out as the lean
    forward makes them) through each of PyTorch's SDPA kernels: forward + backward time of one
    layer (``<kernel>_ms``) and agreement with the plain math kernel. At ViT-B/32's 50 tokens
    FlashAttention pads its blocks, so another kernel may be the faster one; this measures it."""
    import time

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = device.type == "cuda"
    b, t, heads, hd = (1024, 50, 12, 64) if size == "full" else (8, 17, 2, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    # (B, T, 3 * D) as the projections write it, viewed (B, heads, T, head_dim) per tensor.
    qkv = torch.randn(b, t, 3 * heads * hd, generator=g).to(device, dtype).requires_grad_(True)
    grad = torch.randn(b, heads, t, hd, generator=g).to(device, dtype)

    def run(backend, steps: int):
        q, k, v = (x.view(b, t, heads, hd).transpose(1, 2) for x in qkv.split(heads * hd, dim=-1))
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)
            (dx,) = torch.autograd.grad(out, qkv, grad)
            o = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)  # a second warm-up
            torch.autograd.grad(o, qkv, grad)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                o = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)
                torch.autograd.grad(o, qkv, grad)
            if cuda:
                torch.cuda.synchronize()
        return out.detach().float(), dx.float(), (time.perf_counter() - start) / steps * 1e3

    ref_out, ref_dx, ms = run(SDPBackend.MATH, 10)
    out: dict = {"math_ms": ms}
    worst = 1.0
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        name = backend.name.lower().replace("_attention", "")
        try:
            o, dx, ms = run(backend, 10)
        except RuntimeError as e:  # a kernel that does not take these inputs on this device
            out[f"{name}_refused"] = str(e).splitlines()[0][:120]
            continue
        out[f"{name}_ms"] = ms
        # torch's min keeps a NaN (a kernel that returned NaN fails); Python's min(1.0, nan) is 1.0.
        cos = [F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).cpu()
               for a, b in ((o, ref_out), (dx, ref_dx))]
        worst = float(torch.stack([torch.tensor(worst), *cos]).min())
    out["min_cosine_vs_math"] = worst
    out["ok"] = worst > 0.999
    return out


# compile_once last: its cold compilations take the most time, and a part stopped at its time
# limit keeps the checks before it.
CHECKS = {"vit": check_vit, "window_attention": check_window_attention, "mel_resize": check_mel_resize,
          "device_augment": check_device_augment, "prefetch": check_prefetch, "one_behind": check_one_behind,
          "attention_backends": check_attention_backends, "compile_once": check_compile_once}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default=None, choices=["tiny", "full"],
                    help="model sizes: full (ViT-B/32, CLAP HTS-AT) on CUDA by default, tiny elsewhere")
    ap.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    ap.add_argument("--out", help="write the results as JSON")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    size = a.size or ("full" if device.type == "cuda" else "tiny")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "size": size, "checks": {}}
    for name in a.only or CHECKS:
        try:
            r = CHECKS[name](device, size)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                 "where": traceback.format_exc().strip().splitlines()[-3:]}
        results["checks"][name] = r
        figures = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if isinstance(v, float))
        print(f"{'PASS' if r['ok'] else 'FAIL'} {name}: {figures or r.get('error', '')}", flush=True)
        _write(a.out, results)
    results["ok"] = all(r["ok"] for r in results["checks"].values())
    _write(a.out, results)
    return results


def _write(path: str | None, results: dict) -> None:
    """Atomically (a part stopped at its time limit never leaves half a file for summary.py)."""
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(path)


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
