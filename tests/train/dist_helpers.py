"""What the multi-process tests of tests/train share: a free TCP port for a process group's
rendezvous, and the environment torchrun would give rank `rank` of `world` processes."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

import torch


def free_port() -> int:
    """A port that is free now and stays free until a test binds it: below the kernel's
    ephemeral range (from /proc/sys/net/ipv4/ip_local_port_range), which its outgoing
    connections (gloo's, between ranks) draw from. A port from bind(0) is an ephemeral one, and a
    test that reserves several before its runs start lost one to a connection of an earlier run
    (EADDRINUSE)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every candidate taken: an ephemeral one after all
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> None:
    """Set this process's RANK, WORLD_SIZE, LOCAL_RANK and rendezvous as torchrun does, on one
    thread (two cores are shared by every process of the test)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
