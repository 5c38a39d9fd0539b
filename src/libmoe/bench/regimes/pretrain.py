"""The `pretrain` regime (the default; the paper's Table 2): every algorithm trains the same
language model from a random init. Its runs are language-model runs (`libmoe.bench.lm`), its
tables the Table 2 layout and cost table (`libmoe.bench.tables`), its report `libmoe.bench.report`.
The `upcycle` regime differs only in how the runs start (`upcycle.py`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...analysis import FigureInfo, load_analysis, plot_all
from ...files import read_json_object
from ...findings import load_init_std
from ...models import config_from_dict, prepare_run_data
from ..lm import analyse_run, evaluate_trained, train_run
from ..plots import plot_scores
from ..presets import BenchPreset
from ..report import write_bench_report, write_cross_run_analysis
from ..safety import check_spec, stale_runs
from ..spec import RunSpec
from ..studies import interventions_of, summarise_studies
from ..tables import aggregate, results_csv, results_markdown, score_table, write_tables
from .base import PlanContext, Regime

if TYPE_CHECKING:
    from ..study import Study


class PretrainRegime(Regime):
    """Every algorithm trains from a random init (see the module docstring)."""

    name = "pretrain"
    default_preset = "default"
    description = "every algorithm trains from a random init"
    studies = ("init-std", "droptop", "temperature")

    def plan(self, ctx: PlanContext) -> list[list[RunSpec]]:
        if ctx.source_overrides:
            raise ValueError(f"source.* overrides ({', '.join(ctx.source_overrides)}) set the source run "
                             f"of a regime that has one (upcycle); the {self.name} regime has none.")
        specs = []
        for seed in range(ctx.seeds):
            for algorithm in ctx.algorithms:
                cfg = ctx.resolve(f"model.algorithm={algorithm}",
                                  *ctx.algorithm_overrides(algorithm), f"train.seed={seed}")
                name = f"{algorithm}-s{seed}"
                specs.append(ctx.spec(name, algorithm, seed, ctx.out / "runs" / name, cfg.to_dict()))
        return [specs]

    def check_spec(self, spec: RunSpec) -> None:
        check_spec(spec)

    def stale_runs(self, specs: list[RunSpec]) -> list[tuple[RunSpec, list[str]]]:
        return stale_runs(specs)

    def prepare_data(self, specs: list[RunSpec], log: Callable[[str], None]) -> None:
        prepare_run_data(config_from_dict(specs[0].config), log=log)  # every run reads the same data

    def stamp(self, spec: RunSpec) -> dict[str, Any]:
        return {"config_hash": spec.config_hash, "tasks": spec.tasks}

    def train(self, spec: RunSpec, progress: bool | None) -> dict[str, Any]:
        return train_run(spec, progress)

    def evaluate(self, spec: RunSpec, summary: dict[str, Any], row: dict[str, Any]) -> None:
        evaluate_trained(spec, summary, row)

    def summary(self, preset: BenchPreset, support: list[dict[str, Any]]) -> dict[str, Any]:
        """Keys for results.json, given the rows of the stages before the table's."""
        return {}

    results_layout = ("preset", "description", "regime", "algorithms", "seeds", "tasks", "skipped_tasks",
                      "limits", "config", "rows", "runs", "n_runs", "failed", "studies", "machine")

    def results(self, study: Study) -> tuple[dict[str, Any], dict[str, dict], list[FigureInfo]]:
        spec, rows = study.bench_preset, study.rows
        study_results, init_std = summarise_studies(study.out, spec, study.study_rows)
        analysis, figures = ({}, [])
        if study.analysis and (any(r.get("status") == "ok" for r in rows) or init_std):
            analysis, figures = analyse_runs(rows, study.out, interventions_of(study.studies),
                                             spec.val_tokens, study.log, init_std=init_std)
        specs = study.row_specs
        config = dict(specs[0].config)
        config["model"] = dict(config["model"], algorithm="(each)")
        config["train"] = dict(config["train"], seed="(each)")
        if config.get("init"):
            config["init"] = "(each)"
        # what the rows' configs add per algorithm (model.moe_options above is the first row's)
        config["algorithm_options"] = {a: dict(o) for a, o in spec.algorithm_options.items()
                                       if a in study.algorithms}
        own = {"tasks": study.tasks, "skipped_tasks": study.skipped_tasks, "limits": specs[0].limits,
               "config": config, "rows": aggregate(rows, study.tasks),
               "studies": {"run": study.studies, **study_results},
               "launcher": {"launcher": study.launcher, "jobs": study.jobs, "nproc": study.nproc,
                            "nnodes": study.rendezvous.nnodes, "gpus": study.gpus},
               **self.summary(spec, study.support)}
        # a claim links to the scores figure: drawn before the findings are checked
        plot_scores({**study.shared_results(), **own}, study.out / "analysis" / "figures" / "bench_ppl.png")
        return own, analysis, figures

    def write_outputs(self, out: Path, results: dict[str, Any], analysis: dict[str, dict],
                      figures: list[FigureInfo]) -> None:
        write_tables(out, results, results_markdown(results), results_csv(results))
        write_bench_report(out, results, analysis, figures, self.describe(results))

    def rewrite_outputs(self, out: Path, results: dict[str, Any]) -> None:
        """The tables and report again, with the cross-run analysis and figures from the output's
        files (OUT/analysis/metrics.json, the init-std study)."""
        path = out / "analysis" / "metrics.json"
        analysis = read_json_object(path, "rerun `libmoe bench` with the same --out to analyse it "
                                    "again") if path.is_file() else {}
        init_std = load_init_std(out)
        figures = (plot_all(analysis, out / "analysis" / "figures", init_std=init_std)
                   if analysis or init_std else [])
        self.write_outputs(out, results, analysis, figures)

    def score_table(self, results: dict[str, Any]) -> list[list[str]]:
        return score_table(results)

    def describe(self, results: dict[str, Any]) -> str:
        cfg = results["config"]
        m, t = cfg["model"], cfg["train"]
        seq_len = t.get("seq_len") or m["max_seq_len"]
        return (f"Every algorithm trains the same {m['n_layers']}-layer, d={m['d_model']} model "
                f"({m['n_experts']} experts of width {m['expert_dim']}, top-{m['top_k']}; dense FFN "
                f"{m['top_k'] * m['expert_dim']}) from a random init for {t['max_steps']} steps of "
                f"{t['batch_size']} x {seq_len} tokens on {cfg['data']['source']}, same data order, "
                f"{results['seeds']} seed(s).")


def analyse_runs(rows: list[dict[str, Any]], out: Path, interventions: bool | list[str],
                 val_tokens: int | str, log: Callable[[str], None],
                 init_std: dict[str, Any] | None = None) -> tuple[dict[str, dict], list]:
    """Routing analysis of each algorithm's first successful run (RUN/analysis, reused while
    current), then the cross-algorithm figures in OUT/analysis. Returns ({algorithm: metrics},
    figures)."""
    results: dict[str, dict] = {}
    for row in rows:
        if row.get("status") != "ok" or row["algorithm"] in results:
            continue
        cached = load_analysis(row["run"])  # normally written by the run itself (lm.analyse_in_place);
        # else e.g. a run finished by an earlier bench without analysis
        if cached is not None:
            results[row["algorithm"]] = cached
            continue
        log(f"bench: analysing {row['name']}")
        try:
            results[row["algorithm"]] = analyse_run(row["run"], interventions, val_tokens)
        except Exception as err:  # noqa: BLE001  the tables still come out
            log(f"bench: analysis of {row['name']} failed: {type(err).__name__}: {err}")
    return results, write_cross_run_analysis(out, results, init_std)
