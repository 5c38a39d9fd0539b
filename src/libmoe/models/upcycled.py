"""Upcycling transformers decoder models in memory: their MLPs become libmoe MoE layers. This is
the structure of an upcycled transformers model (`libmoe.models.hf_upcycled` rebuilds it when it
loads one); the upcycling commands are `libmoe.upcycle`, which re-exports these names.

    from transformers import AutoModelForCausalLM
    from libmoe.upcycle.hf import upcycle_hf_model, moe_aux_loss
    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B")
    upcycle_hf_model(model, "smoe", n_experts=8, top_k=2)      # same logits at init (exact algorithms)
    loss = model(ids, labels=ids).loss + moe_aux_loss(model)

MLPs are found by structure, not module paths. Gated: `gate_proj`/`up_proj`/`down_proj` Linear
layers (Llama, Mistral, Qwen2, Qwen3, ...) or a fused `gate_up_proj` with `down_proj` (Phi-3); the
activation comes from the config's `hidden_act`: silu -> swiglu, gelu -> geglu. Not gated:
`c_fc`/`c_proj` (GPT-2's Conv1D, weights stored [in, out]) or `fc1`/`fc2` Linear layers (Phi-1/2);
the activation comes from `activation_function` (GPT-2) or `hidden_act`: gelu_new and
gelu_pytorch_tanh -> gelu_tanh, gelu -> gelu, relu -> relu, silu -> silu. Biases are copied into
the experts (the MoE layer gets `expert_bias=True`). A module counts as an MLP only if those
projections are its only parameters, and nothing inside an attention module does (GPT-2's
attention has c_attn/c_proj). The rest of the model (norms, attention, rotary, tied embeddings) is
untouched; GPT-2's dropout on the MLP output is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..moe import build_moe

SHARED_ALGORITHMS = ("sharede_v2", "sharede_v3")
"""Algorithms upcycled with the dense FFN as one shared expert (E - 1 routed copies, mixed 0.5/0.5)."""

# transformers activation name -> libmoe activation, for gated and for plain two-layer MLPs.
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}
PLAIN_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "relu": "relu", "silu": "silu", "swish": "silu"}
MLP_KINDS = "gate_proj/up_proj/down_proj, gate_up_proj/down_proj, c_fc/c_proj or fc1/fc2"
"""The MLP layouts find_mlps recognises (for error messages)."""


def copy_into_experts(experts, w1: Tensor, w2: Tensor, w3: Tensor | None = None,
                      generator: torch.Generator | None = None, noise_std: float = 0.0,
                      reinit_fraction: float = 0.0, *, b1: Tensor | None = None,
                      b2: Tensor | None = None, b3: Tensor | None = None) -> None:
    """Make every expert of `experts` (w1 [E, D, M], w2 [E, M, D], w3) the dense FFN
    (w1 [D, M], w2 [M, D], w3 [D, M] when gated; biases b1, b3 [M] and b2 [D] when it has them).
    `noise_std` adds N(0, noise_std * std(W)) to each copy; `reinit_fraction` re-draws that share
    of each expert's hidden units from N(mean(W), std(W)) of the dense weights (Drop-Upcycling).
    Both draw from `generator` and touch the weights only: biases are copied as they are. Experts
    with biases take a dense FFN without them as zero biases; the reverse is refused."""
    pairs = [("w1", w1), ("w2", w2), ("w3", w3)]
    for name, w in pairs:
        target = getattr(experts, name)
        if (target is None) != (w is None):
            raise ValueError(f"the dense FFN {'has' if w is not None else 'has no'} {name} (gate) but "
                             f"the MoE experts {'do not' if target is None else 'do'}; give the MoE "
                             "layer the source's activation (e.g. swiglu for gated MLPs).")
        if target is not None and tuple(target.shape[1:]) != tuple(w.shape):
            raise ValueError(f"expert {name} has shape {tuple(target.shape[1:])} but the dense FFN's "
                             f"is {tuple(w.shape)}; expert_dim must equal the dense FFN width.")
    biases = [("b1", b1), ("b2", b2), ("b3", b3)]
    if getattr(experts, "b1", None) is None:
        given = [name for name, b in biases if b is not None]
        if given:
            raise ValueError(f"the dense FFN has biases ({', '.join(given)}) but the MoE experts do "
                             "not; build the MoE layer with expert_bias=True.")
        biases = []
    else:
        biases = [(name, b) for name, b in biases if getattr(experts, name) is not None]
    for name, b in biases:
        target = getattr(experts, name)
        if b is not None and tuple(target.shape[1:]) != tuple(b.shape):
            raise ValueError(f"expert bias {name} has shape {tuple(target.shape[1:])} but the dense "
                             f"FFN's is {tuple(b.shape)}; expert_dim must equal the dense FFN width.")
    with torch.no_grad():
        for name, b in biases:
            target = getattr(experts, name)
            if b is None:
                target.zero_()
            else:
                target.copy_(b.to(target).expand_as(target))
        for name, w in pairs:
            target = getattr(experts, name)
            if target is None:
                continue
            target.copy_(w.to(target).expand_as(target))
            if noise_std > 0:
                noise = torch.randn(target.shape, generator=generator) * (noise_std * w.float().std())
                target.add_(noise.to(target))
        if reinit_fraction > 0:
            M = experts.expert_dim
            n = round(reinit_fraction * M)
            for e in range(experts.n_experts):
                units = torch.randperm(M, generator=generator)[:n]
                for name, w in pairs:
                    if w is None:
                        continue
                    rows = name == "w2"  # w2 [M, D] holds hidden units as rows, w1/w3 [D, M] as columns
                    shape = (n, w.shape[1]) if rows else (w.shape[0], n)
                    draw = (torch.randn(shape, generator=generator) * w.float().std() + w.float().mean())
                    target = getattr(experts, name)[e]
                    if rows:
                        target[units.to(target.device), :] = draw.to(target)
                    else:
                        target[:, units.to(target.device)] = draw.to(target)


class UpcycledMLP(nn.Module):
    """Stands in for a transformers MLP: runs `moe` and returns its output tensor, as the MLP did
    (then `dropout`, where the MLP ended in one, as GPT-2's does). The layer's last auxiliary loss,
    its terms and routing stay on `aux_loss` / `aux` / `routing`."""

    def __init__(self, moe: nn.Module, dropout: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.aux_loss: Tensor | None = None
        self.aux: dict[str, Tensor] = {}
        self.routing = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.moe(x)
        self.aux_loss, self.aux, self.routing = out.aux_loss, out.aux, out.routing
        return out.output if self.dropout is None else self.dropout(out.output)


@dataclass(frozen=True)
class DenseMLP:
    """One transformers MLP in libmoe's layout: w1 [D, M] (the gate, or the only input projection),
    w2 [M, D], w3 [D, M] (up, gated MLPs only) and the biases b1, b3 [M], b2 [D] (None if absent).
    `dropout` is the MLP's output dropout, if it has one."""

    w1: Tensor
    w2: Tensor
    w3: Tensor | None = None
    b1: Tensor | None = None
    b2: Tensor | None = None
    b3: Tensor | None = None
    dropout: nn.Module | None = None

    @property
    def gated(self) -> bool:
        return self.w3 is not None

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.b1, self.b2, self.b3))

    def biases(self) -> dict[str, Tensor | None]:
        return {"b1": self.b1, "b2": self.b2, "b3": self.b3}


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x @ weight + bias, weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _in_out(proj: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [in, out], bias [out] or None) of a Linear or Conv1D projection, detached."""
    w = proj.weight.detach()
    b = proj.bias.detach() if proj.bias is not None else None
    return (w if _is_conv1d(proj) else w.t()), b


def _only_parameters_in(mlp: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether the projections `names` hold every parameter of `mlp` (so it is nothing but them)."""
    if any(True for _ in mlp.parameters(recurse=False)):
        return False
    return all(name in names or not any(True for _ in child.parameters())
               for name, child in mlp.named_children())


