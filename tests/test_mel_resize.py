"""The HTS-AT mel-to-image resize as a matrix product: the same outputs, gradients and state
dict as transformers' bicubic ``interpolate``, eager, compiled and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from fixtures import bf16_outputs
from torch.nn import functional as F
from transformers import ClapAudioConfig, ClapAudioModelWithProjection
from transformers.models.clap.modeling_clap import ClapAudioEncoder as HFClapAudioEncoder

from geobind.encoders.audio import (
    ClapAudioEncoder,
    _interpolation_matrix,
    _MatmulMelResize,
    set_mel_resize,
    tiny_clap_audio_config,
    tiny_clap_audio_spec,
)
from geobind.encoders.base import uncompile

CPU = torch.device("cpu")


def _encoder() -> ClapAudioEncoder:
    """The tiny fused encoder: 101 mel frames stretched to 256, 16 mel bins (no stretch)."""
    torch.manual_seed(0)
    return ClapAudioEncoder.create("audio", tiny_clap_audio_spec(32), 32, {})


def _backbone(**overrides) -> ClapAudioModelWithProjection:
    config = {**tiny_clap_audio_config(32), "enable_fusion": False, **overrides}
    torch.manual_seed(0)
    return ClapAudioModelWithProjection(ClapAudioConfig(**config))


def _audio_encoder(model: torch.nn.Module) -> HFClapAudioEncoder:
    return model.backbone.audio_model.audio_encoder if isinstance(model, ClapAudioEncoder) \
        else model.audio_model.audio_encoder


def _cases():
    """(model, backbone, forward) triples: the geobind encoder (global patch embedding, time
    stretched), transformers' plain patch embedding with time stretched (101 -> 256 frames),
    and with frequency stretched (24 -> 32 bins; spec_size 64 over 24 bins gives ratio 2)."""
    encoder = _encoder().train()
    batch = torch.randn(3, encoder.audio.clip_samples) * 0.1
    yield "geobind", encoder, encoder.backbone, lambda: encoder(batch)
    time = _backbone().train()
    feats_t = torch.randn(3, 1, 101, 16)
    yield "time", time, time, lambda: time(input_features=feats_t).audio_embeds
    freq = _backbone(num_mel_bins=24).train()
    feats_f = torch.randn(3, 1, 128, 24)
    yield "freq", freq, freq, lambda: freq(input_features=feats_f).audio_embeds


@pytest.mark.parametrize("case", ["geobind", "time", "freq"])
def test_matmul_matches_interpolate_outputs_and_gradients(case):
    _, model, backbone, forward = next(c for c in _cases() if c[0] == case)
    audio_encoder = _audio_encoder(model)
    spec_width = audio_encoder.spec_size * audio_encoder.freq_ratio
    spec_height = audio_encoder.spec_size // audio_encoder.freq_ratio
    seen = []
    hook = audio_encoder.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results = {}
    for implementation in ("interpolate", "matmul"):
        set_mel_resize(backbone, implementation)
        torch.manual_seed(1)  # the same dropout masks
        out = forward()
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        results[implementation] = (out, torch.autograd.grad((out * weights).sum(), [p for _, p in params]))
    hook.remove()
    assert seen[0][-2:] == seen[1][-2:] == (spec_height * audio_encoder.freq_ratio, spec_width // audio_encoder.freq_ratio)
    assert audio_encoder._mel_resize_matrices  # the product ran
    (ref, ref_grads), (got, got_grads) = results["interpolate"], results["matmul"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    names = [n for n, _ in params]
    assert any("batch_norm" in n for n in names)
    scale = max(g.abs().max().item() for g in ref_grads)
    for n, a, b in zip(names, got_grads, ref_grads, strict=True):
        if n.endswith("key.bias"):
            # Zero in exact arithmetic (softmax ignores a shift shared by all keys): rounding only.
            assert max(a.abs().max().item(), b.abs().max().item()) < 1e-6 * scale, n
            continue
        assert b.abs().max() > 0 or "fusion" in n or "mel_conv2d" in n, n
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1e-6, b.abs().max().item()),
                                   msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize(("n_in", "n_out"), [(101, 256), (1001, 1024), (2, 9), (24, 32), (7, 8), (64, 64)])
def test_interpolation_matrix_is_the_interpolation(n_in, n_out):
    matrix = _interpolation_matrix(n_in, n_out, CPU, torch.float32)
    assert matrix.shape == (n_out, n_in) and matrix.dtype == torch.float32
    torch.testing.assert_close(matrix.sum(1), torch.ones(n_out))
    if n_in == n_out:
        assert torch.equal(matrix, torch.eye(n_in))
    torch.manual_seed(n_in)
    for shape in ((2, 3, n_in, 5), (1, 1, n_in, 1)):
        x = torch.randn(shape) * 10
        ref = F.interpolate(x, (n_out, shape[-1]), mode="bicubic", align_corners=True)
        torch.testing.assert_close(matrix @ x, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        xt = x.transpose(-1, -2)  # the same map along the last axis
        ref_t = F.interpolate(xt, (shape[-1], n_out), mode="bicubic", align_corners=True)
        torch.testing.assert_close(xt @ matrix.mT, ref_t, rtol=1e-5, atol=1e-5 * ref_t.abs().max().item())
    double = _interpolation_matrix(n_in, n_out, CPU, torch.float64)
    assert double.dtype == torch.float64
    # float32 kernels place outputs with float32 arithmetic: weights differ by ~1e-5.
    torch.testing.assert_close(double.float(), matrix, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 256, 16), (2, 3, 101, 16), (2, 1, 128, 24), (2, 2, 100, 24),
                                   (2, 1, 128, 32)])
def test_reshape_mel2img_matches_transformers(shape):
    """At the method: time only, frequency only, both (transformers then sizes time back to
    the input's length) and neither (no product, the features only change layout)."""
    backbone = _backbone(num_mel_bins=24 if shape[-1] != 16 else 16)
    audio_encoder = _audio_encoder(backbone)
    set_mel_resize(backbone, "matmul")
    torch.manual_seed(0)
    x = torch.randn(shape)
    ref = HFClapAudioEncoder.reshape_mel2img(audio_encoder, x)
    got = audio_encoder.reshape_mel2img(x)
    assert got.shape == ref.shape
    resized = (shape[2] < audio_encoder.spec_size * audio_encoder.freq_ratio,
               shape[3] < audio_encoder.spec_size // audio_encoder.freq_ratio)
    cached = {key[:2] for key in audio_encoder._mel_resize_matrices}
    if not any(resized):
        assert torch.equal(got, ref) and not cached
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert cached
    if all(resized):
        assert cached == {(shape[2], 128), (128, shape[2]), (shape[3], 32)}


def test_state_dict_keys_unchanged_and_loadable_both_ways():
    encoder = _encoder().eval()
    batch = torch.randn(2, encoder.audio.clip_samples) * 0.1
    with torch.no_grad():
        out = encoder(batch)
    audio_encoder = encoder.backbone.audio_model.audio_encoder
    assert type(audio_encoder) is _MatmulMelResize and audio_encoder._mel_resize_matrices
    plain = _backbone(enable_fusion=True)
    assert type(plain.audio_model.audio_encoder) is HFClapAudioEncoder
    assert list(encoder.backbone.state_dict()) == list(plain.state_dict())
    assert not any("mel_resize" in k for k in encoder.state_dict())
    plain.load_state_dict(encoder.backbone.state_dict())  # strict, matmul -> transformers' class
    encoder.backbone.load_state_dict(plain.state_dict())  # and back
    set_mel_resize(encoder.backbone, "interpolate")
    assert list(encoder.backbone.state_dict()) == list(plain.state_dict())
    set_mel_resize(encoder.backbone, "matmul")
    with torch.no_grad():
        torch.testing.assert_close(encoder(batch), out)


def test_switching_back_and_forth():
    encoder = _encoder().eval()
    backbone = encoder.backbone
    audio_encoder = backbone.audio_model.audio_encoder
    batch = torch.randn(2, encoder.audio.clip_samples) * 0.1
    outs = []
    for implementation in ("matmul", "interpolate", "matmul", "matmul", "interpolate"):
        set_mel_resize(backbone, implementation)
        expected = _MatmulMelResize if implementation == "matmul" else HFClapAudioEncoder
        assert type(audio_encoder) is expected
        assert ("_mel_resize_matrices" in audio_encoder.__dict__) == (implementation == "matmul")
        with torch.no_grad():
            outs.append(encoder(batch))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'matmul' or 'interpolate'"):
        set_mel_resize(backbone, "fft")


def test_bf16_autocast_keeps_the_product_in_float32():
    encoder = _encoder().eval()
    audio_encoder = encoder.backbone.audio_model.audio_encoder
    dtypes = []
    hook = audio_encoder.patch_embed.register_forward_pre_hook(lambda _m, args: dtypes.append(args[0].dtype))
    batch = torch.randn(2, encoder.audio.clip_samples) * 0.1
    outs = bf16_outputs(encoder, set_mel_resize, ("interpolate", "matmul"), batch)
    hook.remove()
    assert dtypes == [torch.float32, torch.float32]
    assert {key[3] for key in audio_encoder._mel_resize_matrices} == {torch.float32}
    torch.testing.assert_close(outs["matmul"], outs["interpolate"], rtol=0, atol=1e-2)


def test_matrix_made_under_inference_mode_serves_training():
    encoder = _encoder()
    batch = torch.randn(2, encoder.audio.clip_samples) * 0.1
    with torch.inference_mode():
        encoder.eval()(batch)
    (matrix,) = encoder.backbone.audio_model.audio_encoder._mel_resize_matrices.values()
    assert not matrix.is_inference()
    encoder.train()(batch).sum().backward()


@pytest.mark.parametrize("prepared", [True, False])
def test_compiled_matches_eager_without_recompiling(prepared):
    """Prepared by ``ClapAudioEncoder.compile`` (the graph reads the stored matrix) or not
    (the graph makes it, and nothing is stored while tracing); three training steps build one
    graph either way."""
    encoder = _encoder().train()
    audio_encoder = encoder.backbone.audio_model.audio_encoder
    batch = torch.randn(4, encoder.audio.clip_samples) * 0.1
    params = [p for p in encoder.parameters() if p.requires_grad]

    def step():
        torch.manual_seed(1)
        out = encoder(batch)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        return out.detach(), torch.autograd.grad((out * weights).sum(), params)

    if prepared:
        ref, ref_grads = step()
        audio_encoder._mel_resize_matrices.clear()
    torch._dynamo.reset()
    if prepared:
        encoder.compile(backend="aot_eager")
        assert len(audio_encoder._mel_resize_matrices) == 1
    else:
        encoder.backbone.compile(backend="aot_eager")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            runs = [step() for _ in range(3)]
    finally:
        uncompile(encoder.backbone if not prepared else encoder)
        torch._dynamo.reset()
    if not prepared:
        assert not audio_encoder._mel_resize_matrices
        ref, ref_grads = step()
    for out, grads in runs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1e-3, b.abs().max().item()))
