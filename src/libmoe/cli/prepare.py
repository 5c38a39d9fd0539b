"""`libmoe prepare`: build a run's packed, cached data (and tokenizer) without training."""

from __future__ import annotations

import argparse

from ..models import prepare_run_data
from ..train import check_config
from .common import add_plugin_option, takes_overrides
from .run_config import run_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenise and cache a run's data without training",
        description="Build the packed, cached data (and tokenizer) that `libmoe train` with the "
        "same arguments would use; run it before a multi-process job on a large stream.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    p.add_argument("--preset", default=None)
    p.add_argument("--algorithm", default=None)
    p.add_argument("--data", default=None)
    add_plugin_option(p)
    takes_overrides(p, config_file=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg, _ = run_config(args)
    check_config(cfg)  # a config that cannot train is refused before its data are built
    data = prepare_run_data(cfg)
    m = data.meta
    print(f"{data.directory}: {m['n_train_tokens']:,} training tokens in {m['n_train_shards']} "
          f"shard(s), {m['n_val_tokens']:,} validation tokens, {m['vocab_size']} pieces, "
          f"domains: {', '.join(m['domains'])}")
