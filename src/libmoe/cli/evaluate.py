"""`libmoe eval`: zero-shot tasks and validation perplexity of a trained model."""

from __future__ import annotations

import argparse

from ..eval import evaluate_model
from ..eval.results import read_existing, results_path, write_results
from ..eval.table import results_table
from .common import add_plugin_option, log, val_tokens


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="zero-shot tasks and validation perplexity of a trained model",
        description="Evaluate a run, checkpoint or transformers model directory on zero-shot tasks "
        "(lm-evaluation-harness formats), task YAML files and/or val_ppl (a run's own held-out "
        "split). Prints a Markdown table and merges the results into a JSON file, per task: a later "
        "evaluation of other tasks keeps the earlier ones, evaluating a task again replaces its "
        "entry, and each entry records its time, the libmoe version and the model checkpoint "
        "(\"evaluated\"). Arguments, task names, task files and --device are checked before the "
        "model loads; a damaged results file is refused, never replaced.",
    )
    p.add_argument("model", help="a run directory (newest checkpoint), a checkpoint directory or a "
                   "transformers model directory")
    p.add_argument("--tasks", required=True, help="comma-separated task names or task YAML paths, "
                   "e.g. piqa,hellaswag,arc_easy,lambada_openai,blimp,val_ppl")
    p.add_argument("--data-dir", default=None, help="local JSONL files DIR/<task>.<split>.jsonl "
                   "(BLiMP: DIR/blimp/<paradigm>.jsonl); default: the Hugging Face Hub")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (N >= 1; "
                   "default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps, ...); one "
                   "this machine lacks is refused before anything loads")
    p.add_argument("--val-tokens", default="run", help="val_ppl over 'run' (the tokens training "
                   "evaluates: its logged val_ppl), 'all' (the whole split) or the first N tokens")
    p.add_argument("--out", default=None, help="results JSON to merge into (default "
                   "MODEL/eval/results.json); a directory means DIR/results.json")
    add_plugin_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty; name at least one task (e.g. piqa,val_ppl).")
    tokens = val_tokens(args.val_tokens)
    out = results_path(args.out, args.model)
    read_existing(out)  # a damaged or foreign results file is refused now, not after the work
    payload = evaluate_model(args.model, tasks, args.data_dir, args.limit, args.batch_size,
                             args.device, tokens, log=log)  # its arguments checked before loading
    merged, kept = write_results(out, payload)
    print(results_table(payload["results"]))
    if kept:
        step = payload["config"].get("step")
        older = [t for t in kept if (merged["evaluated"].get(t) or {}).get("step") != step]
        log(f"kept the earlier results of {', '.join(kept)}" + (
            f" ({', '.join(older)} of another checkpoint than step {step})" if older else ""))
    log(f"wrote {out}")
