"""Training throughput (tokens/s) of a preset for the dense baseline and each algorithm (CPU, fp32).

One training step is exactly the trainer's: forward of the language model on a batch of real
tokens, cross-entropy plus every MoE layer's aux loss, backward, gradient clipping, AdamW step
(`libmoe.train.optim.build_optimizer`). Batches come from the packed data of `--data` (prepared
once and cached), the same windows for every model.

All models are built first; then they run round-robin, `--warmup` untimed rounds and `--rounds`
timed ones of `--steps` steps each, so that slow drifts of a shared machine hit every model alike.
Each model reports the median over rounds and its ratio to dense.

    python benchmarks/train_throughput.py                        # cpu-tiny, dense + the paper's 7
    python benchmarks/train_throughput.py --preset micro --rounds 2
    python benchmarks/train_throughput.py --threads 1 --json throughput_1t.json
    python benchmarks/train_throughput.py --fine-grained        # 64 experts of width 32, top-16

`--fine-grained` is the fine-grained variant of the preset: 4x the experts at 1/4 the width and
4x the top-k (cpu-tiny: 64 x 32, top-16 instead of 16 x 128, top-4), so the active FFN width and
the dense baseline stay the same. `--set KEY=VALUE` applies any run-config override to every model.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from libmoe.data.packed import SequenceSampler, prepare_data
from libmoe.devices import tune_cpu_allocator
from libmoe.models import MoETransformer, count_parameters
from libmoe.train import resolve_config
from libmoe.train.optim import build_optimizer

PAPER = ["dense", "smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe"]
SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--algorithms", default=",".join(PAPER))
    parser.add_argument("--data", default=str(SHARED_CORPUS) if SHARED_CORPUS.is_dir() else "embedded")
    parser.add_argument("--steps", type=int, default=3, help="steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--fine-grained", action="store_true",
                        help="4x the experts at 1/4 the width and 4x the top-k (same active width)")
    parser.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                        help="keep glibc's default malloc (libmoe train tunes it on the CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every model (repeatable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_tuning:  # as `libmoe train` does on the CPU (libmoe.devices)
        args.malloc_tuning = tune_cpu_allocator()

    algorithms = args.algorithms.split(",")
    overrides = list(args.set)
    if args.fine_grained:
        m = resolve_config(preset=args.preset, overrides=overrides).model
        overrides += [f"model.n_experts={4 * m.n_experts}", f"model.expert_dim={m.expert_dim // 4}",
                      f"model.top_k={4 * m.top_k}"]
    base = resolve_config(preset=args.preset, overrides=overrides)
    seq_len, batch_size = base.seq_len, base.train.batch_size
    data = prepare_data(args.data, vocab_size=base.model.vocab_size, seq_len=seq_len,
                        min_val_tokens=base.data.min_val_tokens)
    sampler = SequenceSampler(data.train, seq_len, seed=0)
    batches = [sampler.next_batch(batch_size) for _ in range(args.steps)]

    runs = {}
    for name in algorithms:
        cfg = resolve_config(preset=args.preset, overrides=[*overrides, f"model.algorithm={name}"])
        torch.manual_seed(0)
        model = MoETransformer(cfg.model)
        runs[name] = (model, build_optimizer(model, cfg), cfg.optim.grad_clip,
                      count_parameters(model))

    def run_steps(name: str) -> float:
        model, opt, clip, _ = runs[name]
        start = time.perf_counter()
        for batch in batches:
            out = model(batch[:, :-1], batch[:, 1:])
            (out.loss + out.aux_loss).backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return args.steps * batch_size * seq_len / (time.perf_counter() - start)

    times: dict[str, list[float]] = {name: [] for name in algorithms}
    for r in range(args.warmup + args.rounds):
        for name in algorithms:
            tps = run_steps(name)
            if r >= args.warmup:
                times[name].append(tps)
        print(f"round {r + 1}/{args.warmup + args.rounds} done", flush=True)

    median = {name: statistics.median(v) for name, v in times.items()}
    ref = median.get("dense")
    m = base.model
    print(f"\n{args.preset}: {m.n_experts} experts of width {m.expert_dim}, top-{m.top_k} "
          f"(dense FFN width {m.dense_width}); batch {batch_size} x {seq_len} tokens, "
          f"{torch.get_num_threads()} threads, malloc tuned {args.malloc_tuning}, median of "
          f"{args.rounds} rounds of {args.steps} steps")
    print("| algorithm | params (total / active) | tokens/s | MoE / dense time |\n|---|---|---|---|")
    rows = []
    for name in algorithms:
        total, active = runs[name][3]
        ratio = ref / median[name] if ref else float("nan")
        print(f"| {name} | {total / 1e6:.2f}M / {active / 1e6:.2f}M | {median[name]:,.0f} | "
              f"{ratio:.2f}x |")
        rows.append({"algorithm": name, "tokens_per_s": median[name], "all": times[name],
                     "time_ratio_vs_dense": ratio, "params_total": total, "params_active": active})
    if args.json:
        Path(args.json).write_text(json.dumps({
            "preset": args.preset, "overrides": overrides, "malloc_tuned": args.malloc_tuning,
            "threads": torch.get_num_threads(), "rows": rows,
            "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        }, indent=2))


if __name__ == "__main__":
    main()
