"""One self-contained HTML report of the routing analysis: summary table, figures, notes.

Figures are embedded as base64 PNG data URIs and the CSS is inline, so the file can be mailed or
attached as it is. Input dicts follow docs/analysis.md; missing values show as "–".
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_text
from .plots import FigureInfo, _mean, _num

MISSING = "–"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1000px; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.intro { color: #555; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: .8rem; }
th, td { border: 1px solid #ccc; padding: .25rem .4rem; }
th { font-weight: 600; vertical-align: bottom; }
.table-note { color: #555; font-size: .8rem; }
th { background: #f3f3f3; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: .9rem; margin-top: .4rem; }
ul.notes li { margin-bottom: .2rem; }
td.verdict { font-weight: 600; white-space: nowrap; }
td.v-reproduced { background: #e3f4e1; color: #1d6b1a; }
td.v-not_reproduced { background: #fbe3e1; color: #8f1d14; }
td.v-inconclusive { background: #fdf3d8; color: #7a5a00; }
td.v-not_applicable { background: #f1f1f1; color: #666; }
ul.why li { font-size: .85rem; margin-bottom: .35rem; }
"""


def _layer_mean(d: dict | None) -> float | None:
    return _mean((d or {}).values())


def _last(entries: list | None, key: str, index: int = -1) -> float | None:
    return _num(entries[index].get(key)) if entries else None


def _intervention_delta(section: dict | None, match: Callable[[dict], bool], metric: str = "val_ppl"):
    """delta[metric] of the first intervention run that `match` accepts."""
    for r in (section or {}).get("runs") or []:
        if match(r):
            return _num((r.get("delta") or {}).get(metric))
    return None


def _is_tau(value: float) -> Callable[[dict], bool]:
    return lambda r: _num(r.get("tau")) is not None and math.isclose(r["tau"], value)


def _is_drop(k: int, name: str) -> Callable[[dict], bool]:
    return lambda r: r.get("drop_top") == k or r.get("name") == name


# (key, header, format) of the summary columns; the first three are always shown.
COLUMNS: list[tuple[str, str, str]] = [
    ("run", "Run", "s"),
    ("algorithm", "Algorithm", "s"),
    ("step", "Final step", "d"),
    ("val_ppl", "Val PPL", ".2f"),
    ("eae", "EAE", ".3f"),
    ("ewa", "EWA", ".3f"),
    ("margin", "Router margin", ".3f"),
    ("change_rate", "Change rate (last)", ".3f"),
    ("saturation", "Saturation (first ckpt)", ".3f"),
    ("jain", "Jain's index", ".3f"),
    ("dead", "Dead experts", "d"),
    ("droptop1", "DropTop1 Δppl", "+.2f"),
    ("droptop12", "DropTop1&2 Δppl", "+.2f"),
    ("tau10", "τ=10 Δppl", "+.2f"),
    ("tau01", "τ=0.1 Δppl", "+.2f"),
]
TABLE_NOTE = ("EAE, EWA, router margin and Jain's index are means over MoE layers; dead experts are summed "
              "over layers; saturation is top-k, at the first traced checkpoint; Δppl is the change in "
              "validation perplexity under the intervention (Val PPL: the unperturbed model's).")


def summary_rows(runs: dict[str, dict]) -> list[dict]:
    """One row per run with the COLUMNS keys; layer metrics are means over MoE layers, None if missing."""
    rows = []
    for name, m in runs.items():
        load = [v or {} for v in (m.get("load") or {}).values()]
        dead = [d for d in (lv.get("dead") for lv in load) if _num(d) is not None]
        rows.append({
            "run": name,
            "algorithm": m.get("algorithm"),
            "step": m.get("step"),
            "val_ppl": _num(m.get("val_ppl")),
            "eae": _layer_mean(m.get("eae")),
            "ewa": _layer_mean(m.get("ewa")),
            "margin": _layer_mean(m.get("router_margin")),
            "change_rate": _last(m.get("expert_change_rate"), "mean"),
            "saturation": _last(m.get("router_saturation"), "topk", index=0),
            "jain": _mean(lv.get("jain") for lv in load),
            "dead": int(sum(dead)) if dead else None,
            "droptop1": _intervention_delta(m.get("droptop"), _is_drop(1, "DropTop1")),
            "droptop12": _intervention_delta(m.get("droptop"), _is_drop(2, "DropTop1&2")),
            "tau10": _intervention_delta(m.get("temperature"), _is_tau(10.0)),
            "tau01": _intervention_delta(m.get("temperature"), _is_tau(0.1)),
        })
    return rows