def mlp_weights(mlp: nn.Module) -> DenseMLP | None:
    """The weights of `mlp` if it is an MLP upcycling understands (see the module docstring), else None."""
    children = dict(mlp.named_children())
    for names in (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"),
                  ("c_fc", "c_proj"), ("fc1", "fc2")):
        if set(names) <= set(children):
            break
    else:
        return None
    projs = [children[n] for n in names]
    if not all(isinstance(p, nn.Linear) or _is_conv1d(p) for p in projs):
        return None
    if not _only_parameters_in(mlp, names):
        return None
    (w_in, b_in), (w2, b2) = _in_out(projs[0]), _in_out(projs[-1])
    if names[0] == "gate_proj":
        w3, b3 = _in_out(projs[1])
        return DenseMLP(w_in, w2, w3, b_in, b2, b3)
    if names[0] == "gate_up_proj":  # Phi-3: [gate; up] in one projection
        w1, w3 = w_in.chunk(2, dim=1)
        b1, b3 = b_in.chunk(2) if b_in is not None else (None, None)
        return DenseMLP(w1, w2, w3, b1, b2, b3)
    dropout = children.get("dropout") if names[0] == "c_fc" else None  # GPT-2: on the MLP output
    return DenseMLP(w_in, w2, b1=b_in, b2=b2,
                    dropout=dropout if isinstance(dropout, nn.Dropout) else None)


