"""Print the `SEED_SPREADS` records (libmoe.findings.seed_spreads) of a multi-seed bench output:

    python -m libmoe.findings.measure_spreads BENCH_DIR [--preset default] [--source "..."]

prints {preset: {claim: record}} as a Python literal to paste into `SEED_SPREADS`; each part
judged over seeds gives the sample sd of its per-seed statistic.
"""

from __future__ import annotations

import argparse
import pprint
from pathlib import Path

from . import check_findings, read_bench_results
from .seed_spreads import spread_records


def main(argv: list[str] | None = None) -> None:
    """Print the `SEED_SPREADS` records of a multi-seed bench output, to paste into
    libmoe/findings/seed_spreads.py."""
    p = argparse.ArgumentParser(prog="python -m libmoe.findings.measure_spreads", description=main.__doc__)
    p.add_argument("bench", help="a libmoe bench output of two or more seeds (e.g. --preset claims)")
    p.add_argument("--preset", default=None, help="the key to file it under (default: the output's preset)")
    p.add_argument("--source", default=None, help="what was run (default: the preset and seed count)")
    args = p.parse_args(argv)
    results = read_bench_results(Path(args.bench) / "results.json")
    if int(results.get("seeds") or 1) < 2:
        raise SystemExit(f"{args.bench} has one seed per algorithm: a seed spread needs a bench with "
                         "--seeds 2 or more (e.g. `libmoe bench --preset claims`).")
    source = args.source or f"libmoe bench --preset {results.get('preset')} --seeds {results.get('seeds')}"
    records = spread_records(check_findings(args.bench, results=results), results, source,
                             output=str(Path(args.bench).resolve()))
    print(pprint.pformat({args.preset or results.get("preset"): records}, width=100, sort_dicts=False))


if __name__ == "__main__":
    main()
