"""Command-line entry point: `libmoe <command>`. Thin: parses arguments, calls library functions,
maps their errors to the exit codes of libmoe.errors (one line on stderr, never a traceback)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, WorkFailed


def _cmd_algorithms(args: argparse.Namespace) -> None:
    from .moe import REGISTRY

    width = max(map(len, REGISTRY))
    for name, spec in REGISTRY.items():
        print(f"{name:<{width}}  {spec.description}")


def _upcycle_source_config(model_dir):
    """The config.yaml of the libmoe run a transformers directory was upcycled from (its
    upcycle.json names the source), so training continues on that run's data; else None."""
    import json
    from pathlib import Path

    info = model_dir / "upcycle.json"
    if not info.is_file():
        return None
    source = Path(str(json.loads(info.read_text()).get("source", "")))
    for candidate in (source / "config.yaml", source.parent.parent / "config.yaml"):
        if source.name and candidate.is_file():
            return candidate
    return None


def _run_config(args: argparse.Namespace, resume: bool = False):
    """(RunConfig, out dir) from preset < saved run when resuming < CONFIG.yaml < flags <
    section.key=value overrides."""
    from pathlib import Path

    from .train import resolve_config
    from .train.config import load_yaml

    config_file, overrides = None, []
    init = getattr(args, "init", None)
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif config_file is None and item.endswith((".yaml", ".yml")):
            config_file = item
        else:
            raise ValueError(f"unexpected argument {item!r}: give one CONFIG.yaml and "
                             "section.key=value overrides.")
    user = load_yaml(config_file) if config_file else {}
    out = Path(getattr(args, "out", None) or user.get("out") or
               f"runs/{args.preset or user.get('preset') or 'micro'}-{args.algorithm or 'smoe'}")
    user.pop("out", None)
    layers = []
    if init:  # the init model's own config (model, data, tokenizer) is the base
        from .models import resolve_checkpoint
        from .train.hf_model import transformers_source

        source = transformers_source(init)  # a transformers model needs no libmoe config
        init_config = (Path(source) if source else resolve_checkpoint(init)) / "config.yaml"
        if source and not init_config.is_file():  # upcycled from a libmoe run: that run's config
            init_config = _upcycle_source_config(Path(source)) or init_config
        if init_config.is_file():
            layers.append(load_yaml(init_config))
        elif not source:
            raise FileNotFoundError(f"--init {init}: no config.yaml beside its weights; give a libmoe "
                                    "model directory (libmoe upcycle --out), run or checkpoint.")
    if resume and (out / "config.yaml").is_file():
        layers.append(load_yaml(out / "config.yaml"))
    layers.append(user)
    flags: dict = {"model": {}, "data": {}, "train": {}}
    if args.algorithm:
        flags["model"]["algorithm"] = args.algorithm
    if args.data:
        flags["data"]["source"] = args.data
    for key in ("max_steps", "checkpoint_every", "seed"):
        if getattr(args, key, None) is not None:
            flags["train"][key] = getattr(args, key)
    layers.append(flags)
    preset = args.preset
    if preset is None and not resume:
        preset = user.get("preset") or (layers[0].get("preset") if init else None)
    return resolve_config(layers, overrides, preset=preset), out


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import train

    cfg, out = _run_config(args, resume=args.resume)
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite,
                    stop_after=args.stop_after, init=args.init,
                    allow_config_change=args.allow_config_change)
    if summary.get("val_ppl") is not None and summary.get("rank", 0) == 0:
        print(f"done: step {summary['step']}, val_loss {summary['val_loss']:.4f}, "
              f"val_ppl {summary['val_ppl']:.2f}, {summary['train_time_s']:.1f} s -> {out}")


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .train.trainer import check_config, prepare_run_data

    cfg, _ = _run_config(args)
    check_config(cfg)  # a config that cannot train is refused before its data are built
    data = prepare_run_data(cfg)
    m = data.meta
    print(f"{data.directory}: {m['n_train_tokens']:,} training tokens in {m['n_train_shards']} "
          f"shard(s), {m['n_val_tokens']:,} validation tokens, {m['vocab_size']} pieces, "
          f"domains: {', '.join(m['domains'])}")


def _val_tokens(text: str) -> int | str:
    """--val-tokens: 'run', 'all' or a count (checked by the library: a count must be positive)."""
    text = text.strip()
    return int(text) if text.lstrip("+-").isdigit() else text


