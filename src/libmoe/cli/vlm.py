"""`libmoe vlm ...`: train (pt | pft | vit), eval, data synth, params, lmms-tasks-path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..devices import check_device
from ..vlm import VLM_PRESETS, evaluate_run, parameter_report, train_stage, write_synth_dataset
from ..vlm.evaluate import check_tasks
from ..vlm.lmms import tasks_path
from ..vlm.presets import STAGE_HELP
from .common import add_plugin_option, log, split_list, takes_overrides


def add_parser(sub) -> None:
    p = sub.add_parser("vlm", help="vision-language sparse upcycling: train stages, evaluate, data",
                       description="The paper's LLaVA-style pipeline (docs/vlm.md).")
    vsub = p.add_subparsers(dest="vlm_command", required=True)
    add_train_parser(vsub)
    add_eval_parser(vsub)
    add_data_parser(vsub)
    add_params_parser(vsub)
    lp = vsub.add_parser("lmms-tasks-path", help="print the folder of libmoe's lmms-eval task YAMLs")
    lp.set_defaults(func=run_lmms_path)


def add_train_parser(vsub) -> None:
    t = vsub.add_parser("train", help="train one stage: pt, pft or vit",
                        description="Stages: " + "; ".join(f"{k}: {v}" for k, v in STAGE_HELP.items())
                        + ". Extra key=value arguments override the resolved config (e.g. "
                        "train.lr=1e-4 moe.top_k=2 data.subtasks=[colour,texture]).")
    t.add_argument("items", nargs="*", metavar="[key=value ...]")
    t.add_argument("--stage", required=True, choices=list(STAGE_HELP))
    t.add_argument("--preset", default="cpu-tiny",
                   help=f"VLM preset: {', '.join(VLM_PRESETS)} (default cpu-tiny)")
    t.add_argument("--data", default=None, help="dataset: a folder of LLaVA JSON + images, a JSON file or a "
                   "Hub dataset name (default: the preset's; cpu presets: the synthetic dataset)")
    t.add_argument("--init", default=None, help="the previous stage's run (pft: a pt run; vit: a pft run)")
    t.add_argument("--algorithm", default=None, help="MoE algorithm of the vit stage (e.g. smoe, xmoe)")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--overwrite", action="store_true", help="delete OUT and start over")
    t.add_argument("--out", required=True)
    add_plugin_option(t)
    takes_overrides(t)
    t.set_defaults(func=run_train)


def add_eval_parser(vsub) -> None:
    e = vsub.add_parser("eval", help="held-out synthetic evaluation of a VLM run or checkpoint")
    e.add_argument("run")
    e.add_argument("--tasks", default="synth_mme", help="comma-separated: synth_mme, synth_open")
    e.add_argument("--data", default=None, help="dataset folder (default: the run's)")
    e.add_argument("--limit", type=int, default=None, help="questions per category")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="results file (default RUN/eval/results.json)")
    add_plugin_option(e)
    e.set_defaults(func=run_eval)


def add_data_parser(vsub) -> None:
    d = vsub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write the embedded synthetic multimodal dataset (LLaVA JSON + PNG)")
    s.add_argument("--out", required=True)
    s.add_argument("--subtasks", default=None, help="comma-separated subtasks (default all)")
    s.add_argument("--n-per-task", type=int, default=200, help="training images per subtask")
    s.add_argument("--n-test-per-task", type=int, default=50, help="held-out images per subtask")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.set_defaults(func=run_synth)


def add_params_parser(vsub) -> None:
    q = vsub.add_parser("params", help="parameter counts of a preset's upcycled model (no download)")
    q.add_argument("--preset", default="paper-phi35-siglip")
    q.add_argument("--algorithm", default="smoe")
    add_plugin_option(q)
    q.set_defaults(func=run_params)


def run_train(args: argparse.Namespace) -> None:
    summary = train_stage(args.stage, args.out, preset=args.preset, data=args.data, init=args.init,
                          algorithm=args.algorithm, max_steps=args.max_steps, overrides=list(args.items),
                          device=args.device, overwrite=args.overwrite, log=log)
    print(json.dumps(summary))


def run_eval(args: argparse.Namespace) -> None:
    tasks = check_tasks(split_list(args.tasks) or ["synth_mme"])
    if args.limit is not None and args.limit < 1:  # before the model loads
        raise ValueError(f"--limit {args.limit}: give a positive number of questions per category, or leave "
                         "it out to evaluate them all.")
    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a directory; give the results file, e.g. "
                         f"{Path(args.out) / 'results.json'}.")
    check_device(args.device)
    payload = evaluate_run(args.run, tasks, data=args.data, out=args.out, device=args.device,
                           limit=args.limit, log=log)
    for task, m in payload["results"].items():
        extra = f", acc+ {m['acc_plus']:.3f}" if "acc_plus" in m else ""
        print(f"{task}: acc {m['acc']:.3f}{extra} ({m['n']} questions)")


def run_synth(args: argparse.Namespace) -> None:
    manifest = write_synth_dataset(args.out, subtasks=split_list(args.subtasks) or None,
                                   n_per_task=args.n_per_task, n_test_per_task=args.n_test_per_task,
                                   seed=args.seed, image_size=args.image_size, log=log)
    print(f"wrote {args.out} ({json.dumps(manifest.get('counts', {}))})")


def run_params(args: argparse.Namespace) -> None:
    report = parameter_report(args.preset, args.algorithm)
    for key, value in report.items():
        print(f"{key:>14}: {value:>14,} ({value / 1e9:.3f}B)")


def run_lmms_path(args: argparse.Namespace) -> None:
    print(tasks_path())
