"""Decoding of audio into mono float32 waveforms at a requested sample rate.

Files (and bytes from WebDataset shards) are decoded with ``soundfile`` (libsndfile: WAV, FLAC,
OGG/Vorbis, MP3 with libsndfile >= 1.1), downmixed to mono and resampled with ``soxr``. Anything
unusable raises :class:`~geobind.data.errors.BadSampleError` naming the sample and the reason, so
readers can skip and count it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from geobind.data.errors import BadSampleError

__all__ = ["load_audio", "load_audio_window", "resample"]

# Containers libsndfile seeks in to the exact sample (lossless or PCM): a window read from them
# equals the same window of the whole decoded file.
_EXACT_SEEK = frozenset({"WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64", "CAF"})


def resample(wave: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform with soxr's high-quality filter (no-op at equal rates)."""
    if int(orig_rate) == int(target_rate):
        return wave
    import soxr

    return np.asarray(
        soxr.resample(wave, int(orig_rate), int(target_rate), quality="HQ"), dtype=np.float32
    )


def _to_float(wave: np.ndarray) -> np.ndarray:
    """Float32 samples in [-1, 1]; integer PCM is scaled by its full-scale value."""
    if np.issubdtype(wave.dtype, np.integer):
        info = np.iinfo(wave.dtype)
        scale = float(max(-info.min, info.max))
        offset = 0.0 if info.min < 0 else (info.max + 1) / 2  # unsigned PCM is centred on mid-scale
        return ((wave.astype(np.float64) - offset) / scale).astype(np.float32)
    if not np.issubdtype(wave.dtype, np.floating):
        raise TypeError(f"audio samples must be integer or float, got dtype {wave.dtype}")
    return wave.astype(np.float32, copy=False)


def _finish(wave: np.ndarray, rate: int, sample_rate: int, name: str) -> np.ndarray:
    if wave.size == 0:
        raise BadSampleError(name, "silent-zero-length", "audio has no samples")
    if not np.isfinite(wave).all():
        raise BadSampleError(name, "non-finite", "audio contains NaN or infinite samples")
    out = resample(np.ascontiguousarray(wave, dtype=np.float32), rate, sample_rate)
    if out.size == 0:
        raise BadSampleError(
            name, "silent-zero-length", f"too short to resample to {sample_rate} Hz"
        )
    return out


def _from_array(wave: Any, rate: int, sample_rate: int, name: str) -> np.ndarray:
    if hasattr(wave, "detach"):  # torch tensor, without importing torch here
        wave = wave.detach().cpu().numpy()
    original = np.asarray(wave)
    wave = _to_float(original)
    if wave.ndim == 1 and np.shares_memory(wave, original):
        wave = wave.copy()  # the caller keeps (and may reuse or have frozen) its array
    elif wave.ndim == 2:
        wave = wave.mean(axis=0, dtype=np.float32)  # [channels, T]
    elif wave.ndim != 1:
        raise BadSampleError(
            name, "bad-shape", f"expected a [T] or [channels, T] waveform, got shape {wave.shape}"
        )
    return _finish(wave, rate, sample_rate, name)


def _decode(source: str | io.BytesIO, name: str, sample_rate: int) -> np.ndarray:
    import soundfile as sf

    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise BadSampleError(name, "undecodable", f"cannot decode audio: {e}") from None
    return _finish(_downmix(data), rate, sample_rate, name)


def _downmix(data: np.ndarray) -> np.ndarray:
    """``[frames, channels]`` -> mono: the mean over channels (what CLAP's and most loaders'
    downmix does)."""
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


