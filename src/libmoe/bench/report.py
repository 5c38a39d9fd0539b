"""OUT/report.html of a bench: the score and cost tables, the routing-analysis summary and every
cross-algorithm figure, self-contained (figures embedded, CSS inline) like the analysis report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..analysis import (
    CSS,
    TABLE_NOTE,
    FigureInfo,
    figure_html,
    plot_all,
    report_notes,
    summary_rows,
    summary_table_html,
)
from ..environment import comparison_rows as environment_differences
from ..environment import corpus_note, environment_rows
from ..files import write_json
from ..findings import findings_html
from .compare import FIGURE, comparison_table
from .outputs import HTML_MARK, plain_json, write_output_text
from .plots import plot_scores
from .tables import ENVIRONMENT_NOTE, cost_table, score_table

REPORT_FILE = "report.html"


def html_table(table: list[list[str]]) -> str:
    """A header row and rows of cells as the report's HTML table (numbers right-aligned)."""
    head, *body = table
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = []
    for row in body:
        cells = [f"<td>{html.escape(row[0])}</td>"]
        cells += [f"<td class=num>{html.escape(c)}</td>" for c in row[1:]]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table-wrap"><table><tr>{th}</tr>\n' + "\n".join(rows) + "</table></div>"


def comparison_html(out: Path, comparison: dict[str, Any] | None) -> list[str]:
    """The regime comparison: figure and table (this bench's change rates alone without
    --compare)."""
    if not comparison or not comparison.get("figure"):
        return []
    parts = [figure_html(FIGURE, out / "analysis" / "figures"), html_table(comparison_table(comparison))]
    if len(comparison["regimes"]) == 1:
        parts.append("<p class=\"table-note\">This bench's change rates alone; <code>--compare "
                     "OTHER_BENCH</code> (a bench of the other regime) sets them beside another's.</p>")
    else:
        benches = "; ".join(f"{e['label']}: {e['bench']}" for e in comparison["regimes"])
        parts.append(f"<p class=\"table-note\">{html.escape(benches)}. Relative = change rate / mean "
                     "change rate of the other algorithms of the same bench.</p>")
    return parts


def write_cross_run_analysis(out: Path, metrics: dict[str, dict],
                             init_std: dict[str, Any] | None = None) -> list[FigureInfo]:
    """OUT/analysis/metrics.json ({name: a run's routing metrics}) and every cross-run figure
    (OUT/analysis/figures, with the init-std study's when given); returns the figures."""
    fig_dir = out / "analysis" / "figures"
    figures = plot_all(metrics, fig_dir, init_std=init_std) if metrics or init_std else []
    write_json(out / "analysis" / "metrics.json", plain_json(metrics), indent=1)
    return figures


def table_html(heading: str, table: list[list[str]], note: str | None = None) -> list[str]:
    """A report section: `heading`, the table, and its note (HTML, not escaped) when given."""
    parts = [f"<h2>{heading}</h2>", html_table(table)]
    if note is not None:
        parts.append(f"<p class=\"table-note\">{note}</p>")
    return parts


def findings_section(out: Path, results: dict[str, Any], embedded: set[str]) -> list[str]:
    """The paper's findings checked on the output ([] without); `embedded`: the figures the report
    shows (a finding links to them; the regime comparison's is added when it was drawn)."""
    if not results.get("findings"):
        return []
    if (out / "analysis" / "figures" / "regime_comparison.png").is_file() and \
            (results.get("regime_comparison") or {}).get("figure"):
        embedded = embedded | {"regime_comparison.png"}
    return [findings_html(results["findings"], embedded)]


def environment_html(results: dict[str, Any]) -> list[str]:
    """The report's "Environment" section (results.json's "environment": data hashes, software,
    machine, threads) and, after `--compare`, how the other output's differ."""
    parts = ["<h2>Environment</h2>", _text_table(environment_rows(results.get("environment"))),
             f"<p class=\"table-note\">{html.escape(ENVIRONMENT_NOTE)}</p>"]
    comparison = results.get("environment_comparison")
    if isinstance(comparison, dict):
        parts += [f"<h2>Compared with {html.escape(str(comparison.get('other')))}</h2>",
                  f"<p class=\"intro\">{html.escape(str(comparison.get('summary')))}</p>"]
        if comparison.get("differences"):
            parts.append(_text_table(environment_differences(comparison)))
    return parts


