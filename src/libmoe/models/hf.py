"""libmoe's Transformer as transformers models: `LibMoEConfig` (model_type "libmoe"),
`LibMoEModel` (the decoder: embeddings, blocks, final norm) and `LibMoEForCausalLM` (plus the
output head), registered with AutoConfig / AutoModel / AutoModelForCausalLM by `register_auto()`.
After `import libmoe`, `AutoModelForCausalLM.from_pretrained(DIR)` loads a libmoe model directory
(no trust_remote_code). Needs transformers (`pip install 'libmoe[hub]'`); tested against the
version the `test` extra pins (docs/transformers.md).

The config is flat, with transformers' standard names (`hidden_size`, `num_hidden_layers`,
`num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, ...; libmoe's own names, `d_model`,
`n_experts`, `top_k`, ..., are aliases through `attribute_map`), plus `algorithm` and the routing
options (`moe_options`). Configs written before it was flat (the ModelConfig under `libmoe`) load.

The models decode like transformers' own decoders: a KV cache (DynamicCache, created when
`use_cache`), `attention_mask` with left padding, `position_ids`, `inputs_embeds`,
`logits_to_keep`, `output_hidden_states`, `output_attentions` (explicit attention; the "eager"
implementation computes it so throughout), and every `generate` mode. With labels (shifted inside,
-100 ignored) the loss is the cross-entropy plus the MoE auxiliary loss; `aux_loss` rides along,
and each MoE layer's router logits with `output_router_logits`.

Weights: `save_pretrained` writes transformers' layout (`model.embed.weight`, ...,
`lm_head.weight`). libmoe's own model directories hold the MoETransformer's keys (`embed.weight`,
..., `head.weight`), and so did this class's `save_pretrained` before the decoder and head were
split (`model.head.weight`): `from_pretrained` reads both layouts.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .checkpoints import restore_router_buffers, saved_shapes, weight_files
from .config import ModelConfig
from .hf_compat import CACHE_FIELD, old_cache_name
from .transformer import Block, Decoder, MoETransformer, rotary_tables

# ModelConfig field -> the config's (transformers') name. The libmoe names read and set the same
# attributes (LibMoEConfig.attribute_map).
STANDARD_NAMES = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "head_dim": "head_dim", "rope_fraction": "partial_rotary_factor",
    "rope_base": "rope_theta", "max_seq_len": "max_position_embeddings", "algorithm": "algorithm",
    "n_experts": "num_experts", "expert_dim": "moe_intermediate_size", "top_k": "num_experts_per_tok",
    "n_shared": "num_shared_experts", "moe_every": "decoder_sparse_step", "moe_options": "moe_options",
    "norm_eps": "layer_norm_eps", "init_std": "initializer_range", "ffn_dim": "intermediate_size",
    "moe_layers": "moe_layers",
}
# Routing options with a standard config name of their own: (config name, MoEOptions field).
OPTION_NAMES = (("hidden_act", "activation"), ("router_aux_loss_coef", "balance_coef"),
                ("router_z_loss_coef", "z_coef"))


class LibMoEConfig(PretrainedConfig):
    """A libmoe model's configuration with transformers' standard names (see the module
    docstring). `hidden_act`, `router_aux_loss_coef` and `router_z_loss_coef` are the experts'
    activation and the balance and z loss weights (None: the algorithm's default); `moe_options`
    holds every other routing option (ALGORITHMS.md, docs/moe.md). `intermediate_size` is the dense
    FFN width (None: num_experts_per_tok * moe_intermediate_size, the compute-matched dense FFN),
    `decoder_sparse_step` puts an MoE layer in every such block (the last of each group), and
    `moe_layers` lists the MoE blocks instead. `model_config()` is the libmoe ModelConfig."""

    model_type = "libmoe"
    # Not `top_k`: transformers reads a config's top_k as a generation setting.
    attribute_map = {name: std for name, std in STANDARD_NAMES.items() if name not in (std, "top_k")} | {
        "num_local_experts": "num_experts"}
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size: int = 8000, hidden_size: int = 512, num_hidden_layers: int = 16,
                 num_attention_heads: int = 4, head_dim: int = 82, partial_rotary_factor: float = 0.5,
                 rope_theta: float = 10000.0, max_position_embeddings: int = 1024,
                 algorithm: str = "smoe", num_experts: int = 66, moe_intermediate_size: int = 128,
                 num_experts_per_tok: int = 8, num_shared_experts: int = 2,
                 decoder_sparse_step: int = 1, moe_layers: list[int] | None = None,
                 intermediate_size: int | None = None, hidden_act: str | None = None,
                 router_aux_loss_coef: float | None = None, router_z_loss_coef: float | None = None,
                 moe_options: dict[str, Any] | None = None, layer_norm_eps: float = 1e-5,
                 initializer_range: float = 0.02, output_router_logits: bool = False,
                 use_cache: bool = True, tie_word_embeddings: bool = False,
                 pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, **kwargs: Any):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.head_dim, self.partial_rotary_factor = head_dim, partial_rotary_factor
        self.rope_theta = rope_theta
        self.max_position_embeddings, self.algorithm = max_position_embeddings, algorithm
        self.num_experts, self.moe_intermediate_size = num_experts, moe_intermediate_size
        self.num_experts_per_tok, self.num_shared_experts = num_experts_per_tok, num_shared_experts
        self.decoder_sparse_step = decoder_sparse_step
        self.moe_layers = list(moe_layers) if moe_layers is not None else None
        self.intermediate_size, self.hidden_act = intermediate_size, hidden_act
        self.router_aux_loss_coef, self.router_z_loss_coef = router_aux_loss_coef, router_z_loss_coef
        self.moe_options = dict(moe_options or {})
        self.layer_norm_eps, self.initializer_range = layer_norm_eps, initializer_range
        self.output_router_logits, self.use_cache = output_router_logits, use_cache
        legacy = kwargs.pop("libmoe", None)  # a config.json written before the config was flat
        if legacy:
            for name, value in _standard(ModelConfig(**legacy), resolved=False).items():
                setattr(self, name, value)
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.model_config()  # every invalid value fails here, with libmoe's message

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> LibMoEConfig:
        """The config of libmoe ModelConfig `cfg` (kwargs: further config attributes, e.g. token ids)."""
        return cls(**_standard(cfg), **kwargs)

    def model_config(self) -> ModelConfig:
        """The libmoe ModelConfig these attributes describe."""
        values = {name: getattr(self, std) for name, std in STANDARD_NAMES.items()}
        options = dict(values["moe_options"] or {})
        for std, option in OPTION_NAMES:
            if getattr(self, std, None) is not None:
                options[option] = getattr(self, std)
        values["moe_options"] = options
        return ModelConfig(**values)


def _standard(cfg: ModelConfig, resolved: bool = True) -> dict[str, Any]:
    """ModelConfig `cfg` as LibMoEConfig's keyword arguments: with to_dict's resolved MoE options
    (what a new config records), or `cfg`'s own (what an old config.json said, which loading
    completes from the saved weights: ModelConfig.with_saved_layout)."""
    values = cfg.to_dict()
    options = dict(values.pop("moe_options") if resolved else cfg.moe_options)
    out = {STANDARD_NAMES[name]: value for name, value in values.items()}
    for std, option in OPTION_NAMES:
        out[std] = options.pop(option, None)
    out["moe_options"] = options
    out.setdefault("intermediate_size", None)
    out.setdefault("moe_layers", None)
    return out


@dataclass
class LibMoEModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus the MoE auxiliary loss and, when asked, the router logits."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class LibMoECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the MoE auxiliary loss and, when asked, the router logits."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None




class LibMoEPreTrainedModel(PreTrainedModel):
    config_class = LibMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _input_embed_layer = "embed"
    _supports_sdpa = True
    _supports_cache_class = True
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The initialisation MoETransformer gives each part (transformers calls it for fresh
        models, and for the weights a checkpoint lacks; its guard skips those loaded). Inside a
        block, a module takes the parameters and buffers of its twin in a freshly built Block."""
        std = self.config.initializer_range
        twin, name = self._fresh_twin(module)
        if name in ("attn.qkv", "attn.out"):
            init.normal_(module.weight, std=std)  # as MoETransformer: N(0, init_std) for attention
        elif twin is not None:
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for name, tensor in own:
                init.copy_(tensor, getattr(twin, name))
        elif isinstance(module, nn.Embedding) or module is getattr(self, "lm_head", None):
            init.normal_(module.weight, std=std)
        elif isinstance(module, LibMoEModel):
            cfg = self.config.model_config()
            cos, sin = rotary_tables(cfg.max_seq_len, cfg.rope_dim, cfg.rope_base)
            init.copy_(module.rope_cos, cos)
            init.copy_(module.rope_sin, sin)
            init.ones_(module.norm.weight)
            init.zeros_(module.norm.bias)

    def _fresh_twin(self, module: nn.Module) -> tuple[nn.Module | None, str | None]:
        """`module`'s counterpart in a freshly built copy of its Block and its name there
        ((None, None) outside the blocks). One fresh block is kept at a time: transformers
        initialises the modules block by block."""
        owners = self.__dict__.get("_block_owners")
        if owners is None:  # a map of the blocks' modules, for this init pass
            owners = {m: (block, name) for block in self.modules() if isinstance(block, Block)
                      for name, m in block.named_modules()}
            self.__dict__["_block_owners"] = owners
        if module not in owners:
            return None, None
        block, name = owners[module]
        fresh = self.__dict__.get("_fresh_block")
        if fresh is None or fresh[0] is not block:
            fresh = (block, Block(self.config.model_config(), block.layer, block.first_moe))
            self.__dict__["_fresh_block"] = fresh
        return fresh[1].get_submodule(name), name

    def initialize_weights(self) -> None:
        try:
            super().initialize_weights()
        finally:  # the fresh block and the module map served this pass only
            self.__dict__.pop("_fresh_block", None)
            self.__dict__.pop("_block_owners", None)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        fitted = _fit_saved_layout(path, kwargs.get("config"))
        if fitted is not None:
            kwargs["config"] = fitted
        if path is not None and Path(str(path)).is_dir() and _libmoe_layout(Path(str(path))):
            return _load_libmoe_layout(cls, Path(str(path)), kwargs)
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        for module in model.modules():
            if isinstance(module, LibMoEModel):
                _restore_buffers(module)
        return loaded


