"""Metric sinks: ``metrics.jsonl`` (one JSON object per line), TensorBoard, and the console.

Training rows carry ``step``, ``loss`` (language-model cross-entropy), ``aux_loss`` and each named
aux term as ``aux_<name>``, ``lr``, ``grad_norm``, ``tokens_per_s`` (over all processes),
``step_time_s``, ``flops_per_token``, ``mfu`` (model FLOPs utilisation in [0, 1]; only where the
device's peak FLOP/s is known: libmoe.train.throughput) and ``load``: per MoE layer ``{"layer",
"min_frac", "max_frac", "entropy", "dead"}`` over the steps since the previous row. Validation
rows carry ``step``, ``val_loss`` and ``val_ppl``. On an interactive terminal a progress bar shows
the step, loss, MFU and ETA; otherwise one plain line per logged row.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..devices import DistInfo, all_reduce_sum
from ..files import CorruptFileError, dumps, write_text


def load_summary(counts: torch.Tensor) -> dict[str, float]:
    """min/max selection fraction, allocation entropy (normalised by log n) and dead experts of
    one layer's selection counts [n_slots]."""
    counts = counts.double()
    total = counts.sum()
    n = counts.numel()
    if total <= 0:
        return {"min_frac": 0.0, "max_frac": 0.0, "entropy": 0.0, "dead": n}
    q = counts / total
    nz = q[q > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(n)) if n > 1 else 1.0
    return {"min_frac": float(q.min()), "max_frac": float(q.max()), "entropy": entropy,
            "dead": int((counts == 0).sum())}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (a write cut off by a crash) is dropped; a
    damaged line before it raises CorruptFileError naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            if k == len(numbered) - 1:  # torn by an interrupted write: the step is repeated anyway
                break
            raise CorruptFileError(path, f"line {number} is not a metrics row",
                                   "delete or repair that line, then resume")
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` (a resumed run rewrites the steps it repeats) and a torn last line."""
    if not Path(path).is_file():
        return
    keep = [row for row in read_metrics(path) if row.get("step", 0) <= step]
    write_text(path, "".join(dumps(row, indent=None) + "\n" for row in keep))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Writes rows to metrics.jsonl and TensorBoard and shows progress (rank 0 only)."""

    def __init__(self, run_dir: Path, max_steps: int, start_step: int, enabled: bool = True,
                 tensorboard: bool = True, progress: bool | None = None):
        self.enabled, self.max_steps, self.start_step = enabled, max_steps, start_step
        self.path = run_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.writer = None
        self.bar = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self.file = self.path.open("a")
        if tensorboard:
            try:  # imports tensorboard (half a second): only runs that log to it pay for it
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("libmoe: tensorboard is not installed; logging to metrics.jsonl only "
                      "(pip install tensorboard)", file=sys.stderr)
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.max_steps - step)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(dumps(row, indent=None) + "\n")
        self.file.flush()
        step = row["step"]
        if self.writer is not None:
            for key, value in row.items():
                if key == "load":
                    for layer in value:
                        for name, v in layer.items():
                            if name != "layer":
                                self.writer.add_scalar(f"load/layer{layer['layer']}/{name}", v, step)
                elif key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("aux_", "val_"))
                                           else key, value, step)
        self._show(row)

    def _show(self, row: dict[str, Any]) -> None:
        step = row["step"]
        if "val_loss" in row:
            text = f"step {step}: val_loss {row['val_loss']:.4f} | val_ppl {row['val_ppl']:.2f}"
        else:
            mfu = f" | MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
            text = (f"step {step}/{self.max_steps} | loss {row['loss']:.4f} | aux {row['aux_loss']:.4f}"
                    f" | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s{mfu}"
                    f" | ETA {_fmt_time(self.eta(step)) if step > self.start_step else '?'}")
        if self.bar is not None:
            self.bar.n = step
            if "loss" in row:
                extra = {"mfu": f"{row['mfu']:.1%}"} if row.get("mfu") is not None else {}
                self.bar.set_postfix(loss=f"{row['loss']:.3f}", **extra, refresh=False)
            self.bar.refresh()
            if "val_loss" in row:
                self.bar.write(text)
        else:
            print(text, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class StepWindow:
    """Sums since the last metrics row, kept on the device (no host sync per step): LM loss, aux
    loss and terms, per-layer selection counts, steps and their seconds; `row` reduces them over
    processes into one metrics.jsonl row."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.steps = 0
        self.loss: torch.Tensor | float = 0.0
        self.aux_loss: torch.Tensor | float = 0.0
        self.aux: dict[str, torch.Tensor] = {}
        self.counts: list[torch.Tensor] = []
        self.elapsed = 0.0  # seconds in training steps (evaluation and checkpoints excluded)
        self.started = time.perf_counter()
        self.excluded = 0.0  # seconds of validation and checkpoints inside the window

    def _sync(self) -> None:
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)

    @contextlib.contextmanager
    def paused(self):
        """Leave what runs inside (validation, a checkpoint) out of the window's training time;
        the GPU's queued training work is waited for first, so it is not left out."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def stop(self) -> None:
        """End the window's clock on a logging step: wait for the GPU (a step queues its work and
        returns before the device has done it), so that step time, tokens/s and MFU measure the
        device's work, not how far the host ran ahead."""
        self._sync()
        self.elapsed = time.perf_counter() - self.started - self.excluded

    def add(self, output, weight: float) -> None:
        """Add one micro-batch's LMOutput, weighted (1 / micro-batches per step)."""
        with torch.no_grad():
            self.loss = self.loss + output.loss.detach().double() * weight
            self.aux_loss = self.aux_loss + output.aux_loss.detach().double() * weight
            for name, value in output.aux.items():
                self.aux[name] = self.aux.get(name, 0.0) + value.detach().double() * weight
            if not self.counts:
                self.counts = [torch.zeros(r.probs.shape[-1], dtype=torch.float64,
                                           device=r.probs.device) for r in output.routing]
            for c, r in zip(self.counts, output.routing):
                # A fixed-size scatter_add with padding (-1) weighted 0: the bincount of the valid
                # ids without the host syncs a boolean-mask index and bincount make on a GPU.
                ids = r.topk_idx.reshape(-1)
                valid = ids >= 0
                c.scatter_add_(0, ids.clamp(min=0), valid.to(c.dtype))

    def row(self, step: int, tokens_per_step: int) -> dict[str, Any]:
        """The metrics row of the window ending at `step` (a collective: every process calls it)."""
        elapsed = self.elapsed
        device = self.info.device
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                             for v in [self.loss, self.aux_loss, *self.aux.values()]])
        stats = all_reduce_sum(stats, self.info).cpu() / (self.info.world_size * self.steps)
        row = {"step": step, "loss": float(stats[0]), "aux_loss": float(stats[1])}
        row.update({f"aux_{name}": float(v) for name, v in zip(self.aux, stats[2:])})
        row["tokens_per_s"] = self.steps * tokens_per_step / elapsed
        row["step_time_s"] = elapsed / self.steps
        row["load"] = [{"layer": l, **load_summary(all_reduce_sum(c, self.info).cpu())}
                       for l, c in enumerate(self.counts)]
        return row
