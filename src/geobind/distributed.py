"""Small helpers for multi-process training under ``torchrun`` (DDP).

Every helper degrades to the single-process behaviour when ``torch.distributed`` is not
initialised, so training and evaluation code calls them unconditionally.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_sum",
    "broadcast_object",
    "all_gather_object",
    "all_reduce_min_int",
    "all_gather_ints",
    "loader_workers",
    "parse_device",
    "comm_device",
    "all_gather_blocks",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    # Global rank of this process (0 when single-process).
    rank: int
    # Number of processes in the job (1 when single-process).
    world_size: int
    # Rank within this machine; selects the CUDA device.
    local_rank: int
    # Device this process computes on.
    device: torch.device
    # True when a process group with more than one member is initialised.
    distributed: bool

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs, checkpoints and reports."""
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one member is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank within this machine, from ``LOCAL_RANK`` (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` unset or 1 nothing is
    initialised and a single-process :class:`DistInfo` comes back, so the same entry point serves
    ``python -m geobind train`` and ``torchrun ... geobind train``. The backend is NCCL when CUDA
    is available and Gloo otherwise (also for a run the command or config puts on the CPU:
    ``device="cpu"``, whose rank device is then the CPU), unless ``backend`` names one. Calling
    it again after the group exists just describes the existing group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lrank = local_rank()
    if torch.cuda.is_available():
        # Set before the process group exists, so NCCL binds each rank to its own GPU rather
        # than all ranks piling onto cuda:0.
        torch.cuda.set_device(lrank % torch.cuda.device_count())
    on_cpu = str(device) == "cpu"
    device = torch.device("cpu") if on_cpu else _default_device()

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), lrank, device, is_distributed())
    if world <= 1:
        return DistInfo(0, 1, lrank, device, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and not on_cpu else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    # init_method defaults to env://, which reads MASTER_ADDR/MASTER_PORT set by torchrun.
    dist.init_process_group(
        backend=backend, rank=int(os.environ["RANK"]), world_size=world, **kwargs
    )
    global _HOST_GROUP
    if backend == "nccl":
        # Small host-side agreements (batch sizes) go over gloo: an NCCL collective read back
        # with .item() would make the host wait for all the work queued on the GPU.
        _HOST_GROUP = dist.new_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), lrank, device, is_distributed())


def barrier() -> None:
    """Wait for every rank; a no-op when not distributed. On the host group where there is one
    (gloo beside NCCL): the ranks wait for each other's host work (rank 0 writing a file,
    say), which NCCL's watchdog would cut off after its shorter timeout."""
    if not is_distributed():
        return
    if _HOST_GROUP is not None:
        dist.barrier(group=_HOST_GROUP)
    elif dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the device from the rank, which is wrong on
        # multi-node jobs.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _small_int_group():
    """``(group, device)`` for agreeing on a few integers: the host (gloo: the default group, or
    the one :func:`init_distributed` adds beside NCCL), so that reading the result back never
    waits for the GPU's queued work; NCCL on the current GPU only for a group made elsewhere."""
    if _HOST_GROUP is not None or dist.get_backend() != "nccl":
        return _HOST_GROUP, torch.device("cpu")
    return None, torch.device("cuda", torch.cuda.current_device())


def _gather_sizes(x: torch.Tensor) -> list[int]:
    """Every rank's ``x.shape[0]`` (see :func:`_small_int_group`)."""
    return [n for (n,) in all_gather_ints([x.shape[0]])]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather rows of ``x`` when ranks hold different numbers of rows."""
    x = x.contiguous()
    largest = max(sizes)
    if x.shape[0] < largest:
        # all_gather needs equal shapes; pad and cut the padding away afterwards.
        pad = x.new_zeros((largest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad], dim=0)
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x)
    return torch.cat([t[:n] for t, n in zip(out, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate rows from all ranks; the backward pass returns to each rank the gradient of
    *every* rank's loss with respect to its own rows (sum over ranks)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        r = dist.get_rank()
        ctx.start = sum(sizes[:r])
        ctx.stop = ctx.start + sizes[r]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        # Each rank's loss touched every rank's rows; summing the full gradient over ranks and
        # keeping our slice hands each rank d(sum of all losses)/d(own rows).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop], None


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` along dim 0 across ranks, in rank order, keeping autograd.

    The backward pass sums the gradient over ranks and returns each rank its own slice, i.e.
    rank r receives ``sum_s dL_s / dx_r``. Ranks may hold different numbers of rows. Identity
    when not distributed.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x, _gather_sizes(x))


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` along dim 0 across ranks, in rank order, detached from autograd.

    Ranks may hold different numbers of rows. Identity (detached) when not distributed.
    """
    if not is_distributed():
        return x.detach()
    return _gather_padded(x.detach(), _gather_sizes(x))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a detached tensor over ranks (a copy; ``x`` is untouched)."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


_HOST_GROUP = None  # a gloo group beside an NCCL default group (see init_distributed)


def all_reduce_min_int(value: int) -> int:
    """Minimum of a Python int over ranks (on the host where it can: :func:`_small_int_group`)."""
    if not is_distributed():
        return int(value)
    group, device = _small_int_group()
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def all_gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's few ints (the same count on every rank), in rank order, on every rank; on
    the host where it can (:func:`_small_int_group`)."""
    if not is_distributed():
        return [[int(v) for v in values]]
    group, device = _small_int_group()
    t = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    # On the host (see _small_int_group): the others may wait here a while (rank 0 checking
    # the datasets, merging parts), longer than NCCL's watchdog allows.
    dist.broadcast_object_list(box, src=src, group=_small_int_group()[0])
    return box[0]


def parse_device(name: str) -> torch.device:
    """``auto`` (CUDA when usable, else the CPU), ``cpu``, ``cuda`` or ``cuda:N`` as a device this
    machine has; a ``ValueError`` that says what to use instead otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "" if torch.version.cuda else " (this torch is a CPU-only build)"
            raise ValueError(f"device {name!r}: no CUDA GPU is usable here{build}; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def loader_workers(setting: int | str, device: torch.device) -> int:
    """``optim.num_workers`` as a number: ``auto`` is 0 on a CPU (the model needs the cores) and,
    on a GPU, this rank's share of the machine's cores less one for the rank itself, at most 8."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    per_rank = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, per_rank - 1))


_WAITS = 0


def wait_for_ranks(poll_s: float = 1.0) -> None:
    """Wait until every rank has called this (as often), with no time limit: a barrier for
    host work of very uneven length (one rank embedding its whole share of an anchor cache
    while another read its share from an interrupted run's parts), which a collective would
    cut off after the process group's timeout (30 minutes by default). Polls the rendezvous
    store; a rank that dies is noticed by the launcher (torchrun ends the job)."""
    global _WAITS
    if not is_distributed():
        return
    _WAITS += 1
    store = dist.distributed_c10d._get_default_store()
    key = f"geobind/wait/{_WAITS}"
    store.add(key, 1)
    while store.add(key, 0) < dist.get_world_size():
        time.sleep(poll_s)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable object), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_small_int_group()[0])  # host side where it can
    return out


def comm_device() -> torch.device:
    """Where collective buffers must live: the rank's CUDA device under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_blocks(out: torch.Tensor, bounds: list[int], *, max_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Fill in, on every rank, the row blocks that the other ranks computed.

    Rank ``r`` has filled ``out[bounds[r]:bounds[r + 1]]`` (``bounds`` has ``world_size + 1``
    ascending entries, the same on every rank, as are ``out``'s shape and dtype); afterwards
    every rank's ``out`` holds every block. ``out`` may live anywhere (typically host memory):
    the rows travel in rounds through buffers on :func:`comm_device`, each round gathering at
    most ``chunk`` rows from every rank, padded to ``chunk`` since ``all_gather`` needs equal
    sizes. ``chunk`` is chosen so the receive buffer stays within ``max_bytes``; the extra memory
    is about ``max_bytes * (1 + 1 / world_size)`` whatever the size of ``out``. Returns ``out``.
    A no-op when not distributed.
    """
    if not is_distributed():
        return out
    world, r = dist.get_world_size(), dist.get_rank()
    if len(bounds) != world + 1 or list(bounds) != sorted(bounds) or bounds[-1] > out.shape[0]:
        raise ValueError(f"bounds {bounds} do not split {out.shape[0]} rows over {world} ranks")
    sizes = [bounds[s + 1] - bounds[s] for s in range(world)]
    largest = max(sizes)
    if largest == 0:
        return out
    row_bytes = max(1, out[0].numel() * out.element_size())
    chunk = max(1, min(largest, max_bytes // (world * row_bytes)))
    dev = comm_device()
    send = torch.empty((chunk, *out.shape[1:]), dtype=out.dtype, device=dev)
    recv = torch.empty((world * chunk, *out.shape[1:]), dtype=out.dtype, device=dev)
    # Into one tensor: the list form of all_gather makes NCCL stage a second flat buffer.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    for k in range(0, largest, chunk):
        m = min(chunk, largest - k)
        own = min(m, max(0, sizes[r] - k))
        send[:own].copy_(out[bounds[r] + k : bounds[r] + k + own])
        send[own:m].zero_()
        gather(recv[: world * m], send[:m])
        for s in range(world):
            n = min(m, max(0, sizes[s] - k))
            if s != r and n:
                out[bounds[s] + k : bounds[s] + k + n].copy_(recv[s * m : s * m + n])
    return out


def cleanup() -> None:
    """Leave the process group, if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        # Wait for every rank first: a rank tearing gloo down while another still talks to it
        # aborts the process ("terminate called without an active exception").
        # Objects that still hold the group (a DDP reducer in a reference cycle) are freed
        # first: destroyed after the group, their gloo threads abort the process the same way.
        gc.collect()
        if dist.get_world_size() > 1:
            dist.barrier()
        global _HOST_GROUP
        _HOST_GROUP = None
        dist.destroy_process_group()
