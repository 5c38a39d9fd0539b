"""What training variance does to a finding's verdict: its scope, and the seed spread that would
overturn it beside the measured one.

A one-seed verdict rests on a bootstrap over the evaluation units of one trained model, so it holds
for that training run only: another seed, or the same command on another machine, trains another
model (issue 22 measured 1-3% perplexity differences between two machines). `annotate` adds to a
finding and each of its parts:

- `scope`: "this training run" (one seed) or "over N seeds" (a t interval over seeds);
- for a decided one-seed part, `overturn_spread` (s*, `stats.overturn_spread`): the seed-to-seed
  standard deviation of the part's statistic above which its verdict would be undecided, beside
  `measured_spread` (libmoe.findings.seed_spreads, with its provenance) and `robust` (measured < s*;
  None when not measured);
- `variance`: the same in words ("holds for this run; a seed spread above 0.9% would overturn it
  (measured seed spread 1.4%: not robust)");

and to the finding `variance` = {"scope", "overturn_spread" (the claim's: for a reproduced claim
the smallest of its parts', as every part must hold; for a contradicted one the largest of its
contradicted parts', as one is enough), "robust", "summary" (the table's "Training variance"
cell), "note" (every part's words)}, whose note ends the finding's `why`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .seed_spreads import measured_spread
from .stats import SCOPE_RUN, overturn_spread, seeds_scope

__all__ = ["annotate", "spread_text"]

DECIDED = ("reproduced", "not_reproduced")


def spread_text(value: float, percent: bool) -> str:
    """A spread for the table: a percentage for a log-ratio statistic (claim a's log-perplexity
    difference: 0.009 is 0.9%), else the statistic's units, two significant digits."""
    text = f"{100 * value if percent else value:#.2g}".rstrip(".")  # '#': 5.0 stays "5.0"
    return text + "%" if percent else text


def _seeds(p: dict[str, Any]) -> int:
    return int(p.get("seeds") or len(p.get("per_seed") or []) or 1)


def _measured_words(m: dict[str, Any] | None, fmt: Callable[[float], str], robust: bool | None,
                    missing: str) -> str:
    if m is None:
        return missing
    tags = [t for t in ("provisional" if m["provisional"] else "",
                        f"with another {', '.join(m['config_differs'])}" if m["config_differs"] else "") if t]
    tag = f", {'; '.join(tags)}" if tags else ""
    return f"measured seed spread {fmt(m['value'])}{tag}: {'robust' if robust else 'not robust'}"


def _annotate_part(p: dict[str, Any], results: dict[str, Any], claim: str, seeded: bool,
                   fmt: Callable[[float], str]) -> None:
    n = _seeds(p)
    p.setdefault("scope", seeds_scope(n))
    p.setdefault("seeds", n)
    if n >= 2:
        spread = p.get("seed_spread")
        p["variance"] = f"over {n} seeds (t interval)" + (
            f"; seed spread here {fmt(spread)}" if spread is not None else "")
        return
    s_star = overturn_spread(p)
    m = measured_spread(results, claim, p["name"]) if seeded else None
    robust = None if s_star is None or m is None else m["value"] < s_star
    p.update(overturn_spread=s_star, measured_spread=m, robust=robust)
    if s_star is None:
        p["variance"] = "undecided in this run already" + (" (evaluation noise)" if p.get("ci95") else "")
        return
    missing = _missing(results, seeded)
    p["variance"] = (f"holds for this run; a seed spread above {fmt(s_star)} would overturn it "
                     f"({_measured_words(m, fmt, robust, missing)})")


def _missing(results: dict[str, Any], seeded: bool) -> str:
    """What a part without a measured seed spread says instead."""
    if not seeded:
        return "its study trains one seed whatever --seeds, so no seed spread is measured"
    return (f"seed spread not measured for preset {results.get('preset') or '?'}; run --seeds 3 or "
            "--preset claims")