def format_cell(value: Any, fmt: str) -> str:
    """A summary value as text: "–" when missing, else formatted with fmt."""
    if value is None or (fmt != "s" and _num(value) is None):
        return MISSING
    return format(int(value) if fmt == "d" else value, fmt) if fmt != "s" else str(value)


def summary_table_html(rows: list[dict]) -> str:
    """The HTML summary table of `summary_rows(runs)`; analysis columns that no run has are left
    out."""
    cols = [c for i, c in enumerate(COLUMNS) if i < 3 or any(r[c[0]] is not None for r in rows)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = []
    for r in rows:
        cells = "".join(
            f'<td{"" if fmt == "s" else " class=num"}>{html.escape(format_cell(r[k], fmt))}</td>'
            for k, _, fmt in cols)
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="table-wrap"><table><tr>{head}</tr>\n' + "\n".join(body) + "</table></div>"


def figure_anchor(name: str) -> str:
    """The id of an embedded figure's heading (links to it: #fig-NAME)."""
    return "fig-" + Path(name).stem.replace("_", "-")


def figure_html(info: FigureInfo, figure_dir: Path) -> str:
    """A figure of `figure_dir` embedded in HTML (heading with its anchor, the PNG inline, caption);
    FileNotFoundError when it was not drawn."""
    path = figure_dir / info.name
    if not path.is_file():
        raise FileNotFoundError(f"figure {path} is missing; run plots.plot_all into {figure_dir} first.")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<h2 id=\"{figure_anchor(info.name)}\">{html.escape(info.title)}</h2>\n"
            f"<figure><img alt=\"{html.escape(info.title)}\" "
            f"src=\"data:image/png;base64,{data}\">\n"
            f"<figcaption>{html.escape(info.caption)}</figcaption></figure>")


def report_notes(runs: dict[str, dict], notes: list[str] | None) -> list[str]:
    """Caller notes, then each run's skipped analyses with their reasons."""
    out = list(notes or [])
    for name, m in runs.items():
        out += [f"{name}: {what} skipped: {why}" for what, why in (m.get("skipped") or {}).items()]
    return out


def write_report(path: str | Path, runs: dict[str, dict], figures: list[FigureInfo],
                 figure_dir: str | Path, title: str = "libmoe routing analysis",
                 notes: list[str] | None = None) -> Path:
    """Write the HTML report of runs (display name -> metrics.json dict) with figures from figure_dir."""
    path = Path(path)
    names = ", ".join(runs) or "none"
    intro = (f"{len(runs)} run{'s' if len(runs) != 1 else ''} analysed: {names}. Diagnostics follow the "
             "LibMoE paper (Section 5, Appendices C–D) and describe the final checkpoint unless stated.")
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if runs:  # a study's report (init-std) has figures only
        parts += [f"<p class=\"intro\">{html.escape(intro)}</p>", "<h2>Summary</h2>",
                  summary_table_html(summary_rows(runs)),
                  f"<p class=\"table-note\">{html.escape(TABLE_NOTE)}</p>"]
    parts += [figure_html(info, Path(figure_dir)) for info in figures]
    if all_notes := report_notes(runs, notes):
        items = "".join(f"<li>{html.escape(n)}</li>" for n in all_notes)
        parts.append(f"<h2>Notes</h2>\n<ul class=\"notes\">{items}</ul>")
    parts.append("</body></html>\n")
    return write_text(path, "\n".join(parts))
