"""The optimizer side of training: AdamW with its parameter groups, the warmup-cosine schedule,
mixed precision, and the state a checkpoint keeps to resume exactly (full optimizer state under
FSDP, RNG states)."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models.run_config import RunConfig


def lr_lambda(cfg: RunConfig):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps (multiplier of lr)."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _on_cuda(p: torch.Tensor) -> bool:
    return p.device.type == "cuda"


def adamw_kernel(params: list[torch.Tensor],
                 on_cuda: Callable[[torch.Tensor], bool] = _on_cuda) -> dict[str, bool]:
    """AdamW's implementation: {"fused": True} (one kernel per step for all parameters) when every
    parameter is a floating-point CUDA tensor (FSDP's DTensors included), else {"foreach": True}
    (a few batched kernels; fused AdamW elsewhere is less tested). `on_cuda` decides the device
    (replaceable in tests)."""
    if params and all(p.is_floating_point() and on_cuda(p) for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay except for names containing a no_decay pattern; fused
    on CUDA (`adamw_kernel`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(s in name for s in cfg.optim.no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr,
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             **adamw_kernel(decay + no_decay))


def apply_optim_settings(opt: torch.optim.Optimizer, sched, cfg: RunConfig,
                         weight_decay: list[float]) -> None:
    """Put the config's optimizer settings into a restored optimizer and schedule (loading a
    checkpoint restores the saved lr, betas, eps and weight decay), for --allow-config-change."""
    factor = lr_lambda(cfg)(sched.last_epoch)
    for group, wd in zip(opt.param_groups, weight_decay):
        group.update(initial_lr=cfg.optim.lr, lr=cfg.optim.lr * factor, weight_decay=wd,
                     betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched.base_lrs = [cfg.optim.lr] * len(opt.param_groups)
    sched._last_lr = [group["lr"] for group in opt.param_groups]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_factory(dtype: torch.dtype | None, device: torch.device) -> Callable[[], Any]:
    """A function returning the context each forward runs in: autocast to `dtype`, or nothing."""
    def autocast():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return autocast


def full_state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state, keyed by parameter name, on every rank."""
    # heavy: 0.4 s (it loads DTensor); only checkpoints pay it, not `import libmoe.train`
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, opt, options=options))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a `full_state_dicts` optimizer state into `opt` (sharded as `model` is)."""
    from torch.distributed.checkpoint.state_dict import (  # heavy: see full_state_dicts
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def rng_state() -> dict[str, Any]:
    """The torch, Python and (when present) CUDA RNG states, for an exact resume."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
