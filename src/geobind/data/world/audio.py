"""Synthetic soundscapes: each scene mixes its own sound sources at random levels and timings.

Sources are built from shaped noise (FFT band filters), tones and short events (bird chirps,
barks, bells, sirens, ice cracks). A scene's recipe says which sources may sound and how likely
and how loud each is; attributes shift the odds (rain where it is wet, insects where it is warm,
a distant road hum where people live). The overall loudness follows the scene (a city is loud,
an ice sheet nearly silent), with a random gain on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Rng = np.random.Generator


def _band(rng: Rng, n: int, sr: int, lo: float, hi: float, tilt: float = 0.0) -> np.ndarray:
    """Unit-RMS noise with energy between ``lo`` and ``hi`` Hz (soft edges); ``tilt`` in dB per
    octave shapes the spectrum inside the band (negative = darker)."""
    # White noise drawn directly in the frequency domain: one inverse FFT instead of two.
    f = np.fft.rfftfreq(n, 1.0 / sr)
    spec = rng.standard_normal(len(f)) + 1j * rng.standard_normal(len(f))
    hi = min(hi, 0.48 * sr)
    gain = 1.0 / (1.0 + (lo / np.maximum(f, 1.0)) ** 4) / (1.0 + (f / hi) ** 4)
    if tilt:
        gain = gain * (np.maximum(f, 20.0) / 1000.0) ** (tilt / 6.02)
    x = np.fft.irfft(spec * gain, n)
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def _slow_env(
    rng: Rng, n: int, sr: int, rate: float, depth: float, floor: float = 0.0
) -> np.ndarray:
    """A smooth random envelope changing about ``rate`` times per second, in [floor, 1]."""
    k = max(3, int(n / sr * rate) + 3)
    pts = 1.0 - depth * rng.random(k)
    t = np.linspace(0, k - 1, n)
    # Cosine interpolation between random control points: smooth, no corners.
    i = np.floor(t).astype(int).clip(0, k - 2)
    frac = t - i
    w = 0.5 - 0.5 * np.cos(np.pi * frac)
    env = pts[i] * (1 - w) + pts[i + 1] * w
    return np.maximum(env, floor)


def _place(out: np.ndarray, ev: np.ndarray, start: int) -> None:
    """Add event ``ev`` into ``out`` at sample ``start`` (may start before 0 or run past the end)."""
    skip = max(0, -start)
    start = max(0, start)
    end = min(len(out), start + len(ev) - skip)
    if start < end:
        out[start:end] += ev[skip : skip + end - start]


def _tone(sr: int, f: np.ndarray, harmonics: tuple[float, ...] = (1.0,)) -> np.ndarray:
    """A tone following the instantaneous frequency track ``f`` (Hz), with harmonic weights."""
    phase = 2 * np.pi * np.cumsum(f) / sr
    out = np.zeros(len(f))
    for k, a in enumerate(harmonics, start=1):
        if a:
            out += a * np.sin(k * phase) * (k * f < 0.48 * sr)
    return out


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Moving average over ``k`` samples (softens on/off envelopes into syllables)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    lo = np.clip(np.arange(len(x)) - k // 2, 0, len(x))
    hi = np.clip(lo + k, 0, len(x))
    return (c[hi] - c[lo]) / k


def _hann(n: int) -> np.ndarray:
    return np.hanning(max(n, 2))[:n]


def _decay(n: int, sr: int, tau: float, attack: float = 0.003) -> np.ndarray:
    t = np.arange(n) / sr
    return (1 - np.exp(-t / attack)) * np.exp(-t / tau)


# --- sources (each returns a mono signal of n samples, roughly unit RMS) --------------------------


def waves(rng: Rng, n: int, sr: int) -> np.ndarray:
    period = rng.uniform(2.5, 7.0)
    phase = rng.uniform(0, 2 * np.pi)
    t = np.arange(n) / sr
    swell = 0.35 + 0.65 * (0.5 + 0.5 * np.sin(2 * np.pi * t / period + phase)) ** 2
    x = _band(rng, n, sr, 60, 1500, tilt=-3) * swell
    for _ in range(int(rng.integers(0, 3))):  # breaking crests
        ln = int(sr * rng.uniform(0.4, 1.0))
        burst = _band(rng, ln, sr, 400, 6000) * _decay(ln, sr, rng.uniform(0.15, 0.4), 0.05)
        _place(x, burst * rng.uniform(0.8, 2.0), int(rng.integers(0, n)))
    return x


def wind(rng: Rng, n: int, sr: int) -> np.ndarray:
    x = _band(rng, n, sr, 60, rng.uniform(400, 900), tilt=-4)
    x *= _slow_env(rng, n, sr, rng.uniform(1.0, 3.0), 0.8, 0.1)
    if rng.random() < 0.3:  # a whistle across an edge
        f = rng.uniform(500, 1400) * (1 + 0.05 * _slow_env(rng, n, sr, 2, 1))
        x += 0.2 * _tone(sr, f) * _slow_env(rng, n, sr, 2, 1)
    return x


def leaves(rng: Rng, n: int, sr: int) -> np.ndarray:
    return _band(rng, n, sr, 1500, 7000) * _slow_env(rng, n, sr, rng.uniform(1, 4), 0.9, 0.05)


def birds(rng: Rng, n: int, sr: int, count: int | None = None) -> np.ndarray:
    out = np.zeros(n)
    songs = int(rng.integers(1, 4)) if count is None else count
    for _ in range(songs):
        start = int(rng.integers(0, n))
        base = rng.uniform(2000, 5000)
        notes = int(rng.integers(2, 8))
        gap = rng.uniform(0.03, 0.15)
        for _ in range(notes):
            ln = int(sr * rng.uniform(0.03, 0.15))
            sweep = np.linspace(0, rng.uniform(-1500, 1500), ln)
            f = base + sweep + 200 * np.sin(np.arange(ln) / sr * 2 * np.pi * rng.uniform(20, 60))
            _place(out, _tone(sr, f, (1.0, 0.25)) * _hann(ln), start)
            start += ln + int(sr * gap)
    return out


def gulls(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    for _ in range(int(rng.integers(1, 4))):
        ln = int(sr * rng.uniform(0.2, 0.45))
        f = np.linspace(rng.uniform(1300, 1900), rng.uniform(700, 1000), ln)
        _place(out, _tone(sr, f, (1.0, 0.6, 0.4, 0.2)) * _hann(ln), int(rng.integers(0, n)))
    return out


def crickets(rng: Rng, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    rate = rng.uniform(15, 45)
    pulses = (np.sin(2 * np.pi * rate * t + rng.uniform(0, 6)) > 0.3).astype(float)
    chirp = (np.sin(2 * np.pi * rng.uniform(0.8, 3.0) * t + rng.uniform(0, 6)) > -0.2).astype(float)
    return _tone(sr, np.full(n, rng.uniform(3500, 5500))) * pulses * chirp


def cicadas(rng: Rng, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    am = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(80, 220) * t)
    return _band(rng, n, sr, 4000, 8000) * am * _slow_env(rng, n, sr, 0.7, 0.6, 0.2)


def frogs(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    for _ in range(int(rng.integers(2, 5))):
        f0 = rng.uniform(600, 2500)
        rate = rng.uniform(4, 15)
        start = int(rng.integers(0, n // 2))
        for k in range(int(rng.integers(3, 20))):
            ln = int(sr * rng.uniform(0.01, 0.03))
            _place(
                out, _tone(sr, np.full(ln, f0), (1.0, 0.5)) * _hann(ln), start + int(k * sr / rate)
            )
    return out


def rain(rng: Rng, n: int, sr: int) -> np.ndarray:
    x = _band(rng, n, sr, 800, 8000, tilt=-2)
    drops = np.zeros(n)
    idx = rng.integers(0, n, int(n / sr * rng.uniform(80, 400)))
    drops[idx] = rng.uniform(-3, 3, len(idx))
    kernel = _decay(int(sr * 0.004), sr, 0.001, 0.0002)
    return x + np.convolve(drops, kernel, mode="same") * 3


def stream(rng: Rng, n: int, sr: int) -> np.ndarray:
    return _band(rng, n, sr, 300, 4000) * _slow_env(rng, n, sr, 25, 0.7, 0.2)


def traffic(rng: Rng, n: int, sr: int) -> np.ndarray:
    x = _band(rng, n, sr, 30, 400, tilt=-3)
    f = rng.uniform(45, 110) * (1 + 0.1 * _slow_env(rng, n, sr, 1.5, 1.0))
    x += 0.5 * _tone(sr, f, (1.0, 0.6, 0.4, 0.2))
    for _ in range(int(rng.integers(0, 3))):  # a car passing by
        ln = int(sr * rng.uniform(0.8, 2.0))
        _place(x, 2.0 * _band(rng, ln, sr, 150, 3000) * _hann(ln), int(rng.integers(-ln // 2, n)))
    return x


def crowd(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    t = np.arange(n) / sr
    for _ in range(int(rng.integers(3, 9))):
        syll = rng.uniform(3, 7)
        on = (np.sin(2 * np.pi * syll * t + rng.uniform(0, 6)) > rng.uniform(-0.3, 0.4)).astype(
            float
        )
        on *= _slow_env(rng, n, sr, 1.0, 1.0)
        lo = rng.uniform(250, 500)
        out += _band(rng, n, sr, lo, rng.uniform(1800, 3500)) * _smooth(on, int(0.02 * sr))
    return out


def siren(rng: Rng, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    if rng.random() < 0.5:  # wail
        f = 950 + 350 * np.sin(2 * np.pi * t / rng.uniform(0.8, 2.5) + rng.uniform(0, 6))
    else:  # hi-lo
        f = np.where(np.sin(2 * np.pi * t / rng.uniform(0.8, 1.4)) > 0, 1100.0, 800.0)
    return _tone(sr, f, (1.0, 0.4, 0.2)) * _slow_env(rng, n, sr, 0.5, 0.6, 0.3)


def horns(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    for _ in range(int(rng.integers(1, 4))):
        ln = int(sr * rng.uniform(0.15, 0.6))
        f = np.full(ln, rng.uniform(350, 520))
        _place(out, _tone(sr, f, (1.0, 0.7, 0.5, 0.3)) * _hann(ln) ** 0.3, int(rng.integers(0, n)))
    return out


def bell(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    f0 = rng.uniform(250, 600)
    for k in range(int(rng.integers(1, 4))):
        ln = n
        ev = sum(
            a * np.sin(2 * np.pi * f0 * p * np.arange(ln) / sr)
            for p, a in ((1, 1.0), (2.0, 0.6), (2.4, 0.4), (3.0, 0.3), (4.2, 0.2))
        )
        _place(out, ev * _decay(ln, sr, rng.uniform(0.6, 1.5)), int(k * sr * rng.uniform(0.6, 1.0)))
    return out


def barks(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    start = int(rng.integers(0, n))
    for _ in range(int(rng.integers(1, 4))):
        ln = int(sr * rng.uniform(0.08, 0.18))
        f = np.linspace(rng.uniform(500, 800), rng.uniform(300, 450), ln)
        ev = (_tone(sr, f, (1.0, 0.8, 0.5)) + 0.5 * _band(rng, ln, sr, 300, 2000)) * _hann(ln)
        _place(out, ev, start)
        start += ln + int(sr * rng.uniform(0.1, 0.3))
    return out


def moo(rng: Rng, n: int, sr: int) -> np.ndarray:
    ln = int(sr * min(n / sr, rng.uniform(0.7, 1.4)))
    f = rng.uniform(110, 170) * (1 + 0.25 * np.sin(np.linspace(0, np.pi, ln)))
    ev = _tone(sr, f, (1.0, 0.8, 0.7, 0.5, 0.3, 0.2)) * _hann(ln) ** 0.5
    out = np.zeros(n)
    _place(out, ev, int(rng.integers(0, max(1, n - ln // 2))))
    return out


def engine(rng: Rng, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(25, 45) * (1 + 0.05 * _slow_env(rng, n, sr, 1, 1))
    return _tone(sr, f, (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)) + 0.3 * _band(rng, n, sr, 40, 300)


def woodpecker(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    start = int(rng.integers(0, n))
    rate = rng.uniform(12, 22)
    click = _band(rng, int(sr * 0.01), sr, 800, 4000) * _decay(int(sr * 0.01), sr, 0.002)
    for k in range(int(rng.integers(8, 20))):
        _place(out, click * (1 - k / 25), start + int(k * sr / rate))
    return out


def raptor(rng: Rng, n: int, sr: int) -> np.ndarray:
    ln = int(sr * rng.uniform(0.5, 1.0))
    f = np.linspace(rng.uniform(2500, 3200), rng.uniform(1600, 2200), ln)
    out = np.zeros(n)
    _place(out, _tone(sr, f, (1.0, 0.3)) * _hann(ln), int(rng.integers(0, n)))
    return out


def ice_crack(rng: Rng, n: int, sr: int) -> np.ndarray:
    out = np.zeros(n)
    ln = int(sr * 0.6)
    ev = _band(rng, ln, sr, 1000, 7000) * _decay(ln, sr, 0.02) + _band(
        rng, ln, sr, 30, 200
    ) * _decay(ln, sr, 0.25, 0.01)
    _place(out, ev, int(rng.integers(0, n)))
    return out


def sand(rng: Rng, n: int, sr: int) -> np.ndarray:
    return _band(rng, n, sr, 2500, 7000) * _slow_env(rng, n, sr, 2, 0.9, 0.05)


Source = Callable[[Rng, int, int], np.ndarray]

# scene -> [(source, probability, level in dB relative to the mix)], then the scene's loudness
# (RMS of the final mix, before a random gain of -6..+4 dB).
RECIPES: dict[str, tuple[list[tuple[Source, float, float]], float]] = {
    "open_ocean": ([(waves, 1.0, 0), (wind, 0.9, -4), (gulls, 0.1, -12)], 0.12),
    "coast": ([(waves, 1.0, 0), (gulls, 0.6, -6), (wind, 0.5, -8), (crowd, 0.2, -16)], 0.1),
    "tropical_rainforest": (
        [(cicadas, 0.8, -2), (birds, 1.0, 0), (frogs, 0.6, -4), (leaves, 0.4, -10)],
        0.08,
    ),
    "savanna": ([(crickets, 0.7, -4), (birds, 0.5, -4), (wind, 0.6, -6), (moo, 0.1, -10)], 0.05),
    "desert": ([(wind, 1.0, 0), (sand, 0.7, -8), (birds, 0.1, -16)], 0.03),
    "grassland": ([(wind, 0.8, -2), (crickets, 0.7, -2), (birds, 0.5, -4)], 0.05),
    "farmland": (
        [(birds, 0.6, -2), (moo, 0.5, 0), (engine, 0.4, -4), (barks, 0.2, -6), (crickets, 0.3, -8)],
        0.05,
    ),
    "temperate_forest": (
        [(birds, 1.0, 0), (leaves, 0.6, -8), (woodpecker, 0.3, -4), (stream, 0.3, -8)],
        0.05,
    ),
    "boreal_forest": (
        [(leaves, 0.8, -4), (birds, 0.6, -2), (woodpecker, 0.3, -4), (wind, 0.5, -6)],
        0.04,
    ),
    "tundra": ([(wind, 1.0, 0), (birds, 0.3, -10), (stream, 0.2, -12)], 0.04),
    "ice": ([(wind, 1.0, 0), (ice_crack, 0.3, 2)], 0.008),
    "mountains": ([(wind, 1.0, 0), (stream, 0.5, -6), (raptor, 0.3, -8), (bell, 0.15, -14)], 0.06),
    "town": (
        [(traffic, 0.8, -4), (birds, 0.6, -4), (bell, 0.3, -8), (barks, 0.3, -6), (crowd, 0.4, -8)],
        0.06,
    ),
    "city_centre": (
        [(traffic, 1.0, 0), (crowd, 0.8, -3), (siren, 0.4, -6), (horns, 0.5, -6)],
        0.15,
    ),
}
_WARM_ONLY = {crickets, cicadas, frogs}


def render_audio(
    scene: str, attrs: dict[str, Any], rng: Rng, sample_rate: int = 16000, seconds: float = 2.0
) -> np.ndarray:
    """Synthesise ``seconds`` of the soundscape of ``scene`` as float32 in [-1, 1]."""
    n = int(round(sample_rate * seconds))
    sources, loudness = RECIPES[scene]
    temp = float(attrs["temperature_c"])
    wet = float(attrs["wetness"])
    extra: list[tuple[Source, float, float]] = []
    if scene not in ("open_ocean", "ice", "desert"):
        extra.append((rain, 0.35 * max(0.0, wet - 0.4) / 0.6, -4))
    if scene not in ("town", "city_centre", "open_ocean"):
        extra.append((traffic, min(0.5, float(attrs["population_density"]) / 300.0), -14))
    mix = np.zeros(n)
    used = 0
    for src, p, db in list(sources) + extra:
        if src in _WARM_ONLY and temp < 8:
            p *= 0.2
        if rng.random() >= p:
            continue
        x = src(rng, n, sample_rate)
        rms = np.sqrt(np.mean(x * x))
        if rms > 0:
            mix += x / rms * 10 ** ((db + rng.uniform(-5, 5)) / 20)
            used += 1
    if not used:  # a scene's first source always sounds, so no clip is pure silence
        x = sources[0][0](rng, n, sample_rate)
        mix = x / (np.sqrt(np.mean(x * x)) + 1e-12)
    mix += rng.standard_normal(n) * 0.003  # microphone self-noise
    target = loudness * 10 ** (rng.uniform(-6, 4) / 20)
    mix *= target / (np.sqrt(np.mean(mix * mix)) + 1e-12)
    # Soft limiting keeps loud mixes in range without hard clipping.
    return (np.tanh(mix * 1.2) / 1.2).astype(np.float32)


__all__ = ["RECIPES", "render_audio"]
