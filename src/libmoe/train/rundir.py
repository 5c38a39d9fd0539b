"""A run directory holds one run: its identity, what `--overwrite` removes, and the resume guards.

`run_hash` names a run by what cannot change within it (model, data, seed); checkpoints and
routing traces carry it, so analysis never mixes two runs' traces. `--resume` compares the settings
that shape the optimisation (`GUARDED`) with the checkpoint's config and refuses a change unless
told to record it (RUN/config_changes.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..files import dumps, write_text
from ..models.checkpoints import list_checkpoints
from ..models.run_config import RunConfig, config_from_dict
from ..overrides import load_yaml

# Everything the trainer and the commands that work on a run write into its directory.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "tokenizer",
             "train_summary.json", "traces", "eval", "analysis", "config_changes.jsonl")
CHANGES_FILE = "config_changes.jsonl"
# Settings a resumed run must keep (they shape the optimisation of the steps already taken); the
# model is checked separately (model_hash). Micro-batching, logging, evaluation, checkpoint
# intervals, precision and device change how, not what, is computed.
GUARDED = ("optim", "data", "train.batch_size", "train.max_steps", "train.seq_len", "train.seed")
UNGUARDED_DATA = ("cache_dir", "num_proc")  # where the cache lives and how it is built, not what it holds


def model_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.model.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def run_hash(cfg: RunConfig) -> str:
    """The run's identity: 16 hex digits of the SHA-256 of its model and data configs and seed."""
    data = {k: v for k, v in cfg.to_dict()["data"].items() if k not in UNGUARDED_DATA}
    identity = {"model": cfg.model.to_dict(), "data": data, "seed": cfg.train.seed}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two config dicts."""
    if not (isinstance(saved, dict) and isinstance(wanted, dict)):
        return [] if saved == wanted else [f"{prefix.rstrip('.') or 'config'}: {saved!r} -> {wanted!r}"]
    out = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_run_dir(out: Path, resume: bool | str, overwrite: bool) -> None:
    """Refuse to write into a directory that holds another run unless told what to do."""
    out = Path(out)
    if resume is True and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; give one of them.")
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"--out {str(out)!r}: {str(path)!r} is a file; give a directory.")
            break
    if (out / "config.yaml").is_file() and not (resume or overwrite):
        raise ValueError(
            f"{str(out)!r} already holds a run (config.yaml); pass --resume to continue it or "
            "--overwrite to replace it."
        )


def check_resumable(out: Path) -> None:
    """A ValueError unless `out` holds a run with a checkpoint to resume from."""
    if list_checkpoints(out):
        return
    if (out / "config.yaml").is_file():
        raise ValueError(f"{str(out)!r} holds a run but no checkpoint to resume from; start it again "
                         "with --overwrite instead of --resume.")
    raise ValueError(f"no run in {str(out)!r} to resume; check --out, or drop --resume to start a "
                     "new run there.")


def clear_run(out: Path) -> None:
    """Remove every file of the run in `out` (RUN_FILES); files libmoe did not write stay, and a
    directory holding no run (no config.yaml, no checkpoints/) is left as it is: an `eval/` or
    `analysis/` folder there is the user's, not an old run's."""
    if (out / "config.yaml").is_file() or (out / "checkpoints").is_dir():
        remove_entries(out, RUN_FILES)


def remove_entries(directory: Path, names: tuple[str, ...]) -> None:
    """Remove the files and folders `names` of `directory` (a link is removed, not followed)."""
    for name in names:
        path = Path(directory) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _guarded(values: dict[str, Any]) -> dict[str, Any]:
    cfg = config_from_dict(values).to_dict()  # defaults filled in, types normalised
    train = cfg["train"]
    train["seq_len"] = train["seq_len"] or cfg["model"]["max_seq_len"]  # the length actually used
    out: dict[str, Any] = {"data": {k: v for k, v in cfg["data"].items() if k not in UNGUARDED_DATA},
                           "optim": cfg["optim"]}
    out["train"] = {key.split(".", 1)[1]: train[key.split(".", 1)[1]]
                    for key in GUARDED if key.startswith("train.")}
    return out


def saved_config(checkpoint: Path, out: Path) -> dict[str, Any]:
    """The config a checkpoint was trained with (its own config.yaml, else the run's)."""
    for path in (checkpoint / "config.yaml", out / "config.yaml"):
        if path.is_file():
            return load_yaml(path, "config", "restore it or start again with --overwrite")
    return {}


def resume_changes(saved: dict[str, Any], cfg: RunConfig, step: int, allow: bool) -> list[str]:
    """The guarded settings `cfg` changes against the saved config ('key: old -> new'); a
    ValueError naming them unless `allow`."""
    if not saved:
        return []
    try:
        old = _guarded(saved)
    except ValueError as err:
        raise ValueError(f"the saved config of this run is not valid any more ({err})") from None
    changes = config_diff(old, _guarded(cfg.to_dict()))
    if changes and not allow:
        raise ValueError(
            f"--resume would change settings of the run at step {step} ({'; '.join(changes)}); "
            "drop these overrides to continue it as it was, or pass --allow-config-change to "
            "continue with them (recorded in config_changes.jsonl)."
        )
    return changes


def record_config_change(out: Path, step: int, changes: list[str]) -> None:
    """Append {"step", "time", "changes"} to RUN/config_changes.jsonl."""
    path = out / CHANGES_FILE
    before = path.read_text() if path.is_file() else ""
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changes": changes}
    write_text(path, before + dumps(row, indent=None) + "\n")
