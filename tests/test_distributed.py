"""Gathered contrastive loss under 2-process gloo DDP equals the single-process global loss.

One spawn runs every check, to pay the process start-up once. Float64 throughout so the
comparison can be tight: any scheme error (a missing factor of the world size, a wrong label
offset, a missing cross-rank gradient) shows up far above 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_helpers import free_port, rank_env, spawn_with_deadline
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from geobind import distributed as gbdist
from geobind.losses import LogitScale, contrastive_loss

WORLD = 2
D_IN, D = 6, 4
RTOL, ATOL = 1e-10, 1e-12


class Towers(nn.Module):
    """Two tiny trainable encoders and the logit scale, like a stage with both sides learnable."""

    def __init__(self) -> None:
        super().__init__()
        self.fx = nn.Linear(D_IN, D)
        self.fy = nn.Linear(D_IN, D)
        self.scale = LogitScale()

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return F.normalize(self.fx(a), dim=1), F.normalize(self.fy(b), dim=1), self.scale()


def _check_gather(r: int, sizes: list[int]) -> None:
    torch.manual_seed(123)
    w = torch.randn(sum(sizes), 3, dtype=torch.float64)
    start = sum(sizes[:r])
    x = (torch.arange(sizes[r] * 3, dtype=torch.float64).reshape(-1, 3) + 100 * r).requires_grad_()
    g = gbdist.all_gather_with_grad(x)
    expected = torch.cat(
        [
            torch.arange(n * 3, dtype=torch.float64).reshape(-1, 3) + 100 * s
            for s, n in enumerate(sizes)
        ]
    )
    assert torch.equal(g.detach(), expected)
    assert torch.equal(gbdist.all_gather_no_grad(x), expected)
    # Rank s weights the gathered rows by (s + 1); rank r's slice must receive the sum over s.
    ((r + 1) * (g * w).sum()).backward()
    factor = sum(s + 1 for s in range(WORLD))
    torch.testing.assert_close(x.grad, factor * w[start : start + sizes[r]], rtol=0, atol=0)


def _check_loss(r: int, sizes: list[int], symmetric: bool, use_queue: bool, frozen_y: bool) -> None:
    torch.manual_seed(0)
    n = sum(sizes)
    ref_model = Towers().double()
    a = torch.randn(n, D_IN, dtype=torch.float64)
    b = torch.randn(n, D_IN, dtype=torch.float64)
    queue = F.normalize(torch.randn(5, D, dtype=torch.float64), dim=1) if use_queue else None
    mask = torch.rand(n, 5) < 0.3 if use_queue else None
    with torch.no_grad():
        ref_model.scale.log_scale.fill_(1.7)  # away from the clamp bounds so its grad is nonzero
    if frozen_y:
        ref_model.fy.requires_grad_(False)
    model = copy.deepcopy(ref_model)

    # Single-process reference on the global batch.
    x, y, s = ref_model(a, b)
    ref_loss = contrastive_loss(x, y, s, symmetric, queue=queue, queue_mask=mask, gather=False)
    ref_loss.backward()

    # DDP: each rank its slice of the global batch.
    start, stop = sum(sizes[:r]), sum(sizes[: r + 1])
    ddp = DDP(model)
    x, y, s = ddp(a[start:stop], b[start:stop])
    loss = contrastive_loss(
        x, y, s, symmetric, queue=queue, queue_mask=None if mask is None else mask[start:stop]
    )
    loss.backward()

    case = f"rank={r} sizes={sizes} symmetric={symmetric} queue={use_queue} frozen_y={frozen_y}"
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=RTOL, atol=ATOL, msg=case)
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        if not p_ref.requires_grad:
            assert p.grad is None
            continue
        assert p.grad is not None, f"{case}: no grad for {name}"
        torch.testing.assert_close(
            p.grad, p_ref.grad, rtol=RTOL, atol=ATOL, msg=lambda m, nm=name: f"{case} {nm}: {m}"
        )


def _worker(r: int, port: int) -> None:
    rank_env(r, port, WORLD)
    info = gbdist.init_distributed(backend="gloo")
    try:
        assert info.distributed and info.rank == r and info.world_size == WORLD
        assert gbdist.rank() == r and gbdist.world_size() == WORLD
        assert gbdist.is_main() == (r == 0)
        assert gbdist.broadcast_object({"seed": 7} if r == 0 else None) == {"seed": 7}
        gbdist.barrier()

        _check_gather(r, [3, 3])
        _check_gather(r, [2, 5])  # uneven last batches
        for sizes in ([4, 4], [3, 5]):
            for symmetric in (True, False):
                _check_loss(r, sizes, symmetric, use_queue=False, frozen_y=False)
        _check_loss(r, [4, 4], symmetric=False, use_queue=True, frozen_y=True)
        _check_loss(r, [3, 5], symmetric=True, use_queue=True, frozen_y=False)
    finally:
        gbdist.cleanup()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_gathered_loss_equals_global_single_process():
    # A deadline: ranks that disagree on a collective would otherwise wait for each other forever.
    spawn_with_deadline(_worker, (free_port(),), WORLD, seconds=180)


def test_helpers_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = gbdist.init_distributed()
    assert not info.distributed and info.rank == 0 and info.world_size == 1 and info.is_main
    x = torch.randn(3, 2, requires_grad=True)
    assert gbdist.all_gather_with_grad(x) is x
    assert torch.equal(gbdist.all_gather_no_grad(x), x)
    assert gbdist.broadcast_object("a") == "a"
    gbdist.barrier()
    gbdist.cleanup()


def _check_blocks(r: int) -> None:
    # Uneven blocks, an empty one, and a buffer of two rows per rank: several rounds, padded.
    n, width = 11, 3
    full = torch.arange(n * width, dtype=torch.float16).reshape(n, width) / 7
    mask = torch.arange(n) % 3 == 0
    for bounds in ([0, 4, 11], [0, 0, 11], [0, 11, 11], [0, 5, 6]):
        for max_bytes in (1, 2 * WORLD * width * 2, 1 << 20):
            out = torch.zeros_like(full)
            out[bounds[r] : bounds[r + 1]] = full[bounds[r] : bounds[r + 1]]
            assert gbdist.all_gather_blocks(out, bounds, max_bytes=max_bytes) is out
            case = f"bounds={bounds} max_bytes={max_bytes}"
            assert torch.equal(out[: bounds[-1]], full[: bounds[-1]]), case
            assert not out[bounds[-1] :].any(), case  # rows past the last bound are untouched
            m = torch.zeros(n, dtype=torch.uint8)
            m[bounds[r] : bounds[r + 1]] = mask[bounds[r] : bounds[r + 1]].to(torch.uint8)
            gbdist.all_gather_blocks(m, bounds, max_bytes=max_bytes)
            assert torch.equal(m[: bounds[-1]].bool(), mask[: bounds[-1]]), case
    with pytest.raises(ValueError, match="do not split"):
        gbdist.all_gather_blocks(torch.zeros(4, 2), [0, 3, 2])


def _blocks_worker(r: int, port: int) -> None:
    rank_env(r, port, WORLD)
    gbdist.init_distributed(backend="gloo")
    try:
        assert gbdist.comm_device() == torch.device("cpu")  # gloo
        assert gbdist.all_gather_object({"rank": r}) == [{"rank": s} for s in range(WORLD)]
        assert gbdist.all_reduce_min_int(10 - r) == 10 - (WORLD - 1)
        assert gbdist.all_gather_ints([r, 10 * r]) == [[s, 10 * s] for s in range(WORLD)]
        _check_blocks(r)
    finally:
        gbdist.cleanup()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_all_gather_blocks_fills_every_rank():
    spawn_with_deadline(_blocks_worker, (free_port(),), WORLD, seconds=180)


def test_block_helpers_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    gbdist.init_distributed()
    x = torch.randn(4, 2)
    assert gbdist.all_gather_blocks(x, [0, 4]) is x
    assert gbdist.all_gather_object("a") == ["a"]
    assert gbdist.all_reduce_min_int(7) == 7
    assert gbdist.all_gather_ints([3, 4]) == [[3, 4]]
    assert gbdist.comm_device() == torch.device("cpu")
