"""`libmoe findings`: check the paper's claims on a bench output (and rewrite its findings)."""

from __future__ import annotations

import argparse
import json
import sys

from ..bench import markdown, write_findings
from ..findings import FINDINGS, check_findings, check_ids, findings_table
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
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--list", action="store_true", help="list the registered claims")
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
