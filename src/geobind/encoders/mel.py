"""A batched torch port of the log-mel front end of ``transformers.ClapFeatureExtractor``.

The reference extractor loops over clips and frames in numpy; this module computes the same
features for a ``[B, T]`` batch with one ``torch.stft`` on whatever device the waveforms are on,
so audio decoding is the only per-sample work left to the data loader.

What is reproduced (``tests/test_mel.py`` checks it against the extractor):

* the STFT: periodic Hann window, ``center=True`` with reflect padding, power 2;
* the mel filters: ``mel_scale="htk"`` with ``norm=None`` (the ``truncation="fusion"`` path, used
  by ``laion/clap-htsat-fused``), or ``"slaney"``/``"slaney"`` (the ``"rand_trunc"`` path);
* ``10 * log10(max(mel, 1e-10))`` (no ``top_db``);
* the 4 identical copies the fusion extractor stacks for clips that are not longer than the
  clip length (``[B, 4, frames, n_mels]``), or one channel without fusion.

Clips longer than the clip length are cropped in the waveform domain (:func:`crop`) before the
front end, so the fusion of random mel crops the extractor applies to long clips is never used
and ``is_longer`` is always false.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClapMelFrontEnd", "crop", "fit_clip", "repeat_pad"]


class ClapMelFrontEnd(nn.Module):
    """Waveforms ``[B, T]`` -> CLAP ``input_features`` ``[B, C, 1 + T // hop_length, n_mels]``.

    ``C`` is 4 when ``fusion`` is true (the copies the fusion extractor makes; returned as an
    expanded view, not 4 copies in memory) and 1 otherwise. The output is float32 on the input's
    device.

    The STFT and mel projection run in ``stft_dtype`` (float64 by default, float32 on MPS). A
    float32 FFT has an absolute error floor about 140 dB below a frame's peak, which shows in
    synthetic audio with a wider dynamic range than that (a pure sine: mel bands far from it are
    off by up to 1.4 dB); float64 matches the float64 reference to ~1e-7 everywhere and costs
    little (the STFT is a small fraction of an HTS-AT forward pass). Real recordings, whose noise
    floor sits far above that limit, agree to ~1e-5 relative error in float32 as well.
    """

    def __init__(
        self,
        sample_rate: int = 48_000,
        n_fft: int = 1024,
        hop_length: int = 480,
        n_mels: int = 64,
        f_min: float = 0.0,
        f_max: float = 14_000.0,
        mel_scale: str = "htk",
        fusion: bool = True,
        stft_dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        # Imported here: transformers is heavy and only the constructor needs its filter bank.
        from transformers.audio_utils import mel_filter_bank, window_function

        if mel_scale not in ("htk", "slaney"):
            raise ValueError(
                f"mel_scale must be 'htk' (CLAP fusion extractor) or 'slaney' (rand_trunc "
                f"extractor), got {mel_scale!r}"
            )
        if f_max > sample_rate / 2:
            raise ValueError(
                f"f_max={f_max} Hz is above the Nyquist frequency of sample_rate={sample_rate} Hz; "
                f"set f_max <= {sample_rate / 2:g}"
            )
        if hop_length <= 0 or n_fft <= 0:
            raise ValueError(f"n_fft and hop_length must be positive, got {n_fft}, {hop_length}")
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.mel_scale = mel_scale
        self.fusion = bool(fusion)
        self.stft_dtype = stft_dtype
        filters = mel_filter_bank(
            num_frequency_bins=self.n_fft // 2 + 1,
            num_mel_filters=self.n_mels,
            min_frequency=self.f_min,
            max_frequency=self.f_max,
            sampling_rate=self.sample_rate,
            # The extractor pairs htk with no normalisation and slaney with slaney area norm.
            norm=None if mel_scale == "htk" else "slaney",
            mel_scale=mel_scale,
        )
        # Plain float64 tensors rather than buffers: derived from the settings (so never part of a
        # checkpoint) and immune to ``module.half()``; copied per device and dtype on first use.
        self._filters_cpu = torch.from_numpy(filters)
        self._window_cpu = torch.from_numpy(window_function(self.n_fft, "hann"))
        self._constants: dict[
            tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]
        ] = {}

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.stft_dtype == torch.float64 and device.type == "mps":
            return torch.float32  # MPS has no float64
        return self.stft_dtype

    def _constants_on(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        cached = self._constants.get(key)
        if cached is None:
            cached = (self._window_cpu.to(device, dtype), self._filters_cpu.to(device, dtype))
            # Not while torch.compile traces: adding the key would invalidate the graph just
            # built (one recompilation). prepare() fills the cache before compiling instead.
            if not torch.compiler.is_compiling():
                self._constants[key] = cached
        return cached

    def prepare(self, device: torch.device | str) -> None:
        """Make the window and filter bank on ``device`` now (the first call would otherwise):
        a compiled caller then reads them as they are, every step."""
        device = torch.device(device)
        self._constants_on(device, self._compute_dtype(device))

    def num_frames(self, num_samples: int) -> int:
        """Frames the front end yields for a clip of ``num_samples`` samples."""
        return 1 + num_samples // self.hop_length

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` (or ``[T]``) waveforms -> float32 log-mel features ``[B, C, frames, n_mels]``."""
        if waveforms.ndim == 1:
            waveforms = waveforms.unsqueeze(0)
        if waveforms.ndim != 2:
            raise ValueError(f"expected waveforms of shape [B, T], got {tuple(waveforms.shape)}")
        if waveforms.shape[-1] <= self.n_fft // 2:
            raise ValueError(
                f"clips of {waveforms.shape[-1]} samples are too short for n_fft={self.n_fft} "
                "(reflect padding needs more than n_fft // 2 samples); repeat_pad them first"
            )
        dtype = self._compute_dtype(waveforms.device)
        x = waveforms.to(dtype)
        window, filters = self._constants_on(x.device, dtype)
        # Autocast would run the mel matmul in bf16/fp16 and lose the dB precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(
                x,
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                window=window,
                center=True,
                pad_mode="reflect",
                onesided=True,
                return_complex=True,
            )  # [B, bins, frames]
            power = spec.real.square() + spec.imag.square()
            mel = torch.matmul(power.transpose(1, 2), filters)  # [B, frames, mels]
            log_mel = (10.0 * torch.log10(mel.clamp_min(1e-10))).float().unsqueeze(1)
        if self.fusion:
            log_mel = log_mel.expand(-1, 4, -1, -1)
        return log_mel

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"n_mels={self.n_mels}, f_min={self.f_min:g}, f_max={self.f_max:g}, "
            f"mel_scale={self.mel_scale!r}, fusion={self.fusion}"
        )


