"""The torch mel front end against transformers' ClapFeatureExtractor (the reference).

Error measures, both required below 1e-4:
* global: max |ours - ref| / max |ref|;
* elementwise: max |ours - ref| / |ref| over the entries with |ref| > 1 dB.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geobind.encoders.mel import ClapMelFrontEnd, crop, crop_start, fit_clip, repeat_pad

ClapFeatureExtractor = pytest.importorskip("transformers").ClapFeatureExtractor

TOL = 1e-4

# name -> (sample_rate, clip_seconds, n_fft, hop_length, n_mels, f_max)
SETTINGS = {
    "tiny": (16_000, 1, 512, 160, 16, 8_000.0),
    "real": (48_000, 10, 1024, 480, 64, 14_000.0),
}


def make_waves(sample_rate: int, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded noise, a pure sine, sines + noise; of clip length and shorter than it."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sample_rate
    return {
        "noise": 0.1 * rng.standard_normal(n),
        "sine": 0.5 * np.sin(2 * np.pi * 440.0 * t),
        "sines+noise": 0.3 * np.sin(2 * np.pi * 1000.0 * t)
        + 0.2 * np.sin(2 * np.pi * 3100.0 * t + 0.3)
        + 0.01 * rng.standard_normal(n),
        "short-noise": 0.3 * rng.standard_normal(n // 3 + 7),
        "short-sine": 0.5 * np.sin(2 * np.pi * 700.0 * t[: int(0.7 * n)]),
    }


def reference(wave: np.ndarray, setting: tuple, truncation: str = "fusion") -> np.ndarray:
    sr, secs, n_fft, hop, n_mels, f_max = setting
    extractor = ClapFeatureExtractor(
        feature_size=n_mels,
        sampling_rate=sr,
        hop_length=hop,
        max_length_s=secs,
        fft_window_size=n_fft,
        frequency_min=0,
        frequency_max=f_max,
        truncation=truncation,
        padding="repeatpad",
    )
    out = extractor(wave.astype(np.float32), sampling_rate=sr, return_tensors="np")
    return out["input_features"][0]


def ours(wave: np.ndarray, setting: tuple, mel_scale: str = "htk", fusion: bool = True):
    sr, secs, n_fft, hop, n_mels, f_max = setting
    frontend = ClapMelFrontEnd(sr, n_fft, hop, n_mels, 0.0, f_max, mel_scale, fusion)
    x = repeat_pad(torch.from_numpy(wave.astype(np.float32)), secs * sr)
    out = frontend(x.unsqueeze(0))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    return out[0].numpy()


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    diff = np.abs(got - ref)
    assert diff.max() / np.abs(ref).max() < TOL, diff.max()
    big = np.abs(ref) > 1
    assert (diff[big] / np.abs(ref[big])).max() < TOL


@pytest.mark.parametrize("name", list(make_waves(16_000, 16_000)))
def test_tiny_matches_extractor_fusion(name):
    setting = SETTINGS["tiny"]
    wave = make_waves(16_000, 16_000)[name]
    ref = reference(wave, setting)
    assert ref.shape == (4, 101, 16)
    assert_close(ours(wave, setting), ref)


@pytest.mark.parametrize("name", ["noise", "short-sine"])
def test_tiny_matches_extractor_rand_trunc(name):
    # The unfused extractor path: slaney filters with slaney norm, one channel.
    setting = SETTINGS["tiny"]
    wave = make_waves(16_000, 16_000)[name]
    ref = reference(wave, setting, truncation="rand_trunc")
    assert ref.shape == (1, 101, 16)
    assert_close(ours(wave, setting, mel_scale="slaney", fusion=False), ref)


@pytest.mark.parametrize("name", ["sines+noise", "short-noise"])
def test_real_settings_match_extractor(name):
    setting = SETTINGS["real"]
    wave = make_waves(48_000, 480_000, seed=1)[name]
    ref = reference(wave, setting)
    assert ref.shape == (4, 1001, 64)
    assert_close(ours(wave, setting), ref)


def test_batch_equals_per_item():
    sr, secs, n_fft, hop, n_mels, f_max = SETTINGS["tiny"]
    frontend = ClapMelFrontEnd(sr, n_fft, hop, n_mels, 0.0, f_max)
    waves = [
        repeat_pad(torch.from_numpy(w.astype(np.float32)), sr * secs)
        for w in make_waves(sr, sr * secs, seed=3).values()
    ]
    batch = frontend(torch.stack(waves))
    assert batch.shape == (len(waves), 4, 101, 16) and batch.dtype == torch.float32
    for i, w in enumerate(waves):
        torch.testing.assert_close(batch[i], frontend(w.unsqueeze(0))[0], rtol=0, atol=1e-5)


def test_autocast_does_not_lower_precision():
    sr, secs, n_fft, hop, n_mels, f_max = SETTINGS["tiny"]
    frontend = ClapMelFrontEnd(sr, n_fft, hop, n_mels, 0.0, f_max)
    x = torch.from_numpy(make_waves(sr, sr * secs)["noise"].astype(np.float32)).unsqueeze(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = frontend(x)
    assert under.dtype == torch.float32
    assert torch.equal(under, frontend(x))


def test_float32_stft_is_close_on_noisy_audio():
    setting = SETTINGS["tiny"]
    sr, secs, n_fft, hop, n_mels, f_max = setting
    wave = make_waves(sr, sr * secs)["noise"]
    frontend = ClapMelFrontEnd(sr, n_fft, hop, n_mels, 0.0, f_max, stft_dtype=torch.float32)
    got = frontend(torch.from_numpy(wave.astype(np.float32)).unsqueeze(0))[0].numpy()
    assert_close(got, reference(wave, setting))


def test_repeat_pad_matches_extractor_rule():
    wave = torch.arange(1.0, 4.0)  # 3 samples -> tiled floor(10 / 3) = 3 times, then zeros
    assert repeat_pad(wave, 10).tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 0]
    assert repeat_pad(wave, 3) is wave
    assert repeat_pad(torch.ones(2, 3), 7).shape == (2, 7)
    with pytest.raises(ValueError):
        repeat_pad(torch.zeros(0), 5)


def test_crop_and_fit_clip():
    wave = torch.arange(100.0)
    assert crop(wave, 10).tolist() == list(range(10))
    gen = torch.Generator().manual_seed(0)
    starts = {int(crop(wave, 10, random=True, generator=gen)[0]) for _ in range(50)}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 90
    assert fit_clip(wave, 10, train=False).tolist() == list(range(10))
    assert fit_clip(wave, 250).shape == (250,)
    assert fit_clip(wave, 100, train=True) is wave


def test_a_random_crop_can_start_at_the_last_possible_sample():
    """A clip one sample longer than the window has two windows; random crops draw both (the
    end of ``randint`` is exclusive), and the last one ends at the clip's last sample."""
    gen = torch.Generator().manual_seed(0)
    starts = {crop_start(11, 10, random=True, generator=gen) for _ in range(200)}
    assert starts == {0, 1}
    assert crop_start(11, 10) == 0
    wave = torch.arange(11.0)
    firsts = {int(crop(wave, 10, random=True, generator=gen)[0]) for _ in range(200)}
    assert firsts == {0, 1}


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="Nyquist"):
        ClapMelFrontEnd(sample_rate=16_000, f_max=14_000)
    with pytest.raises(ValueError, match="mel_scale"):
        ClapMelFrontEnd(mel_scale="kaldi")
