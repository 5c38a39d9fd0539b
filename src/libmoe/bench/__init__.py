"""The study runner: algorithms x seeds under one config, evaluation, routing analysis, tables and
a report (`libmoe bench`), in a regime (pretraining from scratch, upcycling one dense model, or a
vision-language model's VIT). See docs/bench.md for the outputs.

    from libmoe.bench import run_bench
    results = run_bench("bench/micro", preset="micro", data_dir="../shared/data/eval")

The modules, by job: `study` (run_bench: plan, prepare --out, run the stages, finish), `runner`
(plan the stages, run one run), `launchers` (in this process, worker processes, Slurm), `regimes`
(how runs start and what the tables show: one module per regime), `lm` (a language-model run:
train, evaluate, time, analyse), `tables` / `report` / `plots` / `compare` (the outputs), `outputs`
and `safety` (what keeps an output safe), `studies` (the extra studies), `verdicts` (the paper's
findings written into an output), `presets` (bench presets).

Public API:

- `run_bench(out, preset=..., regime=..., ...)`: the whole study; `run_vlm_bench` the same in the
  vlm regime with a BenchPreset.
- `write_findings(bench_dir)`: check the paper's claims on an output and rewrite its tables and
  report with them (`libmoe findings`).
- `score_table(results)`: any regime's scores as rows of cells; `markdown(table)` renders them.
- `failure_line(results, out)`: one line on the failed runs, None when all succeeded.
- `plan_stages` / `plan_runs`, `run_one`, `run_all`, `RunSpec`: the pieces, for custom drivers.
- `Regime`, `PlanContext`, `REGIMES`, `get_regime`: the regimes and their interface.
- `BENCH_PRESETS`, `BenchPreset`, `load_bench_preset`, `PAPER_ALGORITHMS`, `available_tasks`.
"""

from .launchers import run_all
from .presets import BENCH_PRESETS, PAPER_ALGORITHMS, BenchPreset, load_bench_preset
from .regimes import REGIMES, PlanContext, Regime, get_regime
from .runner import available_tasks, plan_runs, plan_stages, run_one
from .safety import failure_line
from .spec import RunSpec
from .study import Study, run_bench, run_vlm_bench, score_table
from .tables import markdown
from .verdicts import write_findings

__all__ = ["BENCH_PRESETS", "PAPER_ALGORITHMS", "REGIMES", "BenchPreset", "PlanContext", "Regime", "RunSpec",
           "Study", "available_tasks", "failure_line", "get_regime", "load_bench_preset", "markdown",
           "plan_runs", "plan_stages", "run_all", "run_bench", "run_one", "run_vlm_bench", "score_table",
           "write_findings"]
