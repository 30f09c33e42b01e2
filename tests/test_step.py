"""One optimisation step (:class:`StepRunner`) and the stage's loss: the temperature is clamped
after the step, the queue is fed the gathered global batch so every rank holds the same
negatives, and the stage's loss is :func:`contrastive_loss` with its queue mask and its
``symmetric`` flag. Tiny linear encoders, so each test takes well under a second (the two-rank
one pays the process start-up)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_helpers import free_port, rank_env, spawn_with_deadline
from torch import nn

from geobind import distributed as gbdist
from geobind.binding.stage import BindingStage
from geobind.binding.step import StepRunner
from geobind.encoders import Encoder, l2_normalize
from geobind.losses import contrastive_loss

D_IN, D = 6, 4


class TinyEncoder(Encoder):
    """A linear layer to unit vectors: inputs are ``[B, D_IN]`` float tensors."""

    def __init__(self, modality: str = "toy") -> None:
        super().__init__(modality, D)
        self.net = nn.Linear(D_IN, D)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.net(batch.to(self.device)))


def _stage(**kw) -> BindingStage:
    torch.manual_seed(0)
    return BindingStage(TinyEncoder("toy"), TinyEncoder("anchor"), **kw)


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded encoder inputs ``[n, D_IN]`` and unit anchor embeddings ``[n, D]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), F.normalize(torch.randn(n, D, generator=g), dim=1)


def test_a_step_clamps_the_logit_scale_back_into_its_range():
    """After the optimiser step the log-scale parameter is clamped in place to ``[ln 1,
    ln 100]``: a scale that drifted above 100 (where the clamp in ``forward`` stops its gradient,
    so the optimiser alone could never bring it back) returns to 100, one below 1 to 1."""
    x, a = _batch(5, seed=1)
    for start, bound in ((math.log(100.0) + 0.5, 100.0), (-0.5, 1.0)):
        stage = _stage()
        with torch.no_grad():
            stage.logit_scale.log_scale.fill_(start)
        opt = torch.optim.SGD([p for _, p in stage.trainable_parameters()], lr=0.1)
        runner = StepRunner(stage, opt)
        loss, out = runner(x, anchor_emb=a)
        assert torch.isfinite(loss) and float(out["logit_scale"]) == pytest.approx(bound)
        p = float(stage.logit_scale.log_scale.detach())
        assert p == pytest.approx(math.log(bound), abs=1e-6), (start, p)
        assert 1.0 - 1e-6 <= math.exp(p) <= 100.0 * (1 + 1e-6)


def test_a_step_without_keys_enqueues_the_anchors_under_an_unmaskable_key():
    """With a queue but no sample keys the step enqueues the batch's anchors under key -1
    (nothing to mask later); the stage's loss then uses them as negatives."""
    stage = _stage(queue_size=8)
    x, a = _batch(3, seed=2)
    StepRunner(stage, torch.optim.SGD([p for _, p in stage.trainable_parameters()], lr=0.1))(x, anchor_emb=a)
    assert len(stage.queue) == 3
    assert torch.equal(stage.queue.negatives(), a) and stage.queue.current_keys().tolist() == [-1, -1, -1]


def _queue_worker(r: int, port: int, root: str) -> None:
    rank_env(r, port, 2)
    gbdist.init_distributed(backend="gloo")
    try:
        stage = _stage(queue_size=16)  # same weights on both ranks
        n = 3 + r  # uneven batches: 3 rows on rank 0, 4 on rank 1
        x, a = _batch(n, seed=10 + r)
        keys = torch.arange(n) + 100 * (r + 1)
        runner = StepRunner(stage, torch.optim.SGD([p for _, p in stage.trainable_parameters()], lr=0.1))
        runner(x, anchor_emb=a, keys=keys)
        torch.save({"negatives": stage.queue.negatives(), "keys": stage.queue.current_keys(), "anchors": a},
                   f"{root}/rank{r}.pt")
    finally:
        gbdist.cleanup()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_every_rank_enqueues_the_gathered_global_batch(tmp_path):
    """2 ranks (gloo), different rows and keys on each: after one step both ranks' queues hold
    the same entries, every rank's anchors with their keys in rank order (contrastive_loss
    assumes an identical queue on every rank)."""
    spawn_with_deadline(_queue_worker, (free_port(), str(tmp_path)), 2, seconds=120)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert got[0]["keys"].tolist() == got[1]["keys"].tolist() == [100, 101, 102, 200, 201, 202, 203]
    assert torch.equal(got[0]["negatives"], got[1]["negatives"])
    assert torch.equal(got[0]["negatives"], torch.cat([got[0]["anchors"], got[1]["anchors"]]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_stage_loss_is_contrastive_loss_with_its_queue_mask_and_symmetric_flag(symmetric):
    """The stage's loss equals contrastive_loss on its own encoder output with the queue as
    extra negatives, the queue entries of the batch's own samples masked out, and the stage's
    ``symmetric`` flag; the mask and the flag each change the value, so neither is optional."""
    stage = _stage(symmetric=symmetric, queue_size=8)
    x, a = _batch(4, seed=3)
    keys = torch.tensor([5, 6, 7, 8])
    g = torch.Generator().manual_seed(4)
    # The queue holds two of this batch's own anchors (keys 5 and 7) from an earlier step, and
    # two other samples' anchors.
    stage.queue.enqueue(torch.cat([a[[0, 2]], F.normalize(torch.randn(2, D, generator=g), dim=1)]),
                        [5, 7, 50, 51])
    out = stage(x, anchor_emb=a, keys=keys)

    with torch.no_grad():
        emb, scale = stage.encoder(x), stage.logit_scale()
    queue, mask = stage.queue.negatives(), stage.queue.mask_for(keys)
    assert mask.sum() == 2 and bool(mask[0, 0]) and bool(mask[2, 1])

    def loss(sym, queue_mask):
        return float(contrastive_loss(emb, a, scale, symmetric=sym, queue=queue, queue_mask=queue_mask))

    expect = loss(symmetric, mask)
    assert float(out["contrastive_loss"].detach()) == pytest.approx(expect, rel=1e-6, abs=1e-7)
    assert abs(loss(not symmetric, mask) - expect) > 1e-3
    assert abs(loss(symmetric, None) - expect) > 1e-3
