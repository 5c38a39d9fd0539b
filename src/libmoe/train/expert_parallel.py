"""Expert parallelism, the training side: `train.expert_parallel: N` under torchrun.

The world of W processes is N-way expert parallel times W / N-way data parallel. Ranks
[d*N, (d+1)*N) form expert-parallel group d: they split every MoE layer's routed experts (rank r
holds block r % N) and exchange tokens by all-to-all (`libmoe.moe.expert_parallel`). Every rank
still trains on its own slice of the global batch, as under plain DDP, so the router, attention,
shared experts and balance losses see exactly what they see without EP.

Gradients: the replicated parameters are averaged over all W ranks by DDP, which is told to
ignore the expert shards. A shard's gradient on one rank already sums the losses of its EP group's
tokens; `clip_grad_norm` sums it over the ranks holding the same shard (one per data-parallel
replica) and divides by W, which is the gradient of the mean loss, as one process computes it.
The gradient norm counts the replicated parameters once and the shards of the EP group each once.

Checkpoints hold the full model and optimizer state in one process's layout
(`gather_expert_state`, all ranks take part, rank 0 writes), so a run resumes with any N, or in
one process, and the analysis reads it unchanged; loading builds the full model, loads the full
state and then shards it (`shard_model`), and `slice_expert_state` cuts the optimizer's state.
Balance losses: "sequence" scope is per sequence and "global" scope all-reduces its counts over
every rank, so both equal one process's; the bias-balancing counts are all-reduced over every rank
(`TopKRouter.update_bias`). "batch" scope is per rank's micro-batch, as under plain DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..devices import DistInfo
from ..models.run_config import RunConfig
from ..moe.expert_parallel import ExpertShard, expert_shards, shard_experts

__all__ = ["check_expert_parallel", "clip_grad_norm", "expert_parallel_groups", "gather_expert_state",
           "shard_model", "slice_expert_state"]


def check_expert_parallel(cfg: RunConfig, world_size: int, hf: bool = False) -> None:
    """Refuse, with one sentence naming the fix, a `train.expert_parallel` this run cannot use
    (checked before any work; `libmoe.train.check_config` calls it)."""
    n, tc = cfg.train.expert_parallel, cfg.train
    if n == 1:
        return
    if hf:
        raise ValueError(f"train.expert_parallel={n} shards libmoe MoE layers, not a transformers "
                         "model's; set train.expert_parallel=1.")
    if cfg.model.algorithm == "dense":
        raise ValueError(f"train.expert_parallel={n} needs routed experts, which the dense model has "
                         "not; set train.expert_parallel=1.")
    if world_size % n:
        raise ValueError(f"train.expert_parallel={n} must divide the number of processes "
                         f"({world_size}): launch a multiple of {n} processes with torchrun, or set "
                         "train.expert_parallel=1.")
    if tc.parallel != "ddp":
        raise ValueError(f"train.expert_parallel={n} works with train.parallel=ddp, not "
                         f"{tc.parallel!r}; set train.parallel=ddp.")
    routed = cfg.model.moe_args()[0]
    if routed % n:
        raise ValueError(f"train.expert_parallel={n} must divide the {routed} routed experts of each "
                         "MoE layer; choose a divisor of it (or change model.n_experts).")
    if tc.precision == "fp16":
        raise ValueError(f"train.expert_parallel={n} does not support precision fp16 (its loss scaler "
                         "would skip steps on some ranks only); use bf16 or fp32.")
    if getattr(tc, "compile", False):
        raise ValueError(f"train.expert_parallel={n} cannot run under train.compile yet (its token "
                         "exchange needs split sizes on the host); set train.compile=false.")


def expert_parallel_groups(n: int, info: DistInfo) -> ExpertShard:
    """This rank's `ExpertShard` for N-way expert parallelism over `info`'s world: the expert-
    parallel group of ranks [d*N, (d+1)*N) and the group of ranks holding the same shard. Every
    rank must call it (process groups are created collectively)."""
    world, rank = info.world_size, info.rank
    mine = replicas = None
    for d in range(world // n):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(d * n, (d + 1) * n)))
        if rank // n == d:
            mine = group
    if world > n:
        for r in range(n):
            group = dist.new_group(list(range(r, world, n)))
            if rank % n == r:
                replicas = group
    return ExpertShard(group=mine, rank=rank % n, size=n, replicas=replicas)


def shard_model(raw: nn.Module, cfg: RunConfig, info: DistInfo) -> nn.Module:
    """Shard `raw` (the full model, on its device, with its initial or resumed weights) for
    `train.expert_parallel` and tell DDP to leave the shards to `clip_grad_norm`; unchanged when it
    is 1. Call before `wrap_model`; every rank must call it."""
    n = cfg.train.expert_parallel
    if n == 1:
        return raw
    shard_experts(raw, expert_parallel_groups(n, info))
    names = [f"{name}.{p}" for name, m in expert_shards(raw).items() for p, _ in m.named_parameters()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(raw, names)
    return raw


def _shard_params(model: nn.Module) -> list[tuple[str, nn.Parameter, ExpertShard]]:
    return [(f"{name}.{p}", param, m.shard) for name, m in expert_shards(model).items()
            for p, param in m.named_parameters()]


def clip_grad_norm(model: nn.Module, max_norm: float, world_size: int | None = None) -> torch.Tensor:
    """Finish the gradients and clip them to a global norm of `max_norm` (inf: no clipping);
    returns the norm before clipping. Without expert shards this is
    `nn.utils.clip_grad_norm_(model.parameters(), max_norm)`. With them, each shard's gradient is
    first summed over the ranks holding it and divided by the world size (DDP has averaged the
    rest), and the norm adds the shards' squares over the expert-parallel group once."""
    shards = _shard_params(model)
    if not shards:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    world = world_size or dist.get_world_size()
    shard = shards[0][2]
    expert = []
    for _, p, _ in shards:
        if p.grad is None:  # no token reached this rank's experts: a zero gradient (AdamW steps on)
            p.grad = torch.zeros_like(p)
        expert.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in expert])
    if shard.replicas is not None:
        dist.all_reduce(flat, group=shard.replicas)
    flat.div_(world)
    for g, part in zip(expert, flat.split([g.numel() for g in expert])):
        g.copy_(part.view_as(g))
    ids = {id(p) for _, p, _ in shards}
    replicated = [p.grad for p in model.parameters() if id(p) not in ids and p.grad is not None]
    sq = torch.zeros(2, dtype=torch.float32, device=flat.device)
    if replicated:
        sq[0] = _sum_of_squares(replicated)
    sq[1] = _sum_of_squares(expert)
    dist.all_reduce(sq[1:], group=shard.group)
    total = sq.sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(replicated + expert, coef.to(flat.dtype))
    return total


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    # One fused kernel per dtype and device, as nn.utils.clip_grad_norm_ does.
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()


