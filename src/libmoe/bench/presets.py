"""Bench presets: which training preset every run uses, the overrides that make it a study (steps,
evaluation, checkpoints), the evaluation (tasks, record limits, validation tokens) and the regime
(how the runs start: from a random init, or upcycled from one dense model), and the seeds per
algorithm (`seeds`; `--seeds` overrides it). They are YAML package data in
``libmoe/configs/bench/``; `libmoe bench --preset NAME` picks one.

A preset may `extends: OTHER`: it starts from OTHER's keys (which may extend another in turn) and
its own replace them, except the mappings `overrides`, `study_options`, `task_limits`,
`regime_options` and `algorithm_options`, which are merged key by key (its keys win;
`study_options` and `algorithm_options` one study or algorithm at a time). The `claims` preset
extends `default` this way, so the two train the same model with the same budget."""

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
    seeds: int = 1  # seeds per algorithm (0..N-1) when --seeds is not given
    # {algorithm: {MoE option: value}}: an algorithm's own settings (e.g. moe_plus_plus's expert
    # init), merged into model.moe_options of that algorithm's runs only
    algorithm_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    extends: str | None = None  # the preset whose keys this one starts from (see the module docstring)

    def override_list(self) -> list[str]:
        return [f"{k}={yaml_value(v)}" for k, v in self.overrides.items()]

    def algorithm_override_list(self, algorithm: str) -> list[str]:
        """The `algorithm_options` of `algorithm` as dotted overrides of model.moe_options."""
        options = self.algorithm_options.get(algorithm) or {}
        return [f"model.moe_options.{k}={yaml_value(v)}" for k, v in options.items()]


def yaml_value(value: Any) -> str:
    """`value` as the text of a `key=value` override (YAML flow style: 0.5, [a, b], {k: v})."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# Keys merged key by key with the extended preset's (the others are replaced whole).
MERGED_KEYS = ("overrides", "study_options", "task_limits", "regime_options", "algorithm_options")


def load_bench_preset(name: str) -> BenchPreset:
    """The bench preset `name` (configs/bench/NAME.yaml, with the preset it `extends`); unknown
    names or keys, a bad `seeds` or a cycle of `extends` are a ValueError."""
    data = _preset_data(name, [])
    seeds = data.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"{BENCH_DIR / (name + '.yaml')}: seeds must be a whole number >= 1 (seeds "
                         f"per algorithm), not {seeds!r}.")
    options = data.get("algorithm_options") or {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError(f"{BENCH_DIR / (name + '.yaml')}: algorithm_options maps an algorithm to its "
                         f"MoE options ({{moe_plus_plus: {{expert_init: dense_match}}}}), not {options!r}.")
    return BenchPreset(name=name, **data)


def resolve_seeds(preset: BenchPreset, seeds: int | None) -> int:
    """The seeds per algorithm of a study: `seeds` (--seeds) when given, else the preset's."""
    return preset.seeds if seeds is None else seeds


def _preset_data(name: str, chain: list[str]) -> dict[str, Any]:
    """The keys of preset `name` with those of the presets it extends merged under them."""
    path = BENCH_DIR / f"{name}.yaml"
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ValueError(f"unknown bench preset {name!r}{where}.{did_you_mean(name, BENCH_PRESETS)} "
                         f"Valid: {', '.join(BENCH_PRESETS)}.")
    if name in chain:
        raise ValueError(f"bench presets extend each other in a cycle: {' -> '.join([*chain, name])}; "
                         "remove one `extends`.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a bench preset is a mapping of keys, not a {type(data).__name__}.")
    valid = set(BenchPreset.__dataclass_fields__) - {"name"}
    unknown = set(data) - valid
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(valid)}.")
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ValueError(f"{path}: extends names one bench preset ({', '.join(BENCH_PRESETS)}), not "
                         f"{parent!r}.")
    merged = _preset_data(parent, [*chain, name])
    merged.pop("extends", None)
    for key, value in data.items():
        base = merged.get(key)
        if key in MERGED_KEYS and isinstance(base, dict) and isinstance(value, dict):
            if key in ("study_options", "algorithm_options"):  # one study/algorithm at a time
                value = {k: {**(base.get(k) or {}), **v} if isinstance(v, dict) else v
                         for k, v in value.items()}
            merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged
