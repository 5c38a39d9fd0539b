"""VIT-stage sparse upcycling of a LibMoEVLM (the paper's Appendix A.1/B.1): every MLP of the vision
tower (found by structure: `libmoe.upcycle.hf.find_mlps`) and the `mlp2x_gelu` connector become MoE
layers of `algorithm` with experts that copy the dense MLP exactly, biases included. The LM stays
dense.

- Routers come from one generator seeded with `seed`, consumed in layer order (vision layers in
  depth order, then the connector): layers differ, runs reproduce. (The original code seeded every
  layer's router with the same generator state, so all layers started identical.)
- Shared-expert algorithms: E - 1 routed copies plus the MLP as one shared expert, mixed 0.5/0.5,
  top_k - 1 routed (as `libmoe upcycle`).
- MoE++: its copy and constant experts exist only where input and output widths match (the vision
  MLPs); the connector (vision width x scales -> LM width) keeps the zero experts only. The first
  MoE layer of a chain has no gating residual (no previous logits); the connector starts its own.
- The connector's MoE layer has `output_dim` = the LM width.
- `aux_combine`: "sum" adds every layer's auxiliary loss (ALGORITHMS.md); "mean" averages over the
  MoE layers, as the released VLM runs did, so the balance coefficient means the same for a
  28-layer tower as for one layer. The paper preset uses "mean".

Exact at initialisation (same logits as the dense model, fp32) for the algorithms in
`libmoe.upcycle.core.EXACT_AT_INIT`; `NOT_EXACT_AT_INIT` says why the others are not.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..moe import REGISTRY, build_moe
from ..moe.layer import check_algorithm
from ..upcycle.core import SHARED_ALGORITHMS, copy_into_experts
from ..upcycle.hf import PLAIN_ACTIVATIONS, find_mlps, mlp_weights
from .model import LibMoEVLM, VLMMoE, build_vlm
from .presets import load_vlm_preset

AUX_COMBINE = ("sum", "mean")


def _vision_activation(model: LibMoEVLM) -> str:
    act = getattr(model.vision.config, "hidden_act", None)
    if act not in PLAIN_ACTIVATIONS:
        raise ValueError(f"the vision tower's MLP activation {act!r} has no exact libmoe expert "
                         f"activation (supported: {', '.join(PLAIN_ACTIVATIONS)}); it cannot be upcycled "
                         "exactly.")
    return PLAIN_ACTIVATIONS[act]


def upcycle_vlm(model: LibMoEVLM, algorithm: str, n_experts: int = 6, top_k: int = 3, seed: int = 42,
                router_init_std: float = 0.02, aux_combine: str = "mean", connector: bool = True,
                options: dict[str, Any] | None = None, copy_weights: bool = True) -> LibMoEVLM:
    """Upcycle `model` in place (see the module docstring) and record the settings in
    `model.spec["moe"]`, so a saved model rebuilds its MoE layers. `copy_weights=False` builds the
    layers only (loading a checkpoint overwrites them)."""
    check_algorithm(algorithm)
    if algorithm == "dense":
        raise ValueError("algorithm 'dense' has no router; VIT with a dense model is the PFT stage "
                         "continued (libmoe vlm train --stage pft --init RUN).")
    if aux_combine not in AUX_COMBINE:
        raise ValueError(f"aux_combine={aux_combine!r}; choose one of {', '.join(AUX_COMBINE)}.")
    if model.moe_layers():
        raise ValueError("this model is already upcycled.")
    targets: list[tuple[nn.Module, str, Any, str, bool]] = []  # parent, child, dense, activation, vision
    for name, module in find_mlps(model.vision):
        parent_name, _, child = name.rpartition(".")
        parent = model.vision.get_submodule(parent_name) if parent_name else model.vision
        targets.append((parent, child, mlp_weights(module), _vision_activation(model), True))
    if not targets:
        raise ValueError(f"no MLP found in the vision tower {type(model.vision).__name__}.")
    if connector and model.connector.kind == "mlp2x_gelu":
        targets.append((model, "connector", mlp_weights(model.connector), "gelu", False))
    router = REGISTRY[algorithm].router
    own = dict(getattr(router, "OPTIONS", {}))
    base = {"router_init_std": router_init_std, **(options or {})}
    E, K = n_experts, top_k
    if algorithm in SHARED_ALGORITHMS:
        base.update(n_shared=1, shared_scaling=base.get("shared_scaling", 0.5),
                    routed_scaling=base.get("routed_scaling", 0.5))
        E, K = n_experts - 1, top_k - 1
    seeds = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    first_vision = True
    for parent, child, dense, activation, vision in targets:
        D, M = dense.w1.shape
        d_out = dense.w2.shape[1]
        opts = {"activation": activation, **base}
        if dense.has_bias:
            opts.setdefault("expert_bias", True)
        if d_out != D:
            opts["output_dim"] = d_out
            if "n_copy" in own:  # MoE++: copy/constant experts need matching widths
                opts.update(n_copy=0, n_const=0)
        if "gating_residual" in own:  # MoE++'s W_g only where the previous layer's logits arrive
            chained = vision and not first_vision
            opts["gating_residual"] = base.get("gating_residual", True) if chained else False
        layer_seed = int(torch.randint(2**62, (1,), generator=seeds, device="cpu"))
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if device.type == "meta"
                                                  else contextlib.nullcontext()):
            torch.manual_seed(layer_seed)
            layer = build_moe(algorithm, D, E, M, K, **opts)
        layer.to(device=device, dtype=dense.w1.dtype)
        if copy_weights:
            copy_into_experts(layer.experts, dense.w1, dense.w2, dense.w3, **dense.biases())
            if layer.shared_experts is not None:
                copy_into_experts(layer.shared_experts, dense.w1, dense.w2, dense.w3, **dense.biases())
        setattr(parent, child, VLMMoE(layer, model.chain if vision else None, dense.dropout))
        first_vision = first_vision and not vision
    model.aux_combine = aux_combine
    model.spec["moe"] = {"algorithm": algorithm, "n_experts": n_experts, "top_k": top_k, "seed": seed,
                         "router_init_std": router_init_std, "aux_combine": aux_combine,
                         "connector": connector, "options": dict(options or {})}
    return model


def parameter_report(preset: str | dict[str, Any], algorithm: str = "smoe",
                     device: str | torch.device = "meta") -> dict[str, int]:
    """Parameter counts of the preset's VIT model upcycled to `algorithm`: {"vision_moe",
    "connector_moe", "lm", "total"}. On "meta" nothing is allocated or downloaded (the preset holds
    the architecture dims); for paper-phi35-siglip this is the paper's Table 3 (1.752B, 0.099B,
    3.821B, 5.67B)."""
    p = load_vlm_preset(preset) if isinstance(preset, str) else preset
    model = build_vlm(p["model"], None, device=device)
    moe = dict(p.get("moe") or {})
    moe.pop("algorithm", None)
    upcycle_vlm(model, algorithm, copy_weights=str(device) != "meta", **moe)
    count = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    report = {"vision_moe": count(model.vision), "connector_moe": count(model.connector),
              "lm": count(model.lm)}
    report["total"] = count(model)
    return report
