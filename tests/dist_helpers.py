"""Running a test body as the ranks of a small gloo group on localhost."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    """A TCP port free on localhost right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int, world: int, **extra: str) -> None:
    """Make this (spawned) process rank ``rank`` of ``world`` on localhost, with one torch
    thread; ``extra`` sets further environment variables."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), **extra)
    torch.set_num_threads(1)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``; none elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def spawn_with_deadline(fn, args, nprocs: int, seconds: float) -> None:
    """``mp.spawn(fn, args, nprocs)`` that fails (killing the ranks and their loader workers)
    when they have not all ended in ``seconds``: a deadlock (e.g. ranks that disagree on a
    collective, or a hung loader worker) fails the test instead of hanging it. A rank's
    exception is raised here as ``mp.spawn`` raises it."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                for pid in [*_children(p.pid), p.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"ranks {alive} did not end within {seconds:.0f} s: killed (a deadlock, or a hung "
                        "loader worker)")
