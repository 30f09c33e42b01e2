"""Images in memory and on disk of any bit depth become the RGB images the encoders take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from geobind.data.errors import BadSampleError
from geobind.data.media import array_to_rgb, load_image, stretch_bands


def _rgb(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_deep_images_are_brought_to_8_bits_not_clipped():
    rng = np.random.default_rng(0)
    grey16 = rng.integers(200, 4000, (24, 24)).astype(np.uint16)  # 12-bit data in 16 bits
    want = np.repeat(stretch_bands(grey16[None].astype(np.float32), np.ones((1, 24, 24), bool))[0][..., None], 3, -1)
    for item in (grey16, Image.fromarray(grey16), Image.fromarray(grey16.astype(np.int32)),
                 Image.fromarray(grey16.astype(np.float32))):
        got = _rgb(load_image(item))
        np.testing.assert_array_equal(got, want)
        assert 40 < got.mean() < 215  # neither white nor black
    # Floats in [0, 1] are scaled by 255, as image libraries store them.
    unit = rng.random((8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(_rgb(load_image(unit)), np.round(unit * 255))
    np.testing.assert_array_equal(_rgb(load_image(Image.fromarray(unit[..., 0]))), np.round(unit[..., :1] * 255).repeat(3, -1))
    # ... also when resampling overshoots them a little (clipped), not read as 8-bit values or
    # stretched; a float image reaching 1.5 (reflectances) is stretched, not read as 8-bit.
    over = unit.copy()
    over[0, 0, 0], over[1, 1, 1] = 1.0001, -1e-6
    np.testing.assert_array_equal(_rgb(load_image(over)), np.round(np.clip(over, 0, 1) * 255))
    bright = unit * 1.5
    np.testing.assert_array_equal(_rgb(load_image(bright)),
                                  stretch_bands(bright.transpose(2, 0, 1), np.ones((3, 8, 8), bool)).transpose(1, 2, 0))
    # 8-bit values in wider types (np.asarray(img, float), an int64 array) are taken as they are.
    tinted = np.stack([np.full((8, 8), 203), rng.integers(100, 180, (8, 8)), np.full((8, 8), 30)], -1)
    for dtype in (np.int64, np.float64, np.float32, np.uint16):
        np.testing.assert_array_equal(_rgb(load_image(tinted.astype(dtype))), tinted)
    # uint8 as is (alpha dropped), booleans black and white.
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    np.testing.assert_array_equal(_rgb(load_image(rgba)), rgba[..., :3])
    np.testing.assert_array_equal(_rgb(array_to_rgb(np.eye(4, dtype=bool)))[..., 0], np.eye(4) * 255)
    # No data (NaN) is black; the rest is stretched over the valid values.
    holes = rng.random((8, 8, 3)).astype(np.float32) * 5000
    holes[0, 0] = np.nan
    assert (_rgb(load_image(holes))[0, 0] == 0).all()


def test_a_16_bit_png_file_reads_like_the_array(tmp_path):
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 60000, (16, 16)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(_rgb(load_image(str(tmp_path / "g16.png"))), _rgb(array_to_rgb(grey16)))


def test_unreadable_items_say_what_an_image_is():
    with pytest.raises(BadSampleError, match=r"HxWx3 numpy array \(for a CxHxW tensor: t.permute"):
        load_image(torch.zeros(3, 8, 8))
    with pytest.raises(BadSampleError, match="got shape"):
        load_image(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(BadSampleError, match="no finite values"):
        load_image(np.full((4, 4, 3), np.nan, np.float32))


def test_a_thin_strip_is_resized_from_its_centre_box_only(monkeypatch):
    """A 1 x 300,000 pixel strip is brought to the encoder's square without the 64 x 19 million
    intermediate image; at a ratio just above the limit the box path gives the exact path's
    pixels to within bicubic rounding at the box edges, and at the limit the exact path runs."""
    from geobind.encoders import images

    strip = Image.new("RGB", (1, 300_000), (10, 200, 30))
    real_resize = Image.Image.resize

    def resize(self, size, *a, **kw):
        assert size[0] * size[1] <= 64 * 64 * images.MAX_EXACT_ASPECT, size
        return real_resize(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", resize)
    out = images.resize_center_crop(strip, 64)
    assert out.size == (64, 64) and out.getpixel((5, 5)) == (10, 200, 30)
    monkeypatch.undo()
    # A smooth gradient image 20 times as tall as wide: box path against resize-then-crop.
    y, x = np.mgrid[0:1000, 0:50]
    arr = np.stack([y * 255 // 999, x * 5, (x + y) % 256], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    got = np.asarray(images.resize_center_crop(img, 32), dtype=int)
    nh = int(32 * 1000 / 50)
    top = (nh - 32) // 2
    ref = np.asarray(img.resize((32, nh), Image.BICUBIC).crop((0, top, 32, top + 32)), dtype=int)
    assert np.abs(got - ref).max() <= 3 and np.abs(got - ref).mean() < 0.5
    at_limit = Image.fromarray(arr[:800])  # 16 x 50 = 800: the exact path
    nh = int(32 * 800 / 50)
    top = (nh - 32) // 2
    ref = np.asarray(at_limit.resize((32, nh), Image.BICUBIC).crop((0, top, 32, top + 32)))
    assert np.array_equal(np.asarray(images.resize_center_crop(at_limit, 32)), ref)


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """A phone photo stored sideways with an orientation tag is embedded as every viewer shows
    it; a photo without the tag is read as stored."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # white on the left of the stored pixels
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img.save(tmp_path / "plain.jpg", quality=95)
    upright = np.asarray(load_image(tmp_path / "phone.jpg"))
    assert upright.shape == (40, 20, 3)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the left side now on top
    assert np.asarray(load_image(tmp_path / "plain.jpg")).shape == (20, 40, 3)
    # Image.open keeps the tag: the PIL image is read upright too, and once turned, not again.
    from PIL import ImageOps

    opened = Image.open(tmp_path / "phone.jpg")
    np.testing.assert_array_equal(np.asarray(load_image(opened)), upright)
    np.testing.assert_array_equal(np.asarray(load_image(ImageOps.exif_transpose(opened))), upright)


