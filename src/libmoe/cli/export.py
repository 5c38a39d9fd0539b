"""`libmoe export`: a model directory transformers' AutoModelForCausalLM loads (--to libmoe), or an
upcycled model converted to transformers' own MoE architecture (--to mixtral, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models import find_tokenizer, load_model, save_model_dir
from ..upcycle.export import export_model
from .common import add_plugin_option


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model as a directory transformers' AutoModelForCausalLM loads",
        description="--to libmoe (default): export a libmoe run or checkpoint as a model directory "
        "(model.safetensors, config.yaml, tokenizer/ and transformers' config.json) that "
        "AutoModelForCausalLM loads as LibMoEForCausalLM after `import libmoe`. --to mixtral, "
        "qwen2_moe, qwen3_moe or olmoe: convert an upcycled transformers model (smoe, sharede_v2) "
        "to transformers' own architecture where the mathematics match, checked by identical "
        "logits (<= 1e-4) before writing; anything else is refused with the reason. See "
        "docs/upcycling.md, Export.",
    )
    p.add_argument("model", help="a libmoe run or checkpoint directory, or an upcycled transformers "
                   "model directory (libmoe upcycle --out) or a run or checkpoint training one")
    p.add_argument("--to", default="libmoe",
                   choices=["libmoe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"],
                   help="target architecture (libmoe: LibMoEForCausalLM; the others: transformers' "
                   "MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_plugin_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.to != "libmoe":
        export_native(args)
    else:
        export_libmoe(args)


def export_native(args: argparse.Namespace) -> None:
    """An upcycled model as transformers' own MoE architecture (refused where the mathematics differ)."""
    info = export_model(args.model, args.to, args.out, overwrite=args.overwrite)
    experts = f"{info['n_experts']} experts"
    if info["shared_expert_width"]:
        experts = f"{info['n_experts']} routed experts + a shared expert"
    print(f"exported {info['source']} -> {args.out} as {info['target_architecture']}: "
          f"{info['algorithm']}, {experts}, top-{info['top_k']}; largest logit difference from "
          f"the source {info['max_abs_logit_diff']:.2e} (tolerance {info['tolerance']:g})")
    print(f"plain transformers.AutoModelForCausalLM.from_pretrained({args.out!r}) loads it, "
          "without libmoe")


def export_libmoe(args: argparse.Namespace) -> None:
    """A libmoe run or checkpoint as a model directory (LibMoEForCausalLM)."""
    if (Path(args.out) / "config.yaml").is_file() and not args.overwrite:  # before loading anything
        raise ValueError(f"{args.out!r} already holds a model; pass --overwrite or a new --out.")
    loaded = load_model(args.model)
    if not loaded.config:
        raise ValueError(f"{args.model} is already a transformers model directory.")
    save_model_dir(args.out, loaded.model, loaded.config, find_tokenizer(loaded.checkpoint))
    readers = "libmoe eval/analyze/train --init read it"
    if (Path(args.out) / "config.json").is_file():
        auto = ("AutoTokenizer and " if (Path(args.out) / "tokenizer_config.json").is_file() else "")
        readers = (f"{auto}AutoModelForCausalLM.from_pretrained load it after `import libmoe`; "
                   f"{readers} too")
    print(f"exported {loaded.checkpoint} -> {args.out} ({readers})")
