"""Tokenise-and-pack speed of `prepare_data` for several `data.num_proc` (tokens/s, wall clock).

The tokenizer is trained once (cached); then each timed build packs the whole corpus again into a
fresh cache directory with that tokenizer, so a timing covers reading the corpus, splitting it,
tokenising every document and writing the shards, but not training the tokenizer. The counts
run round-robin (`--rounds` of each), so a slow drift of a shared machine hits every count alike;
each reports the median and the range over rounds. The packed bytes are the same for any count
(tests/data/test_parallel_tokenize.py).

    python benchmarks/tokenize_speed.py                      # ../shared/data/corpus, num_proc 1 and 2
    python benchmarks/tokenize_speed.py --num-proc 1 2 4 --rounds 5 --json tok.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from libmoe.data.packed import prepare_data

SHARED_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(SHARED_CORPUS), help="corpus (default: the shared one)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_data(args.source, vocab_size=args.vocab_size, cache_dir=Path(tmp) / "train",
                            log=quiet, num_proc=1)
        tokenizer = str(base.tokenizer_dir)
        tokens = int(base.meta["n_train_tokens"]) + int(base.meta["n_val_tokens"])
        times: dict[int, list[float]] = {n: [] for n in args.num_proc}
        for r in range(args.rounds):
            for n in args.num_proc:
                start = time.perf_counter()
                prepare_data(args.source, tokenizer=tokenizer, cache_dir=Path(tmp) / f"r{r}n{n}",
                             log=quiet, num_proc=n)
                times[n].append(time.perf_counter() - start)
                print(f"round {r + 1}/{args.rounds}: num_proc={n} {times[n][-1]:.2f} s", flush=True)
    rows = {}
    for n, ts in times.items():
        rate = [tokens / t for t in ts]
        rows[n] = {"median_s": statistics.median(ts), "tokens_per_s": statistics.median(rate),
                   "min_tokens_per_s": min(rate), "max_tokens_per_s": max(rate)}
    print(f"\n{tokens:,} tokens, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print("| num_proc | median s | tokens/s (median, range) | vs 1 |")
    print("|---|---|---|---|")
    first = rows[args.num_proc[0]]["tokens_per_s"]
    for n, row in rows.items():
        print(f"| {n} | {row['median_s']:.2f} | {row['tokens_per_s'] / 1e6:.2f}M "
              f"({row['min_tokens_per_s'] / 1e6:.2f}–{row['max_tokens_per_s'] / 1e6:.2f}M) | "
              f"{row['tokens_per_s'] / first:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