def test_in_memory_waveforms_in_bfloat16_and_many_channel_arrays():
    """A bfloat16 tensor reads as its float32 values; more channels than surround sound are
    averaged with a warning (more likely a batch of clips passed as one item)."""
    from geobind.data.audio_io import load_audio

    wave = torch.sin(torch.linspace(0, 400, 16000)).to(torch.bfloat16)
    np.testing.assert_array_equal(load_audio((wave, 16000), 16000), load_audio((wave.float(), 16000), 16000))
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16000)).astype(np.float32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio((stereo, 16000), 16000)  # no warning for stereo
    batch = np.random.default_rng(0).uniform(-0.5, 0.5, (16, 16000)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"averaging 16 channels .* pass each as its own item"):
        load_audio((batch, 16000), 16000)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with blocky texture: a JPEG-friendly stand-in for a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.sin(x / 40.0) * 60 + np.cos(y / 27.0) * 50 + 128
    noise = np.kron(rng.normal(0, 12, (h // 8 + 1, w // 8 + 1)), np.ones((8, 8)))[:h, :w]
    return np.clip(np.stack([base + noise, base * 0.8 + noise, 255 - base + noise], -1), 0, 255).astype(np.uint8)


def test_min_side_decodes_a_large_jpeg_at_a_reduced_scale_that_keeps_both_sides(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(_photo(900, 1200)).save(path, quality=90)
    assert load_image(path).size == (1200, 900)
    assert load_image(path, min_side=128).size == (300, 225)  # 1/4: 1/8 would leave 112 rows
    assert load_image(path, min_side=225).size == (300, 225)
    assert load_image(path, min_side=226).size == (600, 450)
    assert load_image(path.read_bytes(), min_side=128).size == (300, 225)
    # Other formats decode at full size whatever min_side says.
    Image.fromarray(_photo(300, 400)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", min_side=32).size == (400, 300)


def _write_png16(path, arr: np.ndarray) -> None:
    """A 16-bit grey or RGB PNG written by hand (PIL writes 16-bit PNGs in grey only)."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_a_16_bit_colour_png_is_read_at_its_full_depth(tmp_path):
    """PIL reads a 16-bit RGB PNG from each sample's high byte: 12-bit data in 16 bits would come
    out nearly black. It is stretched as 16-bit arrays and grey 16-bit PNGs are."""
    rng = np.random.default_rng(0)
    rgb = (np.array([3000, 1500, 500]) + rng.integers(0, 800, (24, 24, 3))).astype(np.uint16)
    _write_png16(tmp_path / "rgb16.png", rgb)
    got = _rgb(load_image(tmp_path / "rgb16.png"))
    np.testing.assert_array_equal(got, _rgb(array_to_rgb(rgb)))
    assert got.mean() > 60  # not the high bytes (0..14)
    _write_png16(tmp_path / "grey16.png", rgb[..., 0])
    np.testing.assert_array_equal(_rgb(load_image(tmp_path / "grey16.png")), _rgb(array_to_rgb(rgb[..., 0])))
