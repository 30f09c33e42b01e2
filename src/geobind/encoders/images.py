"""Image preprocessing in PIL + torch (no torchvision): CLIP-style resize/crop/normalise and
the training augmentation used for overhead tiles (applied here with PIL, or only drawn here and
applied in batches on the model's device by :mod:`geobind.encoders.device_augment`)."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from geobind.data.media import load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Overhead statistics used by Sat2Cap for satellite tiles.
SATELLITE_MEAN = (0.3670, 0.3827, 0.3338)
SATELLITE_STD = (0.2209, 0.1975, 0.1988)


def _to_uint8(img: Image.Image) -> torch.Tensor:
    """A ``[3, H, W]`` uint8 view of an RGB image's ``[H, W, 3]`` pixels (no transpose copied on
    the CPU: :func:`collate_images` stacks them as stored)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


# Above this ratio of long to short side, resize_center_crop resizes only the centre square's
# source box: a 1 x 300,000 pixel strip (a 1 KB PNG) would otherwise become a 224 x 67 million
# pixel intermediate image (45 GB).
MAX_EXACT_ASPECT = 16


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's evaluation transform: shortest side to ``size`` (bicubic), then a centre crop.
    The long side is ``int(size * long / short)``, as in the torchvision ``Resize`` CLIP was
    trained with and in transformers' ``CLIPImageProcessor``.

    An image more than :data:`MAX_EXACT_ASPECT` times as long as it is wide has only the box
    that becomes the centre square resized (the same geometry; the bicubic weights at the
    box's edges differ by rounding), so that a thin strip never becomes a huge image."""
    w, h = img.size
    if (w, h) != (size, size):
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        left, top = (nw - size) // 2, (nh - size) // 2
        if max(w, h) > MAX_EXACT_ASPECT * min(w, h):
            sx, sy = w / nw, h / nh
            box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
            return img.resize((size, size), Image.BICUBIC, box=box)
        img = img.resize((nw, nh), Image.BICUBIC)
        img = img.crop((left, top, left + size, top + size))
    return img


def random_crop_box(
    w: int, h: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int] | None:
    """RandomResizedCrop's box ``(left, top, width, height)`` in pixels of a ``w`` x ``h`` image,
    drawn with :mod:`random`; ``None`` when ten tries find no box that fits."""
    area = w * h
    for _ in range(10):
        target = area * random.uniform(*scale)
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        aspect = math.exp(random.uniform(*log_r))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left = random.randint(0, w - cw)
            top = random.randint(0, h - ch)
            return left, top, cw, ch
    return None


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Image.Image:
    """RandomResizedCrop (bicubic) of ``scale`` of the area; Sat2Cap's overhead augmentation
    also starts with a RandomResizedCrop (followed by RandAugment, which geobind does not use)."""
    box = random_crop_box(*img.size, scale, ratio)
    if box is None:
        return resize_center_crop(img, size)
    left, top, cw, ch = box
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


def overhead_params() -> tuple[bool, int, float, float]:
    """``(flip, k, brightness, contrast)`` of :func:`overhead_augment`, drawn with :mod:`random`:
    a left-right flip with probability 1/2, ``k`` quarter turns counter-clockwise (0-3), and
    brightness and contrast factors in [0.8, 1.2]."""
    flip = random.random() < 0.5
    k = random.randint(0, 3)
    return flip, k, random.uniform(0.8, 1.2), random.uniform(0.8, 1.2)


def overhead_augment(img: Image.Image) -> Image.Image:
    """Augmentations that keep an overhead tile plausible: dihedral flips/rotations and mild
    photometric jitter (a light stand-in for RandAugment)."""
    flip, k, brightness, contrast = overhead_params()
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if k:
        img = img.transpose([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270][k - 1])
    img = ImageEnhance.Brightness(img).enhance(brightness)
    img = ImageEnhance.Contrast(img).enhance(contrast)
    return img


AUGMENT_ON = ("loader", "device")


class ImageTransform:
    """Item -> ``{"pixels": uint8 [3, size, size]}``, resized (evaluation) or augmented (training)
    with PIL; the encoder normalises the batch where the model runs
    (:func:`~geobind.encoders.device_augment.model_input`). Handing over uint8 rather than
    normalised float32 moves a quarter of the bytes through loader workers, pinning and the copy
    to a GPU; the floats are the same.

    ``augment_on`` says where the ``overhead`` training augmentation runs. ``"loader"``: in
    :meth:`__call__`, with PIL, one tile at a time. ``"device"``: :meth:`__call__` only decodes,
    resizes to ``load_size`` (default ``round(size * 8 / 7)``, 256 for 224) and draws the random
    parameters (non-square tiles are squashed to the square load size, so crops reach their
    edges as in the loader); it returns ``{"pixels": uint8 [3, load_size, load_size], "aug": float32 [8]}``
    (layout in :mod:`geobind.encoders.device_augment`), and its ``apply_overhead_augment``
    crops, turns, jitters and normalises whole batches where the model runs.
    Evaluation (``train=False``) is the same PIL resize and centre crop in both modes.
    """

    def __init__(self, size: int, mean, std, augment: str = "none", augment_on: str = "loader",
                 load_size: int | None = None):
        if augment not in ("none", "overhead"):
            raise ValueError(f"unknown augment {augment!r}; use 'none' or 'overhead'")
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"unknown augment_on {augment_on!r}; use 'loader' or 'device'")
        self.size = int(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.augment = augment
        self.augment_on = augment_on
        self.load_size = int(load_size) if load_size else round(self.size * 8 / 7)
        if self.load_size < self.size:
            raise ValueError(f"load_size {self.load_size} is smaller than image_size {self.size}")

    @property
    def on_device(self) -> bool:
        """Whether training items leave the loader as uint8 pixels plus augmentation parameters."""
        return self.augment_on == "device" and self.augment == "overhead"

    # Evaluation items leave the loader as uint8 ``load_size`` tiles, resized and normalised where
    # the model runs (set for one embedding run by ``geobind embed --preprocess-on device``; not a
    # setting of the model: the vectors match the PIL path to float and resampling rounding).
    eval_on_device: bool = False

    def __call__(self, item: Any, train: bool = False) -> dict[str, torch.Tensor]:
        img = load_image(item)
        if train and self.on_device:
            return self._device_sample(img)
        if not train and self.eval_on_device:
            return {"pixels": _to_uint8(resize_center_crop(img, self.load_size))}
        if train and self.augment == "overhead":
            img = overhead_augment(random_resized_crop(img, self.size))
        else:
            img = resize_center_crop(img, self.size)
        return {"pixels": _to_uint8(img)}

    def _device_sample(self, img: Image.Image) -> dict[str, torch.Tensor]:
        n = self.load_size
        w, h = img.size
        if w == h:
            img = resize_center_crop(img, n)  # a plain resize
            # Same draws, in the same order, as the loader path on an n x n image.
            w = h = n
            box = random_crop_box(n, n) or (0, 0, n, n)
        else:
            # The loader path crops anywhere in a non-square tile: draw the box on the whole
            # w x h tile as it does, and squash the tile to n x n so the normalised box covers
            # the same ground (the long side keeps n pixels; for strongly elongated tiles raise
            # load_size or augment in the loader).
            box = random_crop_box(w, h)
            if box is None:  # the loader's fallback: the centred square
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, side, side)
            img = img.resize((n, n), Image.BICUBIC)
        left, top, cw, ch = box
        flip, k, brightness, contrast = overhead_params()
        aug = torch.tensor(
            [left / w, top / h, (left + cw) / w, (top + ch) / h, float(flip), float(k), brightness, contrast],
            dtype=torch.float32,
        )
        # The transpose (a third of this method's cost) is left to the device.
        return {"pixels": _to_uint8(img), "aug": aug}

    def settings(self) -> dict[str, Any]:
        """The options that define the transform (saved with the model and part of its identity)."""
        out = {"image_size": self.size, "mean": list(self.mean), "std": list(self.std), "augment": self.augment}
        # Only written when set, so models saved before the option existed keep their settings
        # (and with them the identity that embeddings files and indexes record).
        if self.augment_on != "loader":
            out.update(augment_on=self.augment_on, load_size=self.load_size)
        return out


def collate_images(samples: list[torch.Tensor | dict[str, torch.Tensor]]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Stack :class:`ImageTransform` outputs (dicts) key by key, or ready float tensors. The uint8
    pixels become a ``[B, 3, H, W]`` batch in channels-last memory (one copy of the bytes as
    decoded, no transpose on the CPU)."""
    if isinstance(samples[0], dict):
        pixels = torch.stack([s["pixels"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2)
        if "aug" not in samples[0]:
            return {"pixels": pixels}
        return {"pixels": pixels, "aug": torch.stack([s["aug"] for s in samples])}
    return torch.stack(samples)
