"""Language models built from `libmoe.moe` layers: config, presets, the Transformer, counting.

    from libmoe.models import build_model, count_parameters
    model = build_model(preset="paper-158m", algorithm="smoe")
    total, active = count_parameters(model)     # ~158M, ~36M
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..moe import DenseFFN, MoELayer, moe_layers
from .config import PRESETS, ModelConfig, model_config
from .loading import LoadedModel, load_model, resolve_checkpoint
from .transformer import LMOutput, MoETransformer


def build_model(preset: str = "micro", algorithm: str = "smoe", **overrides: Any) -> MoETransformer:
    """A freshly initialised model of `preset` for `algorithm` (ModelConfig fields as overrides)."""
    return MoETransformer(model_config(preset, algorithm, **overrides))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters. Active counts everything a token uses: embeddings, head,
    attention, norms, routers, shared experts and top_k of the E routed experts in each MoE layer
    (the MoE++/TC-MoE upper bound where k slots may be computation-free)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        if isinstance(layer, DenseFFN):
            continue
        assert isinstance(layer, MoELayer)
        per_expert = sum(p.numel() for p in layer.experts.parameters()) / layer.n_experts
        inactive += round(per_expert * (layer.n_experts - layer.top_k))
    return total, total - inactive


__all__ = [
    "PRESETS",
    "LMOutput",
    "LoadedModel",
    "ModelConfig",
    "MoETransformer",
    "build_model",
    "count_parameters",
    "load_model",
    "model_config",
    "resolve_checkpoint",
]
