"""`libmoe bench --regime vlm`: the paper's vision-language comparison (Table 1) as one command.

PT and PFT run once (``OUT/source/pt``, ``OUT/source/pft``); then every algorithm upcycles the same
PFT checkpoint and trains VIT with the same data, data order and budget
(``OUT/runs/<algorithm>-s<seed>``); the dense row is the PFT model trained on for the same VIT
steps. Each run is evaluated on the held-out synthetic MME split (acc per subtask, acc+) and the
open questions, timed (one forward at batch 1), and its routing analysed (``RUN/analysis``:
change rate over the VIT checkpoints, per-subtask entropies, margins, DropTop/temperature).

Outputs, as the other regimes: ``results.json`` (rows, runs, config, machine, elapsed_s),
``results.md`` / ``results.csv`` (Table 1 layout: one column per subtask, AVG, AVG rank; a cost
table), ``report.html`` with the figures, and ``analysis/`` (the cross-run figures, the regime
comparison when ``--compare`` names a bench of another regime).

The guarantees of the language-model bench hold here too (docs/bench.md): the stages' configs and
the algorithms are checked before any work, a stage or run in ``--out`` made with another config
is refused (``--overwrite`` replaces it), a finished VIT run is skipped with its files untouched,
every file is written atomically, and SIGTERM/SIGINT stop the study without writing tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_json

RESULTS_FILE = "results.json"


def _figure_info():
    from ..analysis.plots import FigureInfo

    return FigureInfo(
        "vlm_subtask_routing.png", "Routing by subtask (paper Figs. 6, 7, 8)",
        "Left: expert allocation entropy of each subtask's image patches (mean over MoE layers; lower "
        "means more subtask-specific experts; the paper finds XMoE and TC-MoE specialise most). Middle: "
        "routing weight entropy per task group (TC-MoE lowest in the paper). Right: router margin per "
        "MoE layer, vision layers in depth order then the connector.")


SUBTASK_FIGURE = _figure_info()
DEFAULT_ALGORITHMS = ["dense", "smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus",
                      "tc_moe"]
DEFAULTS = {"vlm_preset": "cpu-tiny", "pt_steps": None, "pft_steps": None, "vit_steps": None,
            "subtasks": None, "overrides": [], "stage_overrides": {},
            "eval_tasks": ["synth_mme", "synth_open"]}


def _options(preset) -> dict[str, Any]:
    given = dict(getattr(preset, "regime_options", None) or {})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"bench preset {preset.name}: regime_options {sorted(unknown)} are not options of "
                         f"the vlm regime; valid: {', '.join(DEFAULTS)}.")
    return {**DEFAULTS, **given}


def _stage_overrides(opts: dict[str, Any], extra: list[str]) -> list[str]:
    out = list(opts["overrides"] or [])
    if opts["subtasks"]:
        out.append(f"data.subtasks=[{', '.join(opts['subtasks'])}]")
    return out + list(extra)


def active_parameters(model) -> tuple[int, int]:
    """(total, active per token) parameters: routed experts count top_k of n_experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.moe_layers():
        moe = m.moe
        ex = moe.experts
        tensors = (ex.w1, ex.w2, ex.w3, getattr(ex, "b1", None), getattr(ex, "b2", None),
                   getattr(ex, "b3", None))
        per_expert = sum(p[0].numel() for p in tensors if p is not None)
        inactive += max(0, moe.n_experts - moe.top_k) * per_expert
    return total, total - inactive


def vlm_latency(model, repeats: int = 10) -> float:
    """Median milliseconds of one forward (one image and a 16-token question) at batch 1."""
    import torch

    from ..bench.runner import median_forward_ms

    device = next(model.parameters()).device
    ids = torch.full((1, model.n_image_tokens + 16), 5, dtype=torch.long)
    ids[0, : model.n_image_tokens] = model.image_token_id
    pixels = torch.randn(1, 3, model.pixel_size, model.pixel_size, generator=torch.Generator().manual_seed(0))
    ids, pixels = ids.to(device), pixels.to(device)
    return median_forward_ms(lambda: model(ids, pixels), device, repeats)


