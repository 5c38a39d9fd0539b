"""A transformers causal LM behind libmoe's model interface, for training it with libmoe's trainer:
the upcycling regime's second half.

`libmoe upcycle Qwen/Qwen2-0.5B ... --out up/` writes a transformers directory (a
`LibMoEUpcycledForCausalLM`); `libmoe train --init up/ --out run/` continues training it with the
same loop, data, logging, checkpoints and routing traces as a libmoe model. `TransformersLM` adapts
the transformers model to the trainer's interface (`forward(tokens, targets) -> LMOutput`, with the
upcycled MLPs' auxiliary losses and routing), and `describe` fills the run's `model` section with
the model's shape (for the log line, FLOPs estimate and the resume check); the architecture itself
comes from the directory's config.json. Checkpoints of such a run are transformers directories too
(config.json + model.safetensors), so `AutoModelForCausalLM`, `libmoe eval` and `libmoe analyze`
read them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .generation import cache_argument
from .loading import is_transformers_dir, resolve_checkpoint
from .run_config import RunConfig
from .transformer import LMOutput
from .upcycled import SHARED_ALGORITHMS, UpcycledMLP

PREFIX = "lm."  # TransformersLM's state-dict keys are the transformers model's, behind this prefix


def transformers_source(path: str | Path) -> str | None:
    """What `path` names if it is a transformers model: itself for a transformers directory or a
    Hub name, the newest checkpoint for a run that trains one; None for libmoe's own models
    (model, run and checkpoint directories of a MoETransformer)."""
    path = Path(path)
    if not path.exists():
        owner_name = "/" in str(path) and not str(path).startswith((".", "/", "~"))
        return str(path) if owner_name else None
    if is_transformers_dir(path):
        return str(path)
    if (path / "config.yaml").is_file() and not (path / "model.safetensors").is_file():
        try:
            ckpt = resolve_checkpoint(path)
        except (FileNotFoundError, ValueError):
            return None
        return str(ckpt) if is_transformers_dir(ckpt) else None
    return None


def load_transformers(path: str | Path) -> nn.Module:
    """The fp32 transformers causal LM at `path` (directory or Hub name), on the CPU."""
    from transformers import AutoModelForCausalLM

    from . import hf_upcycled  # noqa: F401  (imports transformers) registers libmoe_upcycled

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _base_config(config: Any) -> Any:
    return config.base_config() if getattr(config, "model_type", None) == "libmoe_upcycled" else config


def describe(config: Any) -> ModelConfig:
    """A ModelConfig recording the shape of the transformers model with `config` (not used to
    build it): width, depth, heads, vocabulary, and the upcycling spec's algorithm and budget."""
    base = _base_config(config)
    spec = dict(getattr(config, "upcycle", None) or {})
    d = base.hidden_size
    heads = base.num_attention_heads
    ffn = getattr(base, "intermediate_size", None) or getattr(base, "n_inner", None) or 4 * d
    algorithm = spec.get("algorithm", "dense")
    shared = algorithm in SHARED_ALGORITHMS
    return ModelConfig(
        vocab_size=base.vocab_size, d_model=d, n_layers=base.num_hidden_layers, n_heads=heads,
        head_dim=getattr(base, "head_dim", None) or d // heads, rope_fraction=1.0,
        max_seq_len=base.max_position_embeddings, algorithm=algorithm,
        n_experts=spec.get("n_experts", 1), expert_dim=ffn, top_k=spec.get("top_k", 1),
        n_shared=1 if shared else 0, moe_options=dict(spec.get("options") or {}), ffn_dim=ffn,
        moe_layers=spec.get("layers"),
    )


class TransformersLM(nn.Module):
    """A transformers causal LM behind the trainer's interface: forward(tokens, targets) returns
    an LMOutput whose aux_loss, aux and routing come from the upcycled MLPs (none for a dense
    model). `config` is the `describe` of its config."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.config = describe(lm.config)
        self.cache_argument = cache_argument(lm)

    def forward(self, tokens: Tensor, targets: Tensor | None = None, cache: Any = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> LMOutput:
        """`cache` (a transformers Cache, `new_cache()`), `attention_mask` and `position_ids` are
        the transformers model's, for decoding (libmoe.models.generation)."""
        decoding: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids}
        if cache is not None:
            decoding[self.cache_argument] = cache
        logits = self.lm(input_ids=tokens, use_cache=cache is not None, **decoding).logits
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        aux: dict[str, Tensor] = {}
        routing = []
        for module in self.lm.modules():
            if isinstance(module, UpcycledMLP) and module.aux_loss is not None:
                aux_loss = aux_loss + module.aux_loss
                for name, value in module.aux.items():
                    aux[name] = aux[name] + value.detach() if name in aux else value.detach()
                if module.routing is not None:
                    routing.append(module.routing)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return LMOutput(logits, loss, aux_loss, aux, routing)

    def new_cache(self):
        """An empty transformers DynamicCache for this model."""
        from transformers import DynamicCache

        return DynamicCache(config=self.lm.config)

    def config_json(self) -> str:
        return self.lm.config.to_json_string()

    @staticmethod
    def export_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The trainer's state dict of a TransformersLM as the transformers model's own keys, a
        tensor shared by two names (tied embeddings) kept once, as save_pretrained does."""
        out, seen = {}, set()
        for key, value in state.items():
            ptr = (value.device, value.data_ptr())
            if ptr in seen:
                continue
            seen.add(ptr)
            out[key.removeprefix(PREFIX)] = value
        return out

    def load_exported(self, state: dict[str, Tensor]) -> None:
        """Load a state dict written by `export_state` (tied weights may be missing)."""
        missing, unexpected = self.lm.load_state_dict(state, strict=False)
        shared = set()
        if self.lm.config.tie_word_embeddings and self.lm.get_output_embeddings() is not None:
            head = self.lm.get_output_embeddings().weight
            shared = {n for n, p in self.lm.named_parameters(remove_duplicate=False) if p is head}
        if set(missing) - shared or unexpected:
            raise ValueError(f"the checkpoint's weights do not match the model (missing "
                             f"{sorted(set(missing) - shared)[:5]}, unexpected {sorted(unexpected)[:5]}).")
        self.lm.tie_weights()

    @property
    def blocks(self) -> nn.ModuleList | list:
        """The decoder layers (what FSDP shards one by one)."""
        for module in self.lm.modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.config.n_layers:
                return module
        return []


def transformers_run_config(cfg: RunConfig, source: str | Path) -> RunConfig:
    """`cfg` for training the transformers model `source`: its shape as the model section, its
    tokenizer (unless data.tokenizer names another), train.seq_len kept from the preset."""
    from transformers import AutoConfig

    from . import hf_upcycled  # noqa: F401  (imports transformers) registers libmoe_upcycled

    model = describe(AutoConfig.from_pretrained(str(source)))
    seq_len = cfg.train.seq_len or cfg.model.max_seq_len
    if seq_len > model.max_seq_len:
        raise ValueError(f"train.seq_len={seq_len} exceeds the model's {model.max_seq_len} positions.")
    tokenizer = str(source) if cfg.data.tokenizer == "train" else cfg.data.tokenizer
    return replace(cfg, model=model, init=str(source), data=replace(cfg.data, tokenizer=tokenizer),
                   train=replace(cfg.train, seq_len=seq_len))
