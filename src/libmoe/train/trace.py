"""Routing traces: every MoE layer's routing of a fixed probe set, saved beside each checkpoint.

Format (stable; the analysis tools read it):
- ``routing_trace.safetensors``: for each MoE layer l (numbered 0.. in depth order among MoE
  layers) ``layer<l>.topk_idx`` [N, k] int64 slot ids sorted by weight (descending),
  ``layer<l>.topk_weight`` [N, k] float32 normalised weights, ``layer<l>.probs`` [N, R] float32
  router probabilities; and per token ``tokens`` [N] int64, ``domain`` [N] int64 (index into the
  JSON's ``domains``), ``position`` [N] int64 (position in its probe sequence).
- ``routing_trace.json``: ``step``, ``algorithm``, ``n_experts``, ``top_k``, ``n_slots`` (R of
  each layer), ``layers`` (the model block index of each MoE layer), ``domains``, ``n_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

TRACE_TENSORS = "routing_trace.safetensors"
TRACE_META = "routing_trace.json"


@torch.no_grad()
def record_routing(model: nn.Module, tokens: Tensor, batch_size: int = 16) -> dict[str, Tensor]:
    """Run `model` (eval mode, no grad) on tokens [n, L] and gather each MoE layer's routing."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_layer: list[dict[str, list[Tensor]]] = []
    try:
        for start in range(0, len(tokens), batch_size):
            out = model(tokens[start : start + batch_size].to(device))
            for l, routing in enumerate(out.routing):
                if l == len(per_layer):
                    per_layer.append({"topk_idx": [], "topk_weight": [], "probs": []})
                per_layer[l]["topk_idx"].append(routing.topk_idx.cpu())
                per_layer[l]["topk_weight"].append(routing.topk_weight.float().cpu())
                per_layer[l]["probs"].append(routing.probs.float().cpu())
    finally:
        model.train(was_training)
    return {f"layer{l}.{name}": torch.cat(parts).contiguous()
            for l, layer in enumerate(per_layer) for name, parts in layer.items()}


def save_trace(
    directory: str | Path,
    model: nn.Module,
    tokens: Tensor,
    domain: Tensor,
    domains: list[str],
    step: int,
    run: nn.Module | None = None,
) -> None:
    """Record and write a routing trace of the probe set (tokens, domain: [n, L]) to `directory`.
    `run`: the module to call when it differs from `model` (a DDP/FSDP wrapper of it)."""
    from ..moe import MoELayer, moe_layers

    tensors = record_routing(run if run is not None else model, tokens)
    n, length = tokens.shape
    tensors["tokens"] = tokens.reshape(-1).contiguous()
    tensors["domain"] = domain.reshape(-1).contiguous()
    tensors["position"] = torch.arange(length).repeat(n)
    routed = [m for m in moe_layers(model) if isinstance(m, MoELayer)]
    blocks = [i for i, b in enumerate(getattr(model, "blocks", [])) if isinstance(b.ffn, MoELayer)]
    cfg = getattr(model, "config", None)
    meta = {
        "step": step,
        "algorithm": getattr(cfg, "algorithm", None),
        "n_experts": routed[0].n_experts if routed else 0,
        "top_k": routed[0].top_k if routed else 0,
        "n_slots": [int(tensors[f"layer{l}.probs"].shape[-1]) for l in range(len(routed))],
        "layers": blocks,
        "domains": list(domains),
        "n_tokens": int(n * length),
    }
    directory = Path(directory)
    save_file(tensors, str(directory / TRACE_TENSORS))
    (directory / TRACE_META).write_text(json.dumps(meta, indent=2) + "\n")