def _in_attention(name: str, attention: list[str]) -> bool:
    return any(name == a or name.startswith(f"{a}.") for a in attention)


def find_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every MLP of `model` that upcycling understands, in depth order.
    Modules inside attention modules (class names containing "Attention") are never MLPs."""
    found, attention = [], []
    for name, module in model.named_modules():
        if isinstance(module, UpcycledMLP) or _in_attention(name, [n for n, _ in found] + attention):
            continue
        if "attention" in type(module).__name__.lower():
            attention.append(name)
            continue
        if mlp_weights(module) is not None:
            found.append((name, module))
    return found


def _activation(config: Any, gated: bool) -> str:
    """The libmoe activation for the model's MLPs, from its config; ValueError if none is exact."""
    keys = ("hidden_act",) if gated else ("activation_function", "hidden_act")
    key = next((k for k in keys if getattr(config, k, None) is not None), keys[0])
    value = getattr(config, key, None)
    table = GATED_ACTIVATIONS if gated else PLAIN_ACTIVATIONS
    if value not in table:
        kind = "gated" if gated else "two-layer (not gated)"
        raise ValueError(f"{key} {value!r} has no exact libmoe activation for a {kind} MLP; "
                         f"supported: {', '.join(table)}.")
    return table[value]


def upcycle_hf_model(model: nn.Module, algorithm: str, n_experts: int, top_k: int,
                     layers: list[int] | None = None, seed: int = 42, router_init_std: float = 0.02,
                     noise_std: float = 0.0, reinit_fraction: float = 0.0, **options: Any) -> nn.Module:
    """Replace the MLPs of a transformers model (the `layers`-th ones, default all) by MoE layers
    of `algorithm` whose experts copy the MLP, biases included, in place; returns the model.
    Routers come from one generator seeded with `seed`, consumed in layer order. Shared-expert
    algorithms get E - 1 routed copies plus the MLP as one shared expert, mixed 0.5/0.5. Noise and
    re-initialisation change the copied weights only, never the biases."""
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(f"no MLP ({MLP_KINDS}) in {type(model).__name__}; it cannot be upcycled here.")
    chosen = range(len(mlps)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < len(mlps)]
    if bad:
        raise ValueError(f"layers {bad}: the model has {len(mlps)} MLPs (0..{len(mlps) - 1}).")
    config = getattr(model, "config", None)
    dense = {i: mlp_weights(mlps[i][1]) for i in chosen}
    activations = {i: _activation(config, d.gated) for i, d in dense.items()}  # refuse before changing
    shared = algorithm in SHARED_ALGORITHMS
    opts = {"router_init_std": router_init_std, **options}
    E, K = n_experts, top_k
    if shared:
        opts.update(n_shared=1, shared_scaling=opts.get("shared_scaling", 0.5),
                    routed_scaling=opts.get("routed_scaling", 0.5))
        E, K = n_experts - 1, top_k - 1
    seeds = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed)
    for i in chosen:
        name, d = mlps[i][0], dense[i]
        D, M = d.w1.shape
        layer_opts = {"activation": activations[i], **opts}
        if d.has_bias:
            layer_opts.setdefault("expert_bias", True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=seeds, device="cpu")))
            layer = build_moe(algorithm, D, E, M, K, **layer_opts)
        layer.to(device=d.w1.device, dtype=d.w1.dtype)
        copy_into_experts(layer.experts, d.w1, d.w2, d.w3, noise, noise_std, reinit_fraction,
                          **d.biases())
        if layer.shared_experts is not None:
            copy_into_experts(layer.shared_experts, d.w1, d.w2, d.w3, **d.biases())
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UpcycledMLP(layer, d.dropout))
    return model


def moe_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the upcycled MLPs' auxiliary losses from the last forward (add it to the LM loss)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, UpcycledMLP) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())
