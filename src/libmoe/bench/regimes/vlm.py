"""The `vlm` regime: the paper's vision-language comparison (Table 1) through the bench's runner.

PT and PFT run once, as the study's first two stages (``OUT/source/pt``, ``OUT/source/pft``); then
every algorithm upcycles the same PFT checkpoint and trains VIT with the same data, data order and
budget (``OUT/runs/<algorithm>-s<seed>``); the dense row is the PFT model trained on for the same VIT
steps. Each run is evaluated on the held-out synthetic MME split (acc per subtask, acc+) and the
open questions, timed (one forward at batch 1), and its routing analysed (``RUN/analysis``: change
rate over the VIT checkpoints, per-subtask entropies, margins, DropTop/temperature).

A run's `RunSpec.config` is its stage job (stage, init, steps, overrides, evaluation), not a
language-model RunConfig: a later stage's config can only be resolved once the stage it starts
from exists, so `stale_runs` compares each stage whose predecessor is there, in order, and a stage
after a changed one is stale too. Everything else (launchers, skipping finished runs, signals,
--overwrite, findings, the output files and their manifest) is the bench's.

Outputs, as the other regimes: ``results.json`` (rows, runs, config, machine, elapsed_s),
``results.md`` / ``results.csv`` (Table 1 layout: one column per subtask, AVG, AVG rank; a cost
table), ``report.html`` with the figures, and ``analysis/`` (the cross-run figures, the regime
comparison when ``--compare`` names a bench of another regime).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...analysis import FIGURES, FigureInfo, figure_html, load_analysis, summary_rows, summary_table_html
from ...vlm import (
    CONFIG_FILE,
    DEFAULT_CHECKPOINTS,
    active_parameters,
    analyze_vlm_run,
    evaluate_run,
    latency_inputs,
    load_vlm,
    load_vlm_preset,
    plot_subtask_routing,
    read_stage_config,
    stage_config,
    stage_config_change,
    train_stage,
)
from .. import (
    PAPER_ALGORITHMS,
    BenchPreset,
    RunSpec,
    cell,
    comparison_html,
    environment_html,
    environment_md,
    failed_md,
    failure_notes,
    findings_md,
    findings_section,
    markdown,
    markdown_page,
    md_section,
    median_forward_ms,
    num,
    param_count,
    table_html,
    write_cross_run_analysis,
    write_report,
    write_tables,
    yaml_value,
)
from .base import PlanContext, Regime

if TYPE_CHECKING:
    from .. import Study

SUBTASK_FIGURE = FigureInfo(
    "vlm_subtask_routing.png", "Routing by subtask (paper Figs. 6, 7, 8)",
    "Left: expert allocation entropy of each subtask's image patches (mean over MoE layers; lower "
    "means more subtask-specific experts; the paper finds XMoE and TC-MoE specialise most). Middle: "
    "routing weight entropy per task group (TC-MoE lowest in the paper). Right: router margin per "
    "MoE layer, vision layers in depth order then the connector.")
DEFAULT_ALGORITHMS = list(PAPER_ALGORITHMS)
STAGE_NAMES = {"pt": "source/pt", "pft": "source/pft"}  # the source stages' run names


class VLMRegime(Regime):
    """PT and PFT once, then VIT for every algorithm from the same dense PFT checkpoint."""

    name = "vlm"
    default_preset = "vlm"
    description = "a VLM: PT and PFT once, VIT (sparse upcycling) of every algorithm from one checkpoint"
    defaults = {"vlm_preset": "cpu-tiny", "pt_steps": None, "pft_steps": None, "vit_steps": None,
                "subtasks": None, "overrides": [], "stage_overrides": {},
                "eval_tasks": ["synth_mme", "synth_open"]}

    def check_request(self, preset: BenchPreset, launcher: str, data: str | None, tasks: list[str] | None,
                      data_dir: str | Path | None) -> None:
        if preset.regime != self.name:
            raise ValueError(f"--regime {self.name} needs a {self.name} bench preset (e.g. --preset "
                             f"{self.default_preset}); {preset.name} is a {preset.regime} preset.")
        if launcher != "local" or data is not None or tasks or data_dir is not None:
            raise ValueError(f"the {self.name} regime evaluates its own held-out split; --launcher, "
                             "--data, --tasks and --data-dir are for the language-model regimes.")

    def plan(self, ctx: PlanContext) -> list[list[RunSpec]]:
        if ctx.source_overrides:
            raise ValueError(f"source.* overrides ({', '.join(ctx.source_overrides)}) set the source run "
                             f"of the upcycle regime; the {self.name} regime's stages take "
                             "regime_options.stage_overrides.")
        opts = self.options(ctx.preset)
        common = list(opts["overrides"] or [])
        if opts["subtasks"]:
            common.append(f"data.subtasks=[{', '.join(opts['subtasks'])}]")
        common += ctx.common
        staged = {k: list(v or []) for k, v in (opts["stage_overrides"] or {}).items()}
        pt_dir, pft_dir = ctx.out / STAGE_NAMES["pt"], ctx.out / STAGE_NAMES["pft"]
        # PT and PFT run alone but on one thread (unless --threads says otherwise): cpu-tiny's matrices
        # are too small for a second thread to pay for its synchronisation, and on a shared machine it
        # costs a lot (measured with other jobs on the 2 cores: 0.029 s per PFT step on 1 thread,
        # 0.18 s on 2).
        source_threads = ctx.run_fields.get("threads") or 1
        pt = ctx.spec(STAGE_NAMES["pt"], "dense", 0, pt_dir, role="source", analysis=False, max_steps=opts[
            "pt_steps"], threads=source_threads,
            config={"stage": "pt", "preset": opts["vlm_preset"], "steps": opts["pt_steps"],
                    "overrides": common + staged.get("pt", [])})
        pft = ctx.spec(STAGE_NAMES["pft"], "dense", 0, pft_dir, role="source", analysis=False,
                       needs=[pt.name], max_steps=opts["pft_steps"], threads=source_threads,
                       config={"stage": "pft", "init": str(pt_dir), "steps": opts["pft_steps"],
                               "overrides": common + staged.get("pft", [])})
        threads = max(1, (os.cpu_count() or 1) // ctx.jobs)
        rows = []
        for seed in range(ctx.seeds):
            for algorithm in ctx.algorithms:
                name = f"{algorithm}-s{seed}"
                dense = algorithm == "dense"
                run = str(ctx.out / "runs" / name)
                job = {"name": name, "algorithm": algorithm, "seed": seed, "run": run,
                       "stage": "pft" if dense else "vit", "vit_algorithm": None if dense else algorithm,
                       "init": str(pft_dir), "steps": opts["vit_steps"],
                       "overrides": [*common, f"train.seed={seed}",
                                     *(() if dense else (f"moe.seed={42 + seed}",)),
                                     # the dense row continues PFT with VIT's hyperparameters and checkpoints
                                     *(vit_hparams(opts["vlm_preset"]) if dense else ()),
                                     *staged.get("vit", [])],
                       "eval_tasks": opts["eval_tasks"], "analysis": ctx.analysis,
                       "interventions": ctx.interventions}
                rows.append(ctx.spec(name, algorithm, seed, job["run"], job, threads=threads,
                                     needs=[pft.name], max_steps=opts["vit_steps"]))
        return [[pt], [pft], rows]

    def check_spec(self, spec: RunSpec) -> None:
        if "init" not in spec.config:  # the first stage: resolving it checks every override
            stage_config_of(spec)

    def stale_runs(self, specs: list[RunSpec]) -> list[tuple[RunSpec, list[str]]]:
        stale: list[tuple[RunSpec, list[str]]] = []
        for spec in specs:
            run = Path(spec.run_dir)
            if not (run / CONFIG_FILE).is_file():
                continue
            if stale:  # a run that started from a changed stage is stale too
                stale.append((spec, ["it starts from a changed earlier stage"]))
                continue
            init = spec.config.get("init")
            if init is not None and not (Path(init) / CONFIG_FILE).is_file():
                continue  # the stage it starts from is not there: its config cannot be resolved
            changed = stage_config_change(run, stage_config_of(spec))
            if changed:
                stale.append((spec, changed))
        return stale

    def stamp(self, spec: RunSpec) -> dict[str, Any]:
        return {"job_hash": spec.config_hash}

    def train(self, spec: RunSpec, progress: bool | None) -> dict[str, Any]:
        c, run = spec.config, Path(spec.run_dir)
        preset = {"preset": c["preset"]} if "preset" in c else {}
        return train_stage(c["stage"], run, **preset, init=c.get("init"), algorithm=c.get("vit_algorithm"),
                           max_steps=c["steps"], overrides=c["overrides"], log=file_log(run))

    def evaluate(self, spec: RunSpec, summary: dict[str, Any], row: dict[str, Any]) -> None:
        """A source stage's row keeps its summary; a VIT run's is evaluated, timed and analysed."""
        if spec.role == "source":
            row.update(status="ok", stage=summary)
            return
        run, c = Path(spec.run_dir), spec.config
        log = file_log(run)
        row.update(status="ok", train_time_s=summary["train_time_s"])
        row["results"] = evaluate_run(run, c["eval_tasks"], log=log)["results"]
        model, _, _ = load_vlm(run)
        row["params_total"], row["params_active"] = active_parameters(model)
        inputs = latency_inputs(model)  # one image and a 16-token question, batch 1
        row["latency_ms"] = median_forward_ms(lambda: model(*inputs), inputs[0].device)
        if c.get("analysis", True) and model.moe_layers():
            metrics = analyze_vlm_run(run, interventions=c.get("interventions", True), figures=False, log=log)
            rates = [e["mean"] for e in metrics.get("expert_change_rate") or [] if e.get("mean") is not None]
            row["change_rate"] = statistics.fmean(rates) if rates else None

    results_layout = ("regime", "preset", "description", "vlm_preset", "algorithms", "seeds", "stages",
                      "runs", "n_runs", "rows", "failed", "config", "machine", "jobs", "studies")

    def results(self, study: Study) -> tuple[dict[str, Any], dict[str, dict], list[FigureInfo]]:
        stages = {r["name"]: r.get("stage") or {} for r in study.support}
        own = {"vlm_preset": self.options(study.bench_preset)["vlm_preset"],
               "stages": {s: stages.get(name, {}) for s, name in STAGE_NAMES.items()},
               "rows": aggregate_rows(study.rows),
               "config": read_stage_config(study.out / STAGE_NAMES["pft"]),  # what the VIT runs start from
               "jobs": study.jobs, "studies": {"run": study.studies}}
        if study.analysis:
            write_cross_run_figures(study.out, study.rows)
        return own, {}, []

    def write_outputs(self, out: Path, results: dict[str, Any], analysis: dict[str, dict],
                      figures: list[FigureInfo]) -> None:
        write_tables(out, results, results_markdown(results), score_table(results))
        write_vlm_report(out, results)

    def score_table(self, results: dict[str, Any]) -> list[list[str]]:
        return score_table(results)


# ----------------------------------------------------------------------------- one run


def stage_config_of(spec: RunSpec) -> dict[str, Any]:
    """The resolved VLM config (config.yaml) of a run's stage job."""
    c = spec.config
    preset = {"preset": c["preset"]} if "preset" in c else {}
    return stage_config(c["stage"], **preset, init=c.get("init"), algorithm=c.get("vit_algorithm"),
                        max_steps=c["steps"], overrides=c["overrides"])


