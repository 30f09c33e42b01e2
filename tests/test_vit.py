"""The lean CLIP vision forward (class token only in the last layer) against transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from geobind.encoders.clip import ClipVisionEncoder
from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform
from geobind.encoders.vit import pooled_class_token


def _model(layers: int = 3, dropout: float = 0.0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                           patch_size=8, projection_dim=16, image_size=32, attention_dropout=dropout)
    return CLIPVisionModelWithProjection(cfg)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("train", [False, True])
def test_pooled_class_token_matches_transformers_outputs_and_gradients(layers, train):
    model = _model(layers).train(train)
    x = torch.randn(5, 3, 32, 32)
    params = list(model.vision_model.parameters())
    ref = model.vision_model(pixel_values=x).pooler_output
    ours = pooled_class_token(model.vision_model, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # Gradients of a loss that mixes every output channel, for every parameter (the last
    # layer's query/MLP weights see the class token only, in both forms).
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    g_ours = torch.autograd.grad((ours * w).sum(), params)
    for (name, _), a, b in zip(model.vision_model.named_parameters(), g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_pooled_class_token_depends_on_every_patch():
    """The last layer's keys and values still come from all tokens: changing one patch of the
    image changes the class token (a class-token-only shortcut that dropped them would not)."""
    model = _model(1).eval()
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, :, 24:, 24:] += 1.0  # the last patch only
    with torch.no_grad():
        a, b = pooled_class_token(model.vision_model, x), pooled_class_token(model.vision_model, y)
    assert (a - b).abs().max() > 1e-3


def test_attention_dropout_is_applied_in_training_only():
    model = _model(2, dropout=0.5)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(pooled_class_token(model.vision_model, x), model.vision_model(pixel_values=x).pooler_output,
                               rtol=1e-5, atol=1e-5)
    model.train()
    torch.manual_seed(1)
    a = pooled_class_token(model.vision_model, x)
    torch.manual_seed(2)
    b = pooled_class_token(model.vision_model, x)
    assert (a - b).abs().max() > 1e-4


def test_satellite_encoder_equals_transformers_image_embeds():
    model = _model(2)
    enc = ClipVisionEncoder("satellite", model, ImageTransform(32, SATELLITE_MEAN, SATELLITE_STD)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(pixel_values=x).image_embeds, dim=-1)
        torch.testing.assert_close(enc(x), ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_stays_close():
    model = _model(2).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pooled_class_token(model.vision_model, x).float()
        ref = model.vision_model(pixel_values=x).pooler_output.float()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("bias", [False, True])
def test_patch_embeddings_match_the_convolution_outputs_and_gradients(bias):
    from geobind.encoders.vit import patch_embeddings

    emb = _model(1).vision_model.embeddings
    if bias:  # CLIP's has none; any stride-equals-kernel convolution works the same
        old = emb.patch_embedding
        emb.patch_embedding = torch.nn.Conv2d(3, old.out_channels, 8, stride=8, bias=True)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    ref, ours = emb(x), patch_embeddings(emb, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(ref)
    params = [x, *emb.parameters()]
    g_ref = torch.autograd.grad((ref * w).sum(), params)
    g_ours = torch.autograd.grad((ours * w).sum(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # Each patch lands in its own token: a change in the last patch changes the last token only.
    y = x.detach().clone()
    y[:, :, 24:, 24:] += 1.0
    diff = (patch_embeddings(emb, y) - patch_embeddings(emb, x.detach())).abs().amax(dim=(0, 2))
    assert diff[-1] > 1e-3 and diff[:-1].max() == 0


def test_patch_embeddings_leave_other_inputs_to_the_module():
    from geobind.encoders.vit import patch_embeddings

    emb = _model(1).vision_model.embeddings
    with pytest.raises(ValueError, match="doesn't match model"):
        patch_embeddings(emb, torch.randn(1, 3, 40, 40))
    emb.patch_embedding = torch.nn.Conv2d(3, 64, 8, stride=8, padding=1, bias=False)  # not plain patches
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(patch_embeddings(emb, x), emb(x), rtol=0, atol=0)


def test_patch_embeddings_under_bf16_autocast_stay_close():
    from geobind.encoders.vit import patch_embeddings

    emb = _model(1).vision_model.embeddings
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = patch_embeddings(emb, x), emb(x)
    assert ours.dtype == ref.dtype
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)
