"""Upcycling transformers decoder models in memory: their gated MLPs become libmoe MoE layers.

    from transformers import AutoModelForCausalLM
    from libmoe.upcycle.hf import upcycle_hf_model, moe_aux_loss
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B")
    upcycle_hf_model(model, "smoe", n_experts=8, top_k=2)      # same logits at init (exact algorithms)
    loss = model(ids, labels=ids).loss + moe_aux_loss(model)

MLPs are found by structure, not module paths: `gate_proj`/`up_proj`/`down_proj` Linear layers
(Llama, Mistral, Qwen2, Qwen3, ...) or a fused `gate_up_proj` with `down_proj` (Phi-3). Their
activation comes from the model config's `hidden_act`: silu -> swiglu, gelu -> geglu. The rest
of the model (norms, attention, rotary, tied embeddings) is untouched. MLPs with biases are
refused, because libmoe experts have none; so is GPT-2, whose Conv1D MLP (with biases) is not a
gated MLP. Saving an upcycled transformers model so that `from_pretrained` rebuilds it is not
implemented yet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .core import SHARED_ALGORITHMS, copy_into_experts

ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


class UpcycledMLP(nn.Module):
    """Stands in for a transformers MLP: runs `moe` and returns its output tensor, as the MLP did.
    The layer's last auxiliary loss and routing stay on `aux_loss` / `routing`."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe
        self.aux_loss: Tensor | None = None
        self.routing = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.moe(x)
        self.aux_loss, self.routing = out.aux_loss, out.routing
        return out.output


def mlp_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor] | None:
    """(w1 gate [D, M], w2 down [M, D], w3 up [D, M]) of a gated MLP, or None if `mlp` is not one."""
    names = {n for n, _ in mlp.named_children()}
    if {"gate_proj", "up_proj", "down_proj"} <= names:
        layers = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    elif {"gate_up_proj", "down_proj"} <= names:  # Phi-3: [gate; up] in one projection
        layers = [mlp.gate_up_proj, mlp.down_proj]
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
    else:
        return None
    if not all(isinstance(lin, nn.Linear) for lin in layers):
        return None
    if any(lin.bias is not None for lin in layers):
        raise ValueError("this MLP has biases, which libmoe experts do not; upcycling it would not "
                         "reproduce the model (bias-free gated MLPs: Llama, Mistral, Qwen, Phi-3).")
    return gate.detach().t(), mlp.down_proj.weight.detach().t(), up.detach().t()


def find_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every gated MLP of `model`, in depth order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, UpcycledMLP):
            continue
        if any(name.startswith(f"{n}.") for n, _ in found):
            continue
        if mlp_weights(module) is not None:
            found.append((name, module))
    return found


def upcycle_hf_model(model: nn.Module, algorithm: str, n_experts: int, top_k: int,
                     layers: list[int] | None = None, seed: int = 42, router_init_std: float = 0.02,
                     noise_std: float = 0.0, reinit_fraction: float = 0.0, **options: Any) -> nn.Module:
    """Replace the gated MLPs of a transformers model (the `layers`-th ones, default all) by MoE
    layers of `algorithm` whose experts copy the MLP, in place; returns the model. Routers come
    from one generator seeded with `seed`, consumed in layer order. Shared-expert algorithms get
    E - 1 routed copies plus the MLP as one shared expert, mixed 0.5/0.5."""
    from ..moe import build_moe

    act_name = getattr(getattr(model, "config", None), "hidden_act", None)
    if act_name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {act_name!r} has no exact libmoe activation; supported: "
                         f"{', '.join(ACTIVATIONS)}.")
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(f"no gated MLP (gate_proj/up_proj/down_proj or gate_up_proj/down_proj) in "
                         f"{type(model).__name__}; it cannot be upcycled here.")
    chosen = range(len(mlps)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < len(mlps)]
    if bad:
        raise ValueError(f"layers {bad}: the model has {len(mlps)} MLPs (0..{len(mlps) - 1}).")
    shared = algorithm in SHARED_ALGORITHMS
    opts = {"activation": ACTIVATIONS[act_name], "router_init_std": router_init_std, **options}
    E, K = n_experts, top_k
    if shared:
        opts.update(n_shared=1, shared_scaling=opts.get("shared_scaling", 0.5),
                    routed_scaling=opts.get("routed_scaling", 0.5))
        E, K = n_experts - 1, top_k - 1
    seeds = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed)
    for i in chosen:
        name, mlp = mlps[i]
        w1, w2, w3 = mlp_weights(mlp)
        D, M = w1.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=seeds)))
            layer = build_moe(algorithm, D, E, M, K, **opts)
        layer.to(device=w1.device, dtype=w1.dtype)
        copy_into_experts(layer.experts, w1, w2, w3, noise, noise_std, reinit_fraction)
        if layer.shared_experts is not None:
            copy_into_experts(layer.shared_experts, w1, w2, w3)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UpcycledMLP(layer))
    return model


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the upcycled MLPs' auxiliary losses from the last forward (add it to the LM loss)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, UpcycledMLP) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())

