"""Decoding of audio into mono float32 waveforms at a requested sample rate.

Files (and bytes from WebDataset shards) are decoded with ``soundfile`` (libsndfile: WAV, FLAC,
OGG/Vorbis, MP3 with libsndfile >= 1.1), downmixed to mono and resampled with ``soxr``. Anything
unusable raises :class:`~geobind.data.errors.BadSampleError` naming the sample and the reason, so
readers can skip and count it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from geobind.data.errors import BadSampleError

__all__ = ["load_audio", "load_audio_window", "resample", "resampled_length"]

# Containers libsndfile seeks in to the exact sample (lossless or PCM): a window read from them
# equals the same window of the whole decoded file.
_EXACT_SEEK = frozenset({"WAV", "WAVEX", "FLAC", "AIFF", "W64", "RF64", "CAF"})
# MP3 seeks to the sample too (mpg123, gapless), with output within float rounding of decoding
# from the start; its length is exact when the file has a LAME/Xing header, estimated otherwise.
_WINDOWED = _EXACT_SEEK | {"MP3"}
# More channels than this in a 2-D waveform array: not a recording (ambisonics stays below it).
MAX_CHANNELS = 64
# Above this (7.1 surround), an in-memory array averaged into one clip gets a warning: more
# likely a batch of clips passed as one item than one recording.
SURROUND_CHANNELS = 8
# Below this rate a "recording" is a damaged header or a mistaken argument, and resampling it
# would multiply its samples by tens of thousands (a 60 KB file at 1 Hz: gigabytes at 16 kHz).
MIN_SAMPLE_RATE = 1000


# Pieces are resampled on the whole recording's grid only where the two rates' grids meet every
# at most this many source samples (every common rate: 44.1 kHz meets 48 kHz every 147). For
# near-coprime pairs (44,101 Hz, say) soxr's phase differs by ~1e-5 between piece and whole.
_MAX_GRID = 1000


def resampled_length(frames: int, orig_rate: int, target_rate: int) -> int:
    """Samples :func:`resample` makes of ``frames`` samples: ``frames * target / orig`` rounded
    half up (soxr's one-shot length)."""
    return (2 * frames * int(target_rate) + int(orig_rate)) // (2 * int(orig_rate))


def _window_span(start: int, n: int, frames: int, rate: int, target: int) -> tuple[int, int, int]:
    """``(first, stop, offset)``: the source samples ``[first, stop)`` to decode and resample so
    that output samples ``[offset, offset + n)`` are the whole recording's resampled samples
    ``[start, start + n)``. ``first`` lies where the two sample grids meet (a multiple of
    ``rate / gcd``), so the piece's output grid is the whole one's shifted by a whole number of
    samples; the margin keeps the resampling filter's edge effects out of the window (the
    piece reaches the recording's own ends where the window is near them, as whole decoding
    does)."""
    g = math.gcd(rate, target)
    p, q = rate // g, target // g
    margin = max(2048, rate // 10)
    first = max(0, start * rate // target - margin) // p * p
    stop = min(frames, -(-(start + n) * rate // target) + margin)
    return first, stop, start - first // p * q


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


def _check_rate(rate: int, name: str) -> None:
    if rate < MIN_SAMPLE_RATE:
        raise BadSampleError(name, "bad-rate", f"sample rate {rate} Hz: audio is recorded at "
                             f"{MIN_SAMPLE_RATE} Hz or more (a damaged header, or the wrong rate given?)")


def _finish(wave: np.ndarray, rate: int, sample_rate: int, name: str) -> np.ndarray:
    _check_rate(rate, name)
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
        wave = wave.detach().cpu()
        if wave.is_floating_point() and wave.element_size() == 2:
            wave = wave.float()  # bfloat16 has no numpy dtype (float16 would do; one rule for both)
        wave = wave.numpy()
    original = np.asarray(wave)
    wave = _to_float(original)
    if wave.ndim == 1 and np.shares_memory(wave, original):
        wave = wave.copy()  # the caller keeps (and may reuse or have frozen) its array
    elif wave.ndim == 2 and wave.size == 0:
        wave = np.zeros(0, np.float32)  # no frames: reported as zero-length below
    elif wave.ndim == 2:
        # [channels, T] (torch's layout) or [T, channels] (soundfile's): channels are the short
        # axis. Two long axes are not a waveform, and guessing would embed garbage silently.
        channels_axis = 0 if wave.shape[0] <= wave.shape[1] else 1
        if wave.shape[channels_axis] > MAX_CHANNELS:
            raise BadSampleError(
                name, "bad-shape", f"a 2-D waveform is [channels, T] or [T, channels] with at most "
                f"{MAX_CHANNELS} channels; got shape {wave.shape}"
            )
        if wave.shape[channels_axis] > SURROUND_CHANNELS:
            # More channels than surround sound has: perhaps a batch of clips given as one item.
            warnings.warn(f"{name}: averaging {wave.shape[channels_axis]} channels of a waveform of shape "
                          f"{wave.shape} into one clip; to embed several clips, pass each as its own item",
                          stacklevel=2)
        wave = wave.mean(axis=channels_axis, dtype=np.float32)
    elif wave.ndim != 1:
        raise BadSampleError(
            name, "bad-shape", f"expected a [T], [channels, T] or [T, channels] waveform, got shape {wave.shape}"
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


# File descriptor 2 is the process's: threads that quiet it share one redirection (the first
# in saves and redirects it, the last out restores it). Each saving and restoring on its own,
# a thread could save the /dev/null another had put there and restore that, for good.
_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_saved: int | None = None


@contextlib.contextmanager
def _quiet_c_stderr(quiet: bool):
    """Send what C libraries write to file descriptor 2 to /dev/null while the block runs."""
    global _quiet_users, _quiet_saved
    if not quiet:
        yield
        return
    with _quiet_lock:
        if _quiet_users == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError):  # no real descriptor 2 (an embedding application)
                saved = None
            if saved is not None:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            _quiet_saved = saved
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0 and _quiet_saved is not None:
                os.dup2(_quiet_saved, 2)
                os.close(_quiet_saved)
                _quiet_saved = None


def load_audio_window(
    item: Any, sample_rate: int, n: int, *, start: Callable[[int], int] | None = None, name: str | None = None
) -> np.ndarray | None:
    """Decode only the part of a file (or bytes) that ``n`` samples at ``sample_rate`` Hz need:
    the window of :func:`load_audio`'s waveform that starts at ``start(length)`` (``length``: the
    whole waveform's samples at ``sample_rate``; called only when it exceeds ``n``; ``None``:
    the window at the start), or the whole waveform when it has ``n`` samples or fewer.

    * Already at ``sample_rate``, in a container that seeks exactly (WAV, FLAC, AIFF, ...): the
      same samples, bit for bit.
    * At another rate: the covering piece (plus a filter margin) is resampled on the same sample
      grid; equal to the whole resampled waveform's window to within float rounding (~1e-7).
    * MP3: its decoder restarts a few frames before the seek point, which is also within float
      rounding of decoding from the start. The window is drawn over the length libsndfile
      reports: exact with a LAME/Xing header (what most encoders write), estimated without.
    * Ogg and other containers that do not seek exactly: only the window at the start
      (``start=None``, what evaluation reads), read without seeking; the same samples as
      decoding from the start.

    Returns ``None`` when the item is not such a file (in-memory waveforms, a ``start`` given
    for an Ogg file, rates whose sample grids meet only every thousand samples or
    more, a file shorter than its header says): decode it whole then. A long recording costs
    the decoding of one clip, not of all of it."""
    src = _file_source(item, name)
    if src is None:
        return None
    source, label = src
    import soundfile as sf

    try:
        with sf.SoundFile(source) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if not f.seekable() or frames <= 0 or rate <= 0:
                return None
            _check_rate(rate, label)
            exact = rate == int(sample_rate)
            if not exact and rate // math.gcd(rate, int(sample_rate)) > _MAX_GRID:
                return None
            length = frames if exact else resampled_length(frames, rate, sample_rate)
            whole = length <= n
            if whole:
                data = f.read(dtype="float32", always_2d=True)
            else:
                # A window at the start is read without seeking, which is exact in any container
                # (Ogg too); a window elsewhere only where seeking is (checked before ``start``
                # makes its draw, which whole decoding makes again).
                if f.format not in _WINDOWED and start is not None:
                    return None
                s = 0 if start is None else start(length)
                first, stop, offset = (s, s + n, 0) if exact else _window_span(s, n, frames, rate, int(sample_rate))
                # mpg123 restarts a few frames before an MP3 seek point and prints "error:
                # part2_3_length ... too large" for each frame whose bit reservoir it lacks; those
                # frames are discarded (the window equals whole decoding), so the lines only alarm.
                with _quiet_c_stderr(f.format == "MP3" and first > 0):
                    f.seek(first)
                    data = f.read(stop - first, dtype="float32", always_2d=True)
                if data.shape[0] != stop - first:  # a header that promises more than the file holds
                    return None
    except BadSampleError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as e:
        raise BadSampleError(label, "undecodable", f"cannot decode audio: {e}") from None
    # Outside the try: its checks raise their own reasons (silent, non-finite), not "undecodable".
    wave = _finish(_downmix(data), rate, sample_rate, label)
    if whole:
        return wave
    wave = wave[offset : offset + n]
    return wave if wave.shape[0] == n else None


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
    ``"silent-zero-length"``, ``"non-finite"``, ``"bad-shape"`` or ``"bad-rate"`` (below
    :data:`MIN_SAMPLE_RATE`), naming the sample.
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
                f"{tuple(item.shape)}; pass (waveform, sample_rate) for [channels, T] audio (its channels are "
                "averaged into one clip), or list(arr) for a batch of clips",
            )
        return _from_array(item, sample_rate, sample_rate, name or "<array>")
    raise TypeError(
        "audio items are paths, bytes, (waveform, sample_rate) pairs or 1-D arrays; "
        f"got {type(item).__name__}"
    )
