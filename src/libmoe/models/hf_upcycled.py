"""Upcycled transformers models as transformers classes: `LibMoEUpcycledConfig` (model_type
"libmoe_upcycled": the source's config plus the upcycling spec) and `LibMoEUpcycledForCausalLM`,
which rebuilds the source architecture, upcycles its MLPs (`libmoe.models.upcycled`) and loads the
saved weights. Registered with the Auto classes like `libmoe.models.hf`, so
`AutoModelForCausalLM.from_pretrained(DIR)` loads an upcycled Llama/Qwen/... directory after
`import libmoe`. Writing such a directory is `libmoe.upcycle` (`wrap_upcycled`,
`upcycle_transformers`). Needs transformers (`pip install 'libmoe[hub]'`).

Loading is transformers' own (`from_pretrained`'s options apply), after the config is fitted to
files saved before MoE++'s slot counts scaled with E; the MoE layers initialise the tensors a
checkpoint lacks like a freshly built layer, and the routers' constants are recomputed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from ..moe import MoELayer, legacy_options
from .checkpoints import restore_router_buffers, saved_shapes
from .generation import cache_argument
from .hf_compat import old_cache_name
from .upcycled import SHARED_ALGORITHMS, moe_aux_loss, upcycle_hf_model


def upcycle_spec(algorithm: str, n_experts: int, top_k: int, layers: list[int] | None = None,
                 seed: int = 42, router_init_std: float = 0.02, **options: Any) -> dict[str, Any]:
    """The arguments of `upcycle_hf_model` that fix the upcycled model's structure, as saved."""
    return {"algorithm": algorithm, "n_experts": n_experts, "top_k": top_k, "layers": layers,
            "seed": seed, "router_init_std": router_init_std, "options": dict(options)}


# upcycle_spec's keys -> the config's (flat, standard where transformers has a name) attributes.
SPEC_NAMES = {"algorithm": "algorithm", "n_experts": "num_experts", "top_k": "num_experts_per_tok",
              "layers": "moe_layers", "seed": "upcycle_seed", "router_init_std": "router_init_std",
              "options": "moe_options"}
# Attributes that are not the source model's: they stay out of base_config().
OWN_NAMES = {*SPEC_NAMES.values(), "base_model_type", "model_type", "architectures",
             "transformers_version", "auto_map"}
# Names every config carries at the top level; GPT-2 spells them its own way.
SHAPE_NAMES = {"vocab_size": (), "hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",),
               "num_attention_heads": ("n_head",), "max_position_embeddings": ("n_positions",)}


class LibMoEUpcycledConfig(PretrainedConfig):
    """The source model's config, flat (its own fields at the top level, `base_model_type` its
    model_type, and `hidden_size`, `num_hidden_layers`, ... under their standard names whatever the
    source calls them), plus the upcycling: `algorithm`, `num_experts` (E, a shared expert
    included), `num_experts_per_tok`, `moe_layers` (None: every MLP), `upcycle_seed`,
    `router_init_std` and the routing options `moe_options`. `upcycle` is that part as
    `upcycle_spec`'s dict. Configs written before it was flat (`base` and `upcycle` dicts) load."""

    model_type = "libmoe_upcycled"

    def __init__(self, base_model_type: str = "llama", algorithm: str = "smoe", num_experts: int = 8,
                 num_experts_per_tok: int = 2, moe_layers: list[int] | None = None,
                 upcycle_seed: int = 42, router_init_std: float = 0.02,
                 moe_options: dict[str, Any] | None = None, **kwargs: Any):
        base, spec = kwargs.pop("base", None), kwargs.pop("upcycle", None)  # the nested format
        if base:
            base = dict(base)
            base_model_type = base.pop("model_type", base_model_type)
            kwargs = {**kwargs, **base}
        self.base_model_type = base_model_type
        self.algorithm, self.num_experts = algorithm, num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layers, self.upcycle_seed, self.router_init_std = moe_layers, upcycle_seed, router_init_std
        self.moe_options = dict(moe_options or {})
        if spec:
            self.upcycle = {**self.upcycle, **spec}
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        source = self.base_config()
        for name, aliases in SHAPE_NAMES.items():
            if name not in self.__dict__:
                for alias in (name, *aliases):
                    if hasattr(source, alias):
                        setattr(self, name, getattr(source, alias))
                        break

    @property
    def upcycle(self) -> dict[str, Any]:
        """The upcycling as `upcycle_spec` gives it (upcycle_hf_model's arguments)."""
        spec = {key: getattr(self, name) for key, name in SPEC_NAMES.items()}
        spec["options"] = dict(spec["options"] or {})
        return spec

    @upcycle.setter
    def upcycle(self, spec: dict[str, Any]) -> None:
        for key, value in spec.items():
            setattr(self, SPEC_NAMES[key], dict(value or {}) if key == "options" else value)

    def base_config(self) -> PretrainedConfig:
        """The source model's config."""
        fields = {k: v for k, v in self.to_dict().items() if k not in OWN_NAMES}
        return AutoConfig.for_model(self.base_model_type, **fields)


class LibMoEUpcycledForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers causal LM whose MLPs are libmoe MoE layers (`.model` is the source class).
    With labels, the loss is the source's language-model loss plus the MoE auxiliary loss.
    Decoding (cache, masks, positions, generate) and the attention implementation are the
    source model's."""

    config_class = LibMoEUpcycledConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: LibMoEUpcycledConfig):
        super().__init__(config)
        spec = dict(config.upcycle)
        options = spec.pop("options", {})
        base = config.base_config()
        if config._attn_implementation is not None:
            base._attn_implementation = config._attn_implementation
        self.model = AutoModelForCausalLM.from_config(base)
        upcycle_hf_model(self.model, **spec, **options)
        if not any(p.is_meta for p in self.model.parameters()):
            mark_initialised(self.model)  # the MoE layers hold their upcycled copies: keep them
        self.post_init()

    def _init_weights(self, module):  # the source model initialises its own modules
        pass

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The source model's initialisation, then each MoE layer's own (a freshly built layer's
        parameters and buffers, for those transformers has not loaded or marked initialised)."""
        super().initialize_weights()
        for layer in [m for m in self.modules() if isinstance(m, MoELayer)]:
            with torch.device("cpu"):
                twin = layer.fresh_copy()
            fresh = dict(twin.named_parameters()) | dict(twin.named_buffers())
            for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
                init.copy_(tensor, fresh[name])

    def set_attn_implementation(self, attn_implementation, *args: Any, **kwargs: Any):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self.model.set_attn_implementation(attn_implementation, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value) -> None:
        self.model.set_output_embeddings(value)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values=None, return_dict=None, **kwargs: Any):
        cache = cache if cache is not None else old_cache_name(past_key_values)
        if cache is not None:
            kwargs[cache_argument(self.model)] = cache
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                         logits_to_keep=logits_to_keep, return_dict=True, **kwargs)
        if labels is not None:
            out.loss = out.loss + moe_aux_loss(self.model)
        return out if return_dict is not False else out.to_tuple()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        local = Path(str(path))
        if not local.exists() and str(path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"{path}: no such directory (an upcycled model directory holds "
                                    "config.json and model.safetensors, as libmoe upcycle writes them).")
        if local.is_dir():
            config = kwargs.get("config")
            if not isinstance(config, LibMoEUpcycledConfig):
                config = cls.config_class.from_pretrained(str(local))
            shapes = saved_shapes(local, lambda key: key.endswith("moe.router.weight"))
            kwargs["config"] = _fit_saved_layout(config, shapes)
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        except RuntimeError as err:  # shapes differ: the weights are not this spec's
            if "mismatch" not in str(err):
                raise
            raise ValueError(f"{path}: weights do not match the upcycled model its config.json "
                             "describes (tensor shapes differ; transformers' load report above "
                             "names them).") from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # with output_loading_info
        restore_router_buffers(model)  # the routers' constants, which meta loading may leave unset
        return loaded


def mark_initialised(model: nn.Module) -> None:
    """Flag the MoE layers' tensors of upcycled `model` as initialised, so that transformers' init
    pass (post_init, and the wrapper's initialize_weights) keeps the upcycled weights."""
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        for tensor in [*layer.parameters(), *layer.buffers()]:
            tensor._is_hf_initialized = True


def _fit_saved_layout(config: LibMoEUpcycledConfig,
                      shapes: dict[str, tuple[int, ...]]) -> LibMoEUpcycledConfig:
    """`config`, its upcycling options completed with the slot counts a MoE++ model saved before
    they scaled with E was built with (libmoe.moe.legacy_options), when its router weights
    (`shapes`: saved key -> shape) say so."""
    spec = dict(config.upcycle)
    shape = next((v for k, v in shapes.items() if k.endswith("moe.router.weight") and len(v) == 2), None)
    if shape is None or "algorithm" not in spec:
        return config
    options = dict(spec.get("options") or {})
    E, K = spec["n_experts"], spec["top_k"]
    if spec["algorithm"] in SHARED_ALGORITHMS:  # as upcycle_hf_model builds them
        E, K = E - 1, K - 1
        options.setdefault("n_shared", 1)
    legacy = legacy_options(spec["algorithm"], int(shape[1]), E, K, int(shape[0]),
                            router_init_std=spec.get("router_init_std", 0.02), **options)
    if legacy:
        config.upcycle = {**spec, "options": {**(spec.get("options") or {}), **legacy}}
    return config


def register_auto() -> None:
    """Register LibMoEUpcycledConfig / LibMoEUpcycledForCausalLM with the Auto classes (idempotent)."""
    with contextlib.suppress(ValueError):
        AutoConfig.register("libmoe_upcycled", LibMoEUpcycledConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LibMoEUpcycledConfig, LibMoEUpcycledForCausalLM)


register_auto()  # importing this module is enough (libmoe.auto imports it when transformers loads)
