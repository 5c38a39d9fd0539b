"""`libmoe train`: pretrain one model (one algorithm, one seed)."""

from __future__ import annotations

import argparse

from ..train import train
from .common import add_plugin_option, takes_overrides
from .run_config import run_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="pretrain a language model (one algorithm, one seed)",
        description="Pretrain an MoE (or dense) language model. Settings come from the preset, "
        "then CONFIG.yaml, then flags, then dotted overrides such as optim.lr=1e-3; the resolved "
        "config is written to OUT/config.yaml. Works under torchrun for data parallelism.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    p.add_argument("--preset", default=None, help="micro, cpu-tiny, paper-158m or paper-679m "
                   "(default: micro, or the CONFIG's preset)")
    p.add_argument("--algorithm", default=None, help="routing algorithm (libmoe algorithms)")
    p.add_argument("--data", default=None, help="embedded (default), a directory, a .txt or "
                   ".jsonl file, hf:NAME or slimpajama")
    p.add_argument("--out", default=None, help="run directory (default runs/PRESET-ALGORITHM)")
    p.add_argument("--max-steps", type=int, default=None, help="schedule length in steps")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step (>= 1) with a checkpoint, as if interrupted")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in --out (with its saved config)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changed optim/data/batch/schedule/seed settings and "
                   "record them with the step in OUT/config_changes.jsonl")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (all its files: checkpoints, traces, eval, "
                   "analysis), once the new config is checked")
    p.add_argument("--init", default=None, metavar="MODEL_DIR",
                   help="start from this model's weights and config (an upcycled model from "
                   "`libmoe upcycle`, a run or a checkpoint): the upcycling regime. A transformers "
                   "model (directory or Hub name) is trained as it is, with its own tokenizer")
    add_plugin_option(p)
    takes_overrides(p, config_file=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg, out = run_config(args, resume=args.resume)
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite,
                    stop_after=args.stop_after, init=args.init,
                    allow_config_change=args.allow_config_change)
    if summary.get("val_ppl") is not None and summary.get("rank", 0) == 0:
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f}, "
              f"val_ppl {summary['val_ppl']:.2f}, {summary['train_time_s']:.1f} s -> {out}")
