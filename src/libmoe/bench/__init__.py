"""The study runner: algorithms x seeds under one config, evaluation, routing analysis, tables and
a report (`libmoe bench`). See `runner` for the pipeline and docs/bench.md for the outputs."""

from .launchers import run_all
from .presets import BENCH_PRESETS, PAPER_ALGORITHMS, BenchPreset, load_bench_preset
from .runner import RunSpec, available_tasks, plan_runs, run_bench, run_one

__all__ = ["BENCH_PRESETS", "PAPER_ALGORITHMS", "BenchPreset", "RunSpec", "available_tasks",
           "load_bench_preset", "plan_runs", "run_all", "run_bench", "run_one"]
