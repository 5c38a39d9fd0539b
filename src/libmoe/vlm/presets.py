"""VLM presets: the model (vision tower, connector, LM), tokenizer, chat template, data, MoE settings
and each stage's hyperparameters. YAML package data in ``libmoe/configs/vlm/``; dotted
``key=value`` overrides change any field of the resolved stage config (``train.lr=1e-4``,
``moe.top_k=2``); an unknown key is refused with the nearest valid ones (`valid_keys`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..overrides import check_keys, did_you_mean, dotted, split_override

VLM_DIR = Path(__file__).resolve().parent.parent / "configs" / "vlm"
VLM_PRESETS = sorted(p.stem for p in VLM_DIR.glob("*.yaml"))
STAGES = ("pt", "pft", "vit")
# What trains in each stage (the command line's help).
STAGE_HELP = {"pt": "connector only (vision tower and LM frozen)",
              "pft": "everything trains (dense)",
              "vit": "the --init run's vision MLPs and connector become MoE layers; everything trains"}


def load_vlm_preset(name: str) -> dict[str, Any]:
    """The preset `name` as a dict (a fresh copy)."""
    path = VLM_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown VLM preset {name!r}.{did_you_mean(name, VLM_PRESETS)} "
                         f"Valid: {', '.join(VLM_PRESETS)}.")
    data = yaml.safe_load(path.read_text()) or {}
    data["name"] = name
    return copy.deepcopy(data)


# Keys an override may set besides those of the resolved config: data options of the synthetic
# dataset and of record filtering, upcycle_vlm's arguments; below model.vision / model.lm any
# transformers config field, below moe.options any option of the algorithm (checked when built).
EXTRA_KEYS = ("data.source", "data.file", "data.subtasks", "data.n_per_task", "data.n_test_per_task",
              "data.image_size", "data.seed", "data.multi_turn", "moe.n_experts", "moe.top_k", "moe.seed",
              "moe.router_init_std", "moe.aux_combine", "moe.connector")
OPEN_SECTIONS = ("model.vision", "model.lm", "moe.options")
FLAG_KEYS = {"kind": None, "stage": "--stage", "preset": "--preset", "init": "--init",
             "algorithm": "--algorithm"}


def valid_keys(config: dict[str, Any]) -> list[str]:
    """The dotted keys an override may set on the resolved stage config `config`: its own keys (but
    those set by flags) and EXTRA_KEYS."""
    keys = [k for k in dotted(config) if k.split(".")[0] not in FLAG_KEYS]
    return sorted(set(keys) | set(EXTRA_KEYS))


def apply_overrides(config: dict[str, Any], overrides: list[str], check: bool = False) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML, libmoe.overrides) to a nested
    dict, in place; ``key=`` sets None. With `check`, every key is first validated against
    `valid_keys(config)` (an unknown one is a ValueError with the nearest valid keys), so nothing
    is applied when one is wrong."""
    parsed = []
    for item in overrides:
        parts, value = split_override(item)
        if parts[0] in FLAG_KEYS and check:
            flag = FLAG_KEYS[parts[0]]
            raise ValueError(f"{parts[0]!r} cannot be overridden" + (f"; use {flag}." if flag else "."))
        parsed.append((item, parts, None if value == "" else value))
    if check:
        valid = valid_keys(config)
        for _, parts, value in parsed:
            nested: Any = value
            for part in reversed(parts):
                nested = {part: nested}
            check_keys(nested, valid, "VLM config key", OPEN_SECTIONS)
    for item, parts, value in parsed:
        node = config
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section.")
            node = child
        node[parts[-1]] = value
    return config