def _file_source(item: Any, name: str | None) -> tuple[str | io.BytesIO, str] | None:
    """``(source for soundfile, label)`` of a path or bytes item (checked for being missing or
    empty), or ``None`` for in-memory waveforms."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        label = name or str(path)
        if not path.is_file():
            detail = "is a directory" if path.is_dir() else "file does not exist"
            raise BadSampleError(label, "missing", detail)
        if path.stat().st_size == 0:
            raise BadSampleError(label, "empty", "file is empty (0 bytes)")
        return str(path), label
    if isinstance(item, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(item) == 0:
            raise BadSampleError(label, "empty", "no bytes")
        return io.BytesIO(bytes(item)), label
    return None


def load_audio_window(
    item: Any, sample_rate: int, n: int, *, start: Callable[[int], int], name: str | None = None
) -> np.ndarray | None:
    """Decode only ``n`` samples of a file (or bytes) that is already at ``sample_rate`` Hz, in a
    container that seeks exactly (WAV, FLAC, AIFF, ...): a mono float32 waveform equal to the
    same window of :func:`load_audio`'s, or the whole waveform when it has ``n`` samples or
    fewer. ``start(frames)`` gives the window's first sample (called only when ``frames > n``).
    Returns ``None`` when the item is not such a file (other rates, lossy formats, in-memory
    waveforms): decode it whole then. A long recording costs the decoding of one clip, not of
    all of it."""
    src = _file_source(item, name)
    if src is None:
        return None
    source, label = src
    import soundfile as sf

    try:
        with sf.SoundFile(source) as f:
            if f.format not in _EXACT_SEEK or f.samplerate != int(sample_rate) or not f.seekable() or f.frames <= 0:
                return None
            frames = int(f.frames)
            if frames > n:
                f.seek(start(frames))
                data = f.read(n, dtype="float32", always_2d=True)
                if data.shape[0] != n:  # a header that promises more than the file holds
                    return None
            else:
                data = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise BadSampleError(label, "undecodable", f"cannot decode audio: {e}") from None
    return _finish(_downmix(data), sample_rate, sample_rate, label)


def load_audio(item: Any, sample_rate: int, *, name: str | None = None) -> np.ndarray:
    """Decode ``item`` into a mono float32 waveform at ``sample_rate`` Hz.

    ``item`` is one of:

    * a path (``str`` or ``Path``) to an audio file soundfile decodes (wav, flac, ogg, mp3, ...);
    * ``bytes`` of such a file (a WebDataset member; pass ``name`` for error messages);
    * a ``(waveform, rate)`` pair, the waveform a numpy array or torch tensor of shape ``[T]`` or
      ``[channels, T]`` (integer PCM is scaled to [-1, 1]);
    * a 1-D numpy array or torch tensor, taken to be at ``sample_rate`` already.

    Multi-channel audio is averaged to mono; other rates are resampled with soxr (HQ).
    Raises :class:`BadSampleError` with reason ``"missing"``, ``"empty"``, ``"undecodable"``,
    ``"silent-zero-length"``, ``"non-finite"`` or ``"bad-shape"``, naming the sample.
    """
    src = _file_source(item, name)
    if src is not None:
        return _decode(src[0], src[1], sample_rate)
    if isinstance(item, tuple) and len(item) == 2:
        wave, rate = item
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float, np.integer, np.floating))
            or rate <= 0
            or int(rate) != rate
        ):
            raise TypeError(
                f"(waveform, sample_rate) pair needs a positive integer rate, got {rate!r}"
            )
        return _from_array(wave, int(rate), sample_rate, name or "<array>")
    if isinstance(item, np.ndarray) or hasattr(item, "detach"):
        if len(item.shape) != 1:
            raise BadSampleError(
                name or "<array>",
                "bad-shape",
                f"a bare array must be a 1-D waveform at {sample_rate} Hz, got shape "
                f"{tuple(item.shape)}; pass (waveform, sample_rate) for [channels, T] audio",
            )
        return _from_array(item, sample_rate, sample_rate, name or "<array>")
    raise TypeError(
        "audio items are paths, bytes, (waveform, sample_rate) pairs or 1-D arrays; "
        f"got {type(item).__name__}"
    )
