"""Dropless token dispatch: five numerically equivalent ways to run the routed experts.

Every backend computes, for x [T, D], expert ids [T, K] and combine weights [T, K],

    y_t = sum_j weights[t, j] * FFN_{ids[t, j]}(x_t)      (ids outside [0, E) contribute nothing)

y is [T, D_out], D_out = w2.shape[-1] (d_model unless the layer sets output_dim). FFN_e may have
biases (b1, b3 [E, M], b2 [E, D_out]); the weight multiplies b2 too, so every backend adds
weights[t, j] * b2[e] to the output.

- ``loop``: tokens sorted by expert and split; one plain autograd FFN per expert. The reference.
- ``padded``: per-expert buffers padded to the largest load, batched matmul (``torch.bmm``).
- ``grouped``: tokens sorted by expert, one grouped matmul per projection (``torch._grouped_mm``
  where the device and dtype support it: fp32, bf16, fp16; the ``loop`` computation otherwise).
  The GPU path: libmoe's part never makes the host wait for the device (fixed shapes, masked
  tail); torch's fused kernel (bf16 on CUDA sm90/sm100) does not either, its per-group fallback
  (other dtypes and GPUs) reads the offsets on the host at each call.
- ``blocked``: a custom autograd function that gathers each expert's rows into a small buffer,
  multiplies the routing weight into the hidden activation, scatters results straight back and
  saves only the hidden pre-activation for backward (PERFORMANCE_NOTES: the fastest on CPU).
- ``fused``: ``blocked``'s computation with the loop over experts in a C++ kernel built on first
  use (cpu_kernel.py, csrc/experts_cpu.cpp): no per-expert Python work, the experts shared out
  between the intra-op threads by a fixed plan (deterministic; on one thread bitwise
  ``blocked``'s results for ReLU experts). ``blocked`` itself where the kernel cannot run (no
  compiler, bf16/fp16, a GPU tensor, a custom activation). The fastest on CPU
  (docs/performance.md, "Fine-grained experts").
- ``auto``: on CPU ``fused`` in fp32/fp64 (the fastest at every shape measured); where the
  kernel cannot be built or in bf16/fp16, ``blocked`` when experts average at least
  BLOCKED_MIN_LOAD rows, else ``grouped`` (``padded`` where ``torch._grouped_mm`` lacks the dtype
  or the 16-byte row alignment); on CUDA ``grouped`` where torch's fused kernel runs (bf16 on
  sm90/sm100), else ``padded`` (one host read per layer against the fallback's one per matmul;
  not measured here, ``dispatch: grouped`` chooses the fallback); under torch.compile always
  ``grouped``.

``loop``, ``padded``, ``blocked`` and ``fused`` read the per-expert counts on the host once per
call (a device sync on a GPU); ``grouped`` reads nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .cpu_kernel import fused_kernel

if TYPE_CHECKING:
    from .experts import Activation


class ExpertOrder(NamedTuple):
    """Every (token, choice) assignment of ids [T, K], sorted by expert (stable, so each expert's
    rows stay in token order), the ones outside [0, E) last. All fields have fixed sizes, so
    building them never makes the host wait for the device.

    tok [N] token index, pos [N] flat index into ids/weights [T*K], expert [N] the row's expert
    (E for the invalid tail), counts [E] assignments per expert; N = T*K. The first
    counts.sum() rows are the valid ones."""

    tok: Tensor
    pos: Tensor
    counts: Tensor
    expert: Tensor


def sort_by_expert(ids: Tensor, n_experts: int) -> ExpertOrder:
    """Sort the flattened ids [T, K] by expert, invalid ids (outside [0, n_experts)) last; no host sync."""
    K = ids.shape[-1]
    flat = ids.reshape(-1)
    # Invalid ids get key E: they sort after every expert and fall into an extra count bucket.
    key = torch.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    expert, pos = torch.sort(key, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return ExpertOrder(pos // K, pos, counts[:n_experts], expert)


def _host_counts(order: ExpertOrder) -> tuple[list[int], int]:
    """Per-expert counts read on the host (one sync) and their sum: the number of valid rows.
    Only the CPU-oriented backends (loop, padded, blocked) call it; `grouped` never does."""
    counts = order.counts.tolist()
    return counts, sum(counts)


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


# Every backend takes `weights` in the combine dtype (fp32 under autocast, else x's dtype), applies
# them to the expert outputs in that dtype and accumulates a token's K choices in it; run_experts
# casts the result back to the compute dtype.


def loop_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """The readable reference: one FFN per expert over its tokens, weights applied to the output."""
    counts, n = _host_counts(order)
    tok, pos = order.tok[:n], order.pos[:n]
    E = w1.shape[0]
    pieces = x[tok].split(counts)
    params = zip(pieces, w1.unbind(0), w2.unbind(0), *(_per_expert(t, E) for t in (w3, b1, b2, b3)))
    outs = [_ffn(act, *p) for p in params]
    out = torch.cat(outs).to(weights.dtype) * weights.reshape(-1)[pos].unsqueeze(-1)
    return out.new_zeros(x.shape[0], w2.shape[-1]).index_add(0, tok, out)


def padded_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """Per-expert buffers [E, C, D] padded to the largest load C, then torch.bmm."""
    T, D = x.shape
    E, D_out = w1.shape[0], w2.shape[-1]
    counts_list, n = _host_counts(order)
    C = max(counts_list)
    tok, pos, counts = order.tok[:n], order.pos[:n], order.counts
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=x.device) - starts.repeat_interleave(counts, output_size=n)
    expert = order.expert[:n]
    # Padding rows point at token T, a zero row appended to x; their weight is 0.
    tok_pad = torch.full((E, C), T, dtype=torch.long, device=x.device)
    tok_pad[expert, slot] = tok
    w_pad = weights.new_zeros(E, C)
    w_pad = w_pad.index_put((expert, slot), weights.reshape(-1)[pos])
    xs = torch.cat([x, x.new_zeros(1, D)])[tok_pad]  # [E, C, D]
    a = act.fn(_plus(torch.bmm(xs, w1), None if b1 is None else b1.unsqueeze(1)))
    if w3 is not None:
        a = a * _plus(torch.bmm(xs, w3), None if b3 is None else b3.unsqueeze(1))
    out = _plus(torch.bmm(a, w2), None if b2 is None else b2.unsqueeze(1))  # [E, C, D_out]
    out = out.to(weights.dtype) * w_pad.unsqueeze(-1)  # padding rows: weight 0, so no bias either
    y = out.new_zeros(T + 1, D_out).index_add(0, tok_pad.reshape(-1), out.reshape(-1, D_out))
    return y[:T]


# torch._grouped_mm: CPU, and CUDA with torch's per-group fallback, since torch 2.9 (pytorch#161717,
# #162059); before, bf16 on CUDA sm90 only.
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(x: Tensor, w1: Tensor | None = None, w2: Tensor | None = None) -> bool:
    """Whether torch._grouped_mm runs directly on these tensors: fp32, bf16 or fp16 on CPU and CUDA
    (torch >= 2.9), with row strides (d_model, expert_dim, output width) that are multiples of 16
    bytes. On CUDA only bf16 on sm90/sm100 takes torch's fused kernel; the other cases take its
    per-group fallback, which reads the group offsets on the host once per call (still one
    matmul per expert, unpadded). `grouped_dispatch` pads misaligned widths itself."""
    if not _grouped_mm_available(x):
        return False
    dims = [x.shape[-1]] + [w.shape[-1] for w in (w1, w2) if w is not None]
    return all(d * x.element_size() % 16 == 0 for d in dims)


def grouped_mm_fused(x: Tensor) -> bool:
    """Whether torch._grouped_mm takes its fused CUDA kernel for x (bf16 on compute capability 9.x
    or 10.x), which never reads the group offsets on the host; CPU grouped matmuls never wait for
    a device either."""
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 \
        and torch.cuda.get_device_capability(x.device)[0] in (9, 10)


def _grouped_mm_available(x: Tensor) -> bool:
    return hasattr(torch, "_grouped_mm") and x.device.type in ("cpu", "cuda") \
        and x.dtype in _GROUPED_DTYPES


def _meta_accepts(dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm's meta kernel (what torch.compile traces with) takes `dtype`:
    torch 2.13's takes bf16 only, although the eager kernels take fp32 and fp16 too."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.empty(4, 8, dtype=dtype, device="meta")
        torch._grouped_mm(a, torch.empty(2, 8, 8, dtype=dtype, device="meta"),
                          offs=torch.empty(2, dtype=torch.int32, device="meta"))
        return True
    except RuntimeError:
        return False


# Computed once at import: never evaluated while torch.compile traces.
_META_OK = {dtype: _meta_accepts(dtype) for dtype in _GROUPED_DTYPES}


@torch.library.custom_op("libmoe::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """torch._grouped_mm as an opaque op, so torch.compile can trace dtypes its meta kernel lacks."""
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:  # [N, K] x [G, K, M] -> [N, M]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # [K, N] x [N, M] -> [G, K, M]


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    ga = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    gb = _grouped_mm_op(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return ga, gb, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _pad_to(t: Tensor, dim: int, size: int) -> Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return torch.nn.functional.pad(t, pad)


def _grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """a [N, K] x b [G, K, M] by groups of rows ending at offs; rows past offs[-1] are undefined.
    Widths that are not multiples of 16 bytes are zero-padded (exact) and the output sliced."""
    align = 16 // a.element_size()
    K, M = b.shape[-2], b.shape[-1]
    Kp, Mp = -(-K // align) * align, -(-M // align) * align
    if (Kp, Mp) != (K, M):
        a, b = _pad_to(a, -1, Kp), _pad_to(_pad_to(b, -2, Kp), -1, Mp)
    if torch.compiler.is_compiling() and not _META_OK.get(a.dtype, False):
        y = _grouped_mm_op(a, b, offs)
    else:
        y = torch._grouped_mm(a, b, offs=offs)
    return y if Mp == M else y[:, :M]


def grouped_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """Tokens sorted by expert, one grouped matmul per projection; no host sync.

    All T*K rows go through the matmuls' fixed shapes; rows past the last expert's offset (the
    invalid assignments) are left undefined by torch._grouped_mm (uninitialised memory), so they
    are masked with torch.where: forward and backward are exact, as where's backward drops the
    masked rows where multiplying by 0 would keep a NaN. Masked: each matmul's input (its
    backward leaves the tail's input gradient undefined) and the last output; the hidden
    outputs only with biases, whose gradient would sum the tail (otherwise the tail's undefined
    hidden values reach nothing: the next input mask stops them, forward and backward)."""
    if not _grouped_mm_available(x):
        return loop_dispatch(x, order, weights, w1, w2, w3, act, b1, b2, b3)
    tok, pos, counts, expert = order
    E = w1.shape[0]
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    valid = (expert < E).unsqueeze(-1)
    if b1 is not None or b2 is not None or b3 is not None:
        row_expert = expert.clamp_max(E - 1)  # the invalid tail reads expert E-1's bias, then is masked

    def mm(a: Tensor, w: Tensor, b: Tensor | None, mask_out: bool) -> Tensor:
        y = _grouped_mm(a, w, offs)  # `a` is masked already
        if b is not None:
            y = y + b[row_expert]
        return torch.where(valid, y, 0.0) if mask_out or b is not None else y

    xs = torch.where(valid, x[tok], 0.0)  # once, also when gated (w1 and w3 share it)
    a = act.fn(mm(xs, w1, b1, False))
    if w3 is not None:
        a = a * mm(xs, w3, b3, False)
    a = torch.where(valid, a, 0.0)
    out = mm(a, w2, b2, True).to(weights.dtype) * weights.reshape(-1)[pos].unsqueeze(-1)
    return out.new_zeros(x.shape[0], w2.shape[-1]).index_add(0, tok, out)


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
    """Per-expert blocks with a hand-written backward. It computes in x's dtype throughout: under
    autocast its combine is in the autocast dtype, not fp32 (a CPU fp32 fast path)."""
    counts, n = _host_counts(order)
    tok, pos = order.tok[:n], order.pos[:n]
    y = _BlockedExperts.apply(x, weights.to(x.dtype), w1, w2, w3, b1, b2, b3, tok, pos, counts, act)
    return y.to(weights.dtype)


# The fused kernel's activation codes (csrc/experts_cpu.cpp); gated ones use w3 as well.
_KERNEL_ACTIVATIONS = {"relu": 0, "gelu": 1, "geglu": 1, "gelu_tanh": 2, "silu": 3, "swiglu": 3}


class _FusedExperts(torch.autograd.Function):
    """`_BlockedExperts`'s computation with the loop over experts in C++ (cpu_kernel.py)."""

    @staticmethod
    def forward(ctx, x, weights, w1, w2, w3, b1, b2, b3, tok, pos, counts, code, parallel, kernel):
        w = weights.reshape(-1)[pos]  # each row's weight, in expert order (saved: not gathered twice)
        y, h, g = kernel.forward(x, w, w1, w2, w3, b1, b2, b3, tok, counts, code, parallel,
                                 FUSED_BLOCK_ROWS)
        ctx.save_for_backward(x, w, w1, w2, w3, b1, b2, b3, tok, pos, counts, h, g)
        ctx.weights_shape, ctx.code, ctx.parallel, ctx.kernel = weights.shape, code, parallel, kernel
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, w1, w2, w3, b1, b2, b3, tok, pos, counts, h, g = ctx.saved_tensors
        gx, gw, gw1, gw2, gw3, gb1, gb2, gb3 = ctx.kernel.backward(
            gy, x, w, w1, w2, w3, b1, b2, b3, tok, counts, h, g, ctx.code, ctx.parallel,
            FUSED_BLOCK_ROWS)
        valid = pos[: gw.shape[0]]  # the kernel's rows: the valid ones, in expert order
        gweights = w.new_zeros(ctx.weights_shape).reshape(-1).index_put((valid,), gw)
        return (gx, gweights.view(ctx.weights_shape), gw1, gw2, gw3, gb1, gb2, gb3,
                None, None, None, None, None, None)


