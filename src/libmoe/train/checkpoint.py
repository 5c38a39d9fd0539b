"""Writing checkpoints: ``<run>/checkpoints/step_<N>/`` written atomically, newest N kept.

What a checkpoint directory holds, and reading it back (`list_checkpoints`, `latest_checkpoint`,
`verify_checkpoint`, `load_checkpoint`, `newest_intact_checkpoint`), is `libmoe.models.checkpoints`.
The directory is assembled under
``.tmp_step_<N>`` and renamed into place, so a crash never leaves a half-written ``step_<N>``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..devices import DistInfo
from ..files import sha256, write_json, write_text
from ..models.checkpoints import (
    INFO_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
)
from .distributed import all_reduce_max

__all__ = ["agreed_checkpoint", "save_checkpoint"]


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
        write_text(tmp / name, text)
    if before_rename is not None:
        before_rename(tmp)
    files = {f.relative_to(tmp).as_posix(): sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
    write_json(tmp / INFO_FILE, dict(info, step=step, files=files))
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


def agreed_checkpoint(out: Path, info: DistInfo, group, say) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from: rank 0 picks the newest intact one (verifying checksums once,
    naming each damaged newer one) and every other rank loads that same step."""
    if not info.enabled:
        return newest_intact_checkpoint(out, say)
    chosen, error = -1, None
    if info.is_main:
        try:
            path, ckpt = newest_intact_checkpoint(out, say)
            chosen = int(path.name.removeprefix("step_"))
        except ValueError as err:  # every rank must still take part in the agreement below
            error = err
    step = int(all_reduce_max(torch.tensor([chosen]), info, group).item())
    if error is not None:
        raise error
    if step < 0:
        raise ValueError(f"no intact checkpoint in {str(out / 'checkpoints')!r} (rank 0 found none).")
    if info.is_main:
        return path, ckpt
    path = out / "checkpoints" / f"step_{step}"
    return path, load_checkpoint(path)
