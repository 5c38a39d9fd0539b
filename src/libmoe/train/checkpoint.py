"""Checkpoints: ``<run>/checkpoints/step_<N>/`` written atomically, newest N kept.

Contents of a checkpoint directory:
- ``model.safetensors``: the full model state (weights and persistent buffers such as the
  bias-balancing expert biases);
- ``optimizer.pt``: AdamW state (written by this library; loaded with ``weights_only=True``);
- ``trainer_state.pt``: step, LR-scheduler state, data-sampler position and RNG states;
- ``checkpoint.json``: step, tokenizer fingerprint, a hash of the model config (for resume checks);
- ``config.yaml``: the run's resolved config, so the directory stands alone;
- ``routing_trace.safetensors`` / ``routing_trace.json``: see `libmoe.train.trace`.

The directory is assembled under ``.tmp_step_<N>`` and renamed into place, so a crash never leaves
a half-written ``step_<N>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / INFO_FILE).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    info: dict[str, Any],
    extra_files: dict[str, str] | None = None,
    keep: int = 3,
    before_rename=None,
) -> Path:
    """Write step `step`'s checkpoint atomically, then delete all but the newest `keep` (their
    routing traces move to RUN/traces/step_N).

    `before_rename(tmp_dir)` may add files (e.g. the routing trace) before the rename.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    torch.save(trainer_state, tmp / STATE_FILE)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if before_rename is not None:
        before_rename(tmp)
    (tmp / INFO_FILE).write_text(json.dumps(dict(info, step=step), indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        _keep_trace(old, Path(run_dir) / "traces" / old.name)
        shutil.rmtree(old, ignore_errors=True)
    return final


def _keep_trace(checkpoint: Path, dest: Path) -> None:
    """Move a pruned checkpoint's routing trace (small) to RUN/traces/step_N: the analysis of
    routing over training needs every checkpoint's trace, not only the kept weights'."""
    files = [checkpoint / name for name in ("routing_trace.safetensors", "routing_trace.json")]
    if not all(f.is_file() for f in files):
        return
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        os.replace(f, dest / f.name)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """{"model", "optimizer", "state", "info"} of a checkpoint directory."""
    path = Path(path)
    return {
        "model": load_file(str(path / MODEL_FILE)),
        "optimizer": torch.load(path / OPTIMIZER_FILE, weights_only=True),
        "state": torch.load(path / STATE_FILE, weights_only=True),
        "info": json.loads((path / INFO_FILE).read_text()),
    }
