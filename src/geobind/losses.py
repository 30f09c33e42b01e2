"""Contrastive (InfoNCE) loss, its learnable temperature, and a queue of extra negatives.

Distributed scheme (``gather=True`` under DDP with world size W, rank r holding B_r rows,
global batch N = sum_r B_r):

* x and y are all-gathered with autograd (:func:`geobind.distributed.all_gather_with_grad`),
  so every rank sees all N columns as negatives.
* Rank r computes the cross-entropy only for its own rows against all N columns (memory
  O(B_r x N), not O(N x N)) and normalises by the *global* N: ``L_r = (1/N) sum_{i in r} CE_i``.
  Hence ``sum_r L_r`` is exactly the single-process loss L on the global batch.
* The gather's backward sums the gradient over ranks, so rank r's encoder receives
  ``sum_s dL_s/dx_r = dL/dx_r`` (the other ranks' rows use x_r as columns).
* DDP then *averages* parameter gradients over ranks, dividing by W. To cancel that, the
  gradient path carries ``W * L_r``; the returned *value* is replaced (without touching the
  gradient) by the all-reduced ``sum_r L_r``. Result: every rank reports L, and after DDP
  averaging ``(1/W) sum_r W dL_r/dtheta = dL/dtheta``, the single-process gradient, for the
  encoder parameters and for the logit scale alike.

  If you sum gradients over ranks yourself instead of averaging, divide by W.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geobind import distributed as gbdist

__all__ = ["contrastive_loss", "LogitScale", "EmbeddingQueue"]


def _gather(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    if t.requires_grad:
        return gbdist._AllGatherWithGrad.apply(t, sizes)
    with torch.no_grad():
        return gbdist._gather_padded(t, sizes)


def contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    logit_scale: torch.Tensor | float,
    symmetric: bool = True,
    *,
    queue: torch.Tensor | None = None,
    queue_mask: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """InfoNCE between paired unit vectors; ``x[i]`` matches ``y[i]``.

    One-directional (``symmetric=False``, the paper's form)::

        L = 1/B * sum_i -log( exp(s x_i.y_i) / sum_j exp(s x_i.y_j) )

    Symmetric: the mean of that x->y loss and the same loss with x and y swapped.

    Args:
        x: ``[B, D]`` embeddings of the modality being trained (rows of the x->y direction).
        y: ``[B, D]`` embeddings it binds to (typically the frozen anchor's).
        logit_scale: the multiplier s = 1/temperature (e.g. ``LogitScale()()`` ~ 14.29).
        symmetric: average the x->y and y->x directions.
        queue: ``[Q, D]`` extra negatives (past anchor embeddings), appended as extra columns
            in the x->y direction only; the same on every rank.
        queue_mask: ``[B, Q]`` bool, True where a queue entry must not count as a negative for
            that (local) row, e.g. the row's own anchor from an earlier step.
        gather: under ``torch.distributed`` with world size > 1, use the global batch as
            negatives (see the module docstring for the exact gradient scheme). Ignored when not
            distributed.

    Returns:
        Scalar loss, computed in float32 (float64 if an input is float64), also under autocast. Distributed: its value is the global-batch loss on
        every rank, and DDP-averaged gradients equal the single-process global-batch gradients.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"contrastive_loss takes torch tensors, got {type(x).__name__} and {type(y).__name__} "
                        "(numpy arrays: torch.from_numpy(a))")
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [B, D]; got {tuple(x.shape)} and {tuple(y.shape)}")
    b = x.shape[0]
    # Logits in at least float32: at scale 100 half precision loses the differences that matter.
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    xf, yf = x.to(dtype), y.to(dtype)
    scale = torch.as_tensor(logit_scale, device=x.device).to(dtype)

    distributed = gather and gbdist.is_distributed()
    if b == 0 and not distributed:  # a mean over no pairs is NaN, which would train silently on nothing
        raise ValueError("contrastive_loss needs at least one pair; got an empty batch")
    if distributed:
        world = gbdist.world_size()
        sizes = gbdist._gather_sizes(x)
        offset = sum(sizes[: gbdist.rank()])
        n_total = sum(sizes)
        x_all, y_all = _gather(xf, sizes), _gather(yf, sizes)
    else:
        world, offset, n_total = 1, 0, b
        x_all, y_all = xf, yf
    labels = torch.arange(offset, offset + b, device=x.device)

    # A training step runs under bf16 autocast, which would compute these products in bf16
    # (logits off by up to 0.5 at scale 100) whatever the inputs' dtype: turn it off here.
    with _autocast_off(x.device):
        logits_xy = scale * (xf @ y_all.T)
        if queue is not None:
            logits_q = scale * (xf @ queue.to(device=x.device, dtype=dtype).T)
            if queue_mask is not None:
                if queue_mask.shape != logits_q.shape:
                    raise ValueError(
                        f"queue_mask must be [B, Q] = {tuple(logits_q.shape)}; "
                        f"got {tuple(queue_mask.shape)}"
                    )
                logits_q = logits_q.masked_fill(queue_mask.to(x.device, torch.bool), float("-inf"))
            logits_xy = torch.cat([logits_xy, logits_q], dim=1)
        # Sums normalised by the global batch size, so per-rank losses add up to the global loss.
        loss = F.cross_entropy(logits_xy, labels, reduction="sum") / n_total
        if symmetric:
            logits_yx = scale * (yf @ x_all.T)
            loss = 0.5 * (loss + F.cross_entropy(logits_yx, labels, reduction="sum") / n_total)

    if not distributed:
        return loss
    scaled = loss * world
    return scaled - scaled.detach() + gbdist.all_reduce_sum(loss)


def _autocast_off(device: torch.device):
    """A context with autocast disabled for ``device``'s type (CUDA and CPU have autocast)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class LogitScale(nn.Module):
    """Learnable logit scale s = exp(p) = 1/temperature, kept within ``[min_scale, max_scale]``.

    Initialised from temperature 0.07 (s ~ 14.29) and capped at 100 as in CLIP, Sat2Cap and
    GeoCLAP; the floor is Sat2Cap's (s >= 1; GeoCLAP clamps the log-scale to [1, ln 100], s >= e). ``forward()`` clamps the returned scale; :meth:`clamp_` also clamps the parameter in
    place, to be called after each optimiser step so the parameter cannot drift past ln(100)
    (where the clamp in ``forward`` would stop all gradient and leave it stuck).
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable: bool = True,
        max_scale: float = 100.0,
        min_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not (0 < min_scale <= max_scale):
            raise ValueError(f"need 0 < min_scale <= max_scale; got {min_scale}, {max_scale}")
        self.max_scale = float(max_scale)
        self.min_scale = float(min_scale)
        init = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)

    def forward(self) -> torch.Tensor:
        """The scale s (a scalar tensor), clamped to ``[min_scale, max_scale]``."""
        return self.log_scale.exp().clamp(self.min_scale, self.max_scale)

    @torch.no_grad()
    def clamp_(self) -> LogitScale:
        """Clamp the log-scale parameter in place to ``[ln min_scale, ln max_scale]``."""
        self.log_scale.clamp_(math.log(self.min_scale), math.log(self.max_scale))
        return self

    @property
    def temperature(self) -> float:
        """Current temperature 1/s, for logging."""
        return 1.0 / float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"scale={float(self.forward().detach()):.4g}, range=[{self.min_scale}, {self.max_scale}]"


