"""The registry of paper findings: each claim is one function over a bench output.

    @finding("x_my_claim", "what the paper says", "Fig. N", figure="my_figure.png")
    def x_my_claim(bench: Bench) -> dict:
        ...
        return {"measured": {...}, "verdict": combine(verdicts), "why": "..."}

The function returns "measured" (its numbers, with "summary": one line for the table),
"verdict" (one of stats.VERDICTS) and "why" (the method and what decided it); `check` adds the
claim's id, text, paper reference and figure link, the scope and seed-spread fields of
`variance.annotate` (`percent`: the statistic is a log ratio, its spreads shown as percentages;
`seeded`: False when the claim's inputs come from one seed whatever --seeds), and turns an error
of the check itself into an inconclusive verdict that says so.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .inputs import Bench
from .stats import VERDICTS
from .variance import annotate


@dataclass(frozen=True)
class Finding:
    """A registered claim of the paper: its id, text, reference, figure, the check `fn`, and how
    its seed spreads read (`percent`, `seeded`: see the module docstring)."""

    id: str
    claim: str
    paper_ref: str
    figure: str | None
    fn: Callable[[Bench], dict[str, Any]]
    percent: bool = False
    seeded: bool = True


FINDINGS: dict[str, Finding] = {}


def finding(id: str, claim: str, paper_ref: str, figure: str | None = None, percent: bool = False,
            seeded: bool = True):
    """Register a check (see the module docstring)."""

    def register(fn: Callable[[Bench], dict[str, Any]]) -> Callable[[Bench], dict[str, Any]]:
        if id in FINDINGS:
            raise ValueError(f"finding {id!r} is registered twice.")
        FINDINGS[id] = Finding(id, claim, paper_ref, figure, fn, percent, seeded)
        return fn

    return register


def check(f: Finding, bench: Bench) -> dict[str, Any]:
    """One finding's entry of results.json's "findings"."""
    entry: dict[str, Any] = {"id": f.id, "claim": f.claim, "paper_ref": f.paper_ref}
    try:
        out = f.fn(bench)
    except Exception as err:  # noqa: BLE001  one broken input must not hide the other claims
        out = {"measured": {"summary": "check failed"}, "verdict": "inconclusive",
               "why": f"the check could not read this output: {type(err).__name__}: {err}",
               "error": traceback.format_exc(limit=4)}
    if out.get("verdict") not in VERDICTS:
        raise ValueError(f"finding {f.id} returned verdict {out.get('verdict')!r}; valid: "
                         f"{', '.join(VERDICTS)}.")
    entry.update(measured=out.get("measured") or {}, verdict=out["verdict"], why=out.get("why", ""))
    if out.get("error"):
        entry["error"] = out["error"]
    entry["figure"] = bench.figure(out.get("figure", f.figure))
    try:
        annotate(entry, bench.results, f.percent, f.seeded)
    except Exception as err:  # noqa: BLE001  the verdict stands; only its variance note is lost
        entry["variance"] = {"scope": None, "summary": "–",
                             "note": f"the training-variance note failed: {type(err).__name__}: {err}"}
    return entry