def run_vlm_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume), evaluate, time and analyse one row's run; returns its row."""
    import torch

    from .analysis import analyze_vlm_run
    from .evaluate import evaluate_run
    from .saving import load_vlm
    from .train import train_stage

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    run = Path(job["run"])
    row: dict[str, Any] = {"name": job["name"], "algorithm": job["algorithm"], "seed": job["seed"],
                           "run": str(run), "status": "ok", "job_hash": job_hash(job)}
    log = _file_log(run)
    try:
        summary = train_stage(job["stage"], run, init=job["init"], algorithm=job.get("vit_algorithm"),
                              max_steps=job["steps"], overrides=job["overrides"], log=log)
        row["train_time_s"] = summary["train_time_s"]
        payload = evaluate_run(run, job["eval_tasks"], log=log)
        row["results"] = payload["results"]
        model, _, _ = load_vlm(run)
        row["params_total"], row["params_active"] = active_parameters(model)
        row["latency_ms"] = vlm_latency(model)
        if job.get("analysis", True) and model.moe_layers():
            metrics = analyze_vlm_run(run, interventions=job.get("interventions", True), figures=False,
                                      log=log)
            rates = [e["mean"] for e in metrics.get("expert_change_rate") or [] if e.get("mean") is not None]
            row["change_rate"] = statistics.fmean(rates) if rates else None
    except Exception as err:  # a failed run is a row with its error; the others go on
        row.update(status="failed", error=f"{type(err).__name__}: {err}")
        with (run / "bench.log").open("a") as f:
            f.write(traceback.format_exc())
    write_json(run / "bench_run.json", _plain(row), indent=1)
    return row


