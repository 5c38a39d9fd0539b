"""VLM presets: the model (vision tower, connector, LM), tokenizer, chat template, data, MoE settings
and each stage's hyperparameters. YAML package data in ``libmoe/configs/vlm/``; dotted
``key=value`` overrides change any field (``stages.vit.lr=1e-4``, ``moe.top_k=2``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..moe.options import did_you_mean

VLM_DIR = Path(__file__).resolve().parent.parent / "configs" / "vlm"
VLM_PRESETS = sorted(p.stem for p in VLM_DIR.glob("*.yaml"))
STAGES = ("pt", "pft", "vit")
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


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string; a string that is a number becomes one."""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. stages.vit.lr=1e-4).")
        value = _number(yaml.safe_load(raw)) if raw else None
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section.")
            node = child
        node[parts[-1]] = value
    return config
