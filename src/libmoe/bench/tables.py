"""The bench's tables: one row per algorithm in the layout of the paper's Table 2 (validation
perplexity, one score per task in %, AVG and AVG rank; `libmoe.eval.table.comparison_rows`), and a
cost table in the spirit of its Tables 14/15 (parameters, training time, peak memory, inference
latency; step time and MFU when the runs' metrics.jsonl has them, "—" otherwise). With several
seeds, each number is the mean over seeds with a `<key>_std` beside it (sample standard
deviation); AVG rank is ranked within each seed, then averaged. A failed algorithm keeps its row,
with its error instead of numbers."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from ..environment import comparison_rows as environment_differences
from ..environment import corpus_note, environment_rows
from ..eval.table import LABELS, comparison_rows
from ..findings import findings_markdown, markdown_table
from .compare import comparison_table
from .outputs import MD_MARK, write_output_json, write_output_text

COST = [("params_total", "Params (total)"), ("params_active", "Params (active)"),
        ("train_time_s", "Train time (s)"), ("tokens_per_s", "Train tokens/s"),
        ("step_time_s", "Step time (s)"), ("mfu", "MFU"),
        ("peak_mem_mb", "Peak memory (MB)"), ("latency_ms", "Latency (ms/seq)")]


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def aggregate(runs: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """Rows of results.json from the runs' rows (bench_run.json), in the algorithms' order."""
    order: list[str] = []
    for r in runs:
        if r["algorithm"] not in order:
            order.append(r["algorithm"])
    per_seed: dict[str, list[dict]] = {a: [] for a in order}
    for seed in sorted({r["seed"] for r in runs}):
        seed_runs = [r for r in runs if r["seed"] == seed and r.get("status") == "ok"]
        _, rows = comparison_rows({r["algorithm"]: r["results"] for r in seed_runs}, tasks=tasks)
        for r, scored in zip(seed_runs, rows):
            scored = dict(scored, ppl=r.get("ppl"))
            per_seed[r["algorithm"]].append({**scored, **{k: r.get(k) for k, _ in COST}})
    out = []
    for algorithm in order:
        mine = [r for r in runs if r["algorithm"] == algorithm]
        ok = per_seed[algorithm]
        row: dict[str, Any] = {"algorithm": algorithm, "seeds": len(ok)}
        failed = [r for r in mine if r.get("status") != "ok"]
        if failed:
            row["error"] = failed[0].get("error")
            row["failed_seeds"] = [r["seed"] for r in failed]
        if not ok:
            row["status"] = "failed"
            for key in ["ppl", *tasks, "avg", "avg_rank", *(k for k, _ in COST)]:
                row[key] = None
            out.append(row)
            continue
        row["status"] = "ok"
        for key in ["ppl", *tasks, "avg", "avg_rank", *(k for k, _ in COST)]:
            mean, std = _stats([r.get(key) for r in ok])
            row[key] = mean
            if len(ok) > 1:
                row[f"{key}_std"] = std
        for key in ("params_total", "params_active"):
            row[key] = ok[0][key]
            row.pop(f"{key}_std", None)
        out.append(row)
    return out


def cell(row: dict, key: str, digits: int = 2, suffix: str = "") -> str:
    """`row[key]` with `digits` decimals (and " ± std" when `row` has `key_std`); "—" when missing."""
    value = row.get(key)
    if value is None:
        return "—"
    std = row.get(f"{key}_std")
    text = f"{value:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    return text + suffix


def percent_cell(row: dict, key: str, digits: int = 1) -> str:
    """A fraction `row[key]` as a percentage ("37.5%", " ± std" with seeds); "—" when missing."""
    value = row.get(key)
    if value is None:
        return "—"
    std = row.get(f"{key}_std")
    return f"{100 * value:.{digits}f}%" + ("" if std is None else f" ± {100 * std:.{digits}f}%")


def num(value: float | None, digits: int = 2) -> str:
    """`value` with `digits` decimals; "—" when missing."""
    return "—" if value is None else f"{value:.{digits}f}"


def param_count(n: float | None) -> str:
    """A parameter count in millions ("12.34M") or billions ("1.234B"); "—" when missing."""
    if n is None:
        return "—"
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def score_table(results: dict[str, Any]) -> list[list[str]]:
    """Table 2 as a header row and rows of cells."""
    tasks = results["tasks"]
    head = ["Algorithm", "PPL ↓", *[LABELS.get(t, t) for t in tasks]]
    if tasks:
        head += ["AVG ↑", "AVG Rank ↓"]
    body = []
    for r in results["rows"]:
        name = r["algorithm"] + (" (failed)" if r["status"] == "failed" else "")
        cells = [name, cell(r, "ppl")] + [cell(r, t) for t in tasks]
        if tasks:
            cells += [cell(r, "avg"), cell(r, "avg_rank")]
        body.append(cells)
    return [head, *body]


def cost_table(results: dict[str, Any]) -> list[list[str]]:
    head = ["Algorithm", *[label for _, label in COST]]
    body = []
    for r in results["rows"]:
        body.append([r["algorithm"], param_count(r["params_total"]), param_count(r["params_active"]),
                     cell(r, "train_time_s", 1), cell(r, "tokens_per_s", 0), cell(r, "step_time_s", 3),
                     percent_cell(r, "mfu"), cell(r, "peak_mem_mb", 0), cell(r, "latency_ms", 2)])
    return [head, *body]


def markdown(table: list[list[str]]) -> str:
    """A header row and rows of cells as a Markdown table (first column left, the others right)."""
    return markdown_table(table)


def results_markdown(results: dict[str, Any]) -> str:
    """results.md of a language-model bench (the pretrain and upcycle regimes)."""
    seeds = results["seeds"]
    regime = results.get("regime", "pretrain")
    intro = [f"{results['description']}. Regime {regime}. {len(results['algorithms'])} algorithms, "
             f"{seeds} seed(s)" + (" (mean ± std over seeds)" if seeds > 1 else "")
             + f", {results['elapsed_s'] / 60:.1f} min."]
    note = corpus_note(results.get("environment"))
    if note:
        intro += ["", note]
    source = results.get("source") or {}
    if source.get("status") == "ok":
        intro += ["", f"Every run started from the dense source {source.get('run')} "
                  f"({source.get('step')} steps, held-out perplexity {num(source.get('ppl'))}, "
                  f"{num(source.get('train_time_s'), 0)} s of training, not in the cost table)."]
    sections = [
        md_section("Scores (paper Table 2 layout)",
                   "Validation perplexity on the held-out split; task scores are accuracy in % "
                   "(acc_norm where a task reports it); AVG is the mean over tasks and AVG Rank the mean "
                   "rank over tasks (1 = best); perplexity enters neither.", markdown(score_table(results))),
        md_section("Cost (paper Tables 14/15 style)",
                   "Training time is the training loop's wall time (its periodic validation and "
                   "checkpoints included); peak memory is the process's (CUDA allocations on a GPU, "
                   "resident set on a CPU); latency is the median time of one forward pass of one "
                   "sequence (batch 1); step time and MFU (model FLOPs utilisation: achieved over "
                   "peak FLOP/s) are the training's own, averaged over its logged steps, \"—\" when "
                   "its metrics do not have them.", markdown(cost_table(results)))]
    comparison = results.get("regime_comparison") or {}
    if comparison.get("algorithms"):
        sections.append(md_section("Routing stability by regime",
                                   f"{comparison['metric']}. Figure: {comparison.get('figure')}.",
                                   markdown(comparison_table(comparison))))
    sections += [findings_md(results), failed_md(results)]
    if results.get("skipped_tasks"):
        sections.append(md_section("Tasks not run", "\n".join(
            f"- {t}: {why}" for t, why in results["skipped_tasks"].items())))
    sections.append(environment_md(results))
    return markdown_page(f"libmoe bench: preset {results['preset']}", intro, sections)


def md_section(heading: str, *blocks: str) -> list[str]:
    """A results.md section: `## heading`, then each block (a paragraph, a table) after a blank line."""
    lines = [f"## {heading}"]
    for block in blocks:
        lines += ["", block]
    return lines


ENVIRONMENT_NOTE = ("What decides these numbers besides the config (results.json's \"environment\"). On "
                    "one machine the same command gives the same numbers; on another CPU, GPU, thread "
                    "count, Python or torch the same command gives perplexities about 1-3% apart (float "
                    "rounding takes training down another path, as another seed does): compare verdicts, "
                    "not digits (docs/bench.md, \"Comparing numbers across machines\").")


def environment_md(results: dict[str, Any]) -> list[str]:
    """results.md's "Environment" section (results.json's "environment"; an older output says it
    has none) and, when the output was compared with another (`--compare`), "Compared with"."""
    table = environment_rows(results.get("environment"))
    lines = md_section("Environment", ENVIRONMENT_NOTE, _text_markdown(table))
    comparison = results.get("environment_comparison")
    if isinstance(comparison, dict):
        lines += ["", *md_section(f"Compared with {comparison.get('other')}", str(comparison.get("summary")))]
        if comparison.get("differences"):
            lines += ["", _text_markdown(environment_differences(comparison))]
    return lines


def _text_markdown(table: list[list[str]]) -> str:
    """A table of text cells as Markdown (left-aligned; a "|" in a cell, e.g. in a path, escaped)."""
    head, *body = [[c.replace("|", "\\|") for c in row] for row in table]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])


def findings_md(results: dict[str, Any]) -> list[str]:
    """The paper's findings checked on the output, as a results.md section ([] without)."""
    return [findings_markdown(results["findings"]).rstrip("\n")] if results.get("findings") else []


