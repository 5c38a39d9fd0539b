"""Training a transformers causal LM with libmoe's trainer. The model class (`TransformersLM`) and
its helpers are model code and live in `libmoe.models.transformers_lm`; re-exported here."""

from ..models.transformers_lm import (
    PREFIX,
    TransformersLM,
    describe,
    load_transformers,
    transformers_run_config,
    transformers_source,
)

__all__ = ["PREFIX", "TransformersLM", "describe", "load_transformers", "transformers_run_config",
           "transformers_source"]
