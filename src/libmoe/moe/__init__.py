"""The MoE layer: routers (one class per algorithm), experts, dispatch backends, losses.

    from libmoe.moe import ALGORITHMS, build_moe
    layer = build_moe("smoe", d_model=512, n_experts=66, expert_dim=128, top_k=8)
    out = layer(x)          # out.output, out.aux_loss, out.aux, out.routing

ALGORITHMS and REGISTRY are live: they include routers registered later, with register_algorithm or
as plugins (entry points `libmoe.algorithms`, modules in LIBMOE_PLUGINS; docs/plugins.md).
"""

from .dispatch import DISPATCH_BACKENDS, run_experts
from .experts import ACTIVATIONS, Experts
from .layer import (
    DenseFFN,
    MoELayer,
    MoEOutput,
    attach_bias_balancing,
    build_moe,
    check_algorithm,
    moe_layers,
    set_training_progress,
    update_bias_balancing,
)
from .options import MoEOptions
from .registry import (
    ALGORITHMS,
    ENTRY_POINT_GROUP,
    PLUGINS_ENV,
    REGISTRY,
    AlgorithmSpec,
    PluginError,
    load_plugins,
    register_algorithm,
)
from .routers import Router, Routing, TopKRouter

__all__ = [
    "ACTIVATIONS",
    "ALGORITHMS",
    "DISPATCH_BACKENDS",
    "ENTRY_POINT_GROUP",
    "AlgorithmSpec",
    "DenseFFN",
    "Experts",
    "MoELayer",
    "MoEOptions",
    "MoEOutput",
    "PLUGINS_ENV",
    "PluginError",
    "REGISTRY",
    "Router",
    "Routing",
    "TopKRouter",
    "attach_bias_balancing",
    "build_moe",
    "check_algorithm",
    "load_plugins",
    "moe_layers",
    "register_algorithm",
    "run_experts",
    "set_training_progress",
    "update_bias_balancing",
]
