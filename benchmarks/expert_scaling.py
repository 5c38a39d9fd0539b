"""How the MoE layer's cost against the dense FFN grows with the number of experts (CPU, fp32).

At fixed active FLOPs (top-k x expert width = 1024, d_model 512, T = 4096 tokens) the experts get
more and thinner: 8 x 512 top-2, 16 x 256 top-4, 66 x 128 top-8 (the paper-small layer), 256 x 32
top-32 (DeepSeek-V3's count). At each shape, forward + backward of:

* the dense ReLU and SwiGLU FFNs of the active width k*m (the baselines), and a dense ReLU FFN of
  width (k+2)*m for the two-shared-expert layout;
* `smoe` with the dispatch backends `fused`, `blocked`, `grouped` and `auto`;
* `smoe` with SwiGLU experts, `sharede_v2` (2 shared experts: against the (k+2)*m dense FFN),
  `moe_plus_plus` (null slots) and `tc_moe` (negated slots), all with `auto`.

Cases of one shape run interleaved (benchmarks/moe_layer.py's timing), medians of `--repeats`; each
row gives its ratio to its dense baseline, the peak memory of one forward + backward and the
activations saved for backward. The issue's targets (README): smoe `auto` within 1.15x of dense
for E <= 16, 1.3x at E = 66 and 2.0x at E = 256; the other layouts no slower relative to their
dense baseline than smoe.

    python benchmarks/expert_scaling.py                    # all four shapes, all cores (~6 min)
    python benchmarks/expert_scaling.py --shapes 66x128x8 --repeats 9
    python benchmarks/expert_scaling.py --quick            # T=512 smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for moe_layer
from moe_layer import Case, DenseFFN, markdown, prepare, run_interleaved  # noqa: E402

SHAPES = ["8x512x2", "16x256x4", "66x128x8", "256x32x32"]  # experts x width x top-k
TARGETS = {8: 1.15, 16: 1.15, 66: 1.3, 256: 2.0}  # smoe auto vs dense (issue 23)
N_SHARED = 2  # sharede_v2's default


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        e, m, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not EXPERTSxWIDTHxTOPK, e.g. 66x128x8") from None
    if not (0 < k <= e and m > 0):
        raise argparse.ArgumentTypeError(f"shape {text!r}: need 0 < top-k <= experts and width > 0")
    return e, m, k


def shape_cases(d: int, e: int, m: int, k: int) -> list[Case]:
    from libmoe.moe import build_moe, set_training_progress

    def moe(algorithm: str, dispatch: str, activation: str = "relu"):
        def build():
            layer = build_moe(algorithm, d, e, m, k, dispatch=dispatch, activation=activation)
            set_training_progress(layer, 1.0)
            return layer
        return build

    shared = f"relu, {N_SHARED} shared"
    cases = [
        Case("dense FFN relu", "relu", lambda: DenseFFN(d, k * m, "relu"), baseline=True),
        Case("dense FFN swiglu", "swiglu", lambda: DenseFFN(d, k * m, "swiglu"), baseline=True),
        Case(f"dense FFN relu, width (k+{N_SHARED})m", shared,
             lambda: DenseFFN(d, (k + N_SHARED) * m, "relu"), baseline=True),
    ]
    for backend in ("fused", "blocked", "grouped", "auto"):
        cases.append(Case(f"smoe dispatch={backend}", "relu", moe("smoe", backend)))
    cases += [
        Case("smoe swiglu auto", "swiglu", moe("smoe", "auto", "swiglu")),
        Case("sharede_v2 auto", shared, moe("sharede_v2", "auto")),
        Case("moe_plus_plus auto", "relu", moe("moe_plus_plus", "auto")),
        Case("tc_moe auto", "relu", moe("tc_moe", "auto")),
    ]
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")],
                   default=[parse_shape(v) for v in SHAPES],
                   help=f"comma-separated EXPERTSxWIDTHxTOPK (default {','.join(SHAPES)})")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: T=512, 2 repeats")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="keep glibc's default malloc (libmoe train tunes it on the CPU)")
    p.add_argument("--json", default=None, help="also write every row here")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.warmup = 512, 2, 1
    args.seed = 0
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if args.malloc_tuning:
        from libmoe.devices import tune_cpu_allocator

        args.malloc_tuning = tune_cpu_allocator()
    seq = min(1024, args.tokens)
    print(f"# expert scaling: T={args.tokens}, d={args.d_model}, fp32, {threads} threads, median of "
          f"{args.repeats}; torch {torch.__version__}; malloc tuned {args.malloc_tuning}", flush=True)

    from libmoe.moe.cpu_kernel import fused_kernel, kernel_status

    fused_kernel()
    print(f"# fused kernel: {kernel_status()}", flush=True)
    results, summary = [], []
    for e, m, k in args.shapes:
        torch.manual_seed(0)
        x = torch.randn(args.tokens // seq, seq, args.d_model, requires_grad=True)
        g = torch.randn(x.shape)
        cases = shape_cases(args.d_model, e, m, k)
        print(f"\n## {e} experts x {m}, top-{k}", flush=True)
        prepared = [prepare(case, x, g, args) for case in cases]
        run_interleaved(prepared, args)
        rows = [row for row, _ in prepared]
        dense = {r.activation: r.ms for c, r in zip(cases, rows, strict=True)
                 if c.baseline and r.error is None}
        for r in rows:
            if r.error is None and dense.get(r.activation):
                r.ratio = r.ms / dense[r.activation]
        print(markdown(rows), flush=True)
        auto = next(r for r in rows if r.case == "smoe dispatch=auto")
        target = TARGETS.get(e)
        summary.append((e, m, k, auto.ratio, target))
        results.append({"experts": e, "width": m, "top_k": k, "rows": [vars(r) for r in rows]})

    print("\n| E x m, top-k | smoe auto vs dense | target |\n|---|---|---|")
    for e, m, k, ratio, target in summary:
        shown = f"{ratio:.2f}x" if ratio is not None else "error"
        print(f"| {e} x {m}, {k} | {shown} | {f'<= {target}x' if target else ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "tokens": args.tokens, "d_model": args.d_model, "threads": threads,
            "malloc_tuned": args.malloc_tuning,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "kernel": kernel_status(), "shapes": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
