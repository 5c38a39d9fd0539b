"""Process-group setup for `torchrun` and the data-parallel wrappers (DDP, FSDP2).

Under torchrun (WORLD_SIZE > 1) every process trains on its slice of the same global batch;
gradients are averaged (DDP) or reduce-scattered (FSDP2 ``fully_shard``), so the optimizer sees the
same mean gradient as one process would. Only rank 0 logs and writes files.

Every collective's tensors live on its group's device. The default group's backend is bound to
the training device's type (``cuda:nccl``, ``cpu:gloo``), so a tensor of another type fails loudly
on every machine ("No backend type associated with device type cpu"), not only on a GPU node:
training-side tensors (losses, counts, the divergence guard) go to the default group on
info.device; host-side agreements (the preemption vote, the checkpoint to resume, barriers
around rank 0's file writes) go to `cpu_group`, a ``cpu:gloo`` group beside it, so they never
wait on the GPU. tests/train/test_dist_device.py keeps every collective call in a short list of
functions that do this.
"""

from __future__ import annotations

import datetime
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..devices import DistInfo, check_collective_device
from ..moe import Router

__all__ = ["DATA_TIMEOUT", "StepVote", "all_reduce_max", "all_reduce_min", "any_rank", "backend_for",
           "barrier", "cpu_group", "init_distributed", "long_wait_group", "mixed_precision_policy",
           "pick_device", "shutdown", "wrap_model"]

DATA_TIMEOUT = datetime.timedelta(hours=24)
"""How long the other processes wait for rank 0 to prepare the data (`long_wait_group`): a day,
enough to tokenise billions of tokens; `libmoe prepare` beforehand takes the wait out of the job."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA GPU is available; use cpu or auto.")
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    """The default group's backend for a training device, bound to its type: "cuda:nccl" on a
    GPU, "cpu:gloo" on the CPU (gloo for any other type). The group then refuses a tensor of
    another device type instead of silently serving it with a slower backend."""
    return f"{device.type}:{'nccl' if device.type == 'cuda' else 'gloo'}"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by it, with the backend bound to the device
    type (`backend_for`: cpu:gloo on CPU, cuda:nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(dev))
    return DistInfo(rank, world, local, dev)


def mixed_precision_policy(dtype: torch.dtype | None):
    """FSDP2's MixedPrecisionPolicy for a run's precision: parameters gathered in `dtype` (bf16 or
    fp16), gradients reduce-scattered in fp32; None for fp32 (FSDP then keeps fp32 throughout)."""
    if dtype is None or dtype == torch.float32:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy  # heavy: see wrap_model

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


# Router methods the MoE layer calls outside the router's forward that may read its parameters
# (MoE++'s constant experts, TC-MoE's plan); FSDP must gather the parameters for them too.
ROUTER_METHODS = ("expert_plan", "extra_output")


def _shard_routers_fp32(model: nn.Module) -> None:
    """Shard each MoE router as its own FSDP unit with an fp32 policy. Under the blocks' bf16/fp16
    policy a router's parameters would be gathered in that dtype, and the MoE layer runs the
    router in its parameters' dtype (moe/layer.py): top-k choices and balance losses are
    sensitive to bf16 rounding, so routers compute from fp32 weights, as they do without FSDP.
    Leaving them out of FSDP instead (ignored parameters) would leave their gradients unreduced.
    Routers are small (experts x d_model), so they stay gathered from forward to backward."""
    from torch.distributed.fsdp import (  # heavy: see wrap_model
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, Router) and any(True for _ in module.parameters()):
            fully_shard(module, mp_policy=fp32, reshard_after_forward=False)
            for name in ROUTER_METHODS:
                register_fsdp_forward_method(module, name)


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "ddp",
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP or FSDP2 around `model` (already on info.device); unchanged for one process. Under
    FSDP, `param_dtype` (the run's autocast dtype, None for fp32) sets `mixed_precision_policy`
    for the transformer blocks, where the compute is, with every MoE router kept in fp32. FSDP
    casts each block's floating inputs to that dtype (the residual stream between blocks is then
    bf16, as in torchtitan; under DDP autocast keeps it fp32). The root unit (embedding, final
    norm, head: a few percent of the parameters) stays fp32, so the final norm and the loss see
    fp32 weights; autocast still runs the head's matmul in bf16. The trainer keeps autocast
    on, in the same dtype: for the blocks' bf16 weights it changes no matmul, and it keeps softmax,
    norms and the loss in fp32; the router runs outside it (moe/layer.py)."""
    if not info.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard  # heavy: 0.4 s, only FSDP runs pay it

        # Blocks return routing records that hold views (top-k ids and weights); nothing modifies
        # them in place, which is the case this warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        policy = mixed_precision_policy(param_dtype)
        options = {} if policy is None else {"mp_policy": policy}
        if policy is not None:
            _shard_routers_fp32(model)
        for block in getattr(model, "blocks", []):
            fully_shard(block, **options)
        return fully_shard(model)
    ids = [info.device.index] if info.device.type == "cuda" else None
    # No buffer broadcast (a collective before each step's first forward, saved): every buffer is
    # constant or changed identically on every rank (expert_bias from all-reduced counts, Hyper-R's
    # progress, rotary tables), except the routers' load_counts, which are each rank's own
    # selections until update_bias sums them and must never take rank 0's values.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def _reduce(t: torch.Tensor, info: DistInfo, op, group) -> torch.Tensor:
    """All-reduce `t` in place: on the default group (`group` None) a tensor on info.device, on
    a `cpu_group` a CPU tensor (checked, so a misplaced tensor fails on any machine)."""
    if info.enabled:
        check_collective_device(t, info.device if group is None else torch.device("cpu"))
        dist.all_reduce(t, op=op, group=group)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    """`t`'s maximum over processes, in place: on info.device over the default group, or a CPU
    tensor over `group` (a `cpu_group`)."""
    return _reduce(t, info, dist.ReduceOp.MAX, group)


def all_reduce_min(t: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    """`t`'s minimum over processes, in place; placed as for `all_reduce_max`."""
    return _reduce(t, info, dist.ReduceOp.MIN, group)


def cpu_group(info: DistInfo, timeout: datetime.timedelta | None = None):
    """A process group for small CPU tensors (a flag every step without a GPU sync): a gloo group
    serving CPU tensors only, beside the default group; None for one process. Every rank must
    call it, in the same order."""
    if not info.enabled:
        return None
    return dist.new_group(backend="cpu:gloo", timeout=timeout)


def long_wait_group(info: DistInfo):
    """A `cpu_group` whose collectives wait up to DATA_TIMEOUT, for a barrier while rank 0
    prepares the data (the default group's timeout, 10 minutes under NCCL, is far too short)."""
    return cpu_group(info, DATA_TIMEOUT)


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
        if self.group is None:
            raise ValueError("StepVote needs a cpu_group(info) for a multi-process run; pass it as group.")
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


def any_rank(flag: bool, info: DistInfo, group) -> bool:
    """Whether `flag` is set on any process (all processes get the same answer); `group` is a
    `cpu_group` (the flag is a CPU tensor, which the default group refuses on a GPU)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    return bool(all_reduce_max(t, info, group).item())


def barrier(info: DistInfo, group=None) -> None:
    """Wait until every process arrives: on `group` (a `cpu_group`: rank 0's file writes are host
    work, so its waiters need no GPU), or the default group on this process's device."""
    if not info.enabled:
        return
    if group is None and info.device.type == "cuda":
        dist.barrier(device_ids=[info.device.index])  # NCCL's barrier runs on this GPU, not a guessed one
    else:
        dist.barrier(group=group)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