def _claim_level(verdict: str, one: list[dict[str, Any]]) -> tuple[dict[str, Any], bool | None,
                                                                   dict[str, Any] | None] | None:
    """(the part whose s* is the claim's, whether the claim is robust to the measured spreads, the
    part that shows it) of a one-seed claim: a reproduced claim needs every part to hold, so the
    weakest part decides and one part not robust makes it not robust; a contradicted claim needs
    one contradicted part to hold, so the strongest decides and one robust part makes it robust.
    None when no part can decide (e.g. the contradicted part's estimate was not finite)."""
    if not one:
        return None
    if verdict == "reproduced":
        binding = min(one, key=lambda p: p["overturn_spread"])
        weak = next((p for p in one if p["robust"] is False), None)
        robust = False if weak else (None if any(p["robust"] is None for p in one) else True)
        return binding, robust, weak
    contradicted = [p for p in one if p["verdict"] == "not_reproduced"]
    if not contradicted:
        return None
    binding = max(contradicted, key=lambda p: p["overturn_spread"])
    strong = next((p for p in contradicted if p["robust"]), None)
    robust = True if strong else (None if any(p["robust"] is None for p in contradicted) else False)
    return binding, robust, strong


def annotate(entry: dict[str, Any], results: dict[str, Any], percent: bool = False,
             seeded: bool = True) -> None:
    """Add scope and seed-spread fields to a checked finding `entry` and its parts (module
    docstring), for the bench output whose results.json is `results`. `percent`: the statistic is
    a log ratio, shown as a percentage; `seeded`: --seeds gives the claim several seeds (False for
    a study that trains one, claim c's)."""
    def fmt(x: float) -> str:
        return spread_text(x, percent)

    parts = [p for p in (entry.get("measured") or {}).get("parts") or []
             if p.get("verdict") != "not_applicable"]
    if entry["verdict"] == "not_applicable" or not parts:
        entry["variance"] = {"scope": None, "summary": "–", "note": ""}
        return
    for p in parts:
        _annotate_part(p, results, entry["id"], seeded, fmt)
    seeds = sorted({_seeds(p) for p in parts})
    one = [p for p in parts if _seeds(p) == 1]
    many = [p for p in parts if _seeds(p) >= 2]
    missing = _missing(results, seeded)  # said once in the note, not once per part
    notes = "; ".join(f"{p['name']}: {p['variance'].replace(missing, 'not measured')}" for p in parts)
    if any(missing in p["variance"] for p in parts):
        notes += f". {missing[0].upper()}{missing[1:]}"
    info: dict[str, Any] = {}
    if not one:
        span = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        scope = f"over {span} seeds"
        summary = f"{scope} (t interval)"
        note = f"t intervals over seeds, so the verdicts account for seed-to-seed variance. {notes}."
    else:
        scope = SCOPE_RUN if not many else f"over {max(seeds)} seeds ({len(one)} part(s) one seed)"
        decided = [p for p in one if p.get("overturn_spread") is not None]
        level = _claim_level(entry["verdict"], decided) if entry["verdict"] in DECIDED else None
        if many:
            summary = scope
        elif level is None:
            summary = "this run only; undecided already"
        else:
            binding, robust, shown = level
            info = {"overturn_spread": binding["overturn_spread"], "robust": robust,
                    "binding_part": binding["name"], "robust_evidence": shown["name"] if shown else None}
            measured = [p for p in decided if p["measured_spread"] is not None]
            verdict = entry["verdict"].replace("_", " ")
            summary = (f"this run only; {verdict} unless the seed spread exceeds "
                       f"{fmt(binding['overturn_spread'])} ({binding['name']})")
            if robust is not None:
                prov = any(p["measured_spread"]["provisional"] for p in measured)
                why = (f"{shown['name']}: {fmt(shown['measured_spread']['value'])} "
                       f"{'<' if robust else '>'} {fmt(shown['overturn_spread'])}" if shown else
                       "every part" if robust else "every contradicted part")
                summary += (f"; {'robust' if robust else 'not robust'} to the measured spread ({why}"
                            f"{', provisional' if prov else ''})")
            else:
                summary += "; seed spread not measured" + (" for some parts" if measured else "")
            if measured and len(decided) > 1:
                n_robust = sum(bool(p["robust"]) for p in measured)
                summary += f"; parts robust {n_robust} of {len(decided)}"
                if len(measured) < len(decided):
                    summary += f", {len(decided) - len(measured)} not measured"
        note = ("one seed, so a verdict holds for this training run only; a spread is the seed-to-seed "
                "standard deviation of the part's statistic, and the one that would overturn a verdict is "
                "sqrt((estimate / 1.96)^2 - (evaluation sd)^2) (docs/findings.md, \"Training variance\"). "
                f"{notes}.")
    entry["scope"] = scope
    entry["variance"] = {"scope": scope, **info, "summary": summary, "note": note}
    entry["why"] = (entry.get("why", "") + " Training variance: " + note).strip()