class LibMoEModel(Decoder, LibMoEPreTrainedModel):
    """The decoder (embed, blocks, norm; libmoe's MoETransformer without its head): forward
    returns the final hidden states [B, S, hidden_size], the cache, and what was asked for."""

    def __init__(self, config: LibMoEConfig):
        super().__init__(config)
        self.build_decoder(config.model_config())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                output_router_logits: bool | None = None, return_dict: bool | None = None,
                past_key_values: Any = None, **kwargs: Any):
        cfg = self.config
        cache = cache if cache is not None else old_cache_name(past_key_values)
        if use_cache is None:  # routing across tokens (expert choice) decodes without a cache,
            # and a cache passed in anyway is refused (Decoder.decode), never silently dropped
            use_cache = cache is not None or (cfg.use_cache and self.routes_per_token)
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        if not use_cache:
            cache = None
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (cfg.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        out = self.decode(input_ids, inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, cache=cache,
                          output_hidden_states=output_hidden_states,
                          output_attentions=output_attentions,
                          eager=getattr(cfg, "_attn_implementation", None) == "eager")
        router = cfg.output_router_logits if output_router_logits is None else output_router_logits
        result = LibMoEModelOutput(
            last_hidden_state=out.hidden, hidden_states=out.hidden_states, attentions=out.attentions,
            aux_loss=out.aux_loss, router_logits=tuple(r.logits for r in out.routing) if router else None,
            **{CACHE_FIELD: cache})
        result.routing = out.routing  # libmoe's Routing records (not a ModelOutput field)
        return result if return_dict is not False else result.to_tuple()


class LibMoEForCausalLM(LibMoEPreTrainedModel, GenerationMixin):
    """LibMoEModel (`.model`) and the output head (`.lm_head`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: LibMoEConfig):
        super().__init__(config)
        self.model = LibMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=config.initializer_range)
        self.post_init()
        if not self.model.routes_per_token and self.generation_config is not None:
            self.generation_config.use_cache = False  # expert choice: see Decoder.decode

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, output_router_logits: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                past_key_values: Any = None, **kwargs: Any):
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else old_cache_name(past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                         output_router_logits=output_router_logits, return_dict=True)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            targets = labels[:, 1:].flatten().to(logits.device)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100)
            loss = ce + out.aux_loss
        result = LibMoECausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
            aux_loss=out.aux_loss, router_logits=out.router_logits,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        result.routing = out.routing
        return result if return_dict is not False else result.to_tuple()

    def to_libmoe(self) -> MoETransformer:
        """This model as libmoe's MoETransformer, sharing its modules (no copy)."""
        with torch.device("meta"):
            model = MoETransformer(self.config.model_config())
        model.embed, model.blocks, model.norm, model.head = (self.model.embed, self.model.blocks,
                                                              self.model.norm, self.lm_head)
        model.rope_cos, model.rope_sin = self.model.rope_cos, self.model.rope_sin
        return model.train(self.training)


def _libmoe_layout(directory: Path) -> bool:
    """Whether `directory`'s weights have the MoETransformer's keys (`head.weight`, a libmoe
    model directory) or this class's before the head was split (`model.head.weight`)."""
    heads = saved_shapes(directory, lambda key: key in ("head.weight", "model.head.weight"))
    return bool(heads)


def _load_libmoe_layout(cls, directory: Path, kwargs: dict[str, Any]):
    """Load `directory` (libmoe's layout, see `_libmoe_layout`) as `cls`, strictly (every tensor
    present, none left over), on the CPU; `dtype`, `device_map` naming one device,
    `attn_implementation`, `output_*` and `output_loading_info` are honoured."""
    config = kwargs.get("config")
    if not isinstance(config, LibMoEConfig):
        config = LibMoEConfig.from_pretrained(str(directory))
    for key in ("output_attentions", "output_hidden_states", "output_router_logits", "use_cache"):
        if key in kwargs:
            setattr(config, key, kwargs[key])
    if kwargs.get("attn_implementation"):
        config._attn_implementation = kwargs["attn_implementation"]
    model = cls(config)
    state = {}
    for name in weight_files(directory):
        state.update(load_file(str(directory / name)))
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key == "head.weight":
            mapped["lm_head.weight"] = value
        else:
            mapped[key if isinstance(model, LibMoEModel) else "model." + key] = value
    if isinstance(model, LibMoEModel):
        mapped.pop("lm_head.weight", None)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        raise ValueError(f"{directory}: its weights do not fit the model of its config.json "
                         f"({' '.join(lines[1:2]) or lines[0]})") from None
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    device = kwargs.get("device_map")
    if isinstance(device, (str, torch.device)) and device != "auto":
        model = model.to(device)
    if kwargs.get("output_loading_info"):  # strict loading above: nothing missing or unexpected
        return model.eval(), {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                              "error_msgs": []}
    return model.eval()


def _fit_saved_layout(path: Any, config: Any) -> LibMoEConfig | None:
    """The config to load local directory `path` with when its weights predate MoE++'s slot
    counts scaling with E (ModelConfig.with_saved_layout); None when the saved config fits (or
    `path` is not a local directory: a Hub name loads as its config says)."""
    if path is None or not Path(str(path)).is_dir():
        return None
    shapes = saved_shapes(Path(str(path)), lambda key: key.endswith("ffn.router.weight"))
    if not shapes:
        return None
    if not isinstance(config, LibMoEConfig):
        config = LibMoEConfig.from_pretrained(str(path))
    cfg = config.model_config()
    fitted = cfg.with_saved_layout(shapes)
    if fitted is cfg:
        return None
    config = copy.deepcopy(config)
    config.moe_options = _standard(fitted)["moe_options"]
    return config


@torch.no_grad()
def _restore_buffers(model: LibMoEModel) -> None:
    """Recompute the non-persistent buffers (rotary tables, routers' constants), which
    transformers' meta-device loading may leave uninitialised."""
    cfg = model.config.model_config()
    cos, sin = rotary_tables(cfg.max_seq_len, cfg.rope_dim, cfg.rope_base)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    restore_router_buffers(model)


def register_auto() -> None:
    """Register the config and models with the Auto classes (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register("libmoe", LibMoEConfig)
    with contextlib.suppress(ValueError):
        AutoModel.register(LibMoEConfig, LibMoEModel)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LibMoEConfig, LibMoEForCausalLM)


def to_hf(model: MoETransformer, **config_kwargs: Any) -> LibMoEForCausalLM:
    """The same weights as a LibMoEForCausalLM (config_kwargs: e.g. eos_token_id)."""
    hf = LibMoEForCausalLM(LibMoEConfig.from_model_config(model.config, **config_kwargs))
    state = model.state_dict()
    hf.lm_head.load_state_dict({"weight": state.pop("head.weight")})
    hf.model.load_state_dict(state)
    return hf.to(next(model.parameters()).device).train(model.training)


def write_hf_config(directory: str | Path, cfg: ModelConfig) -> Path:
    """Add transformers' config.json to a libmoe model directory (model.safetensors with the
    MoETransformer's keys): AutoModelForCausalLM then loads it as LibMoEForCausalLM, while libmoe
    keeps reading config.yaml."""
    config = LibMoEConfig.from_model_config(cfg, architectures=["LibMoEForCausalLM"])
    config.save_pretrained(str(directory))
    return Path(directory) / "config.json"


register_auto()  # importing this module is enough (libmoe.auto imports it when transformers loads)
