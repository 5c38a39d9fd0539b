"""A VLM stage's configuration and data: the resolved config of a stage run (what its config.yaml
holds, checked before any work), the dataset it reads (the synthetic one written into the cache
once) and its training records. `libmoe.vlm.train` runs the stage."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..moe.layer import check_algorithm
from ..overrides import did_you_mean, load_yaml
from .data import load_conversations
from .presets import STAGES, apply_overrides, load_vlm_preset
from .synth import VERSION, write_synth_dataset

CONFIG_FILE = "config.yaml"  # a VLM run directory's resolved stage config
STAGE_FILES = {"pt": "pt.json", "pft": "instruct.json", "vit": "instruct.json"}
INIT_STAGE = {"pft": ("pt", "pft"), "vit": ("pft",)}  # the stages an --init run may be (pft from
# pft: trained on, e.g. the dense baseline of a VIT comparison)
# Where each stage checkpoints by default, as fractions of its steps (train.checkpoint_at).
DEFAULT_CHECKPOINTS = {"pt": [1.0], "pft": [1.0], "vit": [0.2, 0.4, 0.6, 0.8, 1.0]}
TRAIN_DEFAULTS = {"lr": 1e-3, "batch_size": 32, "max_steps": None, "epochs": 1, "warmup_ratio": 0.03,
                  "min_lr_ratio": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "grad_clip": 1.0,
                  "seed": 0, "log_every": 10, "checkpoint_at": None, "probe_per_subtask": 16,
                  "eval_at_end": True, "tensorboard": True}


def cache_dir() -> Path:
    """Where libmoe caches generated data: $LIBMOE_CACHE, else ~/.cache/libmoe."""
    return Path(os.environ.get("LIBMOE_CACHE", Path.home() / ".cache" / "libmoe"))


# -- config ----------------------------------------------------------------------------------------
def stage_config(stage: str, preset: str = "cpu-tiny", data: str | None = None, init: str | None = None,
                 algorithm: str | None = None, max_steps: int | None = None,
                 overrides: list[str] = ()) -> dict[str, Any]:
    """The resolved config of one stage run (what config.yaml holds)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}.{did_you_mean(stage, STAGES)} Valid: {', '.join(STAGES)}.")
    if init is not None:
        init_cfg = _init_config(init, stage)
        preset = init_cfg["preset"]
    p = load_vlm_preset(preset)
    cfg: dict[str, Any] = {"kind": "vlm", "stage": stage, "preset": preset,
                           "init": str(Path(init).resolve()) if init else None,
                           "algorithm": None, "model": p["model"], "tokenizer": p.get("tokenizer", "words"),
                           "template": p.get("template", "simple"), "max_length": p.get("max_length", 2048),
                           "precision": p.get("precision", "auto"), "data": _data_section(p, stage),
                           "moe": p.get("moe") or {},
                           "train": {**TRAIN_DEFAULTS, **(p.get("stages") or {}).get(stage, {})}}
    if init is not None:  # the same data and tokenizer as the stage before, unless told otherwise
        cfg["data"] = {**init_cfg["data"], "file": STAGE_FILES[stage]} if init_cfg["data"].get(
            "source") == "synth" or "file" in init_cfg["data"] else cfg["data"]
        cfg["model"], cfg["tokenizer"] = init_cfg["model"], init_cfg["tokenizer"]
        cfg["template"], cfg["max_length"] = init_cfg["template"], init_cfg["max_length"]
    if data is not None:
        cfg["data"] = {"source": str(data), "file": None if Path(data).is_file() else STAGE_FILES[stage]}
    apply_overrides(cfg, list(overrides), check=True)  # an unknown key fails here, before any work
    if max_steps is not None:
        cfg["train"]["max_steps"] = int(max_steps)
    _check_train(cfg["train"])
    if stage == "vit":
        if algorithm is None:
            raise ValueError("the vit stage needs --algorithm (e.g. smoe, xmoe, sharede_v2).")
        check_algorithm(algorithm)
        if algorithm == "dense":
            raise ValueError("--algorithm dense has no router: the dense baseline of a VIT comparison is "
                             "`--stage pft --init PFT_RUN` continued for the same steps.")
        cfg["algorithm"] = algorithm
    elif algorithm not in (None, "dense"):
        raise ValueError(f"--algorithm {algorithm}: MoE layers are built in the vit stage only (the paper's "
                         f"PT and PFT are dense); drop --algorithm for --stage {stage}.")
    if cfg["train"]["checkpoint_at"] is None:
        cfg["train"]["checkpoint_at"] = DEFAULT_CHECKPOINTS[stage]
    return cfg


