"""Device checks: a `--device` this machine lacks is refused in one line before anything loads.

    from libmoe.devices import check_device
    device = check_device(args.device)   # "cpu", "cuda", "cuda:1", "mps", ... or ValueError

Commands that load a model (eval, analyze, ...) call it first, so `--device cuda` on a CPU-only
build, `cuda:3` on a one-GPU machine or `mps` off a Mac fail before any file is read.

`DistInfo` (this process's rank, world size and device) and `all_reduce_sum` live here too, so
that evaluation sums over processes the way training does without importing training
(`libmoe.train.distributed` sets the process group up and re-exports them).
`tune_cpu_allocator()` sets glibc's malloc up for training on the CPU (see there).
Imports only torch: every layer may use it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Device types that run a model; torch also parses meta, lazy, ... which hold no computation.
_ACCELERATORS = ("cuda", "mps", "xpu", "hpu", "mtia")


def _count(kind: str) -> int:
    """How many devices of `kind` this process can use (0 when its backend is absent)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return 1 if mps is not None and mps.is_available() else 0
    backend = getattr(torch, kind, None)
    try:
        if backend is None or not backend.is_available():
            return 0
        return int(backend.device_count())
    except (AttributeError, RuntimeError):
        return 0


def available_devices() -> list[str]:
    """The devices this process can use: "cpu", then e.g. "cuda:0", "cuda:1", "mps"."""
    found = ["cpu"]
    for kind in _ACCELERATORS:
        n = _count(kind)
        found += [kind] if kind == "mps" and n else [f"{kind}:{i}" for i in range(n)]
    return found


def check_device(name: str | torch.device, flag: str = "--device") -> str:
    """`name` as a torch device string when this machine has that device, else ValueError in one
    sentence naming the device, what is available and the fix (`flag` names the option)."""
    text = str(name).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {text!r} is not a torch device; give cpu, cuda, cuda:N or mps "
                         f"(available here: {', '.join(available_devices())}).") from None
    if device.type == "cpu":
        return str(device)
    if device.type not in _ACCELERATORS:
        raise ValueError(f"{flag} {text!r} cannot run a model; give cpu, cuda, cuda:N or mps (available "
                         f"here: {', '.join(available_devices())}).")
    n = _count(device.type)
    if n == 0:
        why = ""
        if device.type == "cuda" and not (torch.version.cuda or getattr(torch.version, "hip", None)):
            why = " (this PyTorch is built without CUDA)"
        raise ValueError(f"{flag} {text}: this machine has no {device.type} device{why}; use "
                         f"{flag} cpu (available here: {', '.join(available_devices())}).")
    if device.index is not None and device.index >= n:
        raise ValueError(f"{flag} {text}: this machine has {n} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{n - 1}; choose one of them.")
    return str(device)


@dataclass
class DistInfo:
    """This process's place in a torchrun job (rank, world size, local rank) and its device; the
    defaults are one process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_collective_device(t: torch.Tensor, device: torch.device) -> None:
    """Raise ValueError unless `t` is on `device`'s type: a collective on the default group takes
    tensors on the training device (NCCL serves CUDA tensors only), one on a CPU group CPU tensors."""
    if t.device.type != torch.device(device).type:
        raise ValueError(f"a collective got a tensor on {t.device} where its process group serves "
                         f"{torch.device(device).type}; move it there first (.to(info.device)).")


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """`t` summed over every process, in place (unchanged for one process); returns `t`. `t` must
    be on info.device: the default group serves that device type only."""
    if info.enabled:
        check_collective_device(t, info.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


MALLOC_TUNING_ENV = "LIBMOE_MALLOC_TUNING"  # "0": leave glibc's malloc settings alone
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_KEEP_BYTES = 1 << 30


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse (mmap and trim thresholds 1 GiB), as
    training on the CPU wants; returns whether the settings were applied.

    By default glibc hands each large allocation (an activation, a gradient: megabytes) its own
    mmap and returns it to the system on free, so every training step page-faults its
    activations in again and the kernel zeroes them: on the 2-core development VM a third of a
    cpu-tiny step went to system time, and these settings made dense and MoE steps alike 25-40%
    faster (docs/performance.md). The cost: the process keeps its peak heap instead of giving
    freed memory back. Process-wide, so only the training entry points (`libmoe train`, the
    bench's runs on the CPU, the benchmarks) call it, never an import; LIBMOE_MALLOC_TUNING=0
    turns it off. A no-op off Linux/glibc (musl, macOS, Windows) or under another allocator."""
    if os.environ.get(MALLOC_TUNING_ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) & bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
