"""`libmoe findings`: check the paper's claims on a bench output (and rewrite its findings)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..bench import compare_outputs, markdown, record_comparison, write_findings
from ..environment import comparison_lines, environment_summary
from ..findings import FINDINGS, check_findings, check_ids, findings_table, read_bench_results
from .common import add_plugin_option


def add_parser(sub) -> None:
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
    p.add_argument("--json", action="store_true", help="print the findings as JSON (with --compare: "
                   "{\"findings\": [...], \"environment_comparison\": {...}})")
    p.add_argument("--list", action="store_true", help="list the registered claims")
    p.add_argument("--compare", default=None, metavar="OTHER_BENCH_DIR",
                   help="another bench output: say where the two differ in what decides their numbers "
                   "(corpus and tokenizer hashes, Python, torch, libmoe, CPU/GPU, threads, float "
                   "settings, config) and what that means for comparing them; written into results.json "
                   "(environment_comparison), results.md and report.html unless --dry-run/--only")
    add_plugin_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.list:
        for f in FINDINGS.values():
            print(f"{f.id}  ({f.paper_ref})  {f.claim}")
        return
    if args.bench is None:
        raise ValueError("give a bench output directory (libmoe findings BENCH_DIR), or --list.")
    only = None
    if args.only is not None:
        only = check_ids([s.strip() for s in args.only.split(",") if s.strip()])  # before reading
    results = read_bench_results(Path(args.bench) / "results.json")
    if args.compare is not None:
        read_bench_results(Path(args.compare) / "results.json")  # refused before anything is rewritten
    comparison = None
    if args.dry_run or only:
        findings = check_findings(args.bench, only)
        if args.compare is not None:
            comparison = compare_outputs(results, args.compare)
    else:
        if args.compare is not None:  # kept in results.json first, so the rewritten tables show it
            comparison = record_comparison(args.bench, args.compare)
        findings = write_findings(args.bench)
        print(f"rewrote the findings in {args.bench}/results.json, results.md and report.html",
              file=sys.stderr)
    if args.json:
        print(json.dumps(findings if comparison is None else
                         {"findings": findings, "environment_comparison": comparison}, indent=1))
        return
    table = findings_table(findings)
    print(markdown([row[:-1] for row in table]))  # every column but Figure
    for f in findings:
        print(f"\n{f['id']} ({f['verdict'].replace('_', ' ')}): {f['why']}")
    # the numbers above depend on the data and machine as well as the config: say which
    print(f"\n{environment_summary(results.get('environment'))}")
    if comparison is not None:
        print("\n".join(comparison_lines(comparison)))
