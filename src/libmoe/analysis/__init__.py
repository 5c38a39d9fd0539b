"""Routing analysis (paper Section 5): metrics over routing traces, inference-time interventions,
the router-initialisation study, figures and the HTML report, for any model family.

    from libmoe.analysis import RoutingRecorder, Trace, metrics
    with RoutingRecorder(model, labels=["news", "code"]) as rec:
        rec.record(tokens, labels=domain_ids)
    trace = rec.trace()
    metrics.eae(trace)            # {"0": 0.97, ...}: allocation entropy per MoE layer

`libmoe analyze RUN` runs everything and writes RUN/analysis/{metrics.json, figures/, report.html}.
How a run is recognised and analysed is its kind's (`RunKind`): language models are built in,
other families register theirs (`register_run_kind`, or the `libmoe.run_kinds` entry-point group).
The trace format and the recorder live in `libmoe.moe.trace` (training writes traces); they are
re-exported here. Figures need matplotlib (a dependency); it is imported only when drawn.
"""

from ..moe.trace import RoutingRecorder, Trace, list_traces
from . import metrics
from .analyze import analyze_run, check_analysis
from .init_std import INIT_STD_FILE, init_std_study, summarise_init_std
from .interventions import (
    intervention_plan,
    intervention_study,
    routing_intervention,
    run_interventions,
    write_units,
)
from .kinds import RUN_KINDS_GROUP, AnalysisOptions, RunKind, find_run_kind, register_run_kind, run_kinds
from .lm import LM_RUN_KIND
from .metrics import selections, token_change, token_margin, token_weight_entropy
from .plots import FIGURES, FigureInfo, plot_all, save_figure
from .report import (
    CSS,
    TABLE_NOTE,
    figure_anchor,
    figure_html,
    report_notes,
    summary_rows,
    summary_table_html,
)
from .runs import (
    METRICS_FILE,
    REPORT_FILE,
    display_name,
    load_analysis,
    run_traces,
    training_dynamics,
    unique_names,
    write_figures_and_report,
)

__all__ = [
    "CSS",
    "FIGURES",
    "INIT_STD_FILE",
    "LM_RUN_KIND",
    "METRICS_FILE",
    "REPORT_FILE",
    "RUN_KINDS_GROUP",
    "TABLE_NOTE",
    "AnalysisOptions",
    "FigureInfo",
    "RoutingRecorder",
    "RunKind",
    "Trace",
    "analyze_run",
    "check_analysis",
    "display_name",
    "figure_anchor",
    "figure_html",
    "find_run_kind",
    "init_std_study",
    "intervention_plan",
    "intervention_study",
    "list_traces",
    "load_analysis",
    "metrics",
    "plot_all",
    "register_run_kind",
    "report_notes",
    "routing_intervention",
    "run_interventions",
    "run_kinds",
    "run_traces",
    "save_figure",
    "selections",
    "summarise_init_std",
    "summary_rows",
    "summary_table_html",
    "token_change",
    "token_margin",
    "token_weight_entropy",
    "training_dynamics",
    "unique_names",
    "write_figures_and_report",
    "write_units",
]
