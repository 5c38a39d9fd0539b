"""One training run in progress, and what the loop does to it: `train_step` (one optimizer step
over the global batch), `log_window`, `validate` and `checkpoint`. `libmoe.train.trainer` sets it
up and runs the loop."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.packed import PackedData, SequenceSampler
from ..devices import DistInfo
from ..eval.perplexity import validation_loss
from ..models.run_config import RunConfig
from ..moe import set_training_progress
from .checkpoint import save_checkpoint
from .distributed import barrier
from .expert_parallel import clip_grad_norm, gather_expert_state
from .metrics import MetricsLogger, StepWindow
from .optim import full_state_dicts, rng_state
from .stops import FiniteGuard
from .throughput import mfu
from .trace import record_routing, save_trace


@dataclass
class TrainRun:
    """Everything a run holds while it trains: the model (`raw`) and what runs it (`model`: raw, or
    its DDP/FSDP wrapper), optimizer, schedule, loss scaler and data sampler, the step reached,
    what validation and checkpoints need (validation windows, the probe set traced at each
    checkpoint, checkpoint.json's fields and the extra files), the divergence guard and the
    metrics logger."""

    cfg: RunConfig
    out: Path
    info: DistInfo
    data: PackedData
    raw: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    sampler: SequenceSampler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]
    local: int  # sequences per process per step
    micro: int  # sequences per forward
    accum: int  # micro-batches per step
    val_windows: torch.Tensor
    probe_tokens: torch.Tensor
    probe_domain: torch.Tensor
    identity: str  # the run's run_hash, kept in checkpoints and traces
    checkpoint_info: dict[str, Any]
    extra_files: dict[str, str]
    guard: FiniteGuard
    flops_per_token: int
    hf: bool  # a transformers model (libmoe.models.transformers_lm)
    step: int = 0
    saved_step: int | None = None  # the step of the newest checkpoint written or resumed from
    earlier_time: float = 0.0  # seconds of training before a resume (train_time_s covers the whole run)
    start_time: float = field(default_factory=time.perf_counter)
    precision_name: str = "fp32"  # the autocast dtype, for the log
    logger: MetricsLogger | None = None
    flags: Any = None  # the cpu_group of host-side barriers (None: one process, or the default group)
    peak_flops: float | None = None  # one device's peak FLOP/s for the MFU figure (None: unknown, no MFU)

    def elapsed(self) -> float:
        """Seconds of training in this run so far, resumed parts included."""
        return self.earlier_time + time.perf_counter() - self.start_time

    def train_step(self, window: StepWindow) -> tuple[float, torch.Tensor]:
        """One optimizer step: this process's slice of the global batch in micro-batches (DDP and
        FSDP sync gradients on the last only), LM loss plus every MoE layer's auxiliary loss, clip,
        AdamW and schedule. Adds the step to `window`; returns (the step's lr, gradient norm).
        No host sync (the lr is the schedule's float)."""
        tc, info, model = self.cfg.train, self.info, self.model
        set_training_progress(self.raw, self.step / tc.max_steps)
        rows = self.sampler.next_batch(tc.batch_size)[info.rank * self.local : (info.rank + 1) * self.local]
        if info.device.type == "cuda":
            rows = rows.pin_memory()  # a copy from pageable memory would wait for the GPU to finish
        fsdp = info.enabled and tc.parallel == "fsdp"
        for i in range(self.accum):
            batch = rows[i * self.micro : (i + 1) * self.micro].to(info.device, non_blocking=True)
            last = i == self.accum - 1
            sync = contextlib.nullcontext()
            if info.enabled and tc.parallel == "ddp" and not last:
                sync = model.no_sync()  # gradients are all-reduced on the last micro-batch only
            if fsdp and self.accum > 1:
                # FSDP2 keeps the unsharded gradients and reduce-scatters them after the last
                # micro-batch only (more memory for accumulation, one reduction per step).
                model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    output = model(batch[:, :-1], batch[:, 1:])
                loss = (output.loss + output.aux_loss) / self.accum
                self.scaler.scale(loss).backward()
            window.add(output, 1 / self.accum)
        self.scaler.unscale_(self.opt)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = clip_grad_norm(model, clip)  # expert shards: summed over their replicas first
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = self.sched.get_last_lr()[0]
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        window.steps += 1
        # A loss scaler skips steps with overflowing gradients itself; otherwise they diverge.
        self.guard.update(self.step, window.loss, window.aux_loss,
                          *(() if self.scaler.is_enabled() else (grad_norm,)))
        return lr, grad_norm

    def log_window(self, window: StepWindow, lr: float, grad_norm: torch.Tensor) -> None:
        """Log the metrics row of the steps in `window` (every process takes part)."""
        window.stop()  # the logging step's one wait for the GPU
        row = window.row(self.step, self.cfg.train.batch_size * self.cfg.seq_len)
        row.update({"lr": lr, "grad_norm": float(grad_norm), "flops_per_token": self.flops_per_token})
        utilisation = mfu(row["tokens_per_s"], self.flops_per_token, self.peak_flops, self.info.world_size)
        if utilisation is not None:  # only where the device's peak FLOP/s is known (never a guess)
            row["mfu"] = utilisation
        self.logger.log(row)
        self.guard.check(self.step, saved=self.saved_step)

    def validate(self) -> float:
        """The validation loss at this step (logged with its perplexity)."""
        self.guard.check(self.step, saved=self.saved_step)
        val_loss = validation_loss(self.model, self.val_windows, self.micro, self.info, self.autocast)
        self.logger.log({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    def checkpoint(self) -> Path:
        """Write this step's checkpoint with the probe set's routing trace (never of diverged
        weights). Every process runs the probe forward (FSDP/DDP collectives); rank 0 writes."""
        step, info = self.step, self.info
        self.guard.check(step, self.model, self.saved_step)
        model_state, opt_state = gather_expert_state(self.model, self.opt,
                                                     *full_state_dicts(self.model, self.opt))
        if self.hf:
            model_state = self.raw.export_state(model_state)
        trainer_state = {"step": step, "scheduler": self.sched.state_dict(),
                         "data": self.sampler.state_dict(), "rng": rng_state(),
                         "elapsed_s": self.elapsed()}
        path = self.out / "checkpoints" / f"step_{step}"
        if info.is_main:
            path = save_checkpoint(
                self.out, step, model_state, opt_state, trainer_state, self.checkpoint_info,
                extra_files=self.extra_files, keep=self.cfg.train.keep_checkpoints,
                before_rename=lambda tmp: save_trace(tmp, self.raw, self.probe_tokens, self.probe_domain,
                                                     self.data.domains, step, run=self.model,
                                                     run_hash=self.identity),
            )
            self.logger.message(f"step {step}: checkpoint {path}")
        else:
            record_routing(self.model, self.probe_tokens)
        barrier(info, self.flags)  # rank 0's file writes: the others wait on the CPU group
        self.saved_step = step
        return path