def _text_table(table: list[list[str]]) -> str:
    """A table of text cells (left-aligned, escaped)."""
    head, *body = table
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body]
    return f'<div class="table-wrap"><table><tr>{th}</tr>\n' + "\n".join(rows) + "</table></div>"


def failure_notes(results: dict[str, Any]) -> list[str]:
    """The report's notes on the failed runs (results.json's "failed")."""
    return [f"{f['name']} failed: {f['error']}" for f in results.get("failed", [])]


def write_report(out: str | Path, title: str, intro: str, sections: list[str], notes: list[str]) -> Path:
    """OUT/report.html: the page (`title`, the `intro` paragraph, the regime's `sections` as HTML
    parts in order, the `notes` as a list), self-contained and marked as the bench's. Every
    regime's report goes through here."""
    parts = [
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">{HTML_MARK}",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=\"intro\">{html.escape(intro)}</p>",
        *sections,
    ]
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        parts.append(f"<h2>Notes</h2>\n<ul class=\"notes\">{items}</ul>")
    parts.append("</body></html>\n")
    return write_output_text(out, REPORT_FILE, "\n".join(parts))


def write_bench_report(out: str | Path, results: dict[str, Any], analysis: dict[str, dict],
                       figures: list[FigureInfo], describe: str) -> Path:
    """OUT/report.html of a language-model bench (see the module docstring); `describe`: the
    regime's setup sentence (`PretrainRegime.describe`)."""
    out = Path(out)
    fig_dir = out / "analysis" / "figures"
    regime = results.get("regime", "pretrain")
    setup = (f"Preset {results['preset']}: {results['description']}. Regime {regime}: "
             f"{describe} {results['elapsed_s'] / 60:.1f} minutes on "
             f"{results['machine'].get('gpu') or str(results['machine']['cpus']) + ' CPU cores'}.")
    note = corpus_note(results.get("environment"))
    if note:
        setup += " " + note
    sections = [
        *table_html("Scores (paper Table 2 layout)", score_table(results),
                    "Validation perplexity on the held-out split; task scores in % (acc_norm where "
                    "reported); AVG = mean over tasks, AVG Rank = mean rank over tasks (1 = best)"
                    + ("; mean ± std over seeds" if results["seeds"] > 1 else "") + "."),
        *table_html("Cost (paper Tables 14/15 style)", cost_table(results),
                    "Training time is the training loop's wall time (periodic validation and "
                    "checkpoints included); peak memory is the process's (CUDA allocations on a GPU, "
                    "resident set on a CPU); latency is the median time of one forward pass of one "
                    "sequence at batch 1; step time and MFU (model FLOPs utilisation) are the "
                    "training's own, averaged over its logged steps (— when its metrics lack them)."),
    ]
    scores = plot_scores(results, fig_dir / "bench_ppl.png")
    sections += findings_section(out, results, {info.name for info in figures}
                                 | ({scores.name} if scores is not None else set()))
    if scores is not None:
        sections.append(figure_html(scores, fig_dir))
    if analysis:
        sections += ["<h2>Routing summary</h2>", summary_table_html(summary_rows(analysis)),
                     f"<p class=\"table-note\">{html.escape(TABLE_NOTE)}</p>"]
    sections += comparison_html(out, results.get("regime_comparison"))
    sections += [figure_html(info, fig_dir) for info in figures]
    sections += environment_html(results)
    notes = failure_notes(results)
    notes += [f"task {name} not run: {why}" for name, why in (results.get("skipped_tasks") or {}).items()]
    return write_report(out, f"libmoe bench: {results['preset']}", setup, sections,
                        report_notes(analysis, notes))
