"""Paper findings as checks: which of the LibMoE paper's claims a bench output reproduces.

    from libmoe.findings import check_findings, write_findings
    findings = check_findings("bench/")  # [{"id", "claim", "paper_ref", "measured", "verdict", ...}]
    write_findings("bench/")             # ...into results.json, results.md and report.html

Every claim is one registered function over the bench output directory (`registry.finding`,
the claims in `checks`); it reads only the output's files (`inputs`), so an edited, moved or
merged output is judged on what it holds. Verdicts: reproduced, not_reproduced, inconclusive,
not_applicable; the statistics (a bootstrap over validation windows / probe sequences with one
seed, a t interval over seeds with several) are in `stats`. `libmoe bench` checks every claim at
the end of a study; `libmoe findings BENCH_DIR` recomputes them for an existing output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import read_json_object
from . import checks as _checks  # noqa: F401  registers the claims
from .inputs import Bench, read_bench_results
from .registry import FINDINGS, Finding, check, finding
from .stats import VERDICTS

__all__ = ["FINDINGS", "VERDICTS", "Bench", "Finding", "check_findings", "check_ids", "finding",
           "findings_html", "findings_markdown", "findings_table", "write_findings"]


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
    from ..overrides import did_you_mean

    if not ids:
        raise ValueError(f"no finding ids given; choose from {', '.join(FINDINGS)}.")
    for name in ids:
        if name not in FINDINGS:
            starts = [f for f in FINDINGS if f.startswith(name.split("_")[0] + "_")]  # "a" for a_...
            hint = did_you_mean(name, list(FINDINGS)) or did_you_mean(name, starts) or (
                f" Did you mean {', '.join(starts[:3])}?" if starts else "")
            raise ValueError(f"unknown finding {name!r}.{hint} Valid: {', '.join(FINDINGS)}.")
    return list(ids)


def findings_table(findings: list[dict[str, Any]]) -> list[list[str]]:
    """[header, rows]: claim, paper reference, what this run measured, verdict, figure."""
    table = [["Claim", "Paper", "Measured here", "Verdict", "Figure"]]
    for f in findings:
        table.append([f"{f['id']}: {f['claim']}", f["paper_ref"], f["measured"].get("summary", ""),
                      f["verdict"].replace("_", " "), f.get("figure") or ""])
    return table


def findings_markdown(findings: list[dict[str, Any]]) -> str:
    """The "Paper findings" section of results.md (table, then each claim's method)."""
    from ..bench.tables import markdown

    table = findings_table(findings)
    for row in table[1:]:
        row[4] = f"[{Path(row[4]).name}]({row[4]})" if row[4] else ""
    lines = ["## Paper findings", "",
             "Each claim of the paper checked on this output (`libmoe.findings`; `libmoe findings DIR` "
             "recomputes them). ✓ reproduced, ✗ contradicted, ? inconclusive per part.", "",
             markdown(table), ""]
    lines += [f"- **{f['id']}** ({f['verdict'].replace('_', ' ')}): {f['why']}" for f in findings]
    return "\n".join(lines) + "\n"


def findings_html(findings: list[dict[str, Any]], embedded: set[str] = frozenset()) -> str:
    """The "Paper findings" section of report.html: the table (a figure embedded in the report
    is linked to its heading, another to its file) and each claim's method."""
    import html

    from ..analysis.report import figure_anchor

    head = "".join(f"<th>{h}</th>" for h in ("Claim", "Paper", "Measured here", "Verdict", "Figure"))
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
                    f"<td class=\"verdict v-{f['verdict']}\">{verdict}</td><td>{link}</td></tr>")
    why = "".join(f"<li><b>{html.escape(f['id'])}</b>: {html.escape(f['why'])}</li>" for f in findings)
    return ("<h2 id=\"findings\">Paper findings</h2>\n<p class=\"table-note\">Each claim of the paper "
            "checked on this output (<code>libmoe findings DIR</code> recomputes them); per part ✓ "
            "reproduced, ✗ "
            "contradicted, ? inconclusive.</p>\n"
            f'<div class="table-wrap"><table><tr>{head}</tr>\n' + "\n".join(rows) + "</table></div>\n"
            f'<ul class="why">{why}</ul>')


def write_findings(bench_dir: str | Path, findings: list[dict[str, Any]] | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Check the claims on `bench_dir` (unless `findings` are given) and rewrite its results.json,
    results.md and report.html with them; returns the findings."""
    out = Path(bench_dir)
    results = read_bench_results(out / "results.json", full=True)  # refused before anything is rewritten
    findings = check_findings(out, results=results) if findings is None else findings
    results["findings"] = findings
    if results.get("regime") == "vlm":
        from ..bench.outputs import write_output_json
        from ..vlm.bench import write_vlm_report, write_vlm_tables

        write_output_json(out, "results.json", results)  # the bench's manifest records it
        write_vlm_tables(out, results)
        write_vlm_report(out, results)
    else:
        from ..analysis.plots import plot_all
        from ..bench.report import write_bench_report
        from ..bench.studies import load_init_std
        from ..bench.tables import write_tables

        path = out / "analysis" / "metrics.json"
        analysis = read_json_object(path, "rerun `libmoe bench` with the same --out to analyse it "
                                    "again") if path.is_file() else {}
        init_std = load_init_std(out)
        figures = (plot_all(analysis, out / "analysis" / "figures", init_std=init_std)
                   if analysis or init_std else [])
        write_tables(out, results)
        write_bench_report(out, results, analysis, figures)
    if log:
        for f in findings:
            log(f"{f['id']}: {f['verdict']} — {f['measured'].get('summary', '')}")
    return findings
