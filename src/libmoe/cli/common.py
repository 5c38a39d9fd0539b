"""What several commands share: the --plugin option, how a command takes overrides, list parsing,
--val-tokens, and the stderr log."""

from __future__ import annotations

import argparse
import sys

OVERRIDES = "overrides"
"""A command whose `items` are section.key=value overrides (checked before the command starts)."""
CONFIG_AND_OVERRIDES = "config-and-overrides"
"""A command whose `items` are one CONFIG.yaml and section.key=value overrides."""


def takes_overrides(parser: argparse.ArgumentParser, config_file: bool = False) -> None:
    """Mark a command whose positional `items` take overrides: main() then lets key=value
    arguments follow options, and checks each override before the command starts."""
    parser.set_defaults(items_are=CONFIG_AND_OVERRIDES if config_file else OVERRIDES)


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """--plugin MODULE (repeatable), on every command that names or loads an MoE algorithm."""
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: a plugin that registers MoE algorithms "
                        "(repeatable; the processes this command starts import it too; "
                        "docs/plugins.md)")


def split_list(text: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def val_tokens(text: str) -> int | str:
    """--val-tokens: 'run', 'all' or a count (checked by the library: a count must be positive)."""
    text = text.strip()
    return int(text) if text.lstrip("+-").isdigit() else text


def log(msg: str) -> None:
    """Progress and notes go to stderr; stdout carries the command's result."""
    print(msg, file=sys.stderr, flush=True)
