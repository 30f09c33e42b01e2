"""Decoding of image files into RGB PIL images, with errors that name the file and the reason."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from geobind.data.errors import BadSampleError


def load_image(item: Any, *, min_side: int = 0) -> Image.Image:
    """Return ``item`` as an RGB PIL image.

    ``item`` is a path, raw encoded bytes, a PIL image or an ``HxWx3`` array. A missing,
    empty, truncated or undecodable file raises :class:`BadSampleError` naming it. Images and
    arrays of more than 8 bits per sample are brought to 8 bits as :func:`array_to_rgb` says.

    A ``.tif``/``.tiff`` path is read with rasterio when it is installed (``geobind[geo]``): the
    first three bands, 8-bit data as is, 16-bit or float data stretched per tile between its 2nd
    and 98th percentile (the defaults of the ``geotiff`` layout and of a manifest's tiles; both
    layouts take ``bands`` and ``scale`` options, which a dataset's table applies before an
    item reaches this function). Without rasterio, PIL reads TIFFs (its grey 16-bit and float
    ones as above).

    ``min_side``: for callers that shrink the image anyway, a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale (in the decoder, several times faster for large photos) as long as both sides stay
    at least ``min_side`` pixels; 0 decodes every image at full size.
    """
    if isinstance(item, Image.Image):
        # Image.open(path) keeps the file's EXIF orientation: upright, as the path itself is read.
        return _to_rgb(_upright(item), "<image>")
    if isinstance(item, np.ndarray):
        return array_to_rgb(item, "<array>")
    if isinstance(item, (bytes, bytearray)):
        return _decode(io.BytesIO(item), "<bytes>", min_side)
    if not isinstance(item, (str, Path)) and not hasattr(item, "__fspath__"):
        hint = ""
        if hasattr(item, "detach"):
            hint = (" (for a batch of NxCxHxW images: list(t.permute(0, 2, 3, 1).cpu().numpy()))"
                    if getattr(item, "ndim", 0) == 4 else " (for a CxHxW tensor: t.permute(1, 2, 0).numpy())")
        raise BadSampleError(f"<{type(item).__name__}>", "bad-type",
                             "an image is a path, encoded bytes, a PIL image or an HxWx3 numpy array" + hint)
    path = Path(item)
    if not path.is_file():
        raise BadSampleError(str(path), "missing", "is a directory, not an image file: pass the files in it "
                             "(sorted(Path(folder).glob('*.png')), say)" if path.is_dir() else "file does not exist")
    if path.stat().st_size == 0:
        raise BadSampleError(str(path), "empty", "file is empty")
    if path.suffix.lower() in (".tif", ".tiff") and _have_rasterio():
        from geobind.data.layouts import read_raster_rgb

        return Image.fromarray(read_raster_rgb(str(path)))
    with open(path, "rb") as f:
        return _decode(io.BytesIO(f.read()), str(path), min_side)


def _have_rasterio() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def _decode(buf: io.BytesIO, name: str, min_side: int = 0) -> Image.Image:
    try:
        img = Image.open(buf)
        if min_side > 0 and img.format == "JPEG":
            img.draft(img.mode, (min_side, min_side))  # a scale whose both sides reach min_side
        if img.format == "PNG" and img.tile and img.tile[0][3] in ("RGB;16B", "RGBA;16B"):
            # PIL reads a 16-bit-per-channel colour PNG as 8-bit RGB from each sample's high
            # byte (a 0..4000 tile becomes 0..15: nearly black). Read its full depth instead.
            return array_to_rgb(_png16(buf, name), name)
        # load() forces the full decode so truncated files fail here, not later in a worker.
        img.load()
        img = _upright(img)
    except UnidentifiedImageError:
        raise BadSampleError(name, "undecodable", "not an image format PIL can read") from None
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise BadSampleError(name, "too-large", f"over {limit:,} pixels, more than PIL decodes; an image this "
                             "large is a scene, not a tile: cut it into tiles, or map it with "
                             "`geobind map --raster`") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadSampleError(name, "undecodable", f"cannot decode image ({e})") from None
    return _to_rgb(img, name)


def _png16(buf: io.BytesIO, name: str) -> np.ndarray:
    """A 16-bit RGB(A) PNG as an ``HxWxC`` uint16 array (GDAL, through rasterio)."""
    if not _have_rasterio():
        raise BadSampleError(name, "undecodable", "a 16-bit colour PNG, which PIL reads only at 8 bits "
                             "(nearly black): pip install 'geobind[geo]' to read it, or save it as a GeoTIFF")
    import warnings

    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.io import MemoryFile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with MemoryFile(buf.getvalue()) as mem, mem.open() as ds:
            return np.moveaxis(ds.read(), 0, -1)


def _upright(img: Image.Image) -> Image.Image:
    # A phone photo is stored sideways with an EXIF orientation tag that every viewer (and the
    # browser the user picked it in) applies: embed it the way it is seen. The turned image
    # drops the tag, so an image already turned is not turned again.
    if img.getexif().get(0x0112, 1) != 1:  # the orientation tag; most images have none
        from PIL import ImageOps

        return ImageOps.exif_transpose(img)
    return img


_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode in _EIGHT_BIT_MODES:
        return img.convert("RGB")
    # 16-bit, 32-bit or float samples: convert("RGB") would clip them to white.
    return array_to_rgb(np.asarray(img), name)


# Float images a little outside [0, 1] (resampling and gain overshoot) are still [0, 1] images.
FLOAT_SLACK = 0.02


def array_to_rgb(arr: np.ndarray, name: str = "<array>") -> Image.Image:
    """An ``HxW``, ``HxWx1``, ``HxWx3`` or ``HxWx4`` array (alpha dropped) as an RGB image.

    uint8 is taken as is, booleans as black and white, floats within ``[0, 1]`` scaled by 255
    (within :data:`FLOAT_SLACK` of it too, clipped: resampling overshoots a little), integers
    within ``[0, 255]`` and floats within it that reach above 2 taken as 8-bit values
    (rounded), and anything else (16-bit or float reflectances, say) stretched per band between
    its 2nd and 98th percentile, as the ``geotiff`` layout does."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        hint = ("; for a batch of N images pass list(arr)" if arr.ndim == 4 and arr.shape[-1] in (1, 3, 4)
                else "; for CxHxW pass arr.transpose(1, 2, 0)" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4)
                else "")
        raise BadSampleError(name, "bad-shape",
                             f"expected an HxW, HxWx3 or HxWx4 image array, got shape {arr.shape}{hint}")
    arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise BadSampleError(name, "bad-type", f"cannot read an array of {arr.dtype} as an image")
    else:
        x = arr.astype(np.float32)
        valid = np.isfinite(x)
        if not valid.any():
            raise BadSampleError(name, "undecodable", "the image has no finite values")
        lo, hi = x[valid].min(), x[valid].max()
        floating = np.issubdtype(arr.dtype, np.floating)
        if floating and lo >= -FLOAT_SLACK and hi <= 1 + FLOAT_SLACK:
            out = np.round(np.clip(np.nan_to_num(x), 0, 1) * 255).astype(np.uint8)
        elif lo >= 0 and hi <= 255 and (not floating or hi > 2):
            # 8-bit values in a wider type (np.asarray(img, float), say); a float image whose
            # values stay below 2 is not one (reflectances up to 1.5, say): it is stretched.
            out = np.round(np.nan_to_num(x)).astype(np.uint8)
        else:
            out = stretch_bands(x.transpose(2, 0, 1), valid.transpose(2, 0, 1)).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(out))


def stretch_bands(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[bands, H, W]`` data as uint8, each band stretched between the 2nd and 98th
    percentile of its ``valid`` values (black to white); the others (no data) are black."""
    out = np.zeros(x.shape, dtype=np.uint8)
    for b in range(x.shape[0]):
        v = x[b][valid[b]]
        lo, hi = np.percentile(v, [2, 98]) if v.size else (0.0, 1.0)
        band = np.where(valid[b], x[b], lo)
        out[b] = np.clip((band - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return out
