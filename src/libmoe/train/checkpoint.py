"""Checkpoints: ``<run>/checkpoints/step_<N>/`` written atomically, newest N kept.

Contents of a checkpoint directory:
- ``model.safetensors``: the full model state (weights and persistent buffers such as the
  bias-balancing expert biases);
- ``optimizer.pt``: AdamW state (written by this library; loaded with ``weights_only=True``);
- ``trainer_state.pt``: step, LR-scheduler state, data-sampler position and RNG states;
- ``checkpoint.json``: step, tokenizer fingerprint, a hash of the model config (for resume checks),
  the run's identity (``run_hash``) and ``files``: the SHA-256 of every other file, so a damaged
  checkpoint is recognised (`verify_checkpoint`) and `--resume` falls back to an intact one;
- ``config.yaml``: the run's resolved config, so the directory stands alone;
- ``routing_trace.safetensors`` / ``routing_trace.json``: see `libmoe.train.trace`.

The directory is assembled under ``.tmp_step_<N>`` and renamed into place, so a crash never leaves
a half-written ``step_<N>``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..files import CorruptFileError, read_json_object, sha256, write_json, write_text
from .distributed import DistInfo, all_reduce_max

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


def verify_checkpoint(path: str | Path) -> str | None:
    """None when checkpoint directory `path` is intact, else why not (one phrase): its
    checkpoint.json is unreadable, or a file it records is missing or fails its checksum (the
    routing trace may be missing: resuming does not need it). A checkpoint written before
    checksums were recorded passes when its state files are present."""
    path = Path(path)
    try:
        info = read_json_object(path / INFO_FILE)
    except (FileNotFoundError, ValueError, OSError):
        return f"{INFO_FILE} is missing or unreadable"
    files = info.get("files")
    if files is None:  # an older checkpoint: no checksums to compare
        missing = [n for n in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE) if not (path / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    if not isinstance(files, dict):
        return f"{INFO_FILE} has no valid file list"
    for name, digest in sorted(files.items()):
        file = path / name
        if not file.is_file():
            if name.startswith("routing_trace."):  # moved away (analyze's advice for a bad trace)
                continue
            return f"{name} is missing"
        try:
            if sha256(file) != digest:
                return f"{name} does not match its checksum"
        except OSError as err:
            return f"{name} is unreadable ({err.strerror or err})"
    return None


def _fix(path: Path) -> str:
    return f"delete {str(path)!r} to fall back to the previous checkpoint"


def _load_torch(file: Path, checkpoint: Path) -> Any:
    """torch.load with weights_only=True; a damaged file is a CorruptFileError (torch's own message,
    which may suggest weights_only=False, is not passed on: never load these files unsafely)."""
    if not file.is_file():
        raise CorruptFileError(file, "missing", _fix(checkpoint))
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception:  # UnpicklingError, RuntimeError (a torn zip), EOFError, ...
        raise CorruptFileError(file, "truncated or not a PyTorch state file", _fix(checkpoint)) from None


def _load_safetensors(file: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CorruptFileError(file, "missing", _fix(checkpoint))
    try:
        return load_file(str(file))
    except Exception:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise CorruptFileError(file, "truncated or not a safetensors file", _fix(checkpoint)) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """{"model", "optimizer", "state", "info"} of a checkpoint directory; a missing or damaged file
    raises CorruptFileError naming it (see `verify_checkpoint` to check the checksums first)."""
    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise CorruptFileError(info_file, "missing", _fix(path))
    return {
        "model": _load_safetensors(path / MODEL_FILE, path),
        "optimizer": _load_torch(path / OPTIMIZER_FILE, path),
        "state": _load_torch(path / STATE_FILE, path),
        "info": read_json_object(info_file, _fix(path)),
    }


def newest_intact_checkpoint(run_dir: str | Path, say=print) -> tuple[Path, dict[str, Any]]:
    """The newest intact checkpoint of a run and its contents (`load_checkpoint`); each damaged
    newer one is named with the reason it was skipped. A ValueError when none is intact."""
    root = Path(run_dir)
    skipped = []
    for path in reversed(list_checkpoints(root)):
        reason = verify_checkpoint(path)
        if reason is None:
            try:
                return path, load_checkpoint(path)
            except CorruptFileError as err:
                reason = f"{err.path.name} is damaged"
        say(f"resume: skipping damaged checkpoint {path} ({reason})")
        skipped.append(f"{path.name}: {reason}")
    raise ValueError(f"no intact checkpoint in {str(root / 'checkpoints')!r} ({'; '.join(skipped)}); "
                     "start the run again with --overwrite.")


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
