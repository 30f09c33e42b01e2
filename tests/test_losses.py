"""Contrastive loss against hand-computed references; LogitScale; EmbeddingQueue."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geobind.losses import EmbeddingQueue, LogitScale, contrastive_loss


def _ref_direction(a, b, s, extra=(), masked=None):
    """Paper's one-directional InfoNCE with python loops: rows of a vs columns of b (+ extra)."""
    k = len(a)
    total = 0.0
    for i in range(k):
        cols = [sum(p * q for p, q in zip(a[i], bj)) for bj in b]
        cols += [
            sum(p * q for p, q in zip(a[i], e))
            for j, e in enumerate(extra)
            if masked is None or not masked[i][j]
        ]
        denom = sum(math.exp(s * c) for c in cols)
        total += -math.log(math.exp(s * cols[i]) / denom)
    return total / k


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1).tolist()


X2 = _unit([[1.0, 0.0], [0.6, 0.8]])
Y2 = _unit([[0.8, 0.6], [0.0, 1.0]])
X3 = _unit([[1.0, 2.0, 0.5], [-1.0, 0.3, 0.2], [0.1, -0.4, 1.0]])
Y3 = _unit([[0.9, 1.5, 0.0], [-0.5, 0.5, 0.5], [0.3, 0.0, 1.0]])


@pytest.mark.parametrize("x,y", [(X2, Y2), (X3, Y3)])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07])
def test_matches_hand_reference(x, y, scale):
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    one = contrastive_loss(xt, yt, scale, symmetric=False)
    both = contrastive_loss(xt, yt, torch.tensor(scale), symmetric=True)
    ref_xy = _ref_direction(x, y, scale)
    ref_yx = _ref_direction(y, x, scale)
    assert one.item() == pytest.approx(ref_xy, rel=1e-5)
    assert both.item() == pytest.approx(0.5 * (ref_xy + ref_yx), rel=1e-5)


def test_two_by_two_closed_form():
    # x = y = identity: each row has logits (s, 0); loss = log(1 + e^-s).
    eye = torch.eye(2)
    s = 2.0
    assert contrastive_loss(eye, eye, s).item() == pytest.approx(math.log1p(math.exp(-s)))


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="at least one pair"):
        contrastive_loss(torch.zeros(0, 4), torch.zeros(0, 4), 10.0)


def test_numpy_inputs_are_refused_with_the_conversion():
    with pytest.raises(TypeError, match=r"takes torch tensors, got ndarray and ndarray \(numpy arrays: torch.from_numpy"):
        contrastive_loss(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), 10.0)


def test_queue_columns_and_mask():
    q = _unit([[0.2, 0.9, -0.3], [1.0, 1.0, 1.0], [-0.7, 0.1, 0.4], [0.0, 0.0, 1.0]])
    xt, yt, qt = (torch.tensor(v, dtype=torch.float64) for v in (X3, Y3, q))
    s = 5.0
    got = contrastive_loss(xt, yt, s, symmetric=False, queue=qt)
    assert got.item() == pytest.approx(_ref_direction(X3, Y3, s, extra=q), rel=1e-5)
    # Queue only enters the x->y direction.
    got_sym = contrastive_loss(xt, yt, s, symmetric=True, queue=qt)
    ref_sym = 0.5 * (_ref_direction(X3, Y3, s, extra=q) + _ref_direction(Y3, X3, s))
    assert got_sym.item() == pytest.approx(ref_sym, rel=1e-5)

    mask = [[True, False, False, False], [False, True, True, False], [False, False, False, False]]
    got_m = contrastive_loss(xt, yt, s, symmetric=False, queue=qt, queue_mask=torch.tensor(mask))
    assert got_m.item() == pytest.approx(_ref_direction(X3, Y3, s, extra=q, masked=mask), rel=1e-5)
    # Masking every entry is the same as no queue.
    all_masked = torch.ones(3, 4, dtype=torch.bool)
    got_none = contrastive_loss(xt, yt, s, symmetric=False, queue=qt, queue_mask=all_masked)
    assert got_none.item() == pytest.approx(contrastive_loss(xt, yt, s, symmetric=False).item())

    with pytest.raises(ValueError):
        contrastive_loss(xt, yt, s, queue=qt, queue_mask=torch.ones(3, 3, dtype=torch.bool))


def test_gradients_flow_to_inputs_and_scale():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    y = F.normalize(torch.randn(4, 8), dim=1)
    ls = LogitScale()
    loss = contrastive_loss(x, y, ls())
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert ls.log_scale.grad is not None


