"""Bench presets: which training preset every run uses, the overrides that make it a study (steps,
evaluation, checkpoints), the evaluation (tasks, record limits, validation tokens) and the regime
(how the runs start: from a random init, or upcycled from one dense model). They are YAML package
data in ``libmoe/configs/bench/``; `libmoe bench --preset NAME` picks one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..overrides import did_you_mean

BENCH_DIR = Path(__file__).resolve().parent.parent / "configs" / "bench"
BENCH_PRESETS = sorted(p.stem for p in BENCH_DIR.glob("*.yaml"))
# The paper's seven benchmarked algorithms and the compute-matched dense baseline (Table 2).
PAPER_ALGORITHMS = ["dense", "smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus",
                    "tc_moe"]


@dataclass
class BenchPreset:
    """A bench preset (configs/bench/NAME.yaml): the training preset, overrides, tasks and studies."""

    name: str
    train_preset: str
    description: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted run-config keys, every run
    tasks: list[str] = field(default_factory=list)  # zero-shot tasks, those with data are run
    limit: int | None = None  # records per task (the harness's --limit); None: all
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task limits (e.g. blimp per paradigm)
    val_tokens: int | str = "run"  # validation tokens: "run" (training's eval windows), "all", a count
    interventions: bool = True  # DropTop and router-temperature studies (when `studies` is not given)
    studies: list[str] | None = None  # libmoe.bench.studies: init-std, droptop, temperature
    study_options: dict[str, Any] = field(default_factory=dict)  # {study: options}, e.g. init-std's stds
    jobs: int = 1  # runs at a time when --jobs is not given (worker processes)
    regime: str = "pretrain"  # how the runs start (libmoe.bench.regimes); --regime overrides it
    regime_options: dict[str, Any] = field(default_factory=dict)  # the regime's, when it is this one

    def override_list(self) -> list[str]:
        return [f"{k}={yaml_value(v)}" for k, v in self.overrides.items()]


def yaml_value(value: Any) -> str:
    """`value` as the text of a `key=value` override (YAML flow style: 0.5, [a, b], {k: v})."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_bench_preset(name: str) -> BenchPreset:
    """The bench preset `name` (configs/bench/NAME.yaml); unknown names or keys are a ValueError."""
    path = BENCH_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown bench preset {name!r}.{did_you_mean(name, BENCH_PRESETS)} "
                         f"Valid: {', '.join(BENCH_PRESETS)}.")
    data = yaml.safe_load(path.read_text()) or {}
    valid = set(BenchPreset.__dataclass_fields__) - {"name"}
    unknown = set(data) - valid
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(valid)}.")
    return BenchPreset(name=name, **data)
