"""Running a test body as the ranks of a small gloo group on localhost."""

from __future__ import annotations

import os
import socket

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
