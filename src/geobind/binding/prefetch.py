"""Copy the next training batch to the GPU while the current step computes.

A batch copied with ``.to(device, non_blocking=True)`` on the compute stream is ordered after
the previous step's kernels and before the next step's: the host does not wait, but the GPU
does nothing else while the bytes cross (a batch of 1024 uint8 tiles is 201 MB at 256 px; a
batch of 128 ten-second 48 kHz clips, 246 MB). :class:`DevicePrefetcher` issues each copy on a
side stream as soon as the loader hands the batch over, one step ahead, and makes the compute
stream wait for that copy only when the batch is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["DevicePrefetcher", "map_tensors", "outputs_one_behind"]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a batch: a tensor, or dicts, lists and tuples of them
    (other values, e.g. strings or ``None``, are kept as they are)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


class DevicePrefetcher:
    """Iterate ``loader``, with the parts of each item that ``move`` picks already on ``device``.

    ``move(item, to_device) -> item`` applies ``to_device`` (a tensor function) to the parts that
    belong on the device, leaving the rest (indices kept on the host, skip reports) alone. On
    CUDA the copies of item ``k + 1`` run on a side stream while the caller computes with item
    ``k``; elsewhere items are moved when they are taken, in order, with nothing ahead.
    """

    def __init__(self, loader: Iterable, device: torch.device,
                 move: Callable[[Any, Callable[[torch.Tensor], torch.Tensor]], Any]):
        self.loader, self.device, self.move = loader, torch.device(device), move

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            for item in self.loader:
                yield self.move(item, lambda t: t.to(self.device))
            return
        copy_stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        items = iter(self.loader)

        def ahead():
            item = next(items, _END)
            if item is _END:
                return _END
            with torch.cuda.stream(copy_stream):
                return self.move(item, lambda t: t.to(self.device, non_blocking=True))

        upcoming = ahead()
        while upcoming is not _END:
            compute.wait_stream(copy_stream)

            def adopt(t: torch.Tensor) -> torch.Tensor:
                if t.device.type == "cuda":
                    # Allocated on the copy stream, used on the compute stream: keep the memory
                    # from being reused until the compute stream is done with it.
                    t.record_stream(compute)
                return t

            current = self.move(upcoming, adopt)
            # The caller queues its step for `current`; meanwhile the next batch is fetched and
            # its copy queued on the side stream, overlapping that step on the GPU.
            yield current
            upcoming = ahead()


_END = object()


def outputs_one_behind(
    loader: Iterable,
    device: torch.device,
    move: Callable[[Any, Callable[[torch.Tensor], torch.Tensor]], Any],
    forward: Callable[[Any], torch.Tensor | None],
) -> Iterator[tuple[Any, torch.Tensor | None]]:
    """``(item, forward(item) on the host)`` for each item of ``loader``, in order, for
    inference over a dataset. On CUDA the items come through a :class:`DevicePrefetcher`
    (``move`` as there) and each output is copied to the host without waiting; the host waits
    for it only once the next item's forward is queued, so the device is not idle while the
    host takes the result. ``forward`` may return ``None`` (nothing to compute for an item)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    items = DevicePrefetcher(loader, device, move) if cuda else loader
    held = None
    for item in items:
        out, ready = forward(item), None
        if out is not None:
            out = out.to("cpu", non_blocking=True)
            if cuda:
                ready = torch.cuda.Event()
                # On the model's device's stream: the current device may be another GPU.
                ready.record(torch.cuda.current_stream(device))
        if held is not None:
            yield _settled(held)
        held = (item, out, ready)
    if held is not None:
        yield _settled(held)


def _settled(held: tuple[Any, torch.Tensor | None, Any]) -> tuple[Any, torch.Tensor | None]:
    item, out, ready = held
    if ready is not None:
        ready.synchronize()  # the non-blocking copy has landed
    return item, out
