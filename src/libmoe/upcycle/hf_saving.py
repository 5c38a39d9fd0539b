"""Saving upcycled transformers models: `LibMoEUpcycledConfig` (model_type "libmoe_upcycled":
the source's config plus the upcycling spec) and `LibMoEUpcycledForCausalLM`, which rebuilds the
source architecture, upcycles its MLPs and loads the saved weights. Registered with the Auto
classes like `libmoe.models.hf`, so `AutoModelForCausalLM.from_pretrained(DIR)` loads an upcycled
Llama/Qwen/... directory after `import libmoe`.

Loading reads DIR/model.safetensors (or the shards of model.safetensors.index.json; a Hub name is
downloaded first) itself and builds the model on the CPU first: transformers' meta-device loading
would leave the source's non-persistent buffers (rotary tables) and the routers' constants
uninitialised.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from ..files import write_json
from .hf import moe_aux_loss, upcycle_hf_model


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
        model = cls(cls.config_class.from_pretrained(str(path)))
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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a directory: model.safetensors, or the shards its index names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: expected model.safetensors (or a sharded index), as "
                                "libmoe upcycle and save_pretrained write them.")
    return load_file(str(path / "model.safetensors"))


def wrap_upcycled(source, algorithm: str, n_experts: int, top_k: int, layers: list[int] | None = None,
                  seed: int = 42, router_init_std: float = 0.02, noise_std: float = 0.0,
                  reinit_fraction: float = 0.0, **options: Any) -> LibMoEUpcycledForCausalLM:
    """Upcycle the transformers model `source` in place (as `upcycle_hf_model`) and wrap it as a
    LibMoEUpcycledForCausalLM, ready for `save_pretrained`."""
    config = LibMoEUpcycledConfig(
        base=source.config.to_dict(),
        upcycle=upcycle_spec(algorithm, n_experts, top_k, layers, seed, router_init_std, **options),
        architectures=["LibMoEUpcycledForCausalLM"])
    upcycle_hf_model(source, algorithm, n_experts, top_k, layers, seed, router_init_std, noise_std,
                     reinit_fraction, **options)
    # Wrap without __init__, which would build (and upcycle) a second, random copy of the source.
    wrapper = LibMoEUpcycledForCausalLM.__new__(LibMoEUpcycledForCausalLM)
    PreTrainedModel.__init__(wrapper, config)
    wrapper.model = source
    wrapper.post_init()
    return wrapper


def register_auto() -> None:
    with contextlib.suppress(ValueError):
        AutoConfig.register("libmoe_upcycled", LibMoEUpcycledConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LibMoEUpcycledConfig, LibMoEUpcycledForCausalLM)


register_auto()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def upcycle_transformers(source: str, out: str | Path, algorithm: str, n_experts: int, top_k: int,
                         **kwargs: Any) -> dict[str, Any]:
    """Upcycle a transformers causal LM (a local directory or a Hub name) into `out`: the
    upcycled model (`save_pretrained`), its tokenizer, and upcycle.json with the largest logit
    difference from the source on a fixed random batch."""
    import json

    from .core import EXACT_AT_INIT, NOT_EXACT_AT_INIT, UPCYCLE_FILE

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
    wrapper = wrap_upcycled(model, algorithm, n_experts, top_k, **kwargs).eval()
    with torch.no_grad():
        diff = float((wrapper(tokens).logits - before).abs().max())
    out = Path(out)
    wrapper.save_pretrained(str(out))
    try:
        from ..data.hf_tokenizer import write_transformers_tokenizer

        tokenizer_path = source
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
            from ..models.loading import _find_tokenizer  # a checkpoint of a libmoe run

            tokenizer_path = str(_find_tokenizer(Path(source)))
        # a transformers tokenizer as it is; a SentencePiece one libmoe trained, converted
        write_transformers_tokenizer(tokenizer_path, out)
    except (OSError, ValueError) as err:  # a model without a tokenizer still upcycles
        print(f"libmoe: no tokenizer saved ({err})")
    plain = all(kwargs.get(k, 0) == 0 for k in ("noise_std", "reinit_fraction"))
    info = {"source": str(source), "method": "upcycle", "source_architecture": type(model).__name__,
            "algorithm": algorithm, "n_experts": n_experts, "top_k": top_k, **kwargs,
            "max_abs_logit_diff": diff, "exact_at_init": algorithm in EXACT_AT_INIT and plain
            and kwargs.get("capacity_factor") is None}
    if algorithm in NOT_EXACT_AT_INIT:
        info["why_not_exact"] = NOT_EXACT_AT_INIT[algorithm]
    write_json(out / UPCYCLE_FILE, json.loads(json.dumps(info, default=str)))
    return info
