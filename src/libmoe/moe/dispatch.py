"""Dropless token dispatch: four numerically equivalent ways to run the routed experts.

Every backend computes, for x [T, D], expert ids [T, K] and combine weights [T, K],

    y_t = sum_j weights[t, j] * FFN_{ids[t, j]}(x_t)      (ids outside [0, E) contribute nothing)

y is [T, D_out], D_out = w2.shape[-1] (d_model unless the layer sets output_dim). FFN_e may have
biases (b1, b3 [E, M], b2 [E, D_out]); the weight multiplies b2 too, so every backend adds
weights[t, j] * b2[e] to the output.

- ``loop``: tokens sorted by expert and split; one plain autograd FFN per expert. The reference.
- ``padded``: per-expert buffers padded to the largest load, batched matmul (``torch.bmm``).
- ``grouped``: tokens sorted by expert, one grouped matmul per projection (``torch._grouped_mm``
  where the device and dtype support it, the ``loop`` computation otherwise).
- ``blocked``: a custom autograd function that gathers each expert's rows into a small buffer,
  multiplies the routing weight into the hidden activation, scatters results straight back and
  saves only the hidden pre-activation for backward (PERFORMANCE_NOTES: the fastest on CPU).
- ``auto``: on CPU ``blocked`` when experts average at least BLOCKED_MIN_LOAD rows, else
  ``grouped`` (``padded`` where ``torch._grouped_mm`` lacks the dtype); on CUDA ``grouped`` when
  ``torch._grouped_mm`` supports the dtype (bf16 on sm90+), else ``padded``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .experts import Activation


class ExpertOrder(NamedTuple):
    """The (token, choice) assignments that reach an FFN expert, sorted by expert (stable, so each
    expert's tokens stay in token order): tok [N] token index, pos [N] flat index into ids/weights
    [T*K], counts [E] assignments per expert."""

    tok: Tensor
    pos: Tensor
    counts: Tensor


def sort_by_expert(ids: Tensor, n_experts: int) -> ExpertOrder:
    """Flatten ids [T, K], keep the entries in [0, n_experts), sort them by expert."""
    K = ids.shape[-1]
    flat = ids.reshape(-1)
    pos = torch.nonzero((flat >= 0) & (flat < n_experts)).squeeze(-1)
    experts = flat[pos]
    pos = pos[torch.argsort(experts, stable=True)]
    return ExpertOrder(pos // K, pos, torch.bincount(experts, minlength=n_experts))


def _plus(y: Tensor, b: Tensor | None) -> Tensor:
    return y if b is None else y + b


def _ffn(act: Activation, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None,
         b1: Tensor | None = None, b2: Tensor | None = None, b3: Tensor | None = None) -> Tensor:
    a = act.fn(_plus(x @ w1, b1))
    if w3 is not None:
        a = a * _plus(x @ w3, b3)
    return _plus(a @ w2, b2)


def _per_expert(t: Tensor | None, E: int) -> list[Tensor | None]:
    return list(t.unbind(0)) if t is not None else [None] * E


def loop_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """The readable reference: one FFN per expert over its tokens, weights applied to the output."""
    tok, pos, counts = order
    E = w1.shape[0]
    pieces = x[tok].split(counts.tolist())
    params = zip(pieces, w1.unbind(0), w2.unbind(0), *(_per_expert(t, E) for t in (w3, b1, b2, b3)))
    outs = [_ffn(act, *p) for p in params]
    out = torch.cat(outs) * weights.reshape(-1)[pos].unsqueeze(-1)
    return x.new_zeros(x.shape[0], w2.shape[-1]).index_add(0, tok, out)


def padded_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """Per-expert buffers [E, C, D] padded to the largest load C, then torch.bmm."""
    T, D = x.shape
    E, D_out = w1.shape[0], w2.shape[-1]
    tok, pos, counts = order
    C = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(tok.numel(), device=x.device) - starts.repeat_interleave(counts)
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)
    # Padding rows point at token T, a zero row appended to x; their weight is 0.
    tok_pad = torch.full((E, C), T, dtype=torch.long, device=x.device)
    tok_pad[expert, slot] = tok
    w_pad = weights.new_zeros(E, C)
    w_pad = w_pad.index_put((expert, slot), weights.reshape(-1)[pos])
    xs = torch.cat([x, x.new_zeros(1, D)])[tok_pad]  # [E, C, D]
    a = act.fn(_plus(torch.bmm(xs, w1), None if b1 is None else b1.unsqueeze(1)))
    if w3 is not None:
        a = a * _plus(torch.bmm(xs, w3), None if b3 is None else b3.unsqueeze(1))
    out = torch.bmm(a * w_pad.unsqueeze(-1), w2)  # [E, C, D_out]
    if b2 is not None:  # padding rows have weight 0, so they get no bias either
        out = out + w_pad.unsqueeze(-1) * b2.unsqueeze(1)
    y = x.new_zeros(T + 1, D_out).index_add(0, tok_pad.reshape(-1), out.reshape(-1, D_out))
    return y[:T]


def grouped_mm_supported(x: Tensor, w1: Tensor | None = None, w2: Tensor | None = None) -> bool:
    """Whether torch._grouped_mm runs here: fp32/bf16 on CPU, bf16 on CUDA sm90+, and row strides
    (d_model, expert_dim, output width) that are multiples of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        ok = x.dtype in (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda":
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        ok = False
    dims = [x.shape[-1]] + [w.shape[-1] for w in (w1, w2) if w is not None]
    return ok and all(d * x.element_size() % 16 == 0 for d in dims)


def grouped_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """Tokens sorted by expert, one grouped matmul per projection (weight on the hidden activation)."""
    if not grouped_mm_supported(x, w1, w2):
        return loop_dispatch(x, order, weights, w1, w2, w3, act, b1, b2, b3)
    tok, pos, counts = order
    offs = torch.cumsum(counts, 0).to(torch.int32)
    # Row i of the sorted tokens belongs to expert row_expert[i]: it picks that expert's biases.
    row_expert = None
    if b1 is not None or b2 is not None or b3 is not None:
        row_expert = torch.repeat_interleave(torch.arange(w1.shape[0], device=x.device), counts)

    def bias(b):
        return None if b is None else b[row_expert]

    xs = x[tok]
    w = weights.reshape(-1)[pos].unsqueeze(-1)
    a = act.fn(_plus(torch._grouped_mm(xs, w1, offs=offs), bias(b1)))
    if w3 is not None:
        a = a * _plus(torch._grouped_mm(xs, w3, offs=offs), bias(b3))
    out = torch._grouped_mm(a * w, w2, offs=offs)
    if b2 is not None:
        out = out + w * bias(b2)
    return x.new_zeros(x.shape[0], w2.shape[-1]).index_add(0, tok, out)


class _BlockedExperts(torch.autograd.Function):
    """Per-expert blocked FFN with a hand-written backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weights, w1, w2, w3, b1, b2, b3, tok, pos, counts, act):
        T, M, N = x.shape[0], w1.shape[-1], tok.numel()
        w = weights.reshape(-1)[pos]
        y = x.new_zeros(T, w2.shape[-1])
        h_all = x.new_empty(N, M)
        g_all = x.new_empty(N, M) if w3 is not None else None
        relu = act.name == "relu"
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            rows = slice(start, start + c)
            t = tok[rows]
            xe = x.index_select(0, t)
            h = _project(xe, w1[e], b1, e, h_all[rows])
            # ReLU overwrites h with relu(h): backward needs only the output's sign.
            a = h.relu_() if relu else act.fn(h)
            if w3 is not None:  # gated activations are never relu, so `a` is a fresh tensor
                a.mul_(_project(xe, w3[e], b3, e, g_all[rows]))
            we = w[rows].unsqueeze(-1)
            out = torch.mm(a * we, w2[e])
            if b2 is not None:
                out.addmm_(we, b2[e].unsqueeze(0))  # the weight multiplies the output bias too
            y.index_add_(0, t, out)
            start += c
        ctx.save_for_backward(x, weights, w1, w2, w3, b1, b2, b3, tok, pos, h_all, g_all)
        ctx.counts, ctx.act = counts, act
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weights, w1, w2, w3, b1, b2, b3, tok, pos, h_all, g_all = ctx.saved_tensors
        act, counts = ctx.act, ctx.counts
        relu = act.name == "relu"
        gy = gy.contiguous()
        w = weights.reshape(-1)[pos]
        gx = torch.zeros_like(x)
        # Every expert's gradient block is written below (zeroed when it got no tokens): no fill.
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gw3 = torch.empty_like(w3) if w3 is not None else None
        gb1, gb2, gb3 = (torch.empty_like(b) if b is not None else None for b in (b1, b2, b3))
        gw = w.new_empty(w.shape)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                for grad in (gw1, gw2, gw3, gb1, gb2, gb3):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + c)
            t, we = tok[rows], w[rows].unsqueeze(-1)
            xe, gye, h = x.index_select(0, t), gy.index_select(0, t), h_all[rows]
            a = h if relu else act.fn(h)
            if w3 is not None:
                a = a * g_all[rows]
            torch.mm((a * we).t(), gye, out=gw2[e])
            ga = torch.mm(gye, w2[e].t())  # gradient of the weighted hidden activation
            gw[rows] = (ga * a).sum(-1)
            if b2 is not None:  # the output is (a @ w2 + b2) * weight
                gw[rows] += torch.mv(gye, b2[e])
                torch.mv(gye.t(), w[rows], out=gb2[e])
            ga.mul_(we)
            if w3 is not None:
                gg = ga * act.fn(h)  # gradient of the gate projection x @ w3 (+ b3)
                torch.mm(xe.t(), gg, out=gw3[e])
                if b3 is not None:
                    torch.sum(gg, 0, out=gb3[e])
                ga.mul_(g_all[rows])
            gh = torch.ops.aten.threshold_backward(ga, h, 0.0) if relu else ga.mul_(act.grad(h))
            if b1 is not None:
                torch.sum(gh, 0, out=gb1[e])
            gxe = torch.mm(gh, w1[e].t())
            if w3 is not None:
                gxe.addmm_(gg, w3[e].t())
            torch.mm(xe.t(), gh, out=gw1[e])
            gx.index_add_(0, t, gxe)
            start += c
        gweights = torch.zeros_like(weights).reshape(-1).index_put((pos,), gw).view_as(weights)
        return gx, gweights, gw1, gw2, gw3, gb1, gb2, gb3, None, None, None, None


def _project(x: Tensor, w: Tensor, b: Tensor | None, e: int, out: Tensor) -> Tensor:
    """x @ w (+ b[e]) written into `out`."""
    return torch.mm(x, w, out=out) if b is None else torch.addmm(b[e], x, w, out=out)


def blocked_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    tok, pos, counts = order
    return _BlockedExperts.apply(x, weights, w1, w2, w3, b1, b2, b3, tok, pos, counts.tolist(), act)


_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "blocked": blocked_dispatch,
    "grouped": grouped_dispatch,
    "padded": padded_dispatch,
    "loop": loop_dispatch,
}
DISPATCH_BACKENDS = ("auto", *_BACKENDS)


# Average rows per expert (T*K/E) above which `blocked` beats the batched backends on CPU
# (benchmarks/dispatch_grid.py, 2-core CPU, fp32: blocked wins from ~250 rows, grouped/padded below).
BLOCKED_MIN_LOAD = 192


def resolve_backend(
    name: str, x: Tensor, n_assignments: int = 0, n_experts: int = 1, w1: Tensor | None = None,
    w2: Tensor | None = None,
) -> str:
    """Pick the concrete backend for `auto` from device, dtype and the average load per expert."""
    if name != "auto":
        return name
    if x.device.type == "cuda":
        return "grouped" if grouped_mm_supported(x, w1, w2) else "padded"
    if n_assignments / max(n_experts, 1) >= BLOCKED_MIN_LOAD:
        return "blocked"
    return "grouped" if grouped_mm_supported(x, w1, w2) else "padded"


def run_experts(
    backend: str,
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None,
    act: Activation,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    b3: Tensor | None = None,
) -> Tensor:
    """y [T, D_out] = sum_j weights[:, j] * FFN_{ids[:, j]}(x) with the chosen dispatch backend
    (D_out = w2.shape[-1]). Optional expert biases: b1 (and b3 when gated) [E, M], b2 [E, D_out].

    Under autocast every backend computes in the autocast dtype (inputs and expert weights cast
    once here, autocast off inside), so that all backends, custom ones included, agree.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            cast = [t.to(dtype) if t is not None else None for t in (x, weights, w1, w2, w3, b1, b2, b3)]
            return run_experts(backend, cast[0], ids, cast[1], *cast[2:5], act, *cast[5:])
    order = sort_by_expert(ids, w1.shape[0])
    if order.tok.numel() == 0:
        # Nothing routed to an FFN expert (e.g. an empty batch): a zero output still in the graph.
        D_out = w2.shape[-1]
        zero = x * 0.0 if D_out == x.shape[-1] else x[:, :1] * x.new_zeros(D_out)
        return zero + weights.sum() * 0.0
    backend = resolve_backend(backend, x, ids.numel(), w1.shape[0], w1, w2)
    return _BACKENDS[backend](x, order, weights.to(x.dtype), w1, w2, w3, act, b1, b2, b3)
