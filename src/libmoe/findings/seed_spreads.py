"""Measured seed spreads: how much each finding's statistic moves from one training run to another.

A one-seed verdict holds for its training run only; whether it would survive another seed (or
another machine, whose float kernels send training down another path the same way) depends on the
seed-to-seed standard deviation of its statistic. `SEED_SPREADS` holds the spreads measured by
multi-seed benches, keyed by bench preset, claim and part, each claim with its provenance:

    SEED_SPREADS = {
        "default": {                                # the bench preset (results.json's "preset")
            "a_moe_beats_dense": {                  # the finding id
                "spreads": {"smoe": 0.0048, ...},   # part name -> sample sd over seeds of the
                                                    # part's statistic (its own units: claim a's is
                                                    # the log-perplexity difference)
                "seeds": 2,                         # training runs the sd is over
                "source": "...", "output": "...", "date": "YYYY-MM-DD",
                "provisional": True,                # not from a multi-seed bench of this libmoe
                "config": {...},                    # `config_summary` of the measured output
            },
        },
    }

`measured_spread` looks a part up: the output's own preset first, then any preset measured with
the same configuration (the `claims` preset extends `default`, so either one's measurements serve
both); a record whose configuration differs from the output's is still shown, marked. To add the
spreads of a multi-seed bench output (e.g. `libmoe bench --preset claims`):

    python -m libmoe.findings.measure_spreads BENCH_DIR --preset default --source "claims preset, 3 seeds"

prints the records as a Python literal to paste into `SEED_SPREADS` (`spread_records` is the same
as a function).
"""

from __future__ import annotations

import datetime
from typing import Any

from ..overrides import lookup

__all__ = ["CONFIG_KEYS", "SEED_SPREADS", "config_summary", "measured_spread", "spread_records"]

# The run-config values that decide a statistic's seed spread: a record measured with other values
# of these is shown marked "another configuration".
CONFIG_KEYS = ("preset", "model.vocab_size", "model.d_model", "model.n_layers", "model.n_experts",
               "model.expert_dim", "model.top_k", "model.n_shared", "model.moe_options", "model.init_std",
               "optim.lr", "optim.warmup_steps", "train.max_steps", "train.batch_size", "data.source",
               "data.probe_tokens", "algorithm_options")

# The default preset's configuration before issue 22's per-algorithm settings (libmoe at
# issue 22: cpu-tiny, 270 steps of 32 x 128 tokens, routers N(0, 0.1)).
_DEFAULT_AT_ISSUE_22 = {
    "preset": "cpu-tiny", "model.vocab_size": 4096, "model.d_model": 128, "model.n_layers": 4,
    "model.n_experts": 16, "model.expert_dim": 128, "model.top_k": 4, "model.n_shared": 2,
    "model.moe_options": {"router_init_std": 0.1}, "model.init_std": 0.02, "optim.lr": 0.002,
    "optim.warmup_steps": 30, "train.max_steps": 270, "train.batch_size": 32, "data.source": "embedded",
    "data.probe_tokens": 8192, "algorithm_options": {}}  # before the per-algorithm settings

# The default preset's configuration when its seed spreads were measured (issue 22: cpu-tiny, 270 steps
# of 32 x 128 tokens, routers N(0, 0.1), each algorithm's own settings).
_DEFAULT_NOW = {
    **_DEFAULT_AT_ISSUE_22,
    "algorithm_options": {"sigma_moe": {"sigma_renormalize": False},
                          "moe_plus_plus": {"expert_init": "dense_match"},
                          "tc_moe": {"expert_init": "dense_match"}}}

# The claims preset's run of 2026-12-07 (docs/studies.md "The claims preset"): three seeds of every
# algorithm, the sd over the seeds of each part's statistic (`python -m libmoe.findings.measure_spreads`).
_CLAIMS_RUN = {
    "seeds": 3,
    "source": "libmoe bench --preset claims (3 seeds), the 2-core development VM (torch 2.13.0, one thread "
              "per run, the embedded corpus of Python 3.11.7)",
    "output": "docs/studies.md, 'The claims preset'",
    "date": "2026-12-07",
    "provisional": False,
    "config": _DEFAULT_NOW,
}

