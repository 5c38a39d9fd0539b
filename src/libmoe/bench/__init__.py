"""The study runner: algorithms x seeds under one config, evaluation, routing analysis, tables and
a report (`libmoe bench`), in a regime (pretraining from scratch, or upcycling one dense model).
See `runner` for the pipeline, `regimes` for the regimes and docs/bench.md for the outputs."""

from .launchers import run_all
from .presets import BENCH_PRESETS, PAPER_ALGORITHMS, BenchPreset, load_bench_preset
from .regimes import REGIMES, Regime, get_regime
from .runner import RunSpec, available_tasks, plan_runs, plan_stages, run_bench, run_one

__all__ = ["BENCH_PRESETS", "PAPER_ALGORITHMS", "REGIMES", "BenchPreset", "Regime", "RunSpec",
           "available_tasks", "get_regime", "load_bench_preset", "plan_runs", "plan_stages", "run_all",
           "run_bench", "run_one"]
