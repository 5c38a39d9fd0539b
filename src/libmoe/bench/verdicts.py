"""The paper's findings on a bench output, as the bench shows them: checked at the end of a study
(`check_study_findings`, one log line per claim) and written into an existing output's tables and
report again (`write_findings`, what `libmoe findings BENCH_DIR` does). The checks themselves are
`libmoe.findings`, which reads the output's files and knows nothing of the bench's code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..findings import check_findings, read_bench_results
from .regimes import REGIMES


def check_study_findings(out: Path, results: dict[str, Any],
                         log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The paper's claims checked on the finished study (`results` and the files under `out`),
    one line each."""
    findings = check_findings(out, results=results)
    for f in findings:
        verdict = f["verdict"].replace("_", " ")
        log(f"bench: finding {f['id']}: {verdict} ({f['measured'].get('summary', '')})")
    return findings


def write_findings(bench_dir: str | Path, findings: list[dict[str, Any]] | None = None,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Check the claims on `bench_dir` (unless `findings` are given) and rewrite its results.json,
    results.md and report.html with them, as its regime lays them out; returns the findings."""
    out = Path(bench_dir)
    results = read_bench_results(out / "results.json", full=True)  # refused before anything is rewritten
    findings = check_findings(out, results=results) if findings is None else findings
    results["findings"] = findings
    regime = REGIMES.get(results.get("regime") or "pretrain", REGIMES["pretrain"])  # an older output: LM
    regime.rewrite_outputs(out, results)
    if log:
        for f in findings:
            log(f"{f['id']}: {f['verdict']} — {f['measured'].get('summary', '')}")
    return findings