def failed_md(results: dict[str, Any]) -> list[str]:
    """The failed runs (results.json's "failed") as a results.md section ([] when none failed)."""
    failed = results.get("failed") or []
    if not failed:
        return []
    return md_section("Failed runs", "\n".join(f"- {f['name']}: {f['error']}" for f in failed))


def markdown_page(title: str, intro: list[str], sections: list[list[str]]) -> str:
    """results.md's text: `# title`, the intro lines, then each non-empty section after a blank line."""
    lines = [f"# {title}", "", *intro]
    for section in sections:
        if section:
            lines += ["", *section]
    return "\n".join(lines) + "\n"


def results_csv(results: dict[str, Any]) -> list[list[Any]]:
    """results.csv's rows of a language-model bench: one per algorithm, every number (rounded to 4
    decimals), std columns with several seeds, the error."""
    keys = ["algorithm", "status", "seeds", "ppl", *results["tasks"], "avg", "avg_rank",
            *(k for k, _ in COST)]
    if results["seeds"] > 1:
        keys += [f"{k}_std" for k in ["ppl", *results["tasks"], "avg", "avg_rank", "train_time_s",
                                      "tokens_per_s", "step_time_s", "mfu", "peak_mem_mb",
                                      "latency_ms"]]
    keys.append("error")
    return [keys, *(["" if r.get(k) is None else round(r[k], 4) if isinstance(r[k], float) else r[k]
                     for k in keys] for r in results["rows"])]


def csv_text(rows: list[list[Any]]) -> str:
    """Rows of cells as results.csv's text."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_tables(out: str | Path, results: dict[str, Any], markdown_text: str,
                 csv_rows: list[list[Any]]) -> None:
    """results.json (strict JSON, stamped with its writer), results.md (`markdown_text`, e.g. a
    `markdown_page`) and results.csv (`csv_rows`), each written atomically and recorded in the
    output's manifest (libmoe.bench.outputs). Every regime's tables go through here."""
    out = Path(out)
    write_output_json(out, "results.json", results)
    write_output_text(out, "results.md", MD_MARK + "\n" + markdown_text)
    write_output_text(out, "results.csv", csv_text(csv_rows))
