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

    A ``.tif``/``.tiff`` path is read with rasterio when it is installed (``geobind[geo]``): the
    first three bands, 8-bit data as is, 16-bit or float data stretched per tile between its 2nd
    and 98th percentile (the ``geotiff`` layout's defaults; that layout also takes band and
    scale options). Without rasterio, PIL reads 8-bit TIFFs; a 16-bit or float one raises an
    error saying to install it, rather than being clipped to white.
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
    if path.suffix.lower() in (".tif", ".tiff") and _have_rasterio():
        from geobind.data.layouts import read_raster_rgb

        return Image.fromarray(read_raster_rgb(str(path)))
    with open(path, "rb") as f:
        return _decode(io.BytesIO(f.read()), str(path))


def _have_rasterio() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def _decode(buf: io.BytesIO, name: str) -> Image.Image:
    try:
        img = Image.open(buf)
        # load() forces the full decode so truncated files fail here, not later in a worker.
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(name, "undecodable", f"cannot decode image ({e})") from None
    if img.mode not in _EIGHT_BIT_MODES:
        # convert("RGB") would clip 16-bit or float samples to white.
        raise BadSampleError(
            name, "undecodable",
            f"{img.mode} image (more than 8 bits per sample): install rasterio "
            "(pip install 'geobind[geo]') to read it, or use the geotiff layout",
        )
    return img.convert("RGB")


_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
