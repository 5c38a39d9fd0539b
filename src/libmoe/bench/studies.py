"""The extra studies of `libmoe bench --studies` that the paper-findings checks need beyond the
table's runs (`libmoe.findings`):

- ``init-std``: the router-initialisation study (paper Fig. 11; claim c). One algorithm (SMoE)
  trains for a short budget once per router init std, same seed, data and data order, logging the
  balance loss every step, into ``OUT/studies/init_std/std_<s>``; ``OUT/studies/init_std/
  init_std.json`` summarises the curves (`libmoe.analysis.init_std`). Its runs are bench runs
  (resumed, skipped when finished, run in the worker pool with the others) that are neither
  evaluated nor analysed.
- ``droptop`` and ``temperature``: the inference-time interventions of each run's routing
  analysis (paper Fig. 5, Table 7; claims e, f), measured on the run's validation windows.

A preset lists its studies under ``studies`` (without it, DropTop and temperature follow its
``interventions`` flag) and their options under ``study_options``; ``--studies`` overrides the
list (``none`` turns every study off).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analysis import INIT_STD_FILE, summarise_init_std
from ..files import write_json
from ..findings import INIT_STD_DIR
from ..overrides import did_you_mean

if TYPE_CHECKING:
    from .presets import BenchPreset
    from .regimes import PlanContext
    from .spec import RunSpec

__all__ = ["INIT_STD_DEFAULTS", "STUDIES", "init_std_options", "interventions_of",
           "parse_studies", "plan_init_std", "preset_studies", "summarise_studies"]

STUDIES = ("init-std", "droptop", "temperature")
INIT_STD_DEFAULTS: dict[str, Any] = {
    "stds": [0.02, 0.04, 0.06],  # the paper's (Fig. 11)
    "algorithm": "smoe",
    "steps": None,  # None: a third of the table's runs' train.max_steps
    "early_steps": None,  # the window of the early balance loss; None: a third of `steps`
}


def parse_studies(studies: str | list[str] | None) -> list[str] | None:
    """The study names of `--studies` ("init-std,droptop", "all", "none"); None stays None."""
    if studies is None:
        return None
    names = [s.strip() for s in studies.split(",")] if isinstance(studies, str) else list(studies)
    names = [n for n in names if n]
    if names == ["all"]:
        return list(STUDIES)
    if names in (["none"], []):
        return []
    for name in names:
        if name not in STUDIES:
            raise ValueError(f"unknown study {name!r}.{did_you_mean(name, list(STUDIES))} "
                             f"Valid: {', '.join(STUDIES)} (or all, none).")
    return [s for s in STUDIES if s in names]


def preset_studies(preset: BenchPreset) -> list[str]:
    """The preset's studies (its `studies`, else DropTop and temperature when `interventions`)."""
    if preset.studies is not None:
        return parse_studies(preset.studies) or []
    return ["droptop", "temperature"] if preset.interventions else []


def interventions_of(studies: list[str]) -> list[str]:
    """The intervention studies among `studies`, as `analyze_run(interventions=...)` takes them."""
    return [s for s in studies if s in ("droptop", "temperature")]


def init_std_options(preset: BenchPreset) -> dict[str, Any]:
    given = dict((preset.study_options or {}).get("init-std") or {})
    unknown = set(given) - set(INIT_STD_DEFAULTS)
    if unknown:
        key = sorted(unknown)[0]
        raise ValueError(f"bench preset {preset.name}: study_options.init-std {sorted(unknown)} are not "
                         f"options.{did_you_mean(key, list(INIT_STD_DEFAULTS))} "
                         f"Valid: {', '.join(INIT_STD_DEFAULTS)}.")
    return {**INIT_STD_DEFAULTS, **given}


def plan_init_std(ctx: PlanContext, max_steps: int) -> list[RunSpec]:
    """The init-std study's runs: `algorithm` once per std, trained from scratch with the bench's
    common overrides (data, batch, model) and the study's short budget."""
    opts = init_std_options(ctx.preset)
    steps = int(opts["steps"] or max(1, max_steps // 3))
    specs = []
    for std in opts["stds"]:
        if not float(std) > 0:
            raise ValueError(f"study_options.init-std.stds: router init std {std} must be positive.")
        cfg = ctx.resolve(f"model.algorithm={opts['algorithm']}", f"model.moe_options.router_init_std={std}",
                          "train.seed=0", f"train.max_steps={steps}", "train.log_every=1",
                          f"train.checkpoint_every={steps}", f"train.eval_every={steps}")
        name = f"init_std-{float(std):g}"
        specs.append(ctx.spec(name, opts["algorithm"], 0, ctx.out / INIT_STD_DIR / f"std_{float(std):g}",
                              cfg.to_dict(), tasks=[], limits={}, analysis=False, role="study",
                              evaluate=False, regime="pretrain"))
    return specs


def summarise_studies(out: Path, preset: BenchPreset,
                      rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(results.json's "studies": what each study that ran found; the init-std summary, also
    written to OUT/studies/init_std/init_std.json, or None)."""
    done = {r["name"]: r for r in rows if r.get("status") == "ok"}
    init = [r for r in rows if r["name"].startswith("init_std-")]
    result: dict[str, Any] = {}
    summary = None
    if init:
        opts = init_std_options(preset)
        runs = {float(r["name"].removeprefix("init_std-")): Path(r["run"]) for r in init if r["name"] in done}
        if runs:
            steps = max(int(done[r["name"]].get("step") or 0) for r in init if r["name"] in done)
            early = int(opts["early_steps"] or max(1, steps // 3))
            summary = summarise_init_std(dict(sorted(runs.items())), early,
                                         {"algorithm": opts["algorithm"], "steps": steps})
            summary["failed"] = [r["name"] for r in init if r["name"] not in done]
            path = write_json(out / INIT_STD_DIR / INIT_STD_FILE, summary, indent=1)
            result["init_std"] = {"file": str(path.relative_to(out)), "early_steps": early,
                                  "early_balance": summary["early_balance"], "stds": summary["stds"],
                                  "algorithm": opts["algorithm"], "steps": steps}
        else:
            result["init_std"] = {"failed": [r["name"] for r in init]}
    return result, summary
