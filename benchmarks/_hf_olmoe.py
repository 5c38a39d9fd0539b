"""Hugging Face transformers' OLMoE sparse MoE block, built standalone for benchmarks/moe_layer.py.

How transformers (5.x) picks the experts implementation
--------------------------------------------------------
`OlmoeExperts` is decorated with `transformers.integrations.moe.use_experts_implementation`. Its
`forward` looks up `self.config._experts_implementation` in `ALL_EXPERTS_FUNCTIONS` *at every call*:
"grouped_mm" -> `grouped_mm_experts_forward` (sort by expert, two `torch._grouped_mm` /
`torch.nn.functional.grouped_mm` calls), "batched_mm" -> per-token bmm over gathered weights, and
"eager" (and an unset None) -> the class's own per-expert Python loop; any other name raises
KeyError at the first forward.

The config takes it as the constructor kwarg `OlmoeConfig(..., experts_implementation="grouped_mm")`
(stored in the property `config._experts_implementation`). Only `PreTrainedModel.__init__` resolves
an unset value (None) to the model default "grouped_mm"; a *standalone*
`OlmoeSparseMoeBlock(config)` built from a config without the kwarg silently runs the eager loop
(after a one-time warning). So we always pass it explicitly, and `implementation_report` checks
which kernel really ran.

The block's parameters are created with `torch.empty` (and the router with zeros: every token would
tie and go to the same 8 experts); `PreTrainedModel._init_weights` normally fills them, so we do the
same here: normal(0, initializer_range) for router and experts.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

try:
    import transformers
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
except ImportError as exc:  # pragma: no cover - depends on the environment
    transformers = None
    IMPORT_ERROR: ImportError | None = exc
else:
    IMPORT_ERROR = None

IMPLEMENTATIONS = ("eager", "grouped_mm")


def available() -> bool:
    return IMPORT_ERROR is None


def version() -> str | None:
    return None if transformers is None else transformers.__version__


def build_olmoe_block(
    d_model: int,
    n_experts: int,
    expert_dim: int,
    top_k: int,
    implementation: str,
) -> torch.nn.Module:
    """An `OlmoeSparseMoeBlock` (SwiGLU experts, softmax top-k router, renormalised weights).

    Input [batch, seq, d_model] -> output of the same shape (a plain tensor, no aux loss: OLMoE
    computes its load-balancing loss at the model level from the router logits).
    """
    if IMPORT_ERROR is not None:
        raise ImportError("transformers missing: pip install libmoe[bench]") from IMPORT_ERROR
    config = OlmoeConfig(
        hidden_size=d_model,
        intermediate_size=expert_dim,
        num_experts=n_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        hidden_act="silu",
        experts_implementation=implementation,
    )
    if config._experts_implementation != implementation:  # guard against an API change
        raise RuntimeError(
            f"OlmoeConfig did not take experts_implementation={implementation!r} "
            f"(got {config._experts_implementation!r})"
        )
    block = OlmoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, config.initializer_range)
    return block


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run underneath (no monkeypatching)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def implementation_report(block: torch.nn.Module, x: torch.Tensor) -> str:
    """Which experts code path really runs: the registry's function and the kernels it dispatches.

    "eager" shows one `index_add_` per active expert; "grouped_mm" shows 2 `_grouped_mm` calls
    (gate_up and down projections) in the forward and no `index_add_`.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    experts = block.experts
    name = experts.config._experts_implementation
    fn = ALL_EXPERTS_FUNCTIONS.get(name, None) if name is not None else None
    fn_name = fn.__name__ if fn is not None else f"{type(experts).__name__}.forward (eager loop)"
    counter = _OpCounter()
    with torch.no_grad(), counter:
        block(x)
    ops = ", ".join(
        f"{op}x{counter.counts[op]}"
        for op in ("_grouped_mm", "grouped_mm", "index_add_", "bmm")
        if counter.counts[op]
    )
    return f"{fn_name}: {ops or 'no expert kernels seen'}"
