"""Expert parallelism, the layer side: an MoE layer's routed experts sharded over the ranks of an
expert-parallel (EP) group, tokens exchanged with all-to-all.

Each rank routes its own tokens (its data shard) with its full router. `shard_experts` replaces a
layer's `experts` by an `ExpertParallelExperts` holding rank r's contiguous block of E / N experts
(w1 [E/N, D, M], ...; the state-dict keys stay those of `Experts`). Its forward, called by
`MoELayer.forward` exactly as `Experts` is, takes (x [T, D], global expert ids [T, K], weights):

1. the (token, choice) assignments that reach an FFN expert are sorted by expert, so they are
   grouped by the rank that owns it (expert // (E / N));
2. per-expert counts go to every rank with a small all-to-all, and both sides' counts come to the
   host in one `.tolist()`: the one host synchronisation of the EP path (torchtitan has it too),
   as the token exchange needs its split sizes on the host;
3. the token rows go to their experts' ranks (an autograd all-to-all, so gradients flow back),
   each rank runs its local experts on what it received with `run_experts` and weight 1, and the
   outputs return by the reverse all-to-all;
4. the sending rank multiplies the routing weights and adds the rows into its tokens, so the
   gradient of the routing weights stays on the rank that routed.

Shared experts, MoE++'s zero/copy/constant slots and TC-MoE's sign and null slots stay local:
they come from the router's `expert_plan` and `extra_output`, which `MoELayer.forward` handles
before and after calling the experts. Training across ranks (gradient reduction of the shards,
clipping, full checkpoints) is `libmoe.train.expert_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .dispatch import run_experts
from .experts import Experts
from .layer import MoELayer, moe_layers

__all__ = ["ExpertParallelExperts", "ExpertShard", "expert_shards", "shard_experts"]

_EXPERT_PARAMS = ("w1", "w2", "w3", "b1", "b2", "b3")


@dataclass(frozen=True)
class ExpertShard:
    """Where this rank's experts sit: `group` the expert-parallel process group (None: the default
    group), `rank` this process's rank in it and `size` its number of ranks (N). `replicas`: the
    group of ranks that hold the same shard (one per data-parallel replica; None when there is
    one), over which training sums the shard's gradients."""

    group: Any
    rank: int
    size: int
    replicas: Any = None


class ExpertParallelExperts(nn.Module):
    """Rank `shard.rank`'s block of the routed experts of `experts` (experts [r*E/N, (r+1)*E/N)),
    called like `Experts`: forward(x [T, D], global ids [T, K], weights [T, K], dispatch) ->
    [T, D_out], exchanging tokens with the other ranks of `shard.group` (every rank of the group
    must call it the same number of times). Parameters keep `Experts`' names and dtypes, sliced
    along the expert dimension."""

    def __init__(self, experts: Experts, shard: ExpertShard):
        super().__init__()
        E, N = experts.n_experts, shard.size
        if E % N:
            raise ValueError(f"{E} routed experts cannot be split over {N} expert-parallel ranks; "
                             "choose train.expert_parallel dividing the number of routed experts.")
        self.shard = shard
        self.n_experts, self.n_local = E, E // N
        self.start = shard.rank * self.n_local
        self.d_model, self.expert_dim = experts.d_model, experts.expert_dim
        self.output_dim = experts.output_dim
        self.activation, self.init_width = experts.activation, experts.init_width
        block = slice(self.start, self.start + self.n_local)
        for name in _EXPERT_PARAMS:
            p = getattr(experts, name)
            setattr(self, name, None if p is None else nn.Parameter(p.detach()[block].clone(),
                                                                    requires_grad=p.requires_grad))

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor, dispatch: str = "auto") -> Tensor:
        T, K = ids.shape
        E, L, N, group = self.n_experts, self.n_local, self.shard.size, self.shard.group
        flat = ids.reshape(-1)
        valid = (flat >= 0) & (flat < E)
        key = torch.where(valid, flat, E)  # skipped assignments sort last
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(E + 1, dtype=torch.long, device=ids.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        send = counts[:E].view(N, L)  # row n: what this rank sends to rank n's experts
        recv = torch.empty_like(send)  # row n: what rank n sends to this rank's experts
        dist.all_to_all_single(recv, send, group=group)
        sent, received = torch.stack([send, recv]).tolist()  # the EP path's one host sync
        send_splits = [sum(row) for row in sent]
        recv_splits = [sum(row) for row in received]
        rows = order[: sum(send_splits)]  # valid assignments, by expert, hence by rank
        tok = rows // K
        x_out = x[tok]
        if torch.is_autocast_enabled(x.device.type):  # the experts compute in it: send half the bytes
            x_out = x_out.to(torch.get_autocast_dtype(x.device.type))
        x_in = all_to_all_single_autograd(x_out, recv_splits, send_splits, group)
        # The received rows come rank by rank, each rank's sorted by expert: their local ids.
        n_in = sum(recv_splits)
        pattern = torch.arange(L, device=ids.device).repeat(N)
        local_ids = torch.repeat_interleave(pattern, recv.reshape(-1), output_size=n_in)
        ones = x_in.new_ones(n_in, 1)
        y_in = run_experts(dispatch, x_in, local_ids.unsqueeze(-1), ones, self.w1, self.w2, self.w3,
                           self.activation, self.b1, self.b2, self.b3)
        y = all_to_all_single_autograd(y_in, send_splits, recv_splits, group)
        # Combine in fp32 at least (a bf16 expert output times its fp32 routing weight).
        dtype = torch.promote_types(y.dtype, torch.float32)
        w = weights.reshape(-1)[rows].to(dtype).unsqueeze(-1)
        out = torch.zeros(T, y.shape[-1], dtype=dtype, device=y.device).index_add(0, tok, y.to(dtype) * w)
        return out.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"experts {self.start}..{self.start + self.n_local - 1} of {self.n_experts} "
                f"(expert-parallel rank {self.shard.rank} of {self.shard.size}), d_model={self.d_model}, "
                f"expert_dim={self.expert_dim}, activation={self.activation.name}")


def shard_experts(model: nn.Module, shard: ExpertShard) -> nn.Module:
    """Replace the routed experts of every MoE layer in `model` by this rank's block of them
    (shared experts and dense FFNs stay whole); returns `model`. Every rank of `shard.group` must
    hold the same full weights beforehand (built from the same seed, or loaded from one file)."""
    for layer in moe_layers(model):
        if isinstance(layer, MoELayer) and isinstance(layer.experts, Experts):
            layer.experts = ExpertParallelExperts(layer.experts, shard)
    return model


def expert_shards(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """The sharded experts of `model` by module name (empty when it is not expert-parallel); a
    DDP/FSDP wrapper's `module.` prefix is left out, so names match the full state dict's keys."""
    inner = getattr(model, "module", model)
    return {name: m for name, m in inner.named_modules() if isinstance(m, ExpertParallelExperts)}
