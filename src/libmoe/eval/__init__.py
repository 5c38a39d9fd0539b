"""Evaluation (in progress: the scoring core): log-likelihood scoring with lm-evaluation-harness
request semantics. Tasks, the `libmoe eval` CLI and the harness adapter are still to come."""

from .scoring import LMScorer

__all__ = ["LMScorer"]
