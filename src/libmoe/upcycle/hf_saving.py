"""Saving upcycled transformers models: `wrap_upcycled` turns an upcycled transformers model into
a `LibMoEUpcycledForCausalLM` ready for `save_pretrained`, and `upcycle_transformers` upcycles a
local directory or Hub model into a directory AutoModelForCausalLM loads after `import libmoe`.
The model classes themselves (`LibMoEUpcycledConfig`, `LibMoEUpcycledForCausalLM`) live in
`libmoe.models.hf_upcycled`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..data.hf_tokenizer import write_transformers_tokenizer
from ..files import write_json
from ..models.hf_upcycled import (
    LibMoEUpcycledConfig,
    LibMoEUpcycledForCausalLM,
    mark_initialised,
    upcycle_spec,
)
from ..models.loading import find_tokenizer
from ..models.upcycled import upcycle_hf_model
from ..moe import moe_layers
from .core import EXACT_AT_INIT, NOT_EXACT_AT_INIT, UPCYCLE_FILE

__all__ = ["TOKENIZER_FILES", "upcycle_transformers", "wrap_upcycled"]


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
    # Record the size-scaled options (MoE++'s slot counts) as the layers resolved them, so the
    # saved model reloads with this layout whatever later defaults say.
    layer = next(moe_layers(source), None)
    router = getattr(layer, "router", None)
    if router is not None and type(router).SCALED_OPTIONS:
        scaled = {k: router.opts.extra[k] for k in type(router).SCALED_OPTIONS}
        config.upcycle = {**config.upcycle, "options": {**config.upcycle["options"], **scaled}}
    # Wrap without __init__, which would build (and upcycle) a second, random copy of the source.
    wrapper = LibMoEUpcycledForCausalLM.__new__(LibMoEUpcycledForCausalLM)
    PreTrainedModel.__init__(wrapper, config)
    wrapper.model = source
    mark_initialised(source)
    wrapper.post_init()
    return wrapper


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def upcycle_transformers(source: str, out: str | Path, algorithm: str, n_experts: int, top_k: int,
                         **kwargs: Any) -> dict[str, Any]:
    """Upcycle a transformers causal LM (a local directory or a Hub name) into `out`: the
    upcycled model (`save_pretrained`), its tokenizer, and upcycle.json with the largest logit
    difference from the source on a fixed random batch."""
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
        tokenizer_path = source
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
            tokenizer_path = str(find_tokenizer(Path(source)))  # a checkpoint of a libmoe run
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
