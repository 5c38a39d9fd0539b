"""Reading checkpoints: ``<run>/checkpoints/step_<N>/`` as training writes them
(`libmoe.train.checkpoint.save_checkpoint`).

Contents of a checkpoint directory:
- ``model.safetensors``: the full model state (weights and persistent buffers such as the
  bias-balancing expert biases);
- ``optimizer.pt``: AdamW state (written by libmoe; loaded with ``weights_only=True``);
- ``trainer_state.pt``: step, LR-scheduler state, data-sampler position and RNG states;
- ``checkpoint.json``: step, tokenizer fingerprint, a hash of the model config (for resume checks),
  the run's identity (``run_hash``) and ``files``: the SHA-256 of every other file, so a damaged
  checkpoint is recognised (`verify_checkpoint`) and `--resume` falls back to an intact one;
- ``config.yaml``: the run's resolved config, so the directory stands alone;
- ``routing_trace.safetensors`` / ``routing_trace.json``: see `libmoe.moe.trace`.

Also what the transformers classes read off a model directory's weights: `weight_files`,
`saved_shapes` (tensor shapes from the safetensors headers) and `restore_router_buffers` (the
routers' constants, which meta-device loading may leave unset).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..files import CorruptFileError, read_json_object, sha256
from ..moe import Router

# The files of a checkpoint directory (step_N/): the model weights, the optimizer state, the
# trainer's state, and checkpoint.json (the files' checksums, which verify_checkpoint compares).
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
    """The newest complete checkpoint directory of a run, None when it has none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


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


def weight_files(directory: Path) -> list[str]:
    """The safetensors files of a model directory: the shards model.safetensors.index.json names,
    else model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    return ["model.safetensors"]


def saved_shapes(directory: Path, wanted) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the tensors whose key satisfies `wanted` in directory's model.safetensors
    (or the shards its model.safetensors.index.json names), read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in weight_files(directory):
        if not (directory / name).is_file():
            continue
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                if wanted(key):
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


@torch.no_grad()
def restore_router_buffers(model: nn.Module) -> None:
    """Recompute the routers' non-persistent buffers (constants) in `model`."""
    for router in [m for m in model.modules() if isinstance(m, Router)]:
        fresh = router.fresh_copy()
        for name in router._non_persistent_buffers_set:
            getattr(router, name).copy_(getattr(fresh, name))
