"""The MoE layer: routers (one class per algorithm), experts, dispatch backends, losses.

    from libmoe.moe import ALGORITHMS, build_moe
    layer = build_moe("smoe", d_model=512, n_experts=66, expert_dim=128, top_k=8)
    out = layer(x)          # out.output, out.aux_loss, out.aux, out.routing

ALGORITHMS and REGISTRY are live: they include routers registered later, with register_algorithm or
as plugins (entry points `libmoe.algorithms`, modules in LIBMOE_PLUGINS; docs/plugins.md).
Routing traces (`Trace`, `RoutingRecorder`, `list_traces`: `libmoe.moe.trace`) are what training
records and the analysis reads.
"""

from .dispatch import DISPATCH_BACKENDS, run_experts
from .expert_parallel import ExpertParallelExperts, ExpertShard, expert_shards, shard_experts
from .experts import ACTIVATIONS, Experts
from .layer import (
    DenseFFN,
    MoELayer,
    MoEOutput,
    attach_bias_balancing,
    build_moe,
    check_algorithm,
    layer_options,
    legacy_options,
    moe_layers,
    routes_per_token,
    scaled_options,
    set_training_progress,
    update_bias_balancing,
)
from .options import EXPERT_INITS, LIBMOE_INIT, MoEOptions, check_choice, check_number, libmoe_router_init_std
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
from .routers import ExpertChoiceRouter, Router, Routing, TopKRouter
from .trace import (
    TRACE_META,
    TRACE_TENSORS,
    RoutingRecorder,
    Trace,
    check_one_run,
    list_traces,
    routed_layers,
    trace_meta,
)

__all__ = [
    "ACTIVATIONS",
    "ALGORITHMS",
    "DISPATCH_BACKENDS",
    "ENTRY_POINT_GROUP",
    "EXPERT_INITS",
    "LIBMOE_INIT",
    "PLUGINS_ENV",
    "REGISTRY",
    "TRACE_META",
    "TRACE_TENSORS",
    "AlgorithmSpec",
    "DenseFFN",
    "ExpertChoiceRouter",
    "ExpertParallelExperts",
    "ExpertShard",
    "Experts",
    "MoELayer",
    "MoEOptions",
    "MoEOutput",
    "PluginError",
    "Router",
    "Routing",
    "RoutingRecorder",
    "TopKRouter",
    "Trace",
    "attach_bias_balancing",
    "build_moe",
    "check_algorithm",
    "check_choice",
    "check_number",
    "check_one_run",
    "expert_shards",
    "layer_options",
    "legacy_options",
    "libmoe_router_init_std",
    "list_traces",
    "load_plugins",
    "moe_layers",
    "routes_per_token",
    "register_algorithm",
    "routed_layers",
    "run_experts",
    "scaled_options",
    "set_training_progress",
    "shard_experts",
    "trace_meta",
    "update_bias_balancing",
]
