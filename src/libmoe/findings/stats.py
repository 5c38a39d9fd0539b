"""The statistics of the findings checks: one method for every claim.

- **One seed**: a nonparametric bootstrap over the units a run's number is made of (validation
  windows, probe sequences, evaluation questions, blocks of logged steps), with a fixed seed and
  `RESAMPLES` resamples; the 95% interval is the 2.5th-97.5th percentile of the resampled
  statistic. Runs measured on the same units (every run of a bench sees the same validation
  windows and probe sequences) are resampled with the same draws: a paired bootstrap.
- **Several seeds**: the mean of the per-seed values with a Student-t 95% interval over seeds
  (mean ± t · sd / sqrt(n)), so the seed spread, not the units, sets the uncertainty.

A part of a claim is `reproduced` only when its interval lies entirely on the claimed side of 0,
`not_reproduced` when it lies entirely on the other side, and `inconclusive` otherwise. A claim
with several parts (one per algorithm, say) is reproduced when every part is, not reproduced when
any part is contradicted, and inconclusive otherwise (`combine`).

Each part says what its interval covers (`scope`): `SCOPE_RUN` ("this training run") for the
one-seed bootstrap, which resamples the evaluation units of one trained model and so measures
evaluation noise only, or "over N seeds" for the t interval. `overturn_spread` is the seed-to-seed
standard deviation of a one-seed part's statistic that would leave its verdict undecided
(libmoe.findings.variance shows it beside the measured one).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
MIN_UNITS = 8  # fewer units than this: inconclusive whatever the interval
VERDICTS = ("reproduced", "not_reproduced", "inconclusive", "not_applicable")
Z975 = 1.959964  # the normal's two-sided 95% quantile
SCOPE_RUN = "this training run"  # a one-seed part: its interval holds for this trained model only

# two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def multiplicities(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> Tensor:
    """[resamples, n] float64: how often each of n units is drawn in each bootstrap resample (the
    same `seed` gives the same draws, so statistics of runs sharing units are paired)."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one unit.")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    ones = torch.ones_like(idx, dtype=torch.float64)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, ones)


def stratified_multiplicities(groups: Tensor, resamples: int = RESAMPLES, seed: int = SEED) -> Tensor:
    """[resamples, n] multiplicities of n units resampled within each group (`groups` [n]: a
    label per unit), so every group keeps its size in every resample."""
    w = torch.zeros(resamples, len(groups), dtype=torch.float64)
    for i, g in enumerate(torch.unique(groups).tolist()):
        cols = torch.nonzero(groups == g).flatten()
        w[:, cols] = multiplicities(len(cols), resamples, seed + i)
    return w


def weighted_mean(w: Tensor, values: Tensor, counts: Tensor | None = None) -> Tensor:
    """[B] resampled means: sum_u w_u values_u / sum_u w_u counts_u (counts default 1 per unit:
    values are unit means; with counts, values are unit sums of `counts` items)."""
    values = values.double()
    counts = torch.ones_like(values) if counts is None else counts.double()
    return (w @ values) / (w @ counts).clamp_min(1e-300)


