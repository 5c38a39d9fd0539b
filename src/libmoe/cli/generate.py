"""`libmoe generate RUN --prompt TEXT`: what a trained model writes after a plain prompt (no chat
template), greedily or by sampling, with the KV cache of libmoe.models.generation."""

from __future__ import annotations

import argparse
import sys
import time

from ..devices import check_device
from ..models import check_sampling, generate, load_model


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue a plain text prompt with a trained model",
        description="Continue each --prompt with the model of a run (its newest checkpoint), a "
        "checkpoint or a model directory: greedy decoding by default, --sample to draw (with "
        "--temperature, --top-k, --top-p, --seed). Generation stops at --max-new-tokens or the "
        "end-of-text token. Prints the prompt and its continuation; tokens/s on stderr. Several "
        "prompts are decoded as one left-padded batch.",
    )
    p.add_argument("model", help="a libmoe run, checkpoint or model directory (or a transformers "
                   "model directory libmoe trains, e.g. from libmoe upcycle)")
    p.add_argument("--prompt", action="append", required=True,
                   help="the text to continue (repeat for several prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature when sampling")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens holding this probability mass")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws when sampling (default 0)")
    p.add_argument("--no-cache", action="store_true",
                   help="re-read the whole sequence every step (the cache-free reference)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    check_sampling(args.sample, args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    check_device(args.device)
    loaded = load_model(args.model, device=args.device)
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(text) or [tokenizer.eos_id] for text in args.prompt]
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else None
    start = time.perf_counter()
    outputs = generate(loaded.model, prompts, args.max_new_tokens, do_sample=args.sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, eos_id=eos, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    for i, (text, new) in enumerate(zip(args.prompt, outputs)):
        if i:
            print()
        print(text + tokenizer.decode(new), flush=True)
    n = sum(len(new) for new in outputs)
    mode = "sampled" if args.sample else "greedy"
    print(f"libmoe generate: {n} new tokens ({mode}) in {seconds:.2f} s, {n / max(seconds, 1e-9):.0f} "
          f"tokens/s, {loaded.checkpoint}", file=sys.stderr)
