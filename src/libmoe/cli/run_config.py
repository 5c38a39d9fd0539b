"""The run config `libmoe train` and `libmoe prepare` resolve from their arguments."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..models import resolve_checkpoint, resolve_config
from ..models.transformers_lm import transformers_source
from ..overrides import load_yaml


def upcycle_source_config(model_dir: Path) -> Path | None:
    """The config.yaml of the libmoe run a transformers directory was upcycled from (its
    upcycle.json names the source), so training continues on that run's data; else None."""
    info = model_dir / "upcycle.json"
    if not info.is_file():
        return None
    source = Path(str(json.loads(info.read_text()).get("source", "")))
    for candidate in (source / "config.yaml", source.parent.parent / "config.yaml"):
        if source.name and candidate.is_file():
            return candidate
    return None


def init_config_layer(init: str) -> dict | None:
    """--init MODEL: the init model's own config (model, data, tokenizer), the base layer; None for
    a transformers model without one (it needs no libmoe config)."""
    source = transformers_source(init)
    init_config = (Path(source) if source else resolve_checkpoint(init)) / "config.yaml"
    if source and not init_config.is_file():  # upcycled from a libmoe run: that run's config
        init_config = upcycle_source_config(Path(source)) or init_config
    if init_config.is_file():
        return load_yaml(init_config)
    if not source:
        raise FileNotFoundError(f"--init {init}: no config.yaml beside its weights; give a libmoe "
                                "model directory (libmoe upcycle --out), run or checkpoint.")
    return None


def run_config(args: argparse.Namespace, resume: bool = False):
    """(RunConfig, out dir) from preset < saved run when resuming < CONFIG.yaml < flags <
    section.key=value overrides."""
    config_file, overrides = None, []
    init = getattr(args, "init", None)
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_file is None and item.endswith((".yaml", ".yml")):
            config_file = item
        else:
            raise ValueError(f"unexpected argument {item!r}: give one CONFIG.yaml and "
                             "section.key=value overrides.")
    user = load_yaml(config_file) if config_file else {}
    out = Path(getattr(args, "out", None) or user.get("out") or
               f"runs/{args.preset or user.get('preset') or 'micro'}-{args.algorithm or 'smoe'}")
    user.pop("out", None)
    layers = []
    if init:
        base = init_config_layer(init)
        if base is not None:
            layers.append(base)
    if resume and (out / "config.yaml").is_file():
        layers.append(load_yaml(out / "config.yaml"))
    layers.append(user)
    flags: dict = {"model": {}, "data": {}, "train": {}}
    if args.algorithm:
        flags["model"]["algorithm"] = args.algorithm
    if args.data:
        flags["data"]["source"] = args.data
    for key in ("max_steps", "checkpoint_every", "seed"):
        if getattr(args, key, None) is not None:
            flags["train"][key] = getattr(args, key)
    layers.append(flags)
    preset = args.preset
    if preset is None and not resume:
        preset = user.get("preset") or (layers[0].get("preset") if init else None)
    return resolve_config(layers, overrides, preset=preset), out
