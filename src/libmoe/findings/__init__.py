"""Paper findings as checks: which of the LibMoE paper's claims a bench output reproduces.

    from libmoe.findings import check_findings
    findings = check_findings("bench/")  # [{"id", "claim", "paper_ref", "measured", "verdict", ...}]

    from libmoe.bench import write_findings
    write_findings("bench/")             # ...into its results.json, results.md and report.html

Every claim is one registered function over the bench output directory (`registry.finding`,
the claims in `checks`); it reads only the output's files (`inputs`), so an edited, moved or
merged output is judged on what it holds. Verdicts: reproduced, not_reproduced, inconclusive,
not_applicable; the statistics (a bootstrap over validation windows / probe sequences with one
seed, a t interval over seeds with several) are in `stats`; what training variance does to them
(the scope of a verdict: this training run or over N seeds, and the seed spread that would
overturn a one-seed verdict beside the measured one of `seed_spreads`) is in `variance`.
`libmoe bench` checks every claim at the end of a study; `libmoe findings BENCH_DIR` recomputes
them for an existing output.

The findings sit below the bench: they read a bench output's files and render their own sections
(`findings_markdown`, `findings_html`); rewriting a bench output's tables and report with the
verdicts is the bench's (`libmoe.bench.write_findings`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..analysis import figure_anchor
from ..overrides import did_you_mean
from . import checks as _checks  # noqa: F401  registers the claims
from .inputs import INIT_STD_DIR, Bench, load_init_std, read_bench_results
from .registry import FINDINGS, Finding, check, finding
from .seed_spreads import SEED_SPREADS, measured_spread, spread_records
from .stats import VERDICTS

__all__ = ["FINDINGS", "HEADER", "INIT_STD_DIR", "SEED_SPREADS", "VARIANCE_NOTE", "VERDICTS", "Bench",
           "Finding", "check_findings", "check_ids", "finding", "findings_html", "findings_markdown",
           "findings_table", "load_init_std", "markdown_table", "measured_spread", "read_bench_results",
           "spread_records", "variance_summary"]


def check_findings(bench_dir: str | Path, only: list[str] | None = None,
                   results: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every registered claim (or those in `only`) checked on the bench output `bench_dir`
    (`results`: its results.json content, when not yet written)."""
    names = list(FINDINGS) if only is None else check_ids(only)
    bench = Bench(bench_dir, results)
    return [check(FINDINGS[name], bench) for name in names]


def check_ids(ids: list[str]) -> list[str]:
    """`ids` when every one names a registered finding, else ValueError in one line with the
    nearest ids (checked before any file is read)."""
    if not ids:
        raise ValueError(f"no finding ids given; choose from {', '.join(FINDINGS)}.")
    for name in ids:
        if name not in FINDINGS:
            starts = [f for f in FINDINGS if f.startswith(name.split("_")[0] + "_")]  # "a" for a_...
            hint = did_you_mean(name, list(FINDINGS)) or did_you_mean(name, starts) or (
                f" Did you mean {', '.join(starts[:3])}?" if starts else "")
            raise ValueError(f"unknown finding {name!r}.{hint} Valid: {', '.join(FINDINGS)}.")
    return list(ids)


# What the "Training variance" column means, under both tables.
VARIANCE_NOTE = ("Training variance: a one-seed verdict holds for this training run only (another seed or "
                 "machine trains another model); the column gives the seed-to-seed spread (sd) of the "
                 "statistic that would overturn it, beside the measured one where known; with --seeds N "
                 "the verdicts are t intervals over the N seeds.")
HEADER = ["Claim", "Paper", "Measured here", "Verdict", "Training variance", "Figure"]


def variance_summary(f: dict[str, Any]) -> str:
    """A finding's "Training variance" cell: its scope and the seed spread that would overturn it
    (an output checked before the scope existed: "–")."""
    return (f.get("variance") or {}).get("summary") or "–"


def findings_table(findings: list[dict[str, Any]]) -> list[list[str]]:
    """[header, rows]: claim, paper reference, what this run measured, verdict, training variance
    (scope; the seed spread that would overturn a one-seed verdict), figure (always last)."""
    table = [list(HEADER)]
    for f in findings:
        table.append([f"{f['id']}: {f['claim']}", f["paper_ref"], f["measured"].get("summary", ""),
                      f["verdict"].replace("_", " "), variance_summary(f), f.get("figure") or ""])
    return table


def markdown_table(table: list[list[str]]) -> str:
    """A header row and rows of cells as a Markdown table (first column left, the others right)."""
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def findings_markdown(findings: list[dict[str, Any]]) -> str:
    """The "Paper findings" section of results.md (table, then each claim's method)."""
    table = findings_table(findings)
    for row in table[1:]:
        row[-1] = f"[{Path(row[-1]).name}]({row[-1]})" if row[-1] else ""
    lines = ["## Paper findings", "",
             "Each claim of the paper checked on this output (`libmoe.findings`; `libmoe findings DIR` "
             "recomputes them). ✓ reproduced, ✗ contradicted, ? inconclusive per part. " + VARIANCE_NOTE, "",
             markdown_table(table), ""]
    lines += [f"- **{f['id']}** ({f['verdict'].replace('_', ' ')}): {f['why']}" for f in findings]
    return "\n".join(lines) + "\n"


def findings_html(findings: list[dict[str, Any]], embedded: set[str] = frozenset()) -> str:
    """The "Paper findings" section of report.html: the table (a figure embedded in the report
    is linked to its heading, another to its file) and each claim's method."""
    head = "".join(f"<th>{h}</th>" for h in HEADER)
    rows = []
    for f in findings:
        fig = f.get("figure") or ""
        name = Path(fig).name
        link = (f'<a href="#{figure_anchor(name)}">{html.escape(name)}</a>' if name in embedded else
                f'<a href="{html.escape(fig)}">{html.escape(name)}</a>' if fig else "")
        summary = html.escape(f["measured"].get("summary", ""))
        verdict = f["verdict"].replace("_", " ")
        rows.append(f"<tr><td><b>{html.escape(f['id'])}</b>: {html.escape(f['claim'])}</td>"
                    f"<td>{html.escape(f['paper_ref'])}</td><td>{summary}</td>"
                    f"<td class=\"verdict v-{f['verdict']}\">{verdict}</td>"
                    f"<td>{html.escape(variance_summary(f))}</td><td>{link}</td></tr>")
    why = "".join(f"<li><b>{html.escape(f['id'])}</b>: {html.escape(f['why'])}</li>" for f in findings)
    return ("<h2 id=\"findings\">Paper findings</h2>\n<p class=\"table-note\">Each claim of the paper "
            "checked on this output (<code>libmoe findings DIR</code> recomputes them); per part ✓ "
            "reproduced, ✗ "
            f"contradicted, ? inconclusive. {html.escape(VARIANCE_NOTE)}</p>\n"
            f'<div class="table-wrap"><table><tr>{head}</tr>\n' + "\n".join(rows) + "</table></div>\n"
            f'<ul class="why">{why}</ul>')