def _check_train(tcfg: dict[str, Any]) -> None:
    """The stage's hyperparameters are numbers in range (a NaN loss hours later is the alternative)."""
    def number(key, low, high=math.inf, integer=False, allow_none=False, low_open=False):
        value = tcfg.get(key)
        if value is None and allow_none:
            return
        ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high != math.inf else "")
            raise ValueError(f"train.{key}={value!r} is not valid; it must be {kind} {bound}.")

    number("lr", 0.0, low_open=True)
    number("batch_size", 1, integer=True)
    number("max_steps", 1, integer=True, allow_none=True)
    number("epochs", 1, integer=True, allow_none=True)
    number("warmup_ratio", 0.0, 1.0)
    number("min_lr_ratio", 0.0, 1.0)
    number("weight_decay", 0.0)
    number("grad_clip", 0.0, low_open=True)
    number("log_every", 1, integer=True)
    number("probe_per_subtask", 1, integer=True)
    betas = tcfg.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"train.betas={betas!r} is not valid; it must be two numbers in [0, 1), "
                         "e.g. train.betas=[0.9,0.999].")
    at = tcfg.get("checkpoint_at")
    if at is not None and not (isinstance(at, list) and at and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in at)):
        raise ValueError(f"train.checkpoint_at={at!r} is not valid; it must be a list of fractions of the "
                         "steps in (0, 1], e.g. train.checkpoint_at=[0.5,1.0].")


def _data_section(preset: dict[str, Any], stage: str) -> dict[str, Any]:
    data = dict(preset.get("data") or {"source": "synth"})
    if stage in data and isinstance(data[stage], str):  # per-stage Hub names (the paper preset)
        return {"source": data[stage], "file": None}
    data.pop("pt", None), data.pop("pft", None), data.pop("vit", None)
    data.setdefault("source", "synth")
    data["file"] = STAGE_FILES[stage]
    return data


def _init_config(init: str | Path, stage: str) -> dict[str, Any]:
    path = Path(init)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--init {init}: not a libmoe vlm run (no {CONFIG_FILE}).")
    cfg = load_yaml(cfg_path, "--init run's config")
    if cfg.get("kind") != "vlm":
        raise ValueError(f"--init {init} is not a VLM run (train one with `libmoe vlm train`).")
    want = INIT_STAGE.get(stage)
    if want is None:
        raise ValueError(f"--stage {stage} starts from the preset's base models; it takes no --init.")
    if cfg.get("stage") not in want:
        raise ValueError(f"--init {init} is a {cfg.get('stage')} run; --stage {stage} starts from a "
                         f"{' or '.join(want)} run.")
    return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- data ------------------------------------------------------------------------------------------
def resolve_data(data: dict[str, Any], log: Callable[[str], None] = print) -> Path | str:
    """The dataset folder (the synthetic one is generated into the cache once) or a Hub name."""
    source = data.get("source", "synth")
    if source != "synth":
        return source if not Path(source).exists() else Path(source)
    args = {k: data[k] for k in ("n_per_task", "n_test_per_task", "image_size", "seed", "multi_turn")
            if k in data}
    key = hashlib.sha256(json.dumps({**args, "version": VERSION}, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / "vlm-synth" / key
    if not (folder / "dataset.json").is_file():
        log(f"writing the synthetic multimodal dataset to {folder}")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        write_synth_dataset(tmp, **args, log=log)
        try:  # written aside and renamed, so a concurrent run never reads a half-written dataset
            tmp.replace(folder)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stage_records(cfg: dict[str, Any], log: Callable[[str], None] = print) -> tuple[list[dict], Path | str]:
    folder = resolve_data(cfg["data"], log)
    records = load_conversations(folder, file=cfg["data"].get("file"))
    keep = cfg["data"].get("subtasks")
    if keep:
        records = [r for r in records if r.get("subtask") in set(keep)]
        if not records:
            raise ValueError(f"data.subtasks={keep}: no record of those subtasks in {folder}.")
    return records, folder


def load_stage_config(run: str | Path) -> dict[str, Any]:
    """A VLM run's config.yaml; FileNotFoundError / a one-line ValueError naming the file."""
    return load_yaml(Path(run) / CONFIG_FILE, "VLM run config")

