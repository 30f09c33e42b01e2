"""optim.grad_checkpointing: layers recomputed in the backward pass give the same outputs and
gradients and keep far fewer activations."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import TINY_VISION, tiny_config
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from geobind.binding.trainer import train
from geobind.config import parse_config
from geobind.encoders.audio import ClapAudioEncoder, tiny_clap_audio_spec
from geobind.encoders.clip import ClipVisionEncoder
from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform


def _vision_encoder():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(**{**TINY_VISION, "num_hidden_layers": 3})
    return ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(cfg),
                             ImageTransform(32, SATELLITE_MEAN, SATELLITE_STD, "overhead"))


def _audio_encoder():
    torch.manual_seed(0)
    return ClapAudioEncoder.create("audio", tiny_clap_audio_spec(32), 32, {})


def _batch(kind: str, encoder):
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        return {"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)}
    return torch.randn(4, encoder.audio.clip_samples, generator=g) * 0.1


def _run(encoder, batch, recompute: bool):
    """Outputs, gradients and the bytes autograd keeps for the backward pass (recomputation
    replays the dropout masks of the forward)."""
    encoder.set_grad_checkpointing(recompute)
    encoder.train().zero_grad(set_to_none=True)
    params = {p.data_ptr() for p in encoder.parameters()}
    kept = {}

    def pack(t):
        if t.data_ptr() not in params:  # weights are kept anyway; count each activation once
            kept[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    torch.manual_seed(2)  # the same dropout masks (HTS-AT has dropout) in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = encoder(batch)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    return out.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("kind", ["vision", "audio"])
def test_recomputed_layers_give_the_same_gradients_and_keep_fewer_activations(kind):
    encoder = _vision_encoder() if kind == "vision" else _audio_encoder()
    batch = _batch(kind, encoder)
    out0, g0, kept0 = _run(encoder, batch, recompute=False)
    out1, g1, kept1 = _run(encoder, batch, recompute=True)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert kept1 < 0.5 * kept0, (kept1, kept0)
    # Switching it off restores the stock layers.
    encoder.set_grad_checkpointing(False)
    assert _run(encoder, batch, recompute=False)[2] == kept0
    # Evaluation is untouched.
    encoder.eval()
    with torch.no_grad():
        plain = encoder(batch)
        encoder.set_grad_checkpointing(True)
        torch.testing.assert_close(encoder(batch), plain, rtol=0, atol=0)


def test_encoders_without_it_say_so(tiny_data):
    from test_model import build_space

    text = build_space(tiny_data).encoder("text")
    with pytest.raises(ValueError, match="does not support optim.grad_checkpointing"):
        text.set_grad_checkpointing(True)
    text.set_grad_checkpointing(False)  # a no-op


@pytest.mark.slow
def test_training_with_grad_checkpointing_follows_the_plain_run(tiny_data, tmp_path):
    """Both stages with ``optim.grad_checkpointing: true`` reach the plain run's losses."""

    def losses(out, recompute):
        d = tiny_config(tiny_data, out, steps=3)
        for stage in d["stages"]:
            stage["optim"].update(grad_checkpointing=recompute, grad_clip=0.0)
        d["eval"] = None
        model_dir = train(parse_config(d), progress=False, log=None)
        meta = json.loads((model_dir / "geobind.json").read_text())
        return [s["final_loss"] for s in meta["stages"]]

    plain, recomputed = losses(tmp_path / "plain", False), losses(tmp_path / "ckpt", True)
    assert len(plain) == 2
    torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)