SEED_SPREADS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "a_moe_beats_dense": {
            "spreads": {"smoe": 0.008245, "sigma_moe": 0.040956, "xmoe": 0.038945,
                        "sharede_v2": 0.052661, "sharede_v3": 0.018792, "moe_plus_plus": 0.022232,
                        "tc_moe": 0.034508},
            **_CLAIMS_RUN},
        "b_change_rate_falls": {
            "spreads": {"smoe": 0.025802, "sigma_moe": 0.019474, "xmoe": 0.013761,
                        "sharede_v2": 0.016892, "sharede_v3": 0.033814, "moe_plus_plus": 0.016782,
                        "tc_moe": 0.041587},
            **_CLAIMS_RUN},
        "d_margin_grows_with_depth": {
            "spreads": {"smoe": 0.030062, "sigma_moe": 0.002596, "xmoe": 0.032526,
                        "sharede_v2": 0.015974, "sharede_v3": 0.012824, "moe_plus_plus": 0.02059,
                        "tc_moe": 0.029832},
            **_CLAIMS_RUN},
        "e_droptop_hurts": {
            "spreads": {"smoe DropTop1": 0.373054, "smoe DropTop1&2 vs 1": 0.075524,
                        "sigma_moe DropTop1": 0.189205, "sigma_moe DropTop1&2 vs 1": 0.095866,
                        "xmoe DropTop1": 0.118086, "xmoe DropTop1&2 vs 1": 0.066917,
                        "sharede_v2 DropTop1": 0.035702, "sharede_v2 DropTop1&2 vs 1": 0.00091,
                        "sharede_v3 DropTop1": 0.019094, "sharede_v3 DropTop1&2 vs 1": 0.009153,
                        "moe_plus_plus DropTop1": 0.088027, "moe_plus_plus DropTop1&2 vs 1": 0.054089,
                        "tc_moe DropTop1": 0.822939, "tc_moe DropTop1&2 vs 1": 0.34111},
            **_CLAIMS_RUN},
        "f_temperature": {
            "spreads": {"smoe": 0.106286, "sigma_moe": 0.010846, "xmoe": 0.0574, "sharede_v2": 0.001753,
                        "sharede_v3": 0.008279, "moe_plus_plus": 0.04523, "tc_moe": 0.128658},
            **_CLAIMS_RUN},
        "h_subtask_specialisation": {
            "spreads": {"xmoe spread vs SMoE family": 0.005417, "tc_moe spread vs SMoE family": 0.005047,
                        "tc_moe lowest weight entropy": 0.017247},
            **_CLAIMS_RUN},
    },
}


def config_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The `CONFIG_KEYS` values of a bench output's results.json "config" (those it records)."""
    config = results.get("config") or {}
    return {k: v for k in CONFIG_KEYS if (v := lookup(config, k)) is not None and v != "(each)"}


def _differs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys both summaries hold with different values (a key one lacks is not a difference:
    outputs from before a key existed stay comparable)."""
    return [k for k in CONFIG_KEYS if k in a and k in b and a[k] != b[k]]


def measured_spread(results: dict[str, Any], claim: str, part: str,
                    table: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, Any] | None:
    """The measured seed spread of `part` of `claim` for the bench output whose results.json is
    `results`: {"value", "seeds", "provisional", "source", "output", "date", "preset",
    "config_differs": [keys]}; None when no record has it. Its own preset's record first, then a
    record of another preset with the same configuration."""
    table = SEED_SPREADS if table is None else table
    preset = results.get("preset")
    mine = config_summary(results)
    candidates = [(preset, table.get(preset, {}).get(claim))] if preset in table else []
    candidates += [(p, claims.get(claim)) for p, claims in table.items() if p != preset]
    for name, record in candidates:
        if not record or part not in (record.get("spreads") or {}):
            continue
        differs = _differs(mine, record.get("config") or {})
        if name != preset and (differs or not mine):  # another preset's: only for the same config
            continue
        return {"value": float(record["spreads"][part]), "seeds": record.get("seeds"),
                "provisional": bool(record.get("provisional")), "source": record.get("source", ""),
                "output": record.get("output", ""), "date": record.get("date", ""), "preset": name,
                "config_differs": differs}
    return None


def spread_records(findings: list[dict[str, Any]], results: dict[str, Any], source: str,
                   output: str = "", date: str | None = None) -> dict[str, dict[str, Any]]:
    """{claim: record} for `SEED_SPREADS[preset]` from the findings of a multi-seed bench output
    (`results`: its results.json): each part judged over seeds gives its `seed_spread` (the
    sample sd of its per-seed statistic); one-seed parts are left out."""
    out: dict[str, dict[str, Any]] = {}
    for f in findings:
        parts = [p for p in (f.get("measured") or {}).get("parts") or [] if p.get("seeds", 1) >= 2
                 and p.get("seed_spread") is not None]
        if not parts:
            continue
        out[f["id"]] = {"spreads": {p["name"]: round(float(p["seed_spread"]), 6) for p in parts},
                        "seeds": min(p["seeds"] for p in parts), "source": source, "output": output,
                        "date": date or datetime.date.today().isoformat(), "provisional": False,
                        "config": config_summary(results)}
    return out