def test_logit_scale():
    ls = LogitScale()
    assert ls().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert ls.temperature == pytest.approx(0.07, rel=1e-6)
    assert isinstance(ls.log_scale, torch.nn.Parameter)
    with torch.no_grad():
        ls.log_scale.fill_(math.log(500.0))
    assert ls().item() == pytest.approx(100.0)
    ls.clamp_()
    assert ls.log_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        ls.log_scale.fill_(-3.0)
    assert ls().item() == pytest.approx(1.0)
    ls.clamp_()
    assert ls.log_scale.item() == pytest.approx(0.0)

    frozen = LogitScale(temperature=0.05, learnable=False)
    assert list(frozen.parameters()) == []
    assert "log_scale" in frozen.state_dict()
    assert frozen().item() == pytest.approx(20.0, rel=1e-6)


def test_queue_fifo_wrap_and_mask():
    q = EmbeddingQueue(capacity=5, dim=2)
    assert len(q) == 0 and q.negatives().shape == (0, 2)

    def rows(keys):
        return torch.tensor([[float(k), -float(k)] for k in keys])

    q.enqueue(rows([1, 2, 3]), [1, 2, 3])
    assert len(q) == 3
    assert q.current_keys().tolist() == [1, 2, 3]
    assert q.negatives()[:, 0].tolist() == [1, 2, 3]

    q.enqueue(rows([4, 5, 6, 7]), torch.tensor([4, 5, 6, 7]))
    assert len(q) == 5
    assert q.current_keys().tolist() == [3, 4, 5, 6, 7]  # oldest dropped first
    assert q.negatives()[:, 0].tolist() == [3, 4, 5, 6, 7]

    # A batch larger than the capacity keeps its newest rows.
    q.enqueue(rows(range(10, 17)), list(range(10, 17)))
    assert q.current_keys().tolist() == [12, 13, 14, 15, 16]

    mask = q.mask_for([13, 99, 16])
    assert mask.shape == (3, 5)
    assert mask.tolist() == [
        [False, True, False, False, False],
        [False, False, False, False, False],
        [False, False, False, False, True],
    ]
    with pytest.raises(ValueError):
        q.enqueue(rows([1, 2]), [1])


def test_queue_state_dict_round_trip():
    torch.manual_seed(0)
    q = EmbeddingQueue(capacity=6, dim=3)
    for step in range(3):
        q.enqueue(torch.randn(4, 3), torch.arange(4) + 10 * step)
    state = q.state_dict()
    assert set(state) == {"embeddings", "keys", "ptr", "count"}

    r = EmbeddingQueue(capacity=6, dim=3)
    r.load_state_dict(state)
    assert len(r) == len(q)
    assert torch.equal(r.negatives(), q.negatives())
    assert torch.equal(r.current_keys(), q.current_keys())
    # Resumed queue evolves identically.
    new = torch.randn(2, 3)
    q.enqueue(new, [100, 101])
    r.enqueue(new, [100, 101])
    assert torch.equal(r.negatives(), q.negatives())
    assert torch.equal(r.current_keys(), q.current_keys())


def test_half_inputs_computed_in_float32():
    x = F.normalize(torch.tensor(X3), dim=1)
    y = F.normalize(torch.tensor(Y3), dim=1)
    full = contrastive_loss(x, y, 1 / 0.07)
    half = contrastive_loss(x.bfloat16(), y.bfloat16(), torch.tensor(1 / 0.07))
    assert full.dtype == torch.float32 and half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=0.05, abs=1e-3)


def test_logits_stay_float32_under_a_training_steps_autocast():
    """The step runs the loss inside bf16 autocast; its products must not drop to bf16 (at scale
    100 that moves the loss by about 1e-2, against ~1e-7 in float32)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(64, 32, generator=g), dim=1).requires_grad_()
    y = F.normalize(x.detach() + 0.3 * torch.randn(64, 32, generator=g), dim=1)
    queue = F.normalize(torch.randn(100, 32, generator=g), dim=1).half()
    mask = torch.zeros(64, 100, dtype=torch.bool)
    mask[0, 0] = True
    full = contrastive_loss(x, y, 100.0, symmetric=True, queue=queue, queue_mask=mask)
    (gx,) = torch.autograd.grad(full, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the backward outside, as in the step
        auto = contrastive_loss(x, y, torch.tensor(100.0), symmetric=True, queue=queue, queue_mask=mask)
    (ga,) = torch.autograd.grad(auto, x)
    assert auto.dtype == torch.float32
    assert auto.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-6)
    assert torch.allclose(ga, gx, rtol=1e-5, atol=1e-7)