def percentile_interval(samples: Tensor, level: float = LEVEL) -> tuple[float, float]:
    samples = samples[torch.isfinite(samples)].double()
    if samples.numel() == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2
    q = torch.quantile(samples, torch.tensor([a, 1 - a], dtype=torch.float64))
    return float(q[0]), float(q[1])


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of per-seed values (n >= 2)."""
    n = len(values)
    if n < 2:
        raise ValueError("a seed interval needs at least two seeds.")
    mean = statistics.fmean(values)
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def judge(low: float, high: float, sign: int = 1) -> str:
    """The verdict of one part whose claim is "the statistic is > 0" (sign 1) or "< 0" (sign -1)."""
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    low, high = (low, high) if sign > 0 else (-high, -low)
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not_reproduced"
    return "inconclusive"


def combine(verdicts: Sequence[str]) -> str:
    """A claim of several parts: every part reproduced -> reproduced; any part contradicted ->
    not_reproduced; parts not applicable are left out; otherwise inconclusive."""
    used = [v for v in verdicts if v != "not_applicable"]
    if not used:
        return "not_applicable"
    if "not_reproduced" in used:
        return "not_reproduced"
    if all(v == "reproduced" for v in used):
        return "reproduced"
    return "inconclusive"


def part(name: str, estimate: float, low: float, high: float, sign: int, method: str,
         **extra) -> dict:
    """One tested part of a claim: its statistic, 95% interval, claimed sign and verdict."""
    return {"name": name, "estimate": estimate, "ci95": [low, high], "claim": ">0" if sign > 0 else "<0",
            "verdict": judge(low, high, sign), "method": method, **extra}


def seeds_scope(n: int) -> str:
    """The scope of a part judged over `n` seeds ("over 3 seeds"); one seed: `SCOPE_RUN`."""
    return SCOPE_RUN if n < 2 else f"over {n} seeds"


def bootstrap_part(name: str, estimate: float, samples: Tensor, sign: int, units: int, unit: str,
                   **extra) -> dict:
    """A one-seed part: the percentile interval of the bootstrap `samples` (scope: this run)."""
    low, high = percentile_interval(samples)
    out = part(name, estimate, low, high, sign, f"bootstrap over {units} {unit}, {samples.numel()} resamples",
               scope=SCOPE_RUN, seeds=1, **extra)
    if units < MIN_UNITS:  # a resample of a handful of units understates the spread
        out.update(verdict="inconclusive", why=f"only {units} units, fewer than {MIN_UNITS} for a bootstrap")
    return out


def seeds_part(name: str, per_seed: Sequence[float], sign: int, **extra) -> dict:
    """A part over seeds: the t interval of the per-seed values; `seed_spread` is their sample
    standard deviation (the training variance this output measured)."""
    mean, low, high = t_interval(list(per_seed))
    return part(name, mean, low, high, sign, f"t interval over {len(per_seed)} seeds",
                scope=seeds_scope(len(per_seed)), seeds=len(per_seed), per_seed=list(per_seed),
                seed_spread=statistics.stdev(per_seed), **extra)


def overturn_spread(p: dict) -> float | None:
    """The seed-to-seed standard deviation s* of a one-seed part's statistic above which its
    decided verdict would be undecided; None when the part is not decided (or not one seed).

    This run's estimate D is one draw of the statistic over training runs (seeds, machines), with
    seed sd s, measured with evaluation noise of sd e (from the bootstrap interval: the distance
    from D to the interval's end nearest 0, over 1.96). A 95% normal interval for the statistic's
    mean over seeds from this one run is D +- 1.96 sqrt(s^2 + e^2); it excludes 0, as the verdict
    needs, while s < s* = sqrt((D / 1.96)^2 - e^2) (= |D| / 1.96 without evaluation noise). So s*
    is the smallest seed spread under which a training run this far from 0 would be unremarkable
    if the true effect were 0."""
    if p.get("verdict") not in ("reproduced", "not_reproduced") or p.get("seeds", 1) != 1:
        return None
    est, ci = p.get("estimate"), p.get("ci95")
    if est is None or not ci or not all(math.isfinite(x) for x in (est, *ci)):
        return None
    near = ci[0] if est > 0 else ci[1]  # the interval's end nearest 0 (it excludes 0)
    if near * est <= 0:  # the estimate and its interval on opposite sides of 0: nothing to spare
        return 0.0
    e = abs(est - near) / Z975
    return math.sqrt(max((est / Z975) ** 2 - e * e, 0.0))


def not_applicable(name: str, why: str) -> dict:
    return {"name": name, "verdict": "not_applicable", "why": why}


def method_sentence(parts: Sequence[dict]) -> str:
    """How the parts were judged, in words (the `why` of a finding starts with it)."""
    methods = sorted({p["method"] for p in parts if p.get("method")})
    if not methods:
        return ""
    return (f"95% intervals (bootstrap seed {SEED}) by " + "; ".join(methods) + ". A part is reproduced "
            "only when its interval excludes the opposite sign, contradicted when it excludes the claimed "
            "one.")


def counts(parts: Sequence[dict]) -> str:
    """'3 of 4 reproduced, 1 not reproduced' over the tested parts."""
    used = [p["verdict"] for p in parts if p["verdict"] != "not_applicable"]
    names = [("reproduced", "reproduced"), ("not_reproduced", "not reproduced"),
             ("inconclusive", "inconclusive")]
    bits = [f"{used.count(v)} {label}" for v, label in names if used.count(v)]
    return f"{len(used)} part(s): " + ", ".join(bits) if used else "no part testable"

