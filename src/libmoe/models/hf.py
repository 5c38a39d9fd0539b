"""libmoe's Transformer as a transformers model: `LibMoEConfig` (model_type "libmoe") and
`LibMoEForCausalLM`, registered with AutoConfig / AutoModelForCausalLM by `register_auto()`. A
libmoe model directory with `write_hf_config`'s config.json loads with
`AutoModelForCausalLM.from_pretrained(DIR)` after `import libmoe` (no trust_remote_code).
Needs transformers (`pip install 'libmoe[hub]'`).

The wrapped model is `.model` (a MoETransformer); weights are safetensors. `forward(input_ids,
labels=None)` returns logits and, with labels (the harness/Trainer convention: shifted inside,
-100 ignored), the cross-entropy plus the MoE auxiliary loss; `aux_loss` and `routing` ride along.
There is no KV cache and no attention mask: padding must be on the right.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..moe import Router
from .config import ModelConfig
from .transformer import MoETransformer, rotary_tables


class LibMoEConfig(PretrainedConfig):
    """A libmoe ModelConfig (its fields under `libmoe`) as a transformers config."""

    model_type = "libmoe"

    def __init__(self, libmoe: dict[str, Any] | None = None, **kwargs: Any):
        self.libmoe = dict(libmoe or {})
        if self.libmoe:
            cfg = ModelConfig(**self.libmoe)
            kwargs.setdefault("vocab_size", cfg.vocab_size)
            kwargs.setdefault("hidden_size", cfg.d_model)
            kwargs.setdefault("num_hidden_layers", cfg.n_layers)
            kwargs.setdefault("max_position_embeddings", cfg.max_seq_len)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


@dataclass
class LibMoECausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None
    routing: list | None = None


class LibMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LibMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: LibMoEConfig):
        super().__init__(config)
        self.model = MoETransformer(ModelConfig(**config.libmoe))
        self.post_init()

    def _init_weights(self, module):  # MoETransformer initialises itself; weights then load
        pass

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> LibMoEForCausalLM:
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        fitted = _fit_saved_layout(path, kwargs.get("config"))
        if fitted is not None:
            kwargs["config"] = fitted
        model = super().from_pretrained(*args, **kwargs)
        _restore_buffers(model.model)
        return model

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask=None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs: Any) -> LibMoECausalLMOutput:
        out = self.model(input_ids, inputs_embeds=inputs_embeds)
        loss = None
        if labels is not None:
            ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                 ignore_index=-100)
            loss = ce + out.aux_loss
        return LibMoECausalLMOutput(loss=loss, logits=out.logits, aux_loss=out.aux_loss,
                                    routing=out.routing)


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
    if not config.libmoe:
        return None
    cfg = ModelConfig(**config.libmoe)
    fitted = cfg.with_saved_layout(shapes)
    if fitted is cfg:
        return None
    config = copy.deepcopy(config)
    config.libmoe = fitted.to_dict()
    return config


def saved_shapes(directory: Path, wanted) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the tensors whose key satisfies `wanted` in directory's model.safetensors
    (or the shards its model.safetensors.index.json names), read from the headers only."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        files = ["model.safetensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if not (directory / name).is_file():
            continue
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                if wanted(key):
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


@torch.no_grad()
def _restore_buffers(model: MoETransformer) -> None:
    """Recompute the non-persistent buffers (rotary tables, routers' constants), which
    transformers' meta-device loading leaves uninitialised."""
    cfg = model.config
    cos, sin = rotary_tables(cfg.max_seq_len, cfg.rope_dim, cfg.rope_base)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    for router in [m for m in model.modules() if isinstance(m, Router)]:
        fresh = type(router)(router.d_model, router.n_experts, router.top_k, router.opts)
        for name in router._non_persistent_buffers_set:
            getattr(router, name).copy_(getattr(fresh, name))


def register_auto() -> None:
    """Register LibMoEConfig / LibMoEForCausalLM with the Auto classes (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register("libmoe", LibMoEConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LibMoEConfig, LibMoEForCausalLM)


def to_hf(model: MoETransformer) -> LibMoEForCausalLM:
    """The same weights as a LibMoEForCausalLM."""
    hf = LibMoEForCausalLM(LibMoEConfig(libmoe=model.config.to_dict()))
    hf.model.load_state_dict(model.state_dict())
    return hf.to(next(model.parameters()).device)


def write_hf_config(directory: str | Path, cfg: ModelConfig) -> Path:
    """Add transformers' config.json to a libmoe model directory (model.safetensors with the
    MoETransformer's keys): AutoModelForCausalLM then loads it as LibMoEForCausalLM, reading the
    weights as its base model's, while libmoe keeps reading config.yaml."""
    config = LibMoEConfig(libmoe=cfg.to_dict(), architectures=["LibMoEForCausalLM"])
    config.save_pretrained(str(directory))
    return Path(directory) / "config.json"


register_auto()  # importing this module is enough (libmoe.auto imports it when transformers loads)