def _cmd_eval(args: argparse.Namespace) -> None:
    from .eval import evaluate_model
    from .eval.results import read_existing, results_path, write_results
    from .eval.table import results_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty; name at least one task (e.g. piqa,val_ppl).")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    val_tokens = _val_tokens(args.val_tokens)
    out = results_path(args.out, args.model)
    read_existing(out)  # a damaged or foreign results file is refused now, not after the work
    payload = evaluate_model(args.model, tasks, args.data_dir, args.limit, args.batch_size,
                             args.device, val_tokens, log=log)  # its arguments checked before loading
    merged, kept = write_results(out, payload)
    print(results_table(payload["results"]))
    if kept:
        step = payload["config"].get("step")
        older = [t for t in kept if (merged["evaluated"].get(t) or {}).get("step") != step]
        log(f"kept the earlier results of {', '.join(kept)}" + (
            f" ({', '.join(older)} of another checkpoint than step {step})" if older else ""))
    log(f"wrote {out}")


def _cmd_eval_table(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .eval.table import comparison_csv, comparison_markdown, comparison_rows, read_results

    models: dict = {}
    names = args.names.split(",") if args.names else None
    if names and len(names) != len(args.results):
        raise ValueError(f"--names gives {len(names)} names for {len(args.results)} result files.")
    if args.out:
        from .eval.results import results_path

        results_path(Path(args.out).with_suffix(".md"), ".")  # a file in the way is refused now
    for i, path in enumerate(args.results):
        name, results = read_results(path)
        name = names[i] if names else name
        base, k = name, 2
        while name in models:  # two runs with the same directory name
            name, k = f"{base}-{k}", k + 1
        models[name] = results
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    columns, rows = comparison_rows(models, metric=args.metric, tasks=tasks)
    markdown, table_csv = comparison_markdown(columns, rows), comparison_csv(columns, rows)
    print(table_csv if args.format == "csv" else markdown, end="\n" if args.format == "md" else "")
    if args.out:
        from .files import write_text

        out = Path(args.out)
        write_text(out.with_suffix(".md"), markdown + "\n")
        write_text(out.with_suffix(".csv"), table_csv)
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}", file=sys.stderr)


