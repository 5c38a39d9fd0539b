"""Command-line entry point: `libmoe <command>`. Thin: parses arguments, calls library functions,
maps their errors to the exit codes of libmoe.errors (one line on stderr, never a traceback).

One module per command (or family): `add_parser(sub)` declares its arguments, `run(args)` calls the
library. build_parser() assembles them; main() is the one place errors become exit codes. Every
command module is imported here at the top: none imports transformers, matplotlib or a harness
at its top, so `libmoe --help` stays as fast as importing libmoe itself.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, WorkFailed
from ..moe import REGISTRY, load_plugins
from ..overrides import parse_override
from ..version import __version__
from . import analyze, bench, eval_table, evaluate, export, findings, generate, prepare, train, upcycle, vlm
from .common import OVERRIDES, add_plugin_option

DESCRIPTION = """\
libmoe: a research library for sparse Mixture-of-Experts language models. Every routing algorithm
of the LibMoE paper behind one layer, trained, evaluated and analysed under one identical budget.

compare algorithms:
  bench             the paper's fair comparison: train every algorithm, evaluate, analyse, tables
  findings          check the paper's claims on a bench output
  algorithms        list the registered MoE algorithms
train and evaluate one model:
  train             pretrain a language model (one algorithm, one seed); --resume continues it
  prepare           tokenise and cache a run's data ahead of (multi-process) training
  eval              zero-shot tasks and validation perplexity of a trained model
  eval-table        the comparison table (scores, AVG, AVG rank) of several models
  generate          continue a text prompt with a trained model (greedy or sampled)
look inside the routing:
  analyze           routing analysis of a run: metrics, figures, report.html
  analyze init-std  the router initialisation study
reuse models:
  upcycle           turn a dense model into an MoE (sparse upcycling)
  export            write a directory that transformers' AutoModelForCausalLM loads
vision-language models:
  vlm               LLaVA-style sparse upcycling: train stages, evaluate, synthetic data

Settings are changed with dotted section.key=value arguments (e.g. optim.lr=1e-3); an unknown key
is refused with the nearest valid ones.
e.g.  libmoe bench --preset micro --out bench-micro      (the whole pipeline in about 13 s)
"""
EPILOG = """\
exit codes: 0 everything asked for was done; 1 some work failed (a bench run, a non-finite loss, an
interruption; what finished is kept and the last line says what failed); 2 bad input (arguments,
config, a missing or damaged file), refused before any work with one line naming the fix.
documentation: README.md and docs/ (bench, training, evaluation, analysis, upcycling, vlm,
findings, reliability) in the libmoe repository.
"""


class _TopHelp(argparse.RawDescriptionHelpFormatter):
    """`libmoe --help`: the description lists the commands grouped, so argparse's own flat list of
    them is left out."""

    def _iter_indented_subactions(self, action):
        if isinstance(action, argparse._SubParsersAction):
            return iter(())
        return super()._iter_indented_subactions(action)


def _cmd_algorithms(args: argparse.Namespace) -> None:
    """`libmoe algorithms`: the registry, built-ins and plugins, one per line."""
    width = max(map(len, REGISTRY))
    for name, spec in REGISTRY.items():
        print(f"{name:<{width}}  {spec.description}")


def add_algorithms_parser(sub) -> None:
    p = sub.add_parser("algorithms", help="list the registered MoE algorithms")
    add_plugin_option(p)
    p.set_defaults(func=_cmd_algorithms)  # looked up when the parser is built (tests replace it)


def build_parser() -> argparse.ArgumentParser:
    """The `libmoe` parser: one sub-parser per command, in the order of their help."""
    parser = argparse.ArgumentParser(prog="libmoe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_TopHelp)
    parser.add_argument("--version", action="version", version=f"libmoe {__version__}",
                        help="print the installed libmoe version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands above; `libmoe COMMAND --help` shows its options")
    vlm.add_parser(sub)
    bench.add_parser(sub)
    findings.add_parser(sub)
    add_algorithms_parser(sub)
    train.add_parser(sub)
    prepare.add_parser(sub)
    evaluate.add_parser(sub)
    eval_table.add_parser(sub)
    generate.add_parser(sub)
    upcycle.add_parser(sub)
    export.add_parser(sub)
    analyze.add_parser(sub)
    analyze.add_init_std_parser(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse argv; `analyze init-std` is the study, and the section.key=value overrides of the
    commands that take them may follow their options."""
    if argv[:2] == ["analyze", "init-std"]:  # a study, not a run named init-std
        argv = ["analyze-init-std", *argv[2:]]
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "items_are", None) is not None
    if extra and (not takes_overrides or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items = list(args.items) + extra
    return args


def check_overrides(args: argparse.Namespace) -> None:
    """A malformed override fails here, before any command starts work (train and prepare also
    take one CONFIG.yaml among them)."""
    items_are = getattr(args, "items_are", None)
    for item in args.items if items_are else ():
        if "=" in item or items_are == OVERRIDES:
            parse_override(item)


def main(argv: list[str] | None = None) -> int:
    """Run `libmoe` with `argv` (default: the command line); returns the exit code (libmoe.errors)."""
    parser = build_parser()
    args = parse_args(parser, list(sys.argv[1:] if argv is None else argv))
    try:
        load_plugins(getattr(args, "plugin", None) or [])  # before anything looks an algorithm up
        check_overrides(args)
        args.func(args)
    except WorkFailed as err:  # some work failed; what finished is kept (exit 1)
        print(f"libmoe: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
            PermissionError) as err:
        print(f"libmoe: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # the machine failed the work (disk full, I/O error): one line, exit 1
        print(f"libmoe: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # outside training (which checkpoints and raises Interrupted)
        print("libmoe: interrupted", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _one_line(err: BaseException) -> str:
    """The error's message on one line (a library's multi-line text joined)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


__all__ = ["DESCRIPTION", "EPILOG", "build_parser", "main"]
