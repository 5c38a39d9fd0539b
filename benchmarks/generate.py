"""Generation speed with and without the KV cache: tokens/s of 256 new tokens from a cpu-tiny model
(random weights, greedy, no EOS so every case writes all its tokens).

Cases: libmoe's own `libmoe.models.generation.generate` (what `libmoe generate` and the evaluator's
generate_until run) and transformers' `generate` on the same weights as `LibMoEForCausalLM`, each
with the cache and without it (every step re-reads the whole sequence). The model's window is
raised to --max-seq-len (default 512; cpu-tiny trains at 128) so that prompt and new tokens fit:
past the window every path slides without a cache. The cases run round-robin, `--repeats` timed
rounds after one untimed, and each reports its median tokens/s with the spread (min-max) and the
speed-up of the cache; the cached and cache-free outputs are checked to be identical.

    python benchmarks/generate.py                       # cpu-tiny smoe, batch 1, all cores
    python benchmarks/generate.py --batch 8 --algorithm sharede_v3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from libmoe.devices import tune_cpu_allocator
from libmoe.models import build_model
from libmoe.models.generation import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--algorithm", default="smoe")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-hf", action="store_true", help="leave out transformers' generate")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.prompt_tokens + args.new_tokens > args.max_seq_len:
        p.error(f"--prompt-tokens + --new-tokens must fit --max-seq-len={args.max_seq_len}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    model = build_model(args.preset, args.algorithm, max_seq_len=args.max_seq_len).eval()
    prompts = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_tokens),
                            generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    cases = {
        "libmoe generate, cache": lambda: generate(model, prompts.tolist(), n),
        "libmoe generate, no cache": lambda: generate(model, prompts.tolist(), n, use_cache=False),
    }
    if not args.no_hf:
        from libmoe.models.hf import to_hf

        hf = to_hf(model).eval()

        def hf_generate(use_cache: bool):
            out = hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              use_cache=use_cache, attention_mask=torch.ones_like(prompts))
            return out[:, args.prompt_tokens:].tolist()

        cases["transformers generate, cache"] = lambda: hf_generate(True)
        cases["transformers generate, no cache"] = lambda: hf_generate(False)
    times: dict[str, list[float]] = {name: [] for name in cases}
    outputs: dict[str, list] = {}
    for round_ in range(args.repeats + 1):
        for name, run in cases.items():
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = run()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
        print(f"round {round_}/{args.repeats} done", file=sys.stderr, flush=True)
    reference = outputs["libmoe generate, no cache"]
    for name, out in outputs.items():
        if out != reference:
            print(f"MISMATCH: {name} generated other tokens than the cache-free libmoe loop", file=sys.stderr)
            return 1
    tokens = n * args.batch
    rows = []
    for name, ts in times.items():
        rates = sorted(tokens / t for t in ts)
        rows.append({"case": name, "tokens_per_s": statistics.median(rates), "min": rates[0],
                     "max": rates[-1]})
    by_name = {r["case"]: r for r in rows}
    print(f"{args.preset} {args.algorithm}, batch {args.batch}, prompt {args.prompt_tokens} + {n} new "
          f"tokens, {torch.get_num_threads()} threads, {args.repeats} rounds (median, min-max)")
    for row in rows:
        base = row["case"].rsplit(",", 1)[0]
        speedup = ""
        if row["case"].endswith(", cache"):
            ratio = row["tokens_per_s"] / by_name[base + ", no cache"]["tokens_per_s"]
            speedup = f"  {ratio:.1f}x the cache-free"
        print(f"  {row['case']:<34} {row['tokens_per_s']:8.0f} tokens/s  ({row['min']:.0f}-{row['max']:.0f})"
              f"{speedup}")
    print("  outputs: identical with and without the cache")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": platform.processor(),
                                               "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
