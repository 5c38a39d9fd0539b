"""Forward+backward speed of one MoE layer against a compute-matched dense FFN (CPU, fp32).

Cases, all at the same shape (default: the paper-small layer, T=4096 tokens, d=512, 66 experts of
width 128, top-8):

* dense FFN with the MoE's active FLOPs, d -> K*M -> d: ReLU, and SwiGLU (w1, w3: d -> K*M; w2);
* Hugging Face transformers' `OlmoeSparseMoeBlock` (SwiGLU experts) with the experts implementation
  "eager" (per-expert Python loop) and "grouped_mm" (see benchmarks/_hf_olmoe.py);
* libmoe: `smoe` with every dispatch backend, every algorithm in `ALGORITHMS` with dispatch="auto"
  (ReLU experts), and `smoe` with SwiGLU experts.

Every case is built first; then the cases run round-robin, `--warmup` untimed rounds and
`--repeats` timed ones, so that slow drifts of a shared machine hit all cases alike, and each case
reports its median with its ratio to the dense FFN of the same activation. One iteration is forward
plus backward of `(out * g).sum() + aux_loss` with a fixed random `g` (the input requires grad too,
as inside a model); gradients are cleared (set to None) before each iteration, outside the timing.

    python benchmarks/moe_layer.py                     # paper-small shape, all cores
    python benchmarks/moe_layer.py --threads 1 --json moe_layer_1t.json
    python benchmarks/moe_layer.py --quick             # T=512 smoke run
    python benchmarks/moe_layer.py --filter 'dense|olmoe'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _hf_olmoe
import _hf_olmoe  # noqa: E402

# --------------------------------------------------------------------------- the dense baseline


class DenseFFN(nn.Module):
    """Bias-free FFN of width `hidden`: relu -> w2(relu(w1 x)); swiglu -> w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int, activation: str):
        super().__init__()
        if activation not in ("relu", "swiglu"):
            raise ValueError(f"activation must be relu or swiglu, got {activation!r}")
        self.activation = activation
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.relu(self.w1(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------- libmoe


# --------------------------------------------------------------------------- cases and timing


@dataclass
class Case:
    name: str
    activation: str  # "relu" | "swiglu": which dense FFN it is compared with
    build: Callable[[], nn.Module]
    describe: Callable[[nn.Module, torch.Tensor], str] | None = None  # note from the module
    error: str | None = None  # set when the case cannot even be listed (missing dependency)
    baseline: bool = False  # the dense FFN the other cases of this activation are compared with


@dataclass
class Row:
    case: str
    activation: str
    ms: float | None = None
    ratio: float | None = None
    note: str = ""
    error: str | None = None
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float | None = None  # CPU memory allocated at the peak of one forward + backward
    saved_mb: float | None = None  # activations autograd keeps for backward (parameters excluded)


def make_cases(args) -> list[Case]:
    d, e, m, k = args.d_model, args.experts, args.expert_dim, args.top_k
    cases = [
        Case("dense FFN relu", "relu", lambda: DenseFFN(d, k * m, "relu"), baseline=True),
        Case("dense FFN swiglu", "swiglu", lambda: DenseFFN(d, k * m, "swiglu"), baseline=True),
    ]

    for impl in _hf_olmoe.IMPLEMENTATIONS:
        name = f"transformers OLMoE {impl}"
        if not _hf_olmoe.available():
            err = f"transformers missing: pip install libmoe[bench] ({_hf_olmoe.IMPORT_ERROR})"
            cases.append(Case(name, "swiglu", lambda: None, error=err))
        else:
            cases.append(
                Case(
                    name,
                    "swiglu",
                    lambda impl=impl: _hf_olmoe.build_olmoe_block(d, e, m, k, impl),
                    describe=_hf_olmoe.implementation_report,
                )
            )

    from libmoe.moe import ALGORITHMS, DISPATCH_BACKENDS, build_moe, set_training_progress

    def build_libmoe(algorithm, activation, dispatch):
        layer = build_moe(algorithm, d, e, m, k, dispatch=dispatch, activation=activation)
        set_training_progress(layer, 1.0)  # Hyper-R at its final k (= top_k), like the others
        return layer

    def libmoe_case(name, activation, algorithm, dispatch):
        return Case(name, activation, lambda: build_libmoe(algorithm, activation, dispatch))

    for backend in DISPATCH_BACKENDS[1:]:  # every concrete backend, "auto" excluded
        cases.append(libmoe_case(f"libmoe smoe dispatch={backend}", "relu", "smoe", backend))
    for algorithm in ALGORITHMS:
        cases.append(libmoe_case(f"libmoe {algorithm} dispatch=auto", "relu", algorithm, "auto"))
    cases.append(libmoe_case("libmoe smoe swiglu dispatch=auto", "swiglu", "smoe", "auto"))
    return cases


def objective(out, g: torch.Tensor) -> torch.Tensor:
    """`(y * g).sum() (+ aux_loss)` for a plain tensor or a libmoe `MoEOutput`."""
    if isinstance(out, torch.Tensor):
        return (out * g).sum()
    return (out.output * g).sum() + out.aux_loss


def prepare(case: Case, x: torch.Tensor, g: torch.Tensor, args) -> tuple[Row, Callable | None]:
    """Build the case's module; return its row and a function running one timed iteration."""
    row = Row(case.name, case.activation, error=case.error)
    if case.error is not None:
        return row, None
    try:
        torch.manual_seed(args.seed + 1)
        module = case.build()
        if case.describe is not None:
            row.note = case.describe(module, x.detach())
    except Exception as exc:  # one broken case must not stop the others
        row.error = f"{type(exc).__name__}: {exc}"
        return row, None

    def iteration() -> float:
        module.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        objective(module(x), g).backward()
        return (time.perf_counter() - start) * 1e3

    if args.memory:
        try:
            row.peak_mb = peak_memory_mb(iteration)
            module.zero_grad(set_to_none=True)
            row.saved_mb = saved_activations_mb(lambda: module(x))
        except Exception as exc:
            row.error = f"memory: {type(exc).__name__}: {exc}"
    return row, iteration


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak CPU memory allocated while `fn()` runs (above what was allocated before it), from the
    profiler's allocation events: activations, saved tensors, gradients and temporaries."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def saved_activations_mb(forward: Callable[[], object]) -> float:
    """MB of the distinct tensors autograd keeps for backward during `forward()` (parameters
    excluded, the layer input included: every case saves it)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values()) / 2**20


def run_interleaved(prepared: list[tuple[Row, Callable | None]], args) -> None:
    """Round-robin over the cases (`warmup` + `repeats` rounds) so that slow drifts of the machine
    hit every case alike; each row gets its median."""
    for r in range(args.warmup + args.repeats):
        for row, iteration in prepared:
            if iteration is None or row.error is not None:
                continue
            try:
                ms = iteration()
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                continue
            if r >= args.warmup:
                row.times_ms.append(ms)
        print(f"  round {r + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
    for row, _ in prepared:
        if row.error is None and row.times_ms:
            row.ms = statistics.median(row.times_ms)


# --------------------------------------------------------------------------- output


def one_line(text: str, width: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


def markdown(rows: list[Row]) -> str:
    lines = ["| case | act | ms (median) | vs dense | peak MB | saved MB | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.case} | {r.activation} | error | | | | {one_line(r.error)} |")
            continue
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        mem = " | ".join(f"{v:.0f}" if v is not None else "" for v in (r.peak_mb, r.saved_mb))
        lines.append(f"| {r.case} | {r.activation} | {r.ms:.1f} | {ratio} | {mem} | {one_line(r.note)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per batch (default 4096)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--experts", type=int, default=66)
    p.add_argument("--expert-dim", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="smoke run: T=512")
    p.add_argument("--repeats", type=int, default=11, help="timed iterations, median reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filter", default=None, help="regex: run only the cases whose name matches")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak / saved memory measurement (one untimed iteration per case)")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="keep glibc's default malloc (libmoe train tunes it on the CPU: devices.py)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens = 512
    args.seq_len = min(args.seq_len, args.tokens)
    if args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} is not a multiple of --seq-len {args.seq_len}")
    if args.threads is None:
        args.threads = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc_tuning:
        from libmoe.devices import tune_cpu_allocator

        args.malloc_tuning = tune_cpu_allocator()
    torch.manual_seed(args.seed)
    shape = (args.tokens // args.seq_len, args.seq_len, args.d_model)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)

    config = {
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "d_model": args.d_model,
        "experts": args.experts,
        "expert_dim": args.expert_dim,
        "top_k": args.top_k,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "malloc_tuned": args.malloc_tuning,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": _hf_olmoe.version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    print(
        f"# MoE layer fwd+bwd: T={args.tokens} (x {list(shape)}), d={args.d_model}, "
        f"E={args.experts}, M={args.expert_dim}, K={args.top_k}, fp32, "
        f"threads={config['threads']}, median of {args.repeats}; torch {torch.__version__}, "
        f"transformers {config['transformers']}; malloc tuned {args.malloc_tuning}; "
        f"load average {config['loadavg_1min']}"
    )

    cases = make_cases(args)
    if args.filter:
        cases = [c for c in cases if re.search(args.filter, c.name)]
    prepared = [prepare(case, x, g, args) for case in cases]
    run_interleaved(prepared, args)
    rows = [row for row, _ in prepared]

    dense = {r.activation: r.ms for c, r in zip(cases, rows, strict=True) if c.baseline and r.error is None}
    for r in rows:
        if r.error is None and dense.get(r.activation):
            r.ratio = r.ms / dense[r.activation]

    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": config, "rows": [vars(r) for r in rows]}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
