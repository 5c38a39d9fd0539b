"""What stops a training run early: a preemption signal and a diverged loss.

`StopSignals` turns SIGTERM/SIGINT into a flag the loop checks at the end of each step (it then
writes a checkpoint and raises `libmoe.errors.Interrupted`); `FiniteGuard` notes the first step
whose loss was not finite without a host sync per step, and `check` raises `WorkFailed` with one
line at the next log row, validation or checkpoint: that metrics row is written (its non-finite
values as null, a record of the divergence) but no checkpoint or summary of diverged weights.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

import torch
from torch import nn

from ..devices import DistInfo
from ..errors import WorkFailed
from ..models.run_config import RunConfig
from .distributed import all_reduce_min


class StopSignals:
    """SIGTERM and SIGINT set a flag instead of killing training; the loop checkpoints at the end
    of the step and stops. After the first signal a second Ctrl-C acts at once (the previous SIGINT
    handler is back), while a repeated SIGTERM is ignored until training exits: Slurm signals every
    process of a job and torchrun forwards the signal to its workers again, and neither must kill
    the checkpoint being written. Installed only in the main thread (Python delivers signals there)."""

    def __init__(self):
        self.name: str | None = None
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.name = self.name or signal.Signals(signum).name
        if signal.SIGINT in self.saved:
            signal.signal(signal.SIGINT, self.saved[signal.SIGINT] or signal.SIG_DFL)
        if signal.SIGTERM in self.saved:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.saved = {}

    def __exit__(self, *exc) -> None:
        self._restore()


_NEVER = 2**62


class FiniteGuard:
    """The first step whose loss (or, without a loss scaler, gradient norm) was not finite, kept on
    the device (no host sync per step); `check` reduces it over processes (all agree)."""

    def __init__(self, info: DistInfo, cfg: RunConfig):
        self.info, self.cfg = info, cfg
        self.first = torch.full((), _NEVER, dtype=torch.int64, device=info.device)

    def update(self, step: int, *values: torch.Tensor) -> None:
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(torch.as_tensor(v, device=self.info.device)).all()
                                  for v in values]).all()
            self.first = torch.where(finite, self.first, self.first.clamp(max=step))

    def check(self, step: int, model: nn.Module | None = None, saved: int | None = None) -> None:
        """Raise WorkFailed (one line) if training diverged; with `model`, also when a weight or
        buffer is not finite (before a checkpoint: a NaN checkpoint is never written)."""
        first = self.first.clone()
        if model is not None:
            tensors = [t.to_local() if hasattr(t, "to_local") else t
                       for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else True
            first = torch.where(torch.as_tensor(finite, device=first.device), first,
                                first.clamp(max=step))
        bad = int(all_reduce_min(first, self.info).item())
        if bad == _NEVER:
            return
        o = self.cfg.optim
        if not math.isfinite(o.lr):
            cause = f"optim.lr={o.lr} is not finite"
        elif o.eps <= 0:
            cause = f"optim.eps={o.eps} lets AdamW divide by zero"
        else:
            cause = f"optim.lr={o.lr:g} may be too high for this model"
        fix = ("fix the setting and start again with --overwrite" if saved is None else
               f"fix the setting and continue from the intact checkpoint of step {saved} with --resume "
               "--allow-config-change, or start again with --overwrite")
        raise WorkFailed(f"training diverged: the loss is not finite from step {bad} (likely cause: "
                         f"{cause}); stopped at step {step} without saving it; {fix}.")
