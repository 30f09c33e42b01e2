"""Pretraining a small CLIP on ground photos + captions.

OpenAI's CLIP, which the paper binds to, cannot be loaded without a network. The embedded demo
therefore pretrains a small CLIP of the same architecture (``transformers.CLIPModel``) on its
own ground photos and captions, with a tokenizer trained on the captions, and saves it in
``transformers`` format so the rest of the pipeline treats it exactly like the real one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geobind.data.manifest import Table
from geobind.data.media import load_image
from geobind.encoders.base import quiet_transformers
from geobind.encoders.clip import build_clip
from geobind.encoders.images import CLIP_MEAN, CLIP_STD, resize_center_crop
from geobind.encoders.tokenizer import train_tokenizer
from geobind.losses import LogitScale, contrastive_loss


def small_clip_config(dim: int, image_size: int, vocab_size: int, eos: int, bos: int, pad: int) -> dict[str, Any]:
    """A small CLIP (ViT image tower + transformer text tower) for the demo's CPU budget."""
    return {
        "projection_dim": dim,
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 48,
            "eos_token_id": eos,
            "bos_token_id": bos,
            "pad_token_id": pad,
        },
        "vision_config": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
    }


def pretrain_clip(
    table: Table,
    out_dir: str | Path,
    *,
    dim: int = 128,
    image_size: int = 64,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    vocab_size: int = 2000,
    device: torch.device | str = "cpu",
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train a small CLIP on ``table``'s ground photos and captions; save model + tokenizer to
    ``out_dir``. Returns a summary (steps, final loss, seconds)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    device = torch.device(device)
    captions = [table.item("text", i) for i in range(len(table))]
    tok = train_tokenizer(captions, vocab_size=vocab_size)
    torch.manual_seed(seed)
    cfg = small_clip_config(dim, image_size, len(tok), tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    model = build_clip(cfg).to(device)
    # The demo world is small: decode every photo once and keep it as uint8.
    imgs = np.stack([np.asarray(resize_center_crop(load_image(table.item("ground", i)), image_size))
                     for i in range(len(table))])
    imgs_t = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # uint8 [N, 3, H, W]
    enc = tok(captions, padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    scale = LogitScale(0.07).to(device)
    params = [p for p in model.parameters()] + list(scale.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    n = len(table)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    rng = np.random.default_rng(seed)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, desc="pretrain anchor CLIP", unit="step", dynamic_ncols=True)
    model.train()
    loss_v = float("nan")
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            b = perm[s * batch_size : (s + 1) * batch_size]
            x = _augment(imgs_t[b], rng, image_size)
            x = ((x - mean) / std).to(device)
            img_e = model.visual_projection(model.vision_model(pixel_values=x).pooler_output)
            txt_e = model.text_projection(
                model.text_model(input_ids=ids[b].to(device), attention_mask=mask[b].to(device)).pooler_output
            )
            loss = contrastive_loss(
                torch.nn.functional.normalize(img_e, dim=-1), torch.nn.functional.normalize(txt_e, dim=-1),
                scale(), symmetric=True,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            scale.clamp_()
            loss_v = float(loss.detach())
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss_v:.3f}")
    if pbar is not None:
        pbar.close()
    model.eval()
    # The learnt temperature becomes CLIP's own logit_scale.
    with torch.no_grad():
        model.logit_scale.copy_(scale.log_scale.detach().to(model.logit_scale.dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.cpu().save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    from geobind.encoders.base import usual_mode

    for f in out_dir.glob("*.safetensors"):  # safetensors writes 0600 whatever the umask
        usual_mode(f)
    summary = {"steps": total, "final_loss": loss_v, "seconds": round(time.perf_counter() - t0, 1),
               "pairs": n, "vocab_size": len(tok), "dim": dim, "image_size": image_size}
    if log:
        log(f"anchor CLIP: {total} steps on {n} photo-caption pairs in {summary['seconds']}s, loss {loss_v:.3f}")
    return summary


def _augment(batch: torch.Tensor, rng: np.random.Generator, size: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, size, size]`` in 0..1: random crops (half of the
    images, 70-100% of the side) resized back, and horizontal flips; tensor ops only."""
    x = batch.float() / 255.0
    out = []
    h = x.shape[-1]
    for img in x:
        if rng.random() < 0.5:
            side = int(h * rng.uniform(0.7, 1.0))
            top, left = rng.integers(0, h - side + 1, size=2)
            img = img[:, top : top + side, left : left + side]
        if img.shape[-1] != size:
            img = torch.nn.functional.interpolate(img[None], size=(size, size), mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
        if rng.random() < 0.5:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)
