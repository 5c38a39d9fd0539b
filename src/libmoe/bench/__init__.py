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
- `compare_outputs(results, other_dir)` / `record_comparison(bench_dir, other_dir)`: where two
  outputs' environments (data hashes, software, machine, threads) and configs differ, and what
  that means for their numbers (`--compare`; results.json's "environment_comparison").
- `score_table(results)`: any regime's scores as rows of cells; `markdown(table)` renders them.
- `failure_line(results, out)`: one line on the failed runs, None when all succeeded.
- `plan_stages` / `plan_runs`, `run_one`, `run_all`, `RunSpec`: the pieces, for custom drivers.
- `Regime`, `PlanContext`, `REGIMES`, `get_regime`, `Study`: the regimes and their interface.
- `BENCH_PRESETS`, `BenchPreset`, `load_bench_preset`, `PAPER_ALGORITHMS`, `available_tasks`,
  `yaml_value`.
- For a regime's outputs (what `regimes/vlm.py` uses; a regime imports from `libmoe.bench` only):
  `write_tables`, `markdown_page`, `md_section`, `findings_md`, `failed_md`, `environment_md`,
  `markdown` (results.json, .md, .csv); `write_report`, `table_html`, `html_table`,
  `findings_section`, `comparison_html`, `environment_html`, `failure_notes`,
  `write_cross_run_analysis` (report.html, OUT/analysis); `cell`, `num`,
  `param_count` (table cells); `median_forward_ms` (latency).

The names regimes use are imported first: the regimes, imported next, take them from here.
"""

# isort: split
from .compare import compare_outputs, record_comparison
from .lm import median_forward_ms
from .presets import BENCH_PRESETS, PAPER_ALGORITHMS, BenchPreset, load_bench_preset, yaml_value
from .report import (
    comparison_html,
    environment_html,
    failure_notes,
    findings_section,
    html_table,
    table_html,
    write_cross_run_analysis,
    write_report,
)
from .spec import RunSpec
from .tables import (
    cell,
    environment_md,
    failed_md,
    findings_md,
    markdown,
    markdown_page,
    md_section,
    num,
    param_count,
    write_tables,
)

# isort: split
from .launchers import run_all
from .placement import Rendezvous, visible_gpus
from .regimes import REGIMES, PlanContext, Regime, get_regime
from .runner import available_tasks, plan_runs, plan_stages, run_one
from .safety import failure_line
from .study import Study, run_bench, run_vlm_bench, score_table
from .verdicts import write_findings

__all__ = ["BENCH_PRESETS", "PAPER_ALGORITHMS", "REGIMES", "BenchPreset", "PlanContext", "Regime",
           "Rendezvous", "RunSpec", "Study", "available_tasks", "cell", "compare_outputs", "comparison_html",
           "environment_html", "environment_md", "failed_md",
           "failure_line", "failure_notes", "findings_md", "findings_section", "get_regime", "html_table",
           "load_bench_preset", "markdown", "markdown_page", "md_section", "median_forward_ms", "num",
           "param_count", "plan_runs", "plan_stages", "record_comparison", "run_all", "run_bench", "run_one",
           "run_vlm_bench",
           "score_table", "table_html", "visible_gpus", "write_cross_run_analysis", "write_findings",
           "write_report", "write_tables", "yaml_value"]
