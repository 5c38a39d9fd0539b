"""Process-group setup for `torchrun` and the data-parallel wrappers (DDP, FSDP2).

Under torchrun (WORLD_SIZE > 1) every process trains on its slice of the same global batch;
gradients are averaged (DDP) or reduce-scattered (FSDP2 ``fully_shard``), so the optimizer sees the
same mean gradient as one process would. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..devices import DistInfo

__all__ = ["StepVote", "all_reduce_max", "all_reduce_min", "any_rank",
           "barrier", "cpu_group", "init_distributed", "pick_device", "shutdown", "wrap_model"]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA GPU is available; use cpu or auto.")
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "ddp") -> nn.Module:
    """DDP or FSDP2 around `model` (already on info.device); unchanged for one process."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # heavy: 0.4 s, only FSDP runs pay it

        # Blocks return routing records that hold views (top-k ids and weights); nothing modifies
        # them in place, which is the case this warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        return fully_shard(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_max(t: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_reduce_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def cpu_group(info: DistInfo):
    """A process group for small CPU tensors (a flag every step without a GPU sync): a gloo group
    beside NCCL, the default group otherwise; None for one process. Every rank must call it."""
    if not info.enabled:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


class StepVote:
    """Whether a flag is set on any process, agreed on every step without blocking the step: each
    `poll` starts a non-blocking all-reduce of this process's flag (on `group`, a CPU group) and
    returns the previous poll's agreed answer, so every process learns it at the same step, one
    step late. `close` waits for the last reduction (every process must call it)."""

    def __init__(self, info: DistInfo, group=None):
        self.info, self.group = info, group
        self.pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, flag: bool) -> bool:
        if not self.info.enabled:
            return flag
        agreed = self.close()
        t = torch.tensor([int(flag)], dtype=torch.int32)
        self.pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
        return agreed

    def close(self) -> bool:
        if self.pending is None:
            return False
        work, t = self.pending
        self.pending = None
        work.wait()
        return bool(t.item())


def any_rank(flag: bool, info: DistInfo, group=None) -> bool:
    """Whether `flag` is set on any process (all processes get the same answer)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    return bool(all_reduce_max(t, info, group).item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