def vit_hparams(vlm_preset: str) -> list[str]:
    """Overrides that give the dense row (PFT trained on) VIT's hyperparameters and checkpoints."""
    vit = (load_vlm_preset(vlm_preset).get("stages") or {}).get("vit") or {}
    out = [f"train.{k}={yaml_value(v)}" for k, v in vit.items() if k != "max_steps"]
    return out + [f"train.checkpoint_at={yaml_value(DEFAULT_CHECKPOINTS['vit'])}"]


def file_log(run: Path) -> Callable[[str], None]:
    """A log that appends to RUN/bench.log."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / "bench.log"

    def log(msg: str) -> None:
        with path.open("a") as f:
            f.write(msg + "\n")
    return log


# ----------------------------------------------------------------------------- the study


def aggregate_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per algorithm (mean over seeds; `_std` with several): per-subtask MME acc (%), MME
    acc and acc+, open acc, AVG over subtasks, AVG rank (filled across rows), costs."""
    by_alg: dict[str, list[dict]] = {}
    for r in runs:
        if r["status"] == "ok":
            by_alg.setdefault(r["algorithm"], []).append(r)
    rows = []
    for algorithm, rs in by_alg.items():
        row: dict[str, Any] = {"algorithm": algorithm, "seeds": len(rs)}
        values: dict[str, list[float]] = {}
        for r in rs:
            mme = r["results"].get("synth_mme") or {}
            for cat, m in (mme.get("by_category") or {}).items():
                values.setdefault(cat, []).append(100 * m["acc"])
            for key, v in (("mme_acc", mme.get("acc")), ("mme_acc_plus", mme.get("acc_plus")),
                           ("open_acc", (r["results"].get("synth_open") or {}).get("acc"))):
                if v is not None:
                    values.setdefault(key, []).append(100 * v)
            for key in ("train_time_s", "latency_ms", "params_total", "params_active", "change_rate"):
                if r.get(key) is not None:
                    values.setdefault(key, []).append(float(r[key]))
        for key, vs in values.items():
            row[key] = statistics.fmean(vs)
            if len(vs) > 1:
                row[f"{key}_std"] = statistics.stdev(vs)
        row["subtasks"] = sorted(k for k in values if k not in (
            "mme_acc", "mme_acc_plus", "open_acc", "train_time_s", "latency_ms", "params_total",
            "params_active", "change_rate"))
        row["avg"] = statistics.fmean([row[s] for s in row["subtasks"]]) if row["subtasks"] else None
        rows.append(row)
    # Not libmoe.eval.table.comparison_rows (the language-model bench's ranks): that ranks each
    # seed's scores and averages the ranks, and gives no AVG rank to a row missing a task; here the
    # seed means are ranked, and a row is ranked on the subtasks it has (tests/vlm/test_vlm_bench.py
    # pins this). With one seed and every subtask both give the same ranks (same tie rule).
    subtasks = sorted({s for r in rows for s in r["subtasks"]})
    for s in subtasks:  # rank 1 = best; ties share the mean rank
        scored = sorted((r[s], i) for i, r in enumerate(rows) if s in r)
        for value in {v for v, _ in scored}:
            idx = [i for v, i in scored if v == value]
            better = sum(1 for v, _ in scored if v > value)
            for i in idx:
                rows[i].setdefault("_ranks", []).append(better + (len(idx) + 1) / 2)
    for r in rows:
        ranks = r.pop("_ranks", [])
        r["avg_rank"] = statistics.fmean(ranks) if ranks else None
    return rows


