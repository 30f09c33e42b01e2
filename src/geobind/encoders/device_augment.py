"""The overhead training augmentation applied to whole batches on the model's device.

:class:`~geobind.encoders.images.ImageTransform` in ``augment_on="device"`` mode draws each tile's
random parameters in the loader (under the trainer's per-sample seed, so runs stay reproducible
and resumable) and hands over uint8 pixels plus one parameter row per tile:

``aug[:, 0:4]``  crop box ``x0, y0, x1, y1`` as fractions of the loaded image's width and height;
``aug[:, 4]``    1 for a left-right flip, else 0;
``aug[:, 5]``    quarter turns counter-clockwise, 0-3 (after the flip, as PIL's path does);
``aug[:, 6:8]``  brightness and contrast factors.

:func:`apply_overhead_augment` folds crop, flip and rotation into one affine sampling grid per tile
and resamples the batch with a single bicubic ``grid_sample``, then applies brightness and
contrast the way PIL's ``ImageEnhance`` does, and normalises. On the same loaded tile it differs
from the PIL path only in resampling detail: ``grid_sample``'s bicubic kernel (a = -0.75, no
antialiasing) instead of PIL's (a = -0.5, antialiased when shrinking), and no rounding to 8 bits
between steps (nor of the grey mean that contrast blends with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

AUG_PARAMS = 8
# ITU-R 601 luma, as PIL's convert("L") computes the grey image that Contrast blends with.
_LUMA = (0.299, 0.587, 0.114)
# cos and sin of k quarter turns, exact.
_COS = (1.0, 0.0, -1.0, 0.0)
_SIN = (0.0, 1.0, 0.0, -1.0)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device``, made once: a fresh one every step would copy from
    pageable memory, which makes the host wait for all the work queued on the GPU. (Inside a
    compiled graph it is a constant of the graph anyway.)"""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def _normalize_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, in place, for float ``[B, 3, H, W]`` pixels in [0, 1]."""
    m = _constant(tuple(float(v) for v in mean), x.device, torch.float32)[None, :, None, None]
    s = _constant(tuple(float(v) for v in std), x.device, torch.float32)[None, :, None, None]
    return x.sub_(m).div_(s)


def overhead_grid_theta(aug: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 3]`` affine matrices for ``F.affine_grid`` (normalised coordinates,
    ``align_corners=False``) that map output pixels to the crop box, flipped and turned."""
    x0, y0, x1, y1, flip, k = aug[:, :6].unbind(1)
    k = k.round().long() % 4
    cos = _constant(_COS, aug.device, aug.dtype)[k]
    sin = _constant(_SIN, aug.device, aug.dtype)[k]
    # Output (u, v) reads the flipped crop at M^k (u, v), M = [[0, -1], [1, 0]]: k quarter turns
    # counter-clockwise, as torch.rot90(dims=(-2, -1)) and PIL's ROTATE_90 turn an image.
    m = 1.0 - 2.0 * flip  # -1 mirrors u
    sx, sy = x1 - x0, y1 - y0
    theta = torch.stack(
        [
            torch.stack([sx * m * cos, -sx * m * sin, x0 + x1 - 1.0], dim=1),
            torch.stack([sy * sin, sy * cos, y0 + y1 - 1.0], dim=1),
        ],
        dim=1,
    )
    return theta


def apply_overhead_augment(
    pixels: torch.Tensor,
    aug: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 ``[B, 3, L, L]`` tiles and their ``[B, 8]`` parameters -> normalised float32
    ``[B, 3, size, size]``, computed on ``pixels``' device (outside autocast, without gradients)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    if aug.shape != (pixels.shape[0], AUG_PARAMS):
        raise ValueError(f"aug must be [{pixels.shape[0]}, {AUG_PARAMS}], got {tuple(aug.shape)}")
    dev = pixels.device
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        aug = aug.to(dev, torch.float32)
        x = pixels.to(torch.float32).div_(255.0)
        theta = overhead_grid_theta(aug)
        grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
        x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL's result is 8-bit
        x = x.mul_(aug[:, 6, None, None, None]).clamp_(0.0, 1.0)
        luma = _constant(_LUMA, dev, torch.float32)
        grey = torch.einsum("bchw,c->b", x, luma) / (size * size)
        g = grey[:, None, None, None]
        x = x.sub_(g).mul_(aug[:, 7, None, None, None]).add_(g).clamp_(0.0, 1.0)
        return _normalize_(x, mean, std)


def resize_normalize(pixels: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[B, 3, L, L]`` tiles -> normalised float32 ``[B, 3, size, size]``: the evaluation
    transform on the model's device (bicubic with antialiasing, like PIL's resize)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    dev = pixels.device
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        x = pixels.to(torch.float32).div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp_(0.0, 1.0)
        return _normalize_(x, mean, std)


def model_input(batch, transform, device: torch.device) -> torch.Tensor:
    """An image encoder's batch on ``device`` as normalised pixels: a float tensor as is, or the
    uint8 dict of device-side preprocessing (training augmentation when it carries ``aug``)."""
    if not isinstance(batch, dict):
        return batch.to(device, non_blocking=True)
    pixels = batch["pixels"].to(device, non_blocking=True)
    if "aug" in batch:
        return apply_overhead_augment(pixels, batch["aug"].to(device, non_blocking=True), transform.size,
                                      transform.mean, transform.std)
    return resize_normalize(pixels, transform.size, transform.mean, transform.std)