def job_hash(job: dict[str, Any]) -> str:
    """What makes a VIT run's result: the job without its thread count."""
    payload = {k: v for k, v in job.items() if k != "threads"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_job(job: dict[str, Any]) -> dict[str, Any] | None:
    """The saved row of a run that finished this very job, else None."""
    from ..bench.safety import saved_row

    row = saved_row(job["run"])
    ok = row is not None and row.get("status") == "ok" and row.get("job_hash") == job_hash(job)
    return row if ok else None


def _plain(value: Any) -> Any:
    from ..bench.outputs import plain_json

    return plain_json(value)


def _file_log(run: Path) -> Callable[[str], None]:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "bench.log"

    def log(msg: str) -> None:
        with path.open("a") as f:
            f.write(msg + "\n")
    return log


def _init_worker() -> None:
    from ..bench.launchers import init_worker as init

    init()


def _run_jobs(jobs: list[dict[str, Any]], n_jobs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: dict[str, dict] = {}
    for job in jobs:  # finished earlier with this very job: kept as they are
        done = finished_job(job)
        if done is not None:
            rows[job["name"]] = dict(done, skipped=True)
            log(f"{job['name']}: skipped (finished earlier)")
    todo = [job for job in jobs if job["name"] not in rows]
    rows.update({r["name"]: r for r in _run_todo(todo, n_jobs, log)})
    return [rows[j["name"]] for j in jobs]


def _run_todo(jobs: list[dict[str, Any]], n_jobs: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: dict[str, dict] = {}
    start = time.perf_counter()
    if n_jobs <= 1:
        for i, job in enumerate(jobs):
            log(f"[{i + 1}/{len(jobs)}] {job['name']} ...")
            rows[job["name"]] = row = run_vlm_job(job)
            log(f"[{i + 1}/{len(jobs)}] {job['name']}: {row['status']} ({time.perf_counter() - start:.0f} s)")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = mp.get_context("spawn")
        with ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(run_vlm_job, job): job for job in jobs}
            try:
                for done, fut in enumerate(as_completed(futures), 1):
                    job = futures[fut]
                    try:
                        row = fut.result()
                    except Exception as err:  # the worker died
                        row = {"name": job["name"], "algorithm": job["algorithm"], "seed": job["seed"],
                               "run": job["run"], "status": "failed",
                               "error": f"{type(err).__name__}: {err}"}
                    rows[job["name"]] = row
                    elapsed = time.perf_counter() - start
                    eta = elapsed / done * (len(jobs) - done)
                    log(f"[{done}/{len(jobs)}] {job['name']}: {row['status']} ({elapsed:.0f} s, "
                        f"ETA {eta:.0f} s)")
            except KeyboardInterrupt:  # SIGTERM/SIGINT: stop the workers (they die with a row-less
                _stop_workers(pool, futures)  # run, which the next call redoes) and stop
                raise
    return [rows[j["name"]] for j in jobs]


def _stop_workers(pool, futures) -> None:
    from ..bench.launchers import signal_workers
    from ..bench.safety import signals_ignored

    with signals_ignored():
        signal_workers(pool, futures)
        for future in futures:
            with contextlib.suppress(BaseException):
                future.exception()


def run_vlm_bench(out: str | Path, preset, algorithms: list[str] | None = None, seeds: int = 1,
                  jobs: int | None = None, compare: str | Path | None = None, overrides: list[str] = (),
                  analysis: bool = True, log: Callable[[str], None] = print,
                  studies: list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the VLM bench of `preset` (a BenchPreset with regime vlm) into `out`. `studies`: the
    intervention studies of each VIT run's analysis (droptop, temperature; default both);
    init-std is a language-model pretraining study and is not run here. `overwrite` replaces the
    stages and runs in `out` made with another config instead of refusing them."""
    from ..bench.outputs import check_out_dir, remove_outputs, remove_run, start_manifest
    from ..bench.studies import interventions_of
    from ..moe.layer import check_algorithm
    from .train import train_stage

    opts = _options(preset)
    out = Path(out)
    algorithms = list(DEFAULT_ALGORITHMS if algorithms is None else algorithms)
    if not algorithms:
        raise ValueError("--algorithms names no algorithm; give comma-separated names (e.g. dense,smoe).")
    if len(set(algorithms)) != len(algorithms):
        raise ValueError(f"--algorithms lists an algorithm twice: {','.join(algorithms)}.")
    for a in algorithms:
        check_algorithm(a)
    if seeds < 1 or (jobs is not None and jobs < 1):
        raise ValueError("--seeds and --jobs must be at least 1.")
    check_out_dir(out)
    vlm_preset = opts["vlm_preset"]
    common = _stage_overrides(opts, list(overrides))
    staged = {k: list(v or []) for k, v in (opts["stage_overrides"] or {}).items()}
    n_jobs = jobs or getattr(preset, "jobs", 1) or 1
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    chosen = ["droptop", "temperature"] if studies is None else list(studies)
    job_list = _plan_jobs(out, opts, algorithms, seeds, vlm_preset, common, staged, threads, analysis,
                          interventions_of(chosen))
    stale = _stale_stages(out, opts, vlm_preset, common, staged, job_list)  # also checks every override
    if stale and not overwrite:
        name, diff = stale[0]
        more = f"; {len(stale) - 1} more differ too" if len(stale) > 1 else ""
        raise ValueError(f"--out {str(out)!r} holds {name} made with another config ({'; '.join(diff[:4])})"
                         f"{more}; give a new --out, or pass --overwrite to replace the old study.")
    out.mkdir(parents=True, exist_ok=True)
    if stale:
        for name, _ in stale:
            remove_run(out / name)
        remove_outputs(out)
        log(f"vlm bench: --overwrite: removed {', '.join(n for n, _ in stale)} (made with another config)")
    start_manifest(out)
    start = time.perf_counter()
    log(f"vlm bench: preset {vlm_preset}, algorithms {', '.join(algorithms)}, {seeds} seed(s)")
    t0 = time.perf_counter()
    pt = train_stage("pt", out / "source" / "pt", preset=vlm_preset, max_steps=opts["pt_steps"],
                     overrides=common + staged.get("pt", []), log=_file_log(out / "source" / "pt"))
    log(f"PT done: {pt['steps']} steps, {pt['train_time_s']:.0f} s training "
        f"({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    pft = train_stage("pft", out / "source" / "pft", init=str(out / "source" / "pt"),
                      max_steps=opts["pft_steps"], overrides=common + staged.get("pft", []),
                      log=_file_log(out / "source" / "pft"))
    log(f"PFT done: {pft['steps']} steps, {pft['train_time_s']:.0f} s training, held-out synth_mme acc "
        f"{pft.get('synth_mme', {}).get('acc', float('nan')):.3f} ({time.perf_counter() - t0:.0f} s)")
    rows = _run_jobs(job_list, n_jobs, log)
    results = {"regime": "vlm", "preset": preset.name, "description": preset.description,
               "vlm_preset": vlm_preset, "algorithms": algorithms, "seeds": seeds,
               "stages": {"pt": pt, "pft": pft}, "runs": rows, "n_runs": len(rows) + 2,
               "rows": aggregate_rows(rows), "failed": [r for r in rows if r["status"] != "ok"],
               "config": _stage_config(out), "machine": _machine(), "jobs": n_jobs,
               "studies": {"run": [s for s in chosen if s != "init-std"]}}
    if analysis:
        from ..bench.compare import regime_comparison

        results["regime_comparison"] = regime_comparison(results, out, compare)
        write_cross_run_figures(out, rows)
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    from ..bench.runner import _findings

    results["findings"] = _findings(out, results, log)
    from ..bench.outputs import write_output_json

    write_output_json(out, RESULTS_FILE, results)
    write_vlm_tables(out, results)
    write_vlm_report(out, results)
    log(f"vlm bench finished in {results['elapsed_s'] / 60:.1f} min -> {out}")
    return results


def _plan_jobs(out: Path, opts: dict[str, Any], algorithms: list[str], seeds: int, vlm_preset: str,
               common: list[str], staged: dict[str, list[str]], threads: int, analysis: bool,
               interventions: list[str]) -> list[dict[str, Any]]:
    """One job per algorithm and seed: VIT from the PFT checkpoint (dense: PFT trained on)."""
    job_list = []
    for seed in range(seeds):
        for algorithm in algorithms:
            name = f"{algorithm}-s{seed}"
            dense = algorithm == "dense"
            job_list.append({
                "name": name, "algorithm": algorithm, "seed": seed, "run": str(out / "runs" / name),
                "stage": "pft" if dense else "vit", "vit_algorithm": None if dense else algorithm,
                "init": str(out / "source" / "pft"), "steps": opts["vit_steps"],
                "overrides": [*common, f"train.seed={seed}", *(() if dense else (f"moe.seed={42 + seed}",)),
                              # the dense row continues PFT with VIT's hyperparameters and checkpoints
                              *(_vit_hparams(vlm_preset) if dense else ()), *staged.get("vit", [])],
                "eval_tasks": opts["eval_tasks"], "threads": threads, "analysis": analysis,
                "interventions": interventions})
    return job_list


def _stale_stages(out: Path, opts: dict[str, Any], vlm_preset: str, common: list[str],
                  staged: dict[str, list[str]], jobs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The stage and run directories in `out` (relative names) holding a run made with another
    config than this study's, each with its differences. Resolving PT's config checks every
    override up front; a stage after a changed one is stale too where it exists."""

    from ..overrides import load_yaml
    from ..train import config_diff
    from .train import CONFIG_FILE, config_hash, stage_config

    def saved(path: Path) -> dict[str, Any] | None:
        try:
            return load_yaml(path / CONFIG_FILE)
        except (OSError, ValueError):  # absent or unreadable: nothing to compare
            return None

    def diff(path: Path, cfg: dict[str, Any]) -> list[str] | None:
        old = saved(path)
        if old is None:
            return None
        return None if config_hash(old) == config_hash(cfg) else (config_diff(old, cfg) or ["config"])

    stale: list[tuple[str, list[str]]] = []
    pt_dir, pft_dir = out / "source" / "pt", out / "source" / "pft"
    pt_cfg = stage_config("pt", vlm_preset, max_steps=opts["pt_steps"],
                          overrides=common + staged.get("pt", []))
    changed = diff(pt_dir, pt_cfg)
    if changed is None and (pft_dir / CONFIG_FILE).is_file() and (pt_dir / CONFIG_FILE).is_file():
        pft_cfg = stage_config("pft", init=str(pt_dir), max_steps=opts["pft_steps"],
                               overrides=common + staged.get("pft", []))
        changed_pft = diff(pft_dir, pft_cfg)
        if changed_pft:
            stale.append(("source/pft", changed_pft))
    elif changed:
        stale.append(("source/pt", changed))
    later = [Path(j["run"]) for j in jobs] + ([] if stale and stale[0][0] == "source/pft" else [pft_dir])
    if stale:  # a run that started from a changed stage is stale too
        for path in later:
            if (path / CONFIG_FILE).is_file():
                stale.append((str(path.relative_to(out)), ["it starts from a changed earlier stage"]))
        return stale
    if (pft_dir / CONFIG_FILE).is_file():
        for job in jobs:
            run = Path(job["run"])
            if not (run / CONFIG_FILE).is_file():
                continue
            cfg = stage_config(job["stage"], init=job["init"], algorithm=job.get("vit_algorithm"),
                               max_steps=job["steps"], overrides=job["overrides"])
            changed_run = diff(run, cfg)
            if changed_run:
                stale.append((str(run.relative_to(out)), changed_run))
    return stale


def _vit_hparams(vlm_preset: str) -> list[str]:
    from ..bench.presets import _yaml_value
    from .presets import load_vlm_preset
    from .train import DEFAULT_CHECKPOINTS

    vit = (load_vlm_preset(vlm_preset).get("stages") or {}).get("vit") or {}
    out = [f"train.{k}={_yaml_value(v)}" for k, v in vit.items() if k != "max_steps"]
    return out + [f"train.checkpoint_at={_yaml_value(DEFAULT_CHECKPOINTS['vit'])}"]


def _stage_config(out: Path) -> dict[str, Any]:
    import yaml

    path = out / "source" / "pft" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _machine() -> dict[str, Any]:
    from ..bench.runner import _machine as machine

    return machine()


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
    from ..bench.tables import _cell, _num

    rows = results["rows"]
    subtasks = sorted({s for r in rows for s in r["subtasks"]})
    keys = [*subtasks, "mme_acc", "mme_acc_plus", "open_acc", "avg"]
    table = [["Algorithm", *subtasks, "MME acc", "MME acc+", "Open", "AVG↑", "AVG Rank↓"]]
    for r in rows:  # mean ± std where there are several seeds
        table.append([r["algorithm"], *[_cell(r, key) for key in keys], _num(r.get("avg_rank"))])
    return table


def cost_table(results: dict[str, Any]) -> list[list[str]]:
    from ..bench.tables import _num, _params

    table = [["Algorithm", "Params (total)", "Params (active)", "VIT train time (s)", "Latency (ms)",
              "Change rate"]]
    for r in results["rows"]:
        table.append([r["algorithm"], _params(r.get("params_total")), _params(r.get("params_active")),
                      _num(r.get("train_time_s"), 1), _num(r.get("latency_ms"), 2),
                      _num(r.get("change_rate"), 3)])
    return table


def _markdown(table: list[list[str]]) -> str:
    from ..bench.tables import markdown

    return markdown(table)


def write_vlm_tables(out: Path, results: dict[str, Any]) -> None:
    import csv
    import io

    st = results["stages"]
    text = [f"# libmoe bench (vlm): {results['preset']}", "",
            f"{results['description']}. VLM preset {results['vlm_preset']}; PT {st['pt']['steps']} steps, "
            f"PFT {st['pft']['steps']} steps once; VIT for every algorithm from the same PFT checkpoint "
            f"(dense: PFT continued for the same steps). {results['elapsed_s'] / 60:.1f} minutes.", "",
            "## Scores (paper Table 1 layout: held-out synthetic MME accuracy per subtask, %)", "",
            _markdown(score_table(results)), "", "## Cost", "", _markdown(cost_table(results)), ""]
    if results.get("findings"):
        from ..findings import findings_markdown

        text.append(findings_markdown(results["findings"]))
    for f in results.get("failed") or []:
        text.append(f"- {f['name']} failed: {f.get('error')}")
    from ..bench.outputs import MD_MARK, write_output_text

    write_output_text(out, "results.md", MD_MARK + "\n" + "\n".join(text) + "\n")
    buf = io.StringIO()
    table = score_table(results)
    csv.writer(buf, lineterminator="\n").writerows(table)
    write_output_text(out, "results.csv", buf.getvalue())


def write_cross_run_figures(out: Path, rows: list[dict[str, Any]]) -> list:
    """Every analysis figure over all runs (OUT/analysis/figures) plus the VLM subtask figure."""
    from ..analysis.analyze import load_analysis
    from ..analysis.plots import plot_all
    from .plots import plot_subtask_routing

    runs = {}
    for r in rows:
        if r["status"] == "ok":
            m = load_analysis(r["run"])
            if m:
                runs[r["algorithm"] if r["seed"] == 0 else r["name"]] = m
    fig_dir = out / "analysis" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    write_json(out / "analysis" / "metrics.json", _plain(runs), indent=1)
    figures = plot_all(runs, fig_dir) if runs else []
    if plot_subtask_routing(runs, fig_dir / SUBTASK_FIGURE.name):
        figures.insert(0, SUBTASK_FIGURE)
    return figures


def write_vlm_report(out: Path, results: dict[str, Any]) -> Path:
    import html

    from ..analysis.analyze import load_analysis
    from ..analysis.plots import FigureInfo
    from ..analysis.report import CSS, _figure_html, _table, summary_rows
    from ..bench.report import _comparison_html, _html_table

    fig_dir = out / "analysis" / "figures"
    st = results["stages"]
    where = results["machine"].get("gpu") or f"{results['machine'].get('cpus')} CPU cores"
    setup = (f"Preset {results['preset']}: {results['description']}. VLM preset {results['vlm_preset']}: PT "
             f"{st['pt']['steps']} steps ({st['pt']['train_time_s']:.0f} s), PFT {st['pft']['steps']} steps "
             f"({st['pft']['train_time_s']:.0f} s) once; then VIT for every algorithm from the same PFT "
             f"checkpoint with the same data and budget (dense: PFT continued). "
             f"{results['elapsed_s'] / 60:.1f} minutes on {where}.")
    from ..bench.outputs import HTML_MARK

    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{HTML_MARK}",
             f"<title>libmoe bench (vlm): {html.escape(results['preset'])}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>libmoe bench (vlm): {html.escape(results['preset'])}</h1>",
             f"<p class=\"intro\">{html.escape(setup)}</p>",
             "<h2>Scores (paper Table 1 layout)</h2>", _html_table(score_table(results)),
             "<p class=\"table-note\">Held-out synthetic MME accuracy per subtask in % (chance 50); MME acc+ "
             "(both questions of an image right; chance 25); Open: exact match on the open questions; AVG = "
             "mean over subtasks; AVG Rank = mean rank over subtasks (1 = best).</p>",
             "<h2>Cost</h2>", _html_table(cost_table(results))]
    analysed = {}
    for r in results["runs"]:
        if r["status"] == "ok":
            m = load_analysis(r["run"])
            if m and m.get("eae"):
                analysed[r["name"]] = m
    if analysed:
        parts += ["<h2>Routing summary</h2>", _table(summary_rows(analysed))]
    from ..analysis.plots import FIGURES

    infos = {info.name: info for _, info in FIGURES}
    infos["vlm_subtask_routing.png"] = SUBTASK_FIGURE
    shown = [name for name in ("vlm_subtask_routing.png", "change_rate.png", "droptop.png", "temperature.png",
                               "margin_by_depth.png", "saturation.png", "eae_by_label.png", "load.png",
                               "similarity.png") if (fig_dir / name).is_file()]
    if results.get("findings"):
        from ..findings import findings_html

        comparison = (results.get("regime_comparison") or {}).get("figure")
        parts.append(findings_html(results["findings"], set(shown) | ({"regime_comparison.png"}
                                                                     if comparison else set())))
    parts += _comparison_html(out, results.get("regime_comparison"))
    for name in shown:
        info = infos.get(name) or FigureInfo(name, name.removesuffix(".png").replace("_", " "), "")
        parts.append(_figure_html(info, fig_dir))
    if results.get("failed"):
        items = "".join(f"<li>{html.escape(f['name'])} failed: {html.escape(str(f.get('error')))}</li>"
                        for f in results["failed"])
        parts.append(f"<h2>Notes</h2><ul class=\"notes\">{items}</ul>")
    parts.append("</body></html>\n")
    from ..bench.outputs import write_output_text

    return write_output_text(out, "report.html", "\n".join(parts))