def repeat_pad(wave: torch.Tensor, n: int) -> torch.Tensor:
    """Fit a clip shorter than ``n`` samples as the CLAP extractor's ``"repeatpad"`` does.

    The clip is tiled ``floor(n / len)`` times and the rest is zero-padded to ``n``. Clips of
    ``n`` samples or more are returned unchanged (crop them with :func:`crop`).
    """
    length = int(wave.shape[-1])
    if length == 0:
        raise ValueError("cannot repeat-pad a zero-length clip")
    if length >= n:
        return wave
    tiled = wave.repeat(n // length) if wave.ndim == 1 else wave.repeat(1, n // length)
    return torch.nn.functional.pad(tiled, (0, n - tiled.shape[-1]))


def crop(
    wave: torch.Tensor,
    n: int,
    *,
    random: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The first ``n`` samples of a longer clip, or a random window of ``n`` if ``random``.

    Random offsets come from torch's generator (``generator`` or the global one), which
    ``DataLoader`` seeds differently in every worker.
    """
    length = int(wave.shape[-1])
    if length <= n:
        return wave
    start = crop_start(length, n, random=random, generator=generator)
    return wave[..., start : start + n]


def crop_start(length: int, n: int, *, random: bool = False, generator: torch.Generator | None = None) -> int:
    """Where :func:`crop` starts its window in a clip of ``length > n`` samples (the one random
    draw it makes), for readers that decode only that window."""
    if not random:
        return 0
    return int(torch.randint(0, length - n + 1, (1,), generator=generator).item())


def fit_clip(
    wave: torch.Tensor,
    n: int,
    *,
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop (random if ``train``, else from the start) or repeat-pad a clip to exactly ``n``."""
    return repeat_pad(crop(wave, n, random=train, generator=generator), n)
