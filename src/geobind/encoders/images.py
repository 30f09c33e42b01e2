"""Image preprocessing in PIL + torch (no torchvision): CLIP-style resize/crop/normalise and
the training augmentation used for overhead tiles."""

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


def _to_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP's evaluation transform: shortest side to ``size`` (bicubic), then a centre crop."""
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Image.Image:
    """RandomResizedCrop (bicubic), as in Sat2Cap's overhead augmentation."""
    w, h = img.size
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
            return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return resize_center_crop(img, size)


def overhead_augment(img: Image.Image) -> Image.Image:
    """Augmentations that keep an overhead tile plausible: dihedral flips/rotations and mild
    photometric jitter (a light stand-in for RandAugment)."""
    if random.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    k = random.randint(0, 3)
    if k:
        img = img.transpose([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270][k - 1])
    img = ImageEnhance.Brightness(img).enhance(random.uniform(0.8, 1.2))
    img = ImageEnhance.Contrast(img).enhance(random.uniform(0.8, 1.2))
    return img


class ImageTransform:
    """Item -> normalised ``[3, size, size]`` float tensor; optional training augmentation."""

    def __init__(self, size: int, mean, std, augment: str = "none"):
        if augment not in ("none", "overhead"):
            raise ValueError(f"unknown augment {augment!r}; use 'none' or 'overhead'")
        self.size = int(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.augment = augment

    def __call__(self, item: Any, train: bool = False) -> torch.Tensor:
        img = load_image(item)
        if train and self.augment == "overhead":
            img = overhead_augment(random_resized_crop(img, self.size))
        else:
            img = resize_center_crop(img, self.size)
        return _to_tensor(img, self.mean, self.std)

    def settings(self) -> dict[str, Any]:
        return {"image_size": self.size, "mean": list(self.mean), "std": list(self.std), "augment": self.augment}
