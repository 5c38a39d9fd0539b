"""What the multi-process tests of tests/train share: a free TCP port for a process group's
rendezvous, and the environment torchrun would give rank `rank` of `world` processes."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """Set this process's RANK, WORLD_SIZE, LOCAL_RANK and rendezvous as torchrun does, on one
    thread (two cores are shared by every process of the test)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
