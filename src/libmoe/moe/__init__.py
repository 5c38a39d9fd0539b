"""The MoE layer: routers (one class per algorithm), experts, dispatch backends, losses.

    from libmoe.moe import ALGORITHMS, build_moe
    layer = build_moe("smoe", d_model=512, n_experts=66, expert_dim=128, top_k=8)
    out = layer(x)          # out.output, out.aux_loss, out.aux, out.routing
"""

from .dispatch import DISPATCH_BACKENDS, run_experts
from .experts import ACTIVATIONS, Experts
from .layer import (
    DenseFFN,
    MoELayer,
    MoEOutput,
    attach_bias_balancing,
    build_moe,
    moe_layers,
    set_training_progress,
    update_bias_balancing,
)
from .options import MoEOptions
from .routers import REGISTRY, AlgorithmSpec, Router, Routing, TopKRouter, register_algorithm

ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)
"""Names of the registered algorithms (the paper's seven, the earlier routers, extras, dense)."""

__all__ = [
    "ACTIVATIONS",
    "ALGORITHMS",
    "DISPATCH_BACKENDS",
    "AlgorithmSpec",
    "DenseFFN",
    "Experts",
    "MoELayer",
    "MoEOptions",
    "MoEOutput",
    "REGISTRY",
    "Router",
    "Routing",
    "TopKRouter",
    "attach_bias_balancing",
    "build_moe",
    "moe_layers",
    "register_algorithm",
    "run_experts",
    "set_training_progress",
    "update_bias_balancing",
]
