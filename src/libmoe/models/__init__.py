"""Language models built from `libmoe.moe` layers: config, presets, the Transformer, counting,
and reading what training writes (run configs, checkpoints, model directories), and generating
text from them with a KV cache (`generate`, libmoe.models.generation).

    from libmoe.models import build_model, count_parameters
    model = build_model(preset="paper-158m", algorithm="smoe")
    total, active = count_parameters(model)     # ~158M, ~36M

Every model class libmoe defines lives here: `MoETransformer`; with transformers installed
`libmoe.models.hf` (LibMoEForCausalLM), `libmoe.models.hf_upcycled` (upcycled transformers
models) and `TransformersLM` (`libmoe.models.transformers_lm`: a transformers model behind the
trainer's interface). The run config schema is `libmoe.models.run_config`, the checkpoint format
`libmoe.models.checkpoints`, the upcycled MLP layer of a transformers model
`libmoe.models.upcycled` (`UpcycledMLP`, `upcycle_hf_model`). `hf` and `hf_upcycled` import
transformers at their top, so they are not re-exported here; the other modules import it only
when a transformers model is loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..moe import DenseFFN, MoELayer, moe_layers
from .checkpoints import (
    INFO_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    verify_checkpoint,
)
from .config import PRESETS, ModelConfig, model_config
from .generation import cache_argument, check_sampling, generate, model_window, new_cache, supports_cache
from .loading import (
    LoadedModel,
    find_tokenizer,
    is_transformers_dir,
    load_model,
    resolve_checkpoint,
    save_model_dir,
)
from .run_config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    load_run_config,
    load_yaml,
    prepare_run_data,
    resolve_config,
)
from .transformer import KVCache, LMOutput, MoETransformer
from .transformers_lm import TransformersLM, load_transformers, transformers_run_config, transformers_source
from .upcycled import (
    GATED_ACTIVATIONS,
    MLP_KINDS,
    PLAIN_ACTIVATIONS,
    SHARED_ALGORITHMS,
    DenseMLP,
    UpcycledMLP,
    copy_into_experts,
    find_mlps,
    mlp_weights,
    moe_aux_loss,
    upcycle_hf_model,
)


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
    "GATED_ACTIVATIONS",
    "INFO_FILE",
    "MLP_KINDS",
    "MODEL_FILE",
    "OPTIMIZER_FILE",
    "PLAIN_ACTIVATIONS",
    "PRESETS",
    "SHARED_ALGORITHMS",
    "STATE_FILE",
    "DataConfig",
    "DenseMLP",
    "KVCache",
    "LMOutput",
    "LoadedModel",
    "MoETransformer",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TransformersLM",
    "UpcycledMLP",
    "build_model",
    "cache_argument",
    "check_sampling",
    "config_from_dict",
    "copy_into_experts",
    "count_parameters",
    "find_mlps",
    "find_tokenizer",
    "generate",
    "is_transformers_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "new_cache",
    "load_model",
    "load_run_config",
    "load_transformers",
    "load_yaml",
    "mlp_weights",
    "model_config",
    "model_window",
    "moe_aux_loss",
    "newest_intact_checkpoint",
    "prepare_run_data",
    "resolve_checkpoint",
    "resolve_config",
    "save_model_dir",
    "supports_cache",
    "transformers_run_config",
    "transformers_source",
    "upcycle_hf_model",
    "verify_checkpoint",
]
