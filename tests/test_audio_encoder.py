"""The CLAP audio encoder on a tiny HTS-AT, and audio decoding with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import bf16_outputs

from geobind.data.audio_io import load_audio
from geobind.data.errors import BadSampleError
from geobind.encoders.audio import (
    AudioSettings,
    ClapAudioEncoder,
    tiny_clap_audio_config,
    tiny_clap_audio_spec,
)
from geobind.encoders.base import get_encoder_class

SR = 16_000


def make_encoder(dim: int = 32, projection_dim: int = 32, seed: int = 0) -> ClapAudioEncoder:
    torch.manual_seed(seed)
    return ClapAudioEncoder.create("audio", tiny_clap_audio_spec(projection_dim), dim, {})


def waves(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(SR) / SR
    out = [0.5 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(SR) for f in (220, 880)]
    out += [0.2 * rng.standard_normal(SR // 2 + 123), 0.2 * rng.standard_normal(3 * SR)]
    return [w.astype(np.float32) for w in out[:n]]


def embed(encoder: ClapAudioEncoder, items, train: bool = False) -> torch.Tensor:
    return encoder(encoder.collate([encoder.load(x, train=train) for x in items]))


def test_registered():
    assert get_encoder_class("clap_audio") is ClapAudioEncoder


def test_unit_rows_no_head():
    encoder = make_encoder(dim=32, projection_dim=32)
    assert encoder.head is None
    with torch.no_grad():
        out = embed(encoder, waves(4))
    assert out.shape == (4, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    assert not torch.allclose(out[0], out[1])


def test_head_when_projection_differs():
    encoder = make_encoder(dim=24, projection_dim=32)
    assert isinstance(encoder.head, torch.nn.Linear)
    assert (encoder.head.in_features, encoder.head.out_features) == (32, 24)
    with torch.no_grad():
        out = embed(encoder, [(torch.from_numpy(w), SR) for w in waves(3)])
    assert out.shape == (3, 24)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    assert encoder.settings()["head"] == {"in": 32, "out": 24}


def test_settings_are_json_and_complete():
    import json

    s = make_encoder().settings()
    json.dumps(s)
    for key in (
        "sample_rate",
        "clip_seconds",
        "n_mels",
        "hop_length",
        "n_fft",
        "f_min",
        "f_max",
        "mel_scale",
        "fusion",
        "head",
    ):
        assert key in s
    assert s["sample_rate"] == SR and s["n_mels"] == 16 and s["fusion"] is True


def test_load_files(tmp_path):
    encoder = make_encoder()
    wave = waves(1)[0]
    sf.write(tmp_path / "a.flac", wave, SR)
    sf.write(tmp_path / "a.wav", wave, SR, subtype="FLOAT")
    flac, wav = encoder.load(tmp_path / "a.flac"), encoder.load(str(tmp_path / "a.wav"))
    assert flac.shape == wav.shape == (SR,) and flac.dtype == torch.float32
    torch.testing.assert_close(wav, torch.from_numpy(wave))
    torch.testing.assert_close(flac, torch.from_numpy(wave), atol=1e-4, rtol=0)  # 16-bit FLAC

    # Stereo at 44.1 kHz -> mono at 16 kHz; half a second is repeat-padded by load().
    rng = np.random.default_rng(1)
    stereo = (0.1 * rng.standard_normal((22_050, 2))).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo, 44_100)
    mono = load_audio(tmp_path / "stereo.wav", SR)
    assert mono.shape == (8_000,) and mono.dtype == np.float32
    clip = encoder.load(tmp_path / "stereo.wav")
    assert clip.shape == (SR,)
    torch.testing.assert_close(clip[:8_000], clip[8_000:])  # tiled twice, no zero tail
    # In memory, soundfile's [frames, channels] and torch's [channels, frames] give the file's
    # mono; a 2-D array with two long axes is refused, not averaged into garbage.
    data, rate = sf.read(tmp_path / "stereo.wav", dtype="float32")
    np.testing.assert_allclose(load_audio((data, rate), SR), mono, atol=1e-6)
    np.testing.assert_allclose(load_audio((torch.from_numpy(data.T.copy()), rate), SR), mono, atol=1e-6)
    with pytest.raises(BadSampleError, match=r"at most 64 channels; got shape \(100, 200\)"):
        load_audio((np.zeros((100, 200), np.float32), SR), SR)


def test_load_crops_long_audio():
    encoder = make_encoder()
    long = np.arange(3 * SR, dtype=np.float32) / (3 * SR)
    clip = encoder.load(long)
    torch.testing.assert_close(clip, torch.from_numpy(long[:SR]))  # evaluation: the start
    torch.manual_seed(0)
    starts = {float(encoder.load(long, train=True)[0]) for _ in range(8)}
    assert len(starts) > 1
    assert encoder.load(long, train=True).untyped_storage().nbytes() == SR * 4  # not a view


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.wav", None, "missing"),
        ("empty.flac", b"", "empty"),
        ("garbage.wav", b"RIFF\x00\x01garbage" * 50, "undecodable"),
        ("garbage.mp3", bytes(range(256)) * 8, "undecodable"),
    ],
)
def test_bad_files(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadSampleError) as info:
        make_encoder().load(path)
    assert info.value.reason == reason and info.value.path == str(path)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_zero_length_audio(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), SR)
    with pytest.raises(BadSampleError, match="silent-zero-length"):
        load_audio(tmp_path / "zero.wav", SR)
    with pytest.raises(BadSampleError) as info:
        load_audio((np.zeros((2, 0), np.float32), SR), SR)
    assert info.value.reason == "silent-zero-length"


def test_save_from_saved_round_trip(tmp_path):
    encoder = make_encoder(dim=24, projection_dim=32)
    items = waves(3)
    with torch.no_grad():
        before = embed(encoder, items)
    encoder.save(tmp_path / "audio")
    assert (tmp_path / "audio" / "model.safetensors").is_file()
    assert (tmp_path / "audio" / "head.safetensors").is_file()
    shared: dict = {}
    loaded = ClapAudioEncoder.from_saved(
        "audio", tmp_path / "audio", encoder.settings(), 24, shared
    )
    with torch.no_grad():
        after = embed(loaded, items)
    assert torch.equal(before, after)
    assert loaded.settings() == encoder.settings()
    # A second load of the same directory reuses the backbone.
    again = ClapAudioEncoder.from_saved("audio", tmp_path / "audio", encoder.settings(), 24, shared)
    assert again.backbone is loaded.backbone
    # The saved directory is also a CLAP checkpoint with its extractor settings.
    reloaded = ClapAudioEncoder.create("audio", {"pretrained": str(tmp_path / "audio")}, 32, {})
    assert reloaded.audio == encoder.audio


def test_loads_audio_tower_from_full_clap_checkpoint(tmp_path):
    from transformers import ClapConfig, ClapModel

    text = {
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 40,
    }
    torch.manual_seed(0)
    full = ClapModel(
        ClapConfig(text_config=text, audio_config=tiny_clap_audio_config(), projection_dim=24)
    )
    full.save_pretrained(tmp_path / "clap")
    spec = {k: v for k, v in tiny_clap_audio_spec().items() if k != "config"}
    encoder = ClapAudioEncoder.create(
        "audio", {**spec, "pretrained": str(tmp_path / "clap")}, 24, {}
    )
    assert encoder.head is None
    state = full.state_dict()
    for key, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_n_mels_mismatch_is_clear():
    spec = tiny_clap_audio_spec()
    spec["n_mels"] = 64
    with pytest.raises(ValueError, match=r"n_mels=64.*num_mel_bins=16.*set n_mels: 16"):
        ClapAudioEncoder.create("audio", spec, 32, {})


def test_spec_errors():
    with pytest.raises(ValueError, match="unknown keys"):
        ClapAudioEncoder.create("audio", {**tiny_clap_audio_spec(), "clip_second": 1}, 32, {})
    with pytest.raises(ValueError, match="pretrained"):
        ClapAudioEncoder.create("audio", {"sample_rate": SR}, 32, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClapAudioEncoder.create("audio", {"pretrained": "./no/such/dir"}, 32, {})
    with pytest.raises(ValueError, match="mel frames"):
        ClapAudioEncoder.create("audio", {**tiny_clap_audio_spec(), "clip_seconds": 3.0}, 32, {})


def test_batch_of_wrong_length_is_rejected():
    encoder = make_encoder()
    with pytest.raises(ValueError, match=r"\[B, 16000\]"):
        encoder(torch.zeros(2, 8_000))


def test_gradients_reach_backbone():
    encoder = make_encoder(dim=24, projection_dim=32).train()
    batch = encoder.collate([encoder.load(w, train=True) for w in waves(4)])
    out = encoder(batch)
    out[:, 0].sum().backward()
    proj = encoder.backbone.audio_model.audio_encoder.patch_embed.proj.weight
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert encoder.head.weight.grad.abs().sum() > 0
    # The fusion branch never runs (is_longer is always false) and is frozen.
    patch_embed = encoder.backbone.audio_model.audio_encoder.patch_embed
    assert not any(p.requires_grad for p in patch_embed.fusion_model.parameters())
    for name, p in encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"trainable parameter {name} got no gradient"


def test_tiny_forward_backward_is_fast():
    import time

    encoder = make_encoder().train()
    batch = encoder.collate([encoder.load(w) for w in waves(4)])
    # One thread and the best of 3: on a shared machine, OpenMP threads waiting on a busy core
    # dominate the time; the model itself takes ~10 ms here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = []
        for _ in range(4):
            start = time.perf_counter()
            encoder(batch).sum().backward()
            timings.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert min(timings[1:]) < 0.5


def test_audio_settings_defaults_are_clap():
    s = AudioSettings()
    assert (s.sample_rate, s.clip_samples, s.n_fft, s.hop_length, s.n_mels) == (
        48_000,
        480_000,
        1024,
        480,
        64,
    )
    assert (s.f_min, s.f_max, s.mel_scale) == (0.0, 14_000.0, "htk")


@pytest.mark.parametrize("train", [False, True])
def test_global_patch_embed_matches_clap_fused_model(train):
    """The compile-friendly patch embedding computes exactly what transformers' fused HTS-AT
    computes for clips that are not longer (outputs and batch-norm running statistics)."""
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection

    encoder = make_encoder()
    assert encoder.fusion
    reference = ClapAudioModelWithProjection(ClapAudioConfig(**tiny_clap_audio_config(32)))
    reference.load_state_dict(encoder.backbone.state_dict())
    encoder.train(train)
    reference.train(train)
    batch = encoder.collate([encoder.load(w) for w in waves(4)])
    with torch.no_grad():
        features = encoder.frontend(batch)
        torch.manual_seed(1)  # the same dropout masks in training mode
        expected = reference(input_features=features, is_longer=torch.zeros(4, 1, dtype=torch.bool)).audio_embeds
        torch.manual_seed(1)
        got = encoder(batch)
    torch.testing.assert_close(got, torch.nn.functional.normalize(expected, dim=-1), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(encoder.backbone.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_encoder_pickles_for_spawned_workers():
    import pickle

    encoder = make_encoder().eval()
    copy = pickle.loads(pickle.dumps(encoder))
    batch = encoder.collate([encoder.load(w) for w in waves(2)])
    with torch.no_grad():
        torch.testing.assert_close(copy(batch), encoder(batch))
    assert type(copy.backbone.audio_model.audio_encoder.patch_embed) is type(
        encoder.backbone.audio_model.audio_encoder.patch_embed
    )


def _shifted_encoder() -> ClapAudioEncoder:
    """Two blocks per stage, so every stage has a shifted-window (masked) block."""
    spec = tiny_clap_audio_spec(32)
    spec["config"]["depths"] = [2, 2]
    torch.manual_seed(0)
    return ClapAudioEncoder.create("audio", spec, 32, {})


@pytest.mark.parametrize("train", [False, True])
def test_sdpa_window_attention_matches_eager_outputs_and_gradients(train):
    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    from geobind.encoders.audio import _SdpaWindowAttention, set_window_attention

    encoder = _shifted_encoder().train(train)
    attention = [m for m in encoder.modules() if isinstance(m, ClapAudioSelfAttention)]
    assert attention and all(type(m) is _SdpaWindowAttention for m in attention)  # the default
    masked = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: masked.append(args[1] is not None)) for m in attention]
    batch = torch.randn(3, encoder.audio.clip_samples) * 0.1
    params = [p for p in encoder.parameters() if p.requires_grad]
    results = {}
    for implementation in ("eager", "sdpa"):
        set_window_attention(encoder.backbone, implementation)
        torch.manual_seed(1)  # the same dropout masks in training mode
        out = encoder(batch)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        results[implementation] = (out, torch.autograd.grad((out * weights).sum(), params))
    for h in hooks:
        h.remove()
    assert any(masked) and not all(masked)  # both plain and shifted windows ran
    (ref, ref_grads), (got, got_grads) = results["eager"], results["sdpa"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip([n for n, p in encoder.named_parameters() if p.requires_grad], got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_sdpa_window_attention_under_bf16_autocast_and_state_dict():
    from geobind.encoders.audio import set_window_attention

    encoder = _shifted_encoder().eval()
    keys = list(encoder.state_dict())
    batch = torch.randn(2, encoder.audio.clip_samples) * 0.1
    outs = bf16_outputs(encoder, set_window_attention, ("eager", "sdpa"), batch)
    assert list(encoder.state_dict()) == keys
    assert torch.nn.functional.cosine_similarity(outs["sdpa"], outs["eager"], dim=-1).min() > 0.99
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        set_window_attention(encoder.backbone, "flash")


def test_sdpa_window_attention_accepts_both_transformers_call_forms():
    """transformers 4.x calls self-attention with (mask, head_mask, output_attentions), 5.x with
    (mask, output_attentions); unset extras run SDPA, attention maps fall back to the eager form."""
    import inspect

    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    from geobind.encoders.audio import _SdpaWindowAttention

    encoder = _shifted_encoder().eval()
    attn = next(m for m in encoder.modules() if isinstance(m, _SdpaWindowAttention))
    tokens = attn.window_size[0] * attn.window_size[1]
    x = torch.randn(3, tokens, attn.all_head_size)
    with torch.no_grad():
        ref = ClapAudioSelfAttention.forward(attn, x)[0]
        for call in ((x,), (x, None), (x, None, False), (x, None, None, False), (x, None, None, None)):
            out = attn(*call)
            assert len(out) == 1
            torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
        four_x = "head_mask" in inspect.signature(ClapAudioSelfAttention.forward).parameters
        maps = attn(x, None, None, True) if four_x else attn(x, None, True)
    assert len(maps) == 2 and maps[1].shape[-2:] == (tokens, tokens)
    torch.testing.assert_close(maps[0], ref, rtol=1e-5, atol=1e-6)


def test_clip_window_decoding_equals_whole_decoding_and_crop(tmp_path, monkeypatch):
    """Only the clip's window of a long FLAC, WAV or MP3 is decoded, with the same random draw
    (the generator is left in the same state) as decoding the whole file and cropping: the same
    samples for FLAC and WAV at the encoder's rate, the same to within float rounding for MP3
    and at other rates (resampled piece by piece). Ogg, which does not seek exactly, has only a
    window at its start read (evaluation's window: the same samples), and is decoded whole for
    a window elsewhere."""
    import geobind.encoders.audio as audio_mod
    from geobind.data.audio_io import load_audio_window
    from geobind.encoders.audio import load_clip
    from geobind.encoders.mel import fit_clip

    settings = make_encoder().audio
    n = settings.clip_samples
    rng = np.random.default_rng(3)
    long = (0.3 * rng.standard_normal((3 * SR + 77, 2))).astype(np.float32)
    files = {
        "long.flac": (long, SR, {}), "long.wav": (long[:, 0], SR, {"subtype": "PCM_16"}),
        "short.flac": (long[: SR // 3], SR, {}), "long.mp3": (long, SR, {"format": "MP3"}),
        "other-rate.flac": (long[:, 0], 22_050, {}), "other-rate.wav": (long, 44_100, {}),
        "other-rate.mp3": (long, 22_050, {"format": "MP3"}), "short-other-rate.wav": (long[: SR // 3], 8_000, {}),
        "long.ogg": (long[:, 0], SR, {"format": "OGG", "subtype": "VORBIS"}),
    }
    items = {}
    for fname, (wave, rate, kw) in files.items():
        path = tmp_path / fname
        sf.write(path, wave, rate, **kw)
        items[fname] = str(path)
    items["long.flac bytes"] = (tmp_path / "long.flac").read_bytes()
    items["other-rate.mp3 bytes"] = (tmp_path / "other-rate.mp3").read_bytes()
    same = {"long.flac", "long.wav", "short.flac", "long.flac bytes"}
    # MP3's decoder restarts a few frames before the seek point: ~1e-7 from continuous decoding.
    resampled = {"other-rate.flac", "other-rate.wav", "other-rate.mp3", "short-other-rate.wav",
                 "other-rate.mp3 bytes", "long.mp3"}
    for key, item in items.items():
        windowed = load_audio_window(item, SR, n, start=lambda frames: 0) is not None
        assert windowed == (key in same | resampled), key
        at_start = load_audio_window(item, SR, n) is not None
        assert at_start == (key in same | resampled | {"long.ogg"}), key
    for train in (False, True):
        for seed in range(4):
            for key, item in items.items():
                torch.manual_seed(seed)
                ref = fit_clip(torch.from_numpy(load_audio(item, SR)), n, train=train)
                after_ref = torch.rand(1)
                if key in same | resampled or (key == "long.ogg" and not train):  # no whole decoding
                    monkeypatch.setattr(audio_mod, "load_audio", lambda *a, **k: pytest.fail("decoded whole"))
                torch.manual_seed(seed)
                got = load_clip(item, settings, train=train)
                monkeypatch.undo()
                assert got.shape == (n,), (key, train, seed)
                if key in resampled:
                    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6, msg=f"{key} {train} {seed}")
                else:
                    assert torch.equal(got, ref), (key, train, seed)
                assert torch.equal(torch.rand(1), after_ref), (key, train, seed)


@pytest.mark.parametrize("rate", [8_000, 11_025, 22_050, 32_000, 44_100, 88_200, 96_000, 44_101])
def test_resampled_windows_match_the_whole_resampled_recording(tmp_path, rate):
    """Windows anywhere in a recording at another rate (start, middle, the very end) equal the
    same samples of the whole recording resampled at once, to within float rounding; the
    length the draw is made over is the whole resampled length. A rate whose grid meets 48 kHz
    only once a second (44,101 Hz) is decoded whole instead."""
    from geobind.data.audio_io import load_audio_window, resample, resampled_length

    target, n = 48_000, 48_000 * 2
    rng = np.random.default_rng(rate)
    wave = (0.3 * rng.standard_normal(rate * 7 + 13)).astype(np.float32)
    path = tmp_path / "rec.wav"
    sf.write(path, wave, rate, subtype="FLOAT")
    whole = resample(wave, rate, target)
    assert resampled_length(len(wave), rate, target) == len(whole)
    for frames in (1, 2, 3, 147, 160, 44_101, 12_345):
        assert resampled_length(frames, rate, target) == len(resample(np.zeros(frames, np.float32), rate, target))
    if rate == 44_101:
        assert load_audio_window(str(path), target, n, start=lambda length: 0) is None
        return
    for s in (0, 1, 5_000, len(whole) // 2 + 3, len(whole) - n - 1, len(whole) - n):
        seen = []
        got = load_audio_window(str(path), target, n, start=lambda length, s=s, seen=seen: seen.append(length) or s)
        assert seen == [len(whole)]
        np.testing.assert_allclose(got, whole[s : s + n], rtol=0, atol=2e-6, err_msg=f"start {s}")


@pytest.mark.parametrize("seconds", [0.5, 3.0])
@pytest.mark.parametrize("rate", [SR, 22_050])
def test_windowed_reads_keep_the_reason_a_recording_is_bad(tmp_path, seconds, rate):
    """A recording with NaN samples in its clip is skipped as non-finite, whether it is read
    whole (shorter than a clip) or by window, at the encoder's rate or another."""
    from geobind.data.errors import BadSampleError
    from geobind.encoders.audio import load_clip

    wave = np.zeros(int(seconds * rate), dtype=np.float32)
    wave[: rate // 4] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, wave, rate, subtype="FLOAT")
    with pytest.raises(BadSampleError) as info:
        load_clip(str(path), make_encoder().audio, train=False)
    assert info.value.reason == "non-finite"


def test_sample_rates_below_1_khz_are_refused_before_resampling(tmp_path, monkeypatch):
    """A file or array at a few Hz (a damaged header, a mistaken argument) is a bad sample
    ``bad-rate``, refused before resampling would blow it up by tens of thousands; 1 kHz is
    accepted."""
    import geobind.data.audio_io as audio_io
    from geobind.encoders.audio import load_clip

    settings = make_encoder().audio
    wave = (0.1 * np.random.default_rng(0).standard_normal(3000)).astype(np.float32)
    monkeypatch.setattr(audio_io, "resample", lambda *a: pytest.fail("resampled"))
    for rate in (1, 999):
        path = tmp_path / f"r{rate}.wav"
        sf.write(path, wave, rate)
        for item in (str(path), path.read_bytes(), (wave, rate)):
            with pytest.raises(BadSampleError) as e:
                load_audio(item, SR)
            assert e.value.reason == "bad-rate" and f"{rate} Hz" in str(e.value)
            with pytest.raises(BadSampleError, match="bad-rate"):
                load_clip(item, settings)
    monkeypatch.undo()
    assert load_audio((wave, 1000), SR).shape == (48_000,)


def test_a_windowed_mp3_read_prints_nothing(tmp_path, capfd):
    """mpg123 restarts a few frames before a seek point and prints an "error:" line for each frame
    whose bit reservoir it lacks; those frames are discarded (the window is what whole decoding
    gives), so the lines would only alarm: they are not shown."""
    from geobind.data.audio_io import load_audio_window

    noise = (np.random.default_rng(0).standard_normal(SR * 6) * 0.3).astype(np.float32)
    sf.write(tmp_path / "noise.mp3", noise, SR, format="MP3")
    for s in range(1000, 60000, 7000):
        assert load_audio_window(tmp_path / "noise.mp3", SR, SR, start=lambda n, s=s: s) is not None
    assert "error" not in capfd.readouterr().err


def test_windowed_mp3_reads_in_threads_leave_stderr_where_it_was(tmp_path):
    """The quieting swaps the process's file descriptor 2: threads doing it at once must leave it
    as it was (not at /dev/null, which would hide every later error of the process)."""
    import io
    import os
    import threading

    from geobind.data.audio_io import load_audio_window

    noise = (np.random.default_rng(0).standard_normal(SR * 20) * 0.1).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, noise, SR, format="MP3")
    before = os.fstat(2)

    def read():
        for _ in range(60):
            load_audio_window(buf.getvalue(), SR, SR, start=lambda n: n // 2)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