class EmbeddingQueue(nn.Module):
    """FIFO of past (frozen) anchor embeddings used as extra negatives, MoCo / Sat2Cap style.

    Embeddings and their integer sample keys live in buffers, so the queue is part of the
    ``state_dict`` and a resumed run continues with exactly the same negatives. Call
    :meth:`enqueue` with the *gathered global* batch (after computing the loss) so every rank
    holds an identical queue, as :func:`contrastive_loss` assumes.
    """

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if capacity <= 0:
            raise ValueError(f"capacity must be positive; got {capacity}")
        self.capacity = int(capacity)
        self.register_buffer("embeddings", torch.zeros(capacity, dim, dtype=dtype))
        self.register_buffer("keys", torch.full((capacity,), -1, dtype=torch.long))
        # Next slot to write, and how many slots hold data.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # Host copies of (ptr, count): reading the buffers on a GPU would make the host wait
        # for the device several times a step. Refreshed from the buffers after a state load.
        self._host: list[int] | None = [0, 0]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None

    def _pointers(self) -> list[int]:
        if self._host is None:
            self._host = [int(self.ptr), int(self.count)]
        return self._host

    def __len__(self) -> int:
        return self._pointers()[1]

    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor, keys: torch.Tensor | Sequence[int] | np.ndarray) -> None:
        """Append ``emb`` [n, D] with sample ``keys`` [n], dropping the oldest entries when full."""
        keys = torch.as_tensor(keys, dtype=torch.long, device=self.keys.device).reshape(-1)
        if emb.ndim != 2 or emb.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"emb must be [n, {self.embeddings.shape[1]}]; got {tuple(emb.shape)}")
        if keys.shape[0] != emb.shape[0]:
            raise ValueError(f"{emb.shape[0]} embeddings but {keys.shape[0]} keys")
        emb = emb.detach()
        n = emb.shape[0]
        if n == 0:
            return
        if n > self.capacity:
            emb, keys, n = emb[-self.capacity :], keys[-self.capacity :], self.capacity
        start, count = self._pointers()
        idx = (torch.arange(n, device=self.keys.device) + start) % self.capacity
        self.embeddings[idx] = emb.to(self.embeddings.device, self.embeddings.dtype)
        self.keys[idx] = keys
        self._host = [(start + n) % self.capacity, min(count + n, self.capacity)]
        self.ptr.fill_(self._host[0])
        self.count.fill_(self._host[1])

    def _order(self) -> torch.Tensor:
        ptr, count = self._pointers()
        # Oldest entry sits at ptr once the buffer has wrapped, at 0 before.
        first = (ptr - count) % self.capacity
        return (torch.arange(count, device=self.keys.device) + first) % self.capacity

    def negatives(self) -> torch.Tensor:
        """Current embeddings ``[n, D]``, oldest first."""
        return self.embeddings[self._order()]

    def current_keys(self) -> torch.Tensor:
        """Sample keys ``[n]`` aligned with :meth:`negatives`."""
        return self.keys[self._order()]

    def mask_for(self, keys: torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
        """``[B, n]`` bool: True where a queue entry has the same sample key as row b.

        Pass it as ``queue_mask`` so a sample's own earlier anchor is not a false negative.
        """
        keys = torch.as_tensor(keys, dtype=torch.long, device=self.keys.device).reshape(-1)
        return keys[:, None] == self.current_keys()[None, :]
