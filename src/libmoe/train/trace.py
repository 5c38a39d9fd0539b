"""Routing traces of a fixed probe set, saved beside each checkpoint. The format and the recorder
live in `libmoe.moe.trace` (the analysis tools read what training writes)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..moe.trace import RoutingRecorder, Trace, routed_layers

__all__ = ["record_routing", "save_trace"]


@torch.no_grad()
def record_routing(model: nn.Module, tokens: Tensor, domain: Tensor | None = None,
                   domains: list[str] | None = None, batch_size: int = 16, **meta) -> Trace | None:
    """Run `model` (eval mode, no grad) on the probe tokens [n, L] and return its routing trace
    (None for a model without MoE layers)."""
    if not has_routing(model):
        return None
    with RoutingRecorder(model, labels=domains) as rec:
        rec.record(tokens, labels=0 if domain is None else domain, batch_size=batch_size)
    return rec.trace(**meta)


def has_routing(model: nn.Module) -> bool:
    """Whether `model` holds MoE layers (a dense model has no routing to trace)."""
    return bool(routed_layers(model))


def save_trace(
    directory: str | Path,
    model: nn.Module,
    tokens: Tensor,
    domain: Tensor,
    domains: list[str],
    step: int,
    run: nn.Module | None = None,
    run_hash: str | None = None,
) -> None:
    """Record and write a routing trace of the probe set (tokens, domain: [n, L]) to `directory`.
    `run`: the module to call when it differs from `model` (a DDP/FSDP wrapper of it); `run_hash`:
    the run's identity (`libmoe.train.run_hash`), kept in the trace's meta so that analysis never
    mixes traces of different runs. A dense model has no routing and gets no trace."""
    if not has_routing(model):
        return
    meta = {"step": step} if run_hash is None else {"step": step, "run_hash": run_hash}
    trace = record_routing(run if run is not None else model, tokens, domain, domains, **meta)
    cfg = getattr(model, "config", None)
    trace.meta["algorithm"] = getattr(cfg, "algorithm", trace.meta["algorithm"])
    trace.save(directory)
