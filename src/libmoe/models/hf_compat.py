"""What libmoe's transformers classes (`hf`, `hf_upcycled`) share about the transformers version:
the name of the cache. transformers 5.2x passes and returns it as `cache` and deprecates
`past_key_values`, its name in earlier 5.x versions. Imports transformers (not its Auto classes,
so importing this module does not set off libmoe.auto's registration)."""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
"""The cache's name in the installed transformers' model outputs (and forward arguments)."""


def old_cache_name(past_key_values: Any) -> Any:
    """`past_key_values` as passed to a forward that also takes `cache`: returned as it is, with a
    FutureWarning where the installed transformers has renamed it (and none where it has not)."""
    if past_key_values is not None and CACHE_FIELD == "cache":
        warnings.warn("`past_key_values` is deprecated: pass the cache as `cache`, as transformers "
                      f"{transformers.__version__} names it.", FutureWarning, stacklevel=3)
    return past_key_values