def _cmd_analyze(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .analysis.analyze import (
        analyze_run,
        check_analysis,
        load_analysis,
        unique_names,
        write_figures_and_report,
    )

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    val_tokens = _val_tokens(args.val_tokens)
    out = Path(args.out) if args.out else Path(args.run) / "analysis"
    for run in [args.run, *args.compare]:  # every run checked before any is analysed
        check_analysis(run, out if run == args.run else None, tasks, args.data_dir, args.limit,
                       args.batch_size, args.device, val_tokens)
    init_std = None
    if args.init_std:
        from .files import read_json_object

        path = Path(args.init_std)
        path = path / "init_std.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--init-std {args.init_std}: no init_std.json there; run "
                                    "`libmoe analyze init-std --out DIR` first.")
        init_std = read_json_object(path, "run `libmoe analyze init-std --out DIR` again")

    def analyse(run, out, figures):
        return analyze_run(run, out, tasks, args.data_dir, args.limit, args.batch_size, args.device,
                           not args.no_interventions, val_tokens, init_std, figures=figures, log=log)

    primary = analyse(args.run, out, figures=not args.compare)
    if not args.compare:
        print(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
        return
    results = [primary]
    for run in args.compare:
        cached = None if args.recompute else load_analysis(run)
        if cached is not None:
            log(f"{run}: using {Path(run) / 'analysis' / 'metrics.json'} (--recompute redoes it)")
            results.append(cached)
        else:
            log(f"analysing {run}")
            results.append(analyse(run, None, figures=True))
    report = write_figures_and_report(out, unique_names(results), init_std,
                                      title="libmoe routing analysis: " + ", ".join(
                                          str(r.get("algorithm")) for r in results))
    print(f"wrote {out / 'metrics.json'} and the comparison {report}")


def _cmd_analyze_init_std(args: argparse.Namespace) -> None:
    import math
    from pathlib import Path

    from .analysis.init_std import init_std_study

    try:
        stds = tuple(float(s) for s in args.stds.split(",") if s.strip())
    except ValueError:
        stds = ()
    if not stds or not all(math.isfinite(s) and s >= 0 for s in stds):
        raise ValueError(f"--stds {args.stds!r}: give comma-separated non-negative router init stds, e.g. "
                         "0.02,0.04,0.06.")
    if args.early_steps is not None and args.early_steps < 1:
        raise ValueError(f"--early-steps {args.early_steps}: give a positive number of steps.")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a directory for the study.")
    init_std_study(args.out, stds, args.steps, args.preset, args.algorithm, args.data,
                   args.early_steps, list(args.items), log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {args.out}/init_std.json and {args.out}/report.html")


def _cmd_upcycle(args: argparse.Namespace) -> None:
    from .overrides import parse_value
    from .upcycle import upcycle_checkpoint

    layers = None
    if args.layers:
        parts = [x.strip() for x in args.layers.split(",") if x.strip()]
        if not parts or not all(x.isdigit() for x in parts):
            raise ValueError(f"--layers {args.layers!r}: give comma-separated block indices, e.g. 0,2.")
        layers = [int(x) for x in parts]
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r}: give KEY=VALUE, e.g. balance_coef=0.01.")
        options[key.strip()] = parse_value(value)
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


def _cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    if args.to != "libmoe":  # transformers' own MoE architectures, for upcycled models
        from .upcycle.export import export_model

        info = export_model(args.model, args.to, args.out, overwrite=args.overwrite)
        experts = f"{info['n_experts']} experts"
        if info["shared_expert_width"]:
            experts = f"{info['n_experts']} routed experts + a shared expert"
        print(f"exported {info['source']} -> {args.out} as {info['target_architecture']}: "
              f"{info['algorithm']}, {experts}, top-{info['top_k']}; largest logit difference from "
              f"the source {info['max_abs_logit_diff']:.2e} (tolerance {info['tolerance']:g})")
        print(f"plain transformers.AutoModelForCausalLM.from_pretrained({args.out!r}) loads it, "
              "without libmoe")
        return

    from .models import load_model
    from .models.loading import _find_tokenizer, save_model_dir

    if (Path(args.out) / "config.yaml").is_file() and not args.overwrite:  # before loading anything
        raise ValueError(f"{args.out!r} already holds a model; pass --overwrite or a new --out.")
    loaded = load_model(args.model)
    if not loaded.config:
        raise ValueError(f"{args.model} is already a transformers model directory.")
    save_model_dir(args.out, loaded.model, loaded.config, _find_tokenizer(loaded.checkpoint))
    readers = "libmoe eval/analyze/train --init read it"
    if (Path(args.out) / "config.json").is_file():
        auto = ("AutoTokenizer and " if (Path(args.out) / "tokenizer_config.json").is_file() else "")
        readers = (f"{auto}AutoModelForCausalLM.from_pretrained load it after `import libmoe`; "
                   f"{readers} too")
    print(f"exported {loaded.checkpoint} -> {args.out} ({readers})")


def _cmd_bench(args: argparse.Namespace) -> None:
    from .bench import run_bench
    from .bench.safety import failure_line
    from .overrides import parse_override

    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    algorithms = split(args.algorithms)
    if args.algorithms is not None and not algorithms:  # "" or ",": not "all eight"
        raise ValueError(f"--algorithms {args.algorithms!r} names no algorithm; give comma-separated "
                         "names (e.g. dense,smoe) or leave it out for the paper's eight.")
    slurm = {}
    for item in args.slurm_option or []:
        for key, value in parse_override(item).items():
            slurm[key] = value
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = run_bench(args.out, preset=args.preset, algorithms=algorithms,
                        seeds=args.seeds, data=args.data, tasks=split(args.tasks),
                        data_dir=args.data_dir, jobs=args.jobs, launcher=args.launcher,
                        nproc=args.nproc, slurm=slurm, overrides=list(args.items),
                        analysis=not args.no_analysis, regime=args.regime, compare=args.compare,
                        studies=args.studies, log=log, overwrite=args.overwrite)
    from .bench.tables import markdown, score_table

    if results.get("regime") == "vlm":
        from .vlm.bench import score_table
    print(markdown(score_table(results)))
    failed = failure_line(results, args.out)
    if failed:  # the tables are written; the exit code and the last line say what failed
        raise WorkFailed(failed)


def _cmd_findings(args: argparse.Namespace) -> None:
    from .bench.tables import markdown
    from .findings import FINDINGS, check_findings, findings_table, write_findings

    if args.list:
        for f in FINDINGS.values():
            print(f"{f.id}  ({f.paper_ref})  {f.claim}")
        return
    if args.bench is None:
        raise ValueError("give a bench output directory (libmoe findings BENCH_DIR), or --list.")
    only = None
    if args.only is not None:
        from .findings import check_ids

        only = check_ids([s.strip() for s in args.only.split(",") if s.strip()])  # before reading
    if args.dry_run or only:
        findings = check_findings(args.bench, only)
    else:
        findings = write_findings(args.bench)
        print(f"rewrote the findings in {args.bench}/results.json, results.md and report.html",
              file=sys.stderr)
    if args.json:
        print(json.dumps(findings, indent=1))
        return
    table = findings_table(findings)
    print(markdown([row[:4] for row in table]))
    for f in findings:
        print(f"\n{f['id']} ({f['verdict'].replace('_', ' ')}): {f['why']}")


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


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="libmoe", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_TopHelp)
    parser.add_argument("--version", action="version", version=f"libmoe {__version__}",
                        help="print the installed libmoe version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands above; `libmoe COMMAND --help` shows its options")

    from .vlm.cli import add_vlm_parser

    add_vlm_parser(sub)

    from .bench.presets import BENCH_PRESETS, PAPER_ALGORITHMS
    from .bench.regimes import REGIMES

    p = sub.add_parser(
        "bench", help="the paper's fair comparison of MoE algorithms: train, evaluate, analyse, tables",
        description="Train every algorithm (and seed) with one identical config, data order and token "
        "budget; evaluate validation perplexity and every zero-shot task whose data is available; "
        "analyse the routing across runs; write results.json/.md/.csv and report.html into --out. "
        "Finished runs are skipped and interrupted ones resume, so rerunning the command continues a "
        "study. --regime upcycle pretrains one dense model (OUT/source) and upcycles it into every "
        "algorithm before they train.",
    )
    p.add_argument("items", nargs="*", metavar="[section.key=value ...]",
                   help="run-config overrides applied to every run (e.g. train.max_steps=600)")
    p.add_argument("--preset", default=None, help=f"bench preset: {', '.join(BENCH_PRESETS)} "
                   "(default: the regime's, default or upcycle, each about 20 minutes on a 2-core CPU)")
    p.add_argument("--regime", default=None, choices=list(REGIMES),
                   help="pretrain: every algorithm from a random init (default); upcycle: one dense "
                   "model pretrained, upcycled into every algorithm, each trained on alike "
                   "(default: the preset's)")
    p.add_argument("--compare", default=None, metavar="OTHER_BENCH_DIR",
                   help="another bench output (of the other regime): the report and results.json "
                   "set its expert change rates beside this bench's (regime_comparison)")
    p.add_argument("--algorithms", default=None,
                   help=f"comma-separated (default: {','.join(PAPER_ALGORITHMS)})")
    p.add_argument("--seeds", type=int, default=1, help="seeds per algorithm (0..N-1; default 1)")
    p.add_argument("--data", default=None, help="training corpus for every run (default: the "
                   "training preset's, the embedded corpus)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks (default: the "
                   "preset's, those whose data is in --data-dir)")
    p.add_argument("--data-dir", default=None, help="local task files (JSONL in the Hub schemas)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel worker processes (the "
                   "CPU threads are split between them; default: the preset's, 2 for default)")
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "slurm"],
                   help="local processes, each training under torchrun --nproc, or Slurm jobs "
                   "through submitit")
    p.add_argument("--nproc", type=int, default=1, help="processes per training run with "
                   "--launcher torchrun")
    p.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                   help="submitit parameter for --launcher slurm (slurm_partition=gpu, "
                   "timeout_min=600, gpus_per_node=1, ...; cluster=local runs the jobs here)")
    p.add_argument("--no-analysis", action="store_true", help="skip the routing analysis")
    p.add_argument("--studies", default=None, metavar="init-std,droptop,temperature",
                   help="the extra studies the paper-findings checks need: init-std (router init "
                   "stds, Fig. 11), droptop (Fig. 5), temperature (Table 7); all or none "
                   "(default: the preset's; the default preset runs all three)")
    p.add_argument("--out", default="bench", help="output directory (default: bench)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the runs in --out made with another config (and the old tables) "
                   "instead of refusing them; runs with this config are kept and skipped")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser(
        "findings", help="check the paper's claims on a bench output (rewrites its findings)",
        description="Check every registered claim of the LibMoE paper (libmoe.findings) on an existing "
        "`libmoe bench` output directory, from its files alone (scores from results.json's rows, "
        "routing from the runs' analysis outputs and traces), print the table, and rewrite the "
        "findings in its results.json, results.md and report.html. Verdicts: reproduced, not "
        "reproduced, inconclusive (the 95%% interval does not exclude either side), not applicable "
        "(the output lacks the inputs).")
    p.add_argument("bench", nargs="?", help="a libmoe bench output directory (holding results.json)")
    p.add_argument("--only", default=None, help="comma-separated finding ids (print only; nothing rewritten)")
    p.add_argument("--dry-run", action="store_true", help="print the findings without rewriting files")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--list", action="store_true", help="list the registered claims")
    p.set_defaults(func=_cmd_findings)

    p = sub.add_parser("algorithms", help="list the registered MoE algorithms")
    p.set_defaults(func=_cmd_algorithms)

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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "prepare", help="tokenise and cache a run's data without training",
        description="Build the packed, cached data (and tokenizer) that `libmoe train` with the "
        "same arguments would use; run it before a multi-process job on a large stream.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]")
    p.add_argument("--preset", default=None)
    p.add_argument("--algorithm", default=None)
    p.add_argument("--data", default=None)
    p.set_defaults(func=_cmd_prepare)

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
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "eval-table", help="the paper's comparison table (scores, AVG, AVG rank) of several models",
        description="Build the paper-style comparison table (Table 2: PPL, per-task scores in %%, "
        "AVG, AVG rank) from `libmoe eval` or lm_eval results files. Prints Markdown (or CSV).",
    )
    p.add_argument("results", nargs="+", help="results JSON files, one per model")
    p.add_argument("--names", default=None, help="comma-separated model names (default: each "
                   "model's directory name)")
    p.add_argument("--tasks", default=None, help="columns, comma-separated (default: every task "
                   "present, in the paper's order)")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm", "acc_bytes"],
                   help="score per task where the task has it (else acc); default acc, as the paper")
    p.add_argument("--format", default="md", choices=["md", "csv"], help="what to print")
    p.add_argument("--out", default=None, help="also write OUT.md and OUT.csv")
    p.set_defaults(func=_cmd_eval_table)

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
    p.set_defaults(func=_cmd_upcycle)

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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "analyze", help="routing analysis of a run: metrics.json, figures, report.html",
        description="Routing diagnostics of a trained run (paper Section 5): expert change rate and "
        "router saturation over its checkpoints' traces, allocation and weight entropies (by domain, "
        "and by task with --tasks), router margin, co-activation, expert similarity, load, layer "
        "overlap, and the DropTop and temperature interventions. `libmoe analyze init-std` runs the "
        "router-initialisation study instead.",
    )
    p.add_argument("run", help="a run directory (its checkpoints' traces) or a checkpoint directory")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN",
                   help="more runs to overlay in the figures (their own RUN/analysis is reused when "
                   "current)")
    p.add_argument("--tasks", default=None, help="comma-separated evaluation tasks: routing by task "
                   "(eae_by_task, ewa_by_task) and the interventions' task metrics")
    p.add_argument("--data-dir", default=None, help="local task files (as libmoe eval)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (N >= 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.add_argument("--val-tokens", default="run", help="validation tokens of the interventions' "
                   "val_ppl: 'run' (as training evaluates), 'all' or a count")
    p.add_argument("--no-interventions", action="store_true", help="skip DropTop and temperature")
    p.add_argument("--init-std", default=None, metavar="DIR",
                   help="include an init-std study's results (DIR/init_std.json) in the report")
    p.add_argument("--recompute", action="store_true", help="re-analyse --compare runs")
    p.add_argument("--out", default=None, help="output directory (default RUN/analysis)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser(
        "analyze-init-std", help="router initialisation study (as `libmoe analyze init-std`)",
        description="Train one algorithm (default smoe) with each router init std for N steps and "
        "compare their balance-loss curves (paper Fig. 11). Writes OUT/init_std.json, OUT/figures "
        "and OUT/report.html; runs already finished in OUT are reused.",
    )
    p.add_argument("items", nargs="*", metavar="[section.key=value ...]")
    p.add_argument("--stds", default="0.02,0.04,0.06", help="comma-separated router init stds")
    p.add_argument("--steps", type=int, default=200, help="training steps per std")
    p.add_argument("--early-steps", type=int, default=None,
                   help="window of the early balance-loss summary (default steps / 4)")
    p.add_argument("--preset", default="micro")
    p.add_argument("--algorithm", default="smoe")
    p.add_argument("--data", default=None, help="training data (as libmoe train --data)")
    p.add_argument("--out", required=True, help="study directory")
    p.set_defaults(func=_cmd_analyze_init_std)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["analyze", "init-std"]:  # a study, not a run named init-std
        argv = ["analyze-init-std", *argv[2:]]
    # Overrides (key=value) may follow options: collect what argparse leaves over.
    args, extra = parser.parse_known_args(argv)
    takes_overrides = ("train", "prepare", "analyze-init-std", "bench")
    vlm_train = args.command == "vlm" and getattr(args, "vlm_command", None) == "train"
    allowed = args.command in takes_overrides or vlm_train
    if extra and (not allowed or any(x.startswith("-") for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items = list(args.items) + extra
    try:
        if allowed:  # a malformed override fails here, before any command starts work
            from .overrides import parse_override

            for item in args.items:
                if "=" in item or args.command not in ("train", "prepare"):  # those take a CONFIG.yaml
                    parse_override(item)
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


if __name__ == "__main__":
    sys.exit(main())
