"""Decoding of image files into RGB PIL images, with errors that name the file and the reason."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from geobind.data.errors import BadSampleError


def load_image(item: Any) -> Image.Image:
    """Return ``item`` as an RGB PIL image.

    ``item`` is a path, raw encoded bytes, a PIL image or an ``HxWx3`` uint8 array. A missing,
    empty, truncated or undecodable file raises :class:`BadSampleError` naming it.
    """
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[-1] not in (3, 4):
            raise BadSampleError("<array>", "bad-shape", f"expected HxWx3 array, got {item.shape}")
        return Image.fromarray(np.ascontiguousarray(item[..., :3]).astype(np.uint8))
    if isinstance(item, (bytes, bytearray)):
        return _decode(io.BytesIO(item), "<bytes>")
    path = Path(item)
    if not path.is_file():
        raise BadSampleError(str(path), "missing", "file does not exist")
    if path.stat().st_size == 0:
        raise BadSampleError(str(path), "empty", "file is empty")
    with open(path, "rb") as f:
        return _decode(io.BytesIO(f.read()), str(path))


def _decode(buf: io.BytesIO, name: str) -> Image.Image:
    try:
        img = Image.open(buf)
        # load() forces the full decode so truncated files fail here, not later in a worker.
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(name, "undecodable", f"cannot decode image ({e})") from None
