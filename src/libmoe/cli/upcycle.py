"""`libmoe upcycle`: turn a dense model into an MoE (sparse upcycling)."""

from __future__ import annotations

import argparse

from ..overrides import parse_value
from ..upcycle import upcycle_checkpoint
from .common import add_plugin_option


def add_parser(sub) -> None:
    p = sub.add_parser(
        "upcycle", help="turn a dense model into an MoE (sparse upcycling)",
        description="Sparse upcycling: every FFN (or those of --layers) of a dense libmoe run or "
        "checkpoint becomes an MoE layer of --algorithm whose experts are exact copies of it, with "
        "fresh routers N(0, --router-init-std) from --seed. Writes a model directory that "
        "`libmoe train --init`, `libmoe eval` and `libmoe analyze` accept.",
    )
    p.add_argument("src", help="a dense libmoe run or checkpoint directory, or a transformers causal "
                   "LM (local directory or Hub name: Llama, Mistral, Qwen2, Qwen3, Phi-3)")
    p.add_argument("--algorithm", required=True, help="routing algorithm (libmoe algorithms)")
    p.add_argument("--n-experts", type=int, required=True, help="experts per MoE layer (shared-expert "
                   "algorithms: E-1 routed copies + the dense FFN as 1 shared expert)")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (shared included)")
    p.add_argument("--layers", default=None, help="comma-separated block indices (default: all)")
    p.add_argument("--seed", type=int, default=42, help="seed of the routers' init (default 42)")
    p.add_argument("--router-init-std", type=float, default=0.02)
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="relative std of noise added to each expert copy (default 0: exact copies)")
    p.add_argument("--reinit-fraction", type=float, default=0.0,
                   help="share of each expert's hidden units re-drawn (Drop-Upcycling; default 0)")
    p.add_argument("--shared-only", action="store_true", help="SharedE-Upcyc: only the shared "
                   "experts of a sharede_v2/v3 model start from the dense FFN, the rest is random")
    p.add_argument("--expert-dim", type=int, default=None, help="expert width for --shared-only")
    p.add_argument("--n-shared", type=int, default=None, help="shared experts for --shared-only")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an MoE option of the new layers, e.g. balance_coef=0.01 (repeatable)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--overwrite", action="store_true")
    add_plugin_option(p)
    p.set_defaults(func=run)


def parse_layers(text: str | None) -> list[int] | None:
    """--layers 0,2 -> [0, 2]; None: all."""
    if not text:
        return None
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not parts or not all(x.isdigit() for x in parts):
        raise ValueError(f"--layers {text!r}: give comma-separated block indices, e.g. 0,2.")
    return [int(x) for x in parts]


def parse_options(items: list[str]) -> dict:
    """--option KEY=VALUE ... -> {KEY: value}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r}: give KEY=VALUE, e.g. balance_coef=0.01.")
        options[key.strip()] = parse_value(value)
    return options


def run(args: argparse.Namespace) -> None:
    layers = parse_layers(args.layers)
    options = parse_options(args.option)
    info = upcycle_checkpoint(args.src, args.out, args.algorithm, args.n_experts, args.top_k, layers,
                              args.seed, args.router_init_std, args.noise_std, args.reinit_fraction,
                              args.shared_only, args.expert_dim, args.n_shared, args.overwrite, **options)
    exact = "exact" if info["exact_at_init"] else "not exact by construction"
    print(f"upcycled {info['source']} -> {args.out}: {args.algorithm}, {args.n_experts} experts, "
          f"top-{args.top_k}; largest logit difference from the source {info['max_abs_logit_diff']:.2e} "
          f"({exact})")
    if "why_not_exact" in info:
        print(f"  {args.algorithm}: {info['why_not_exact']}")
    if "source_architecture" in info:  # a transformers source
        print(f"load it with AutoModelForCausalLM.from_pretrained({args.out!r}) after `import libmoe`; "
              "libmoe eval and libmoe analyze --tasks accept it")
    print(f"continue training with: libmoe train --init {args.out} --out RUN")
