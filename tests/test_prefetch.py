"""The one-batch-ahead device prefetcher of the training loop."""

from __future__ import annotations

import contextlib

import torch

from geobind.binding import prefetch
from geobind.binding.prefetch import DevicePrefetcher, map_tensors


def test_map_tensors_reaches_nested_tensors_and_keeps_the_rest():
    batch = {"pixels": torch.zeros(2, 3), "aug": [torch.ones(2), "name", None], "n": 2}
    out = map_tensors(batch, lambda t: t + 1)
    assert torch.equal(out["pixels"], torch.ones(2, 3)) and torch.equal(out["aug"][0], torch.full((2,), 2.0))
    assert out["aug"][1:] == ["name", None] and out["n"] == 2 and isinstance(out["aug"], list)
    assert map_tensors(None, lambda t: t) is None


def _move(item, to_device):
    idx, inputs = item
    return idx, map_tensors(inputs, to_device)


def test_off_cuda_items_come_in_order_with_their_inputs_moved():
    items = [(torch.tensor([i]), {"x": torch.full((2,), float(i))}) for i in range(4)]
    got = list(DevicePrefetcher(items, torch.device("meta"), _move))
    assert [int(idx) for idx, _ in got] == [0, 1, 2, 3]
    assert all(idx.device.type == "cpu" and inputs["x"].device.type == "meta" for idx, inputs in got)
    assert len(DevicePrefetcher(items, torch.device("cpu"), _move)) == 4


def test_on_cuda_the_next_copy_is_queued_after_the_current_batch_is_handed_over(monkeypatch):
    """Stream logic with stand-in streams: item k+1 is fetched and its copy queued on the side
    stream only once the caller has item k (so the copy overlaps k's step), and the compute
    stream waits for the copy stream before each item is handed over."""
    log = []
    in_copy = [False]

    class Stream:
        def __init__(self, device=None):
            self.name = "copy"

        def wait_stream(self, other):
            log.append(f"wait {other.name}")

    compute = Stream()
    compute.name = "compute"

    @contextlib.contextmanager
    def on(stream):
        in_copy[0] = True
        try:
            yield
        finally:
            in_copy[0] = False

    monkeypatch.setattr(prefetch.torch.cuda, "Stream", Stream)
    monkeypatch.setattr(prefetch.torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(prefetch.torch.cuda, "stream", on)

    def loader():
        for i in range(3):
            log.append(f"fetch {i}")
            yield i

    def move(item, to_device):
        log.append(f"{'copy' if in_copy[0] else 'adopt'} {item}")
        return item

    for item in DevicePrefetcher(loader(), torch.device("cuda", 0), move):
        log.append(f"step {item}")
    assert log == [
        "fetch 0", "copy 0",
        "wait copy", "adopt 0", "step 0", "fetch 1", "copy 1",
        "wait copy", "adopt 1", "step 1", "fetch 2", "copy 2",
        "wait copy", "adopt 2", "step 2",
    ]


def test_outputs_one_behind_pairs_each_item_with_its_own_output():
    """Inference over a loader: every item comes back once, in order, with its own output on the
    host (None where nothing was computed), also for the last item."""
    items = [(i, torch.full((2, 3), float(i)) if i % 3 else None) for i in range(7)]
    forward = lambda item: None if item[1] is None else item[1].sum(dim=1) * 10  # noqa: E731
    got = list(prefetch.outputs_one_behind(items, torch.device("cpu"), lambda item, to: item, forward))
    assert [item[0] for item, _ in got] == list(range(7))
    for (i, x), out in got:
        assert (out is None) == (x is None)
        if out is not None:
            assert out.device.type == "cpu" and out.tolist() == [30.0 * i] * 2
    assert list(prefetch.outputs_one_behind([], torch.device("cpu"), lambda i, to: i, forward)) == []