def score_table(results: dict[str, Any]) -> list[list[str]]:
    """Table 1's layout: one column per subtask, MME acc and acc+, Open, AVG and AVG rank."""
    rows = results["rows"]
    subtasks = sorted({s for r in rows for s in r["subtasks"]})
    keys = [*subtasks, "mme_acc", "mme_acc_plus", "open_acc", "avg"]
    table = [["Algorithm", *subtasks, "MME acc", "MME acc+", "Open", "AVG↑", "AVG Rank↓"]]
    for r in rows:  # mean ± std where there are several seeds
        table.append([r["algorithm"], *[cell(r, key) for key in keys], num(r.get("avg_rank"))])
    return table


def cost_table(results: dict[str, Any]) -> list[list[str]]:
    table = [["Algorithm", "Params (total)", "Params (active)", "VIT train time (s)", "Latency (ms)",
              "Change rate"]]
    for r in results["rows"]:
        table.append([r["algorithm"], param_count(r.get("params_total")), param_count(r.get("params_active")),
                      num(r.get("train_time_s"), 1), num(r.get("latency_ms"), 2),
                      num(r.get("change_rate"), 3)])
    return table


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: the setup, the scores in Table 1 layout, the cost, the findings and failures."""
    st = results["stages"]
    setup = (f"{results['description']}. VLM preset {results['vlm_preset']}; "
             f"PT {st['pt'].get('steps')} steps, PFT {st['pft'].get('steps')} steps once; "
             "VIT for every algorithm from the same PFT checkpoint "
             f"(dense: PFT continued for the same steps). {results['elapsed_s'] / 60:.1f} minutes.")
    return markdown_page(f"libmoe bench (vlm): {results['preset']}", [setup], [
        md_section("Scores (paper Table 1 layout: held-out synthetic MME accuracy per subtask, %)",
                   markdown(score_table(results))),
        md_section("Cost", markdown(cost_table(results))), findings_md(results), failed_md(results),
        environment_md(results)])


def write_cross_run_figures(out: Path, rows: list[dict[str, Any]]) -> list[FigureInfo]:
    """Every analysis figure over all runs (OUT/analysis/figures, metrics.json) plus the VLM subtask
    figure."""
    runs = {}
    for r in rows:
        if r["status"] == "ok":
            m = load_analysis(r["run"])
            if m:
                runs[r["algorithm"] if r["seed"] == 0 else r["name"]] = m
    fig_dir = out / "analysis" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = write_cross_run_analysis(out, runs)
    if plot_subtask_routing(runs, fig_dir / SUBTASK_FIGURE.name):
        figures.insert(0, SUBTASK_FIGURE)
    return figures


def _seconds(stage: dict[str, Any]) -> str:
    value = stage.get("train_time_s")
    return "?" if value is None else f"{value:.0f}"


def write_vlm_report(out: Path, results: dict[str, Any]) -> Path:
    """OUT/report.html: the setup, both tables, the routing summary, findings and every figure."""
    fig_dir = out / "analysis" / "figures"
    st = results["stages"]
    where = results["machine"].get("gpu") or f"{results['machine'].get('cpus')} CPU cores"
    setup = (f"Preset {results['preset']}: {results['description']}. VLM preset {results['vlm_preset']}: PT "
             f"{st['pt'].get('steps')} steps ({_seconds(st['pt'])} s), PFT {st['pft'].get('steps')} steps "
             f"({_seconds(st['pft'])} s) once; then VIT for every algorithm from the same PFT "
             f"checkpoint with the same data and budget (dense: PFT continued). "
             f"{results['elapsed_s'] / 60:.1f} minutes on {where}.")
    sections = [
        *table_html("Scores (paper Table 1 layout)", score_table(results),
                    "Held-out synthetic MME accuracy per subtask in % (chance 50); MME acc+ (both questions "
                    "of an image right; chance 25); Open: exact match on the open questions; AVG = mean "
                    "over subtasks; AVG Rank = mean rank over subtasks (1 = best)."),
        *table_html("Cost", cost_table(results))]
    analysed = {}
    for r in results["runs"]:
        if r["status"] == "ok":
            m = load_analysis(r["run"])
            if m and m.get("eae"):
                analysed[r["name"]] = m
    if analysed:
        sections += ["<h2>Routing summary</h2>", summary_table_html(summary_rows(analysed))]
    infos = {info.name: info for _, info in FIGURES}
    infos[SUBTASK_FIGURE.name] = SUBTASK_FIGURE
    shown = [name for name in (SUBTASK_FIGURE.name, "change_rate.png", "droptop.png", "temperature.png",
                               "margin_by_depth.png", "saturation.png", "eae_by_label.png", "load.png",
                               "similarity.png") if (fig_dir / name).is_file()]
    sections += findings_section(out, results, set(shown))
    sections += comparison_html(out, results.get("regime_comparison"))
    for name in shown:
        info = infos.get(name) or FigureInfo(name, name.removesuffix(".png").replace("_", " "), "")
        sections.append(figure_html(info, fig_dir))
    sections += environment_html(results)
    return write_report(out, f"libmoe bench (vlm): {results['preset']}", setup, sections,
                        failure_notes(results))
