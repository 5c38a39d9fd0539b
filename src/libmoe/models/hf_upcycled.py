"""Upcycled transformers models as transformers classes: `LibMoEUpcycledConfig` (model_type
"libmoe_upcycled": the source's config plus the upcycling spec) and `LibMoEUpcycledForCausalLM`,
which rebuilds the source architecture, upcycles its MLPs (`libmoe.models.upcycled`) and loads the
saved weights. Registered with the Auto classes like `libmoe.models.hf`, so
`AutoModelForCausalLM.from_pretrained(DIR)` loads an upcycled Llama/Qwen/... directory after
`import libmoe`. Writing such a directory is `libmoe.upcycle` (`wrap_upcycled`,
`upcycle_transformers`). Needs transformers (`pip install 'libmoe[hub]'`).

Loading reads DIR/model.safetensors (or the shards of model.safetensors.index.json; a Hub name is
downloaded first) itself and builds the model on the CPU first: transformers' meta-device loading
would leave the source's non-persistent buffers (rotary tables) and the routers' constants
uninitialised.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from ..moe import legacy_options
from .upcycled import SHARED_ALGORITHMS, moe_aux_loss, upcycle_hf_model


def upcycle_spec(algorithm: str, n_experts: int, top_k: int, layers: list[int] | None = None,
                 seed: int = 42, router_init_std: float = 0.02, **options: Any) -> dict[str, Any]:
    """The arguments of `upcycle_hf_model` that fix the upcycled model's structure, as saved."""
    return {"algorithm": algorithm, "n_experts": n_experts, "top_k": top_k, "layers": layers,
            "seed": seed, "router_init_std": router_init_std, "options": dict(options)}


class LibMoEUpcycledConfig(PretrainedConfig):
    model_type = "libmoe_upcycled"

    def __init__(self, base: dict[str, Any] | None = None, upcycle: dict[str, Any] | None = None,
                 **kwargs: Any):
        self.base, self.upcycle = dict(base or {}), dict(upcycle or {})
        names = {"vocab_size": (), "hidden_size": ("n_embd",), "num_hidden_layers": ("n_layer",),
                 "max_position_embeddings": ("n_positions",)}  # GPT-2 spells them its own way
        for key, aliases in names.items():
            for name in (key, *aliases):
                if name in self.base:
                    kwargs.setdefault(key, self.base[name])
                    break
        kwargs.setdefault("tie_word_embeddings", self.base.get("tie_word_embeddings", False))
        super().__init__(**kwargs)

    def base_config(self) -> PretrainedConfig:
        base = dict(self.base)
        return AutoConfig.for_model(base.pop("model_type"), **base)


class LibMoEUpcycledForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers causal LM whose MLPs are libmoe MoE layers (`.model` is the source class).
    With labels, the loss is the source's language-model loss plus the MoE auxiliary loss."""

    config_class = LibMoEUpcycledConfig
    base_model_prefix = "model"

    def __init__(self, config: LibMoEUpcycledConfig):
        super().__init__(config)
        spec = dict(config.upcycle)
        options = spec.pop("options", {})
        self.model = AutoModelForCausalLM.from_config(config.base_config())
        upcycle_hf_model(self.model, **spec, **options)
        self.post_init()

    def _init_weights(self, module):  # the source and the MoE layers initialise themselves
        pass

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids=None, labels=None, **kwargs: Any):
        out = self.model(input_ids=input_ids, labels=labels, **kwargs)
        if labels is not None:
            out.loss = out.loss + moe_aux_loss(self.model)
        return out

    @classmethod
    def from_pretrained(cls, path, *args: Any, **kwargs: Any) -> LibMoEUpcycledForCausalLM:
        path = Path(path)
        hub_name = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
        if not path.exists() and hub_name:
            from huggingface_hub import snapshot_download  # a Hub repository holding such a model

            path = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors",
                                                                     "*.model", "*.txt"]))
        state = _read_safetensors(path)
        model = cls(_fit_saved_layout(cls.config_class.from_pretrained(str(path)), state))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes differ: the weights are not this spec's
            raise ValueError(f"{path}: weights do not match the upcycled model ({err}).") from err
        tied = {"model.lm_head.weight"} if model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ValueError(f"{path}: weights do not match the upcycled model (missing "
                             f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}).")
        model.tie_weights()
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        return (model.to(dtype) if isinstance(dtype, torch.dtype) else model).eval()


def _fit_saved_layout(config: LibMoEUpcycledConfig, state: dict[str, torch.Tensor]) -> LibMoEUpcycledConfig:
    """`config`, its upcycling options completed with the slot counts a MoE++ model saved before
    they scaled with E was built with (libmoe.moe.legacy_options), when its router weights say so."""
    spec = dict(config.upcycle)
    weight = next((v for k, v in state.items() if k.endswith("moe.router.weight") and v.dim() == 2), None)
    if weight is None or "algorithm" not in spec:
        return config
    options = dict(spec.get("options") or {})
    E, K = spec["n_experts"], spec["top_k"]
    if spec["algorithm"] in SHARED_ALGORITHMS:  # as upcycle_hf_model builds them
        E, K = E - 1, K - 1
        options.setdefault("n_shared", 1)
    legacy = legacy_options(spec["algorithm"], int(weight.shape[1]), E, K, int(weight.shape[0]),
                            router_init_std=spec.get("router_init_std", 0.02), **options)
    if legacy:
        config.upcycle = {**spec, "options": {**(spec.get("options") or {}), **legacy}}
    return config


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a directory: model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: expected model.safetensors (or a sharded index), as "
                                "libmoe upcycle and save_pretrained write them.")
    return load_file(str(path / "model.safetensors"))


def register_auto() -> None:
    """Register LibMoEUpcycledConfig / LibMoEUpcycledForCausalLM with the Auto classes (idempotent)."""
    with contextlib.suppress(ValueError):
        AutoConfig.register("libmoe_upcycled", LibMoEUpcycledConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LibMoEUpcycledConfig, LibMoEUpcycledForCausalLM)


register_auto()  # importing this module is enough (libmoe.auto imports it when transformers loads)
