"""Vision-language sparse upcycling (the paper's LLaVA-style pipeline): model, presets, data, stages,
evaluation, analysis and the vlm bench regime. See docs/vlm.md.

    from libmoe.vlm import parameter_report, train_stage
    parameter_report("paper-phi35-siglip")    # Table 3, on the meta device (no download)
    train_stage("pt", "runs/pt", preset="cpu-tiny")

Names are imported on first use, so `import libmoe.vlm` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LibMoEVLM": "model", "build_vlm": "model", "load_vlm": "model", "save_vlm": "model",
    "upcycle_vlm": "upcycle", "parameter_report": "upcycle",
    "load_vlm_preset": "presets", "VLM_PRESETS": "presets", "STAGES": "presets",
    "train_stage": "train", "stage_config": "train",
    "evaluate_vlm": "evaluate", "evaluate_run": "evaluate", "score_mme": "evaluate",
    "write_synth_dataset": "synth", "SUBTASKS": "synth",
    "load_conversations": "data", "load_mme": "data", "load_image": "data",
    "analyze_vlm_run": "analysis", "record_vlm_trace": "trace", "run_vlm_bench": "bench",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