def gather_expert_state(model: nn.Module, opt: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                        opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`full_state_dicts(model, opt)`'s output with every expert shard replaced by the whole
    tensor, gathered over its expert-parallel group: one process's layout, in its key order.
    Every rank must call it; the dicts are filled where they hold entries (rank 0), and returned
    unchanged without shards."""
    shards = _shard_params(model)
    if not shards:
        return model_state, opt_state
    state = opt_state.get("state", {})
    for key, param, shard in shards:
        whole = _gather(param.detach(), shard)
        if model_state:
            model_state[key] = whole
        # Every rank gathers the same tensors (its own optimizer state), whatever its dicts hold.
        for name, value in opt.state.get(param, {}).items():
            if torch.is_tensor(value) and value.shape == param.shape:
                whole = _gather(value, shard)
                if key in state:
                    state[key][name] = whole
    if model_state:  # the keys in the model's order, as one process writes them
        inner = getattr(model, "module", model)
        model_state = {k: model_state[k] for k in inner.state_dict() if k in model_state}
    return model_state, opt_state


def _gather(t: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(shard.size)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.cat(parts).cpu()


def slice_expert_state(model: nn.Module, opt_state: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state (one process's layout) with each expert tensor cut to this rank's
    block, to load into the optimizer of an expert-parallel `model`. Unchanged without shards."""
    state = opt_state.get("state", {})
    for name, module in expert_shards(model).items():
        block = slice(module.start, module.start + module.n_local)
        for p, param in module.named_parameters():
            full = (module.n_experts, *param.shape[1:])
            entry = state.get(f"{name}.{p}", {})
            for key, value in entry.items():
                if torch.is_tensor(value) and tuple(value.shape) == full:
                    entry[key] = value[block].clone()
    return opt_state
