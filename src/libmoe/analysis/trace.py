"""Moved to `libmoe.moe.trace` (trace recording lives beside the routing records it stores, below
training); this temporary shim keeps the old import path working until analysis imports it there."""

from ..moe.trace import (
    TRACE_META,
    TRACE_TENSORS,
    RoutingRecorder,
    Trace,
    check_one_run,
    damaged_trace_fix,
    list_traces,
    routed_layers,
    trace_meta,
)

__all__ = ["TRACE_META", "TRACE_TENSORS", "RoutingRecorder", "Trace", "check_one_run", "damaged_trace_fix",
           "list_traces", "routed_layers", "trace_meta"]
