"""Validation perplexity: the mean next-token cross-entropy over a run's held-out windows.

One function, `validation_loss`, computes it for training (every train.eval_every steps, split
over the processes of a torchrun job) and for evaluation (`libmoe eval --tasks val_ppl`, which
calls `validation_perplexity` on a loaded run), so the two numbers are the same computation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packed import validation_windows
from ..devices import DistInfo, all_reduce_sum
from ..models.run_config import config_from_dict, prepare_run_data


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, info: DistInfo | None = None,
                    autocast: Callable[[], Any] = contextlib.nullcontext,
                    per_window: bool = False) -> float | tuple[float, list[float]]:
    """Mean next-token cross-entropy of `model` over `windows` [n, L+1], split over processes
    (padded so every process runs the same number of forwards, as FSDP requires; `info` None is
    one process on the model's device). `autocast()` gives the context each forward runs in.
    With `per_window`, also each window's mean cross-entropy in window order (the unit of the
    findings' bootstrap)."""
    if info is None:
        info = DistInfo(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    n = len(windows)
    per_rank = math.ceil(n / info.world_size)
    mine = torch.arange(info.rank * per_rank, (info.rank + 1) * per_rank)
    # The sums stay on the device, which the process group serves (NCCL takes no CPU tensor), and
    # the host reads them once at the end, not once per batch. MPS has no float64.
    device = info.device
    acc = torch.float32 if device.type == "mps" else torch.float64
    total = torch.zeros(2, dtype=acc, device=device)
    each = torch.zeros(per_rank * info.world_size, dtype=acc, device=device) if per_window else None
    for start in range(0, per_rank, batch_size):
        idx = mine[start : start + batch_size]
        valid = (idx < n).to(device, non_blocking=True)
        batch = windows[idx.clamp(max=n - 1)].to(device, non_blocking=True)
        with autocast():
            logits = model(batch[:, :-1]).logits
        ce = F.cross_entropy(logits.float().transpose(1, 2), batch[:, 1:], reduction="none").to(acc)
        total[0] += (ce.sum(1) * valid).sum()
        total[1] += valid.sum() * ce.shape[1]
        if each is not None:
            each[idx.to(device, non_blocking=True)] = ce.mean(1) * valid
    all_reduce_sum(total, info)
    model.train(was_training)
    loss_sum, count = total.tolist()
    loss = loss_sum / count
    if each is None:
        return loss
    all_reduce_sum(each, info)  # each window is filled by exactly one process
    return loss, each[:n].tolist()


def validation_perplexity(loaded, tokens: int | str = "run", batch_size: int = 16,
                          log: Callable[[str], None] | None = None, per_window: bool = False) -> dict:
    """Perplexity on the run's own held-out split (its data config; cached after training):
    {"loss", "ppl", "tokens"}, exp of the mean next-token cross-entropy. `loaded`: a
    `libmoe.models.LoadedModel`. `tokens`: "run" (the first train.eval_tokens, the windows
    training evaluates, so the number equals the run's logged val_ppl), "all" (the whole split)
    or a count. `per_window` adds "window_nll", each window's mean cross-entropy (windows of
    train.seq_len tokens, in split order)."""
    if not loaded.config:
        raise ValueError(f"val_ppl needs a libmoe run's data config, which {loaded.checkpoint} has "
                         "not; evaluate perplexity on a task instead.")
    cfg = config_from_dict(loaded.config)
    if tokens == "run":
        max_tokens = cfg.train.eval_tokens
    elif tokens == "all":
        max_tokens = None
    elif isinstance(tokens, int) and tokens > 0:
        max_tokens = tokens
    else:
        raise ValueError(f"validation tokens {tokens!r}: give 'run', 'all' or a positive count.")
    source = cfg.data.source
    if not run_data_available(loaded.config) and not Path(source).is_absolute():
        raise FileNotFoundError(f"val_ppl needs the run's data, data.source {source!r}, a path relative to "
                                "the directory the run was trained from; run `libmoe eval` from there.")
    data = prepare_run_data(cfg, log=log or (lambda _: None))
    windows = validation_windows(data.val, cfg.seq_len, max_tokens)
    out = validation_loss(loaded.model, windows, batch_size, per_window=per_window)
    loss, each = out if per_window else (out, None)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(windows.shape[0]) * cfg.seq_len}
    if each is not None:
        result["window_nll"] = each
    return result


def run_data_available(config: dict) -> bool:
    """Whether a run config's data source can be read from here (a path source must exist;
    embedded, slimpajama and hf: sources always can, perhaps by downloading)."""
    source = str((config.get("data") or {}).get("source", "embedded"))
    is_path = source not in ("embedded", "slimpajama") and not source.startswith("hf:")
    return not is_path or Path(source).exists()
