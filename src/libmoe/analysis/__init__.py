"""Routing analysis (paper Section 5): traces, the recorder, metrics over traces, inference-time
interventions, the router-initialisation study, figures and the HTML report.

    from libmoe.analysis import RoutingRecorder, Trace, metrics
    with RoutingRecorder(model, labels=["news", "code"]) as rec:
        rec.record(tokens, labels=domain_ids)
    trace = rec.trace()
    metrics.eae(trace)            # {"0": 0.97, ...}: allocation entropy per MoE layer

`libmoe analyze RUN` runs everything and writes RUN/analysis/{metrics.json, figures/, report.html}.
Figures need matplotlib (a dependency); they are imported only when drawn.
"""

from . import metrics
from .analyze import analyze_run, run_traces, write_figures_and_report
from .init_std import init_std_study
from .interventions import intervention_study, routing_intervention
from .trace import RoutingRecorder, Trace, list_traces

__all__ = [
    "RoutingRecorder",
    "Trace",
    "analyze_run",
    "init_std_study",
    "intervention_study",
    "list_traces",
    "metrics",
    "routing_intervention",
    "run_traces",
    "write_figures_and_report",
]