# Whether `fused` shares the experts out between the intra-op threads (each running
# single-threaded matmuls, with its own output accumulator) rather than looping over them on one
# thread with threaded matmuls: 1.19x against 1.32x dense at the paper-small shape on 2 cores.
FUSED_PARALLEL_EXPERTS = True
# Rows of one expert the kernel multiplies at a time (0: all of them), so that its buffers stay in
# the CPU's cache; weight gradients accumulate over an expert's blocks.
FUSED_BLOCK_ROWS = 1024


def fused_available(x: Tensor, act: Activation, *tensors: Tensor | None) -> bool:
    """Whether the fused kernel runs for x (and the other tensors) and act: CPU, float32/float64,
    plain tensors (a subclass, e.g. a collective's pending result under expert parallelism, has no
    storage the kernel can read), a built-in activation, and a kernel that could be built
    (cpu_kernel.py; it is built on the first call)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if any(type(t) not in (Tensor, torch.nn.Parameter) for t in (x, *tensors) if t is not None):
        return False
    if act.name not in _KERNEL_ACTIVATIONS:
        return False
    return fused_kernel() is not None


def fused_dispatch(x, order, weights, w1, w2, w3, act, b1=None, b2=None, b3=None):
    """`blocked`'s computation with its loop over experts in a compiled C++ kernel (no per-expert
    Python work, experts shared out between the CPU threads). Where the kernel does not run (no
    C++ compiler, a GPU tensor, bf16 under autocast, a custom activation) it is `blocked` itself."""
    if not fused_available(x, act, weights, w1, w2, w3, b1, b2, b3):
        return blocked_dispatch(x, order, weights, w1, w2, w3, act, b1, b2, b3)
    params = [t.contiguous() if t is not None else None for t in (w1, w2, w3, b1, b2, b3)]
    y = _FusedExperts.apply(x.contiguous(), weights.to(x.dtype), *params, order.tok, order.pos,
                            order.counts, _KERNEL_ACTIVATIONS[act.name], FUSED_PARALLEL_EXPERTS,
                            fused_kernel())
    return y.to(weights.dtype)


_BACKENDS: dict[str, Callable[..., Tensor]] = {
    "fused": fused_dispatch,
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
    """Pick the concrete backend for `auto` from device, dtype and the average load per expert.

    Under torch.compile always `grouped`: the others read counts on the host, which a graph
    cannot hold (blocked's Python loop over them cannot be traced)."""
    if name != "auto":
        return name
    if torch.compiler.is_compiling():
        return "grouped"
    if x.device.type == "cuda":
        # Sync-free only where torch's fused grouped kernel runs; elsewhere torch's fallback loops
        # over the experts reading the offsets on the host at every call (~9 per layer), against
        # padded's one read and three batched matmuls. `dispatch: grouped` still chooses it.
        return "grouped" if grouped_mm_supported(x, w1, w2) and grouped_mm_fused(x) else "padded"
    if x.dtype in (torch.float32, torch.float64) and fused_kernel() is not None:
        return "fused"  # the fastest at every CPU shape measured (benchmarks/dispatch_grid.py)
    if n_assignments / max(n_experts, 1) >= BLOCKED_MIN_LOAD:
        return "blocked"  # bf16/fp16, or no C++ compiler: blocked from this load on
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

    Under autocast the expert matmuls run in the autocast dtype (inputs and expert weights cast
    once here, autocast off inside, so that all backends agree), while the combine stays in fp32:
    the routing weights are not rounded, each expert output is weighted in fp32 and a token's K
    choices are summed in fp32 (`blocked` excepted, see blocked_dispatch). The result is returned
    in the autocast dtype, as before. `grouped` never reads data on the host (see ExpertOrder).
    """
    if ids.numel() == 0:
        # Nothing to route (an empty batch, or K = 0): a zero output still in the graph.
        D_out = w2.shape[-1]
        zero = x * 0.0 if D_out == x.shape[-1] else x[:, :1] * x.new_zeros(D_out)
        return zero + weights.sum().to(x.dtype) * 0.0
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            cast = [t.to(dtype) if t is not None else None for t in (x, w1, w2, w3, b1, b2, b3)]
            combine = torch.promote_types(weights.dtype, torch.float32)
            y = _dispatch(backend, cast[0], ids, weights.to(combine), *cast[1:4], act, *cast[4:])
            return y.to(dtype)
    return _dispatch(backend, x, ids, weights.to(x.dtype), w1, w2, w3, act, b1, b2, b3).to(x.dtype)


def _dispatch(backend, x, ids, weights, w1, w2, w3, act, b1, b2, b3) -> Tensor:
    order = sort_by_expert(ids, w1.shape[0])
    backend = resolve_backend(backend, x, ids.numel(), w1.shape[0], w1, w2)
    return _BACKENDS[backend](x, order, weights, w1, w2, w3, act, b1, b2, b3)
