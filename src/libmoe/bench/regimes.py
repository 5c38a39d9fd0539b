"""Training regimes of `libmoe bench`: how the runs of a study start.

A regime is one small class registered in REGIMES. It plans the study as stages of RunSpecs
(`plan`): every stage runs after the one before it, and the last stage holds the table's rows
(one run per algorithm and seed). It may do work in the process that trains a run, just before
training (`prepare`, e.g. upcycling the source model), add keys to results.json (`summary`) and
describe the setup in the report (`describe`). Everything else (launchers, resuming, evaluation,
latency, routing analysis, tables, report) is shared.

- `pretrain` (the default): every algorithm trains from a random init (the paper's Table 2).
- `upcycle`: one dense LM is pretrained (the source, ``OUT/source/dense``), upcycled into every
  algorithm (``OUT/upcycled/<algorithm>-s<seed>``: experts exact copies of the dense FFN, routers
  N(0, router_init_std) from one seeded generator; shared-expert algorithms E-1 routed copies plus
  the FFN as one shared expert, mixed 0.5/0.5, as `libmoe upcycle` does), and every upcycled model
  and the dense source itself (the dense row) train on with the same data, data order and budget.

A regime's options come from the bench preset's `regime_options` when the preset is of that
regime (`regime: upcycle`), else from the regime's defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..files import read_json, write_json
from ..moe.options import did_you_mean

if TYPE_CHECKING:
    from .presets import BenchPreset
    from .runner import RunSpec


@dataclass
class PlanContext:
    """What every regime plans from: the preset, the study's shape and the evaluation."""

    out: Path
    preset: BenchPreset
    regime: str
    algorithms: list[str]
    seeds: int
    common: list[str]  # overrides of every run: the preset's, --data, the user's key=value
    tasks: list[str] = field(default_factory=list)
    limits: dict[str, int | None] = field(default_factory=dict)
    data_dir: str | None = None
    launcher: str = "local"
    nproc: int = 1
    threads: int | None = None
    analysis: bool = True
    source_overrides: list[str] = field(default_factory=list)  # the user's `source.KEY=VALUE`, for
    # the runs the rows start from (the upcycle regime's dense source)
    interventions: bool | list[str] = True  # the intervention studies of each run's analysis

    def resolve(self, *extra: str):
        """The RunConfig of the preset's training preset with the common and `extra` overrides."""
        from ..train import resolve_config

        return resolve_config(overrides=[*self.common, *extra], preset=self.preset.train_preset)

    def spec(self, name: str, algorithm: str, seed: int, run_dir: str | Path, config: dict[str, Any],
             **fields: Any) -> RunSpec:
        """A RunSpec of this study (evaluation, launcher and regime filled in)."""
        from .runner import RunSpec

        common = dict(tasks=list(self.tasks), limits=dict(self.limits), data_dir=self.data_dir,
                      val_tokens=self.preset.val_tokens, launcher=self.launcher, nproc=self.nproc,
                      threads=self.threads, analysis=self.analysis,
                      interventions=self.interventions, regime=self.regime)
        return RunSpec(name, algorithm, seed, str(run_dir), config, **{**common, **fields})


class Regime:
    """The `pretrain` regime, and the base of the others (see the module docstring)."""

    name: ClassVar[str] = "pretrain"
    default_preset: ClassVar[str] = "default"  # the preset `--regime NAME` uses without --preset
    description: ClassVar[str] = "every algorithm trains from a random init"
    defaults: ClassVar[dict[str, Any]] = {}  # regime_options and their defaults

    def options(self, preset: BenchPreset) -> dict[str, Any]:
        given = preset.regime_options if preset.regime == self.name else {}
        unknown = set(given) - set(self.defaults)
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(f"bench preset {preset.name}: regime_options {sorted(unknown)} are not "
                             f"options of the {self.name} regime.{did_you_mean(key, list(self.defaults))} "
                             f"Valid: {', '.join(self.defaults) or 'none'}.")
        return {**self.defaults, **given}

    def plan(self, ctx: PlanContext) -> list[list[RunSpec]]:
        """Stages of runs; the last one is the table's rows."""
        if ctx.source_overrides:
            raise ValueError(f"source.* overrides ({', '.join(ctx.source_overrides)}) set the source run "
                             f"of a regime that has one (upcycle); the {self.name} regime has none.")
        specs = []
        for seed in range(ctx.seeds):
            for algorithm in ctx.algorithms:
                cfg = ctx.resolve(f"model.algorithm={algorithm}", f"train.seed={seed}")
                name = f"{algorithm}-s{seed}"
                specs.append(ctx.spec(name, algorithm, seed, ctx.out / "runs" / name, cfg.to_dict()))
        return [specs]

    def prepare(self, spec: RunSpec, row: dict[str, Any]) -> None:
        """Before `spec` trains, in the process that trains it; may add keys to its row."""

    def summary(self, preset: BenchPreset, support: list[dict[str, Any]]) -> dict[str, Any]:
        """Keys for results.json, given the rows of the stages before the table's."""
        return {}

    def describe(self, results: dict[str, Any]) -> str:
        """The report's setup sentence about how the runs were trained."""
        cfg = results["config"]
        m, t = cfg["model"], cfg["train"]
        seq_len = t.get("seq_len") or m["max_seq_len"]
        return (f"Every algorithm trains the same {m['n_layers']}-layer, d={m['d_model']} model "
                f"({m['n_experts']} experts of width {m['expert_dim']}, top-{m['top_k']}; dense FFN "
                f"{m['top_k'] * m['expert_dim']}) from a random init for {t['max_steps']} steps of "
                f"{t['batch_size']} x {seq_len} tokens on {cfg['data']['source']}, same data order, "
                f"{results['seeds']} seed(s).")


PretrainRegime = Regime


class UpcycleRegime(Regime):
    """One dense source, upcycled into every algorithm, then every model trains on alike."""

    name = "upcycle"
    default_preset = "upcycle"
    description = "one dense LM pretrained, upcycled into every algorithm, each trained on alike"
    defaults = {
        "n_experts": 8,  # experts per upcycled layer (shared-expert algorithms: E-1 routed + 1 shared)
        "top_k": 2,  # experts per token, the shared one included
        "router_init_std": 0.02,  # routers N(0, std), the paper's
        "layers": None,  # blocks to upcycle (None: all)
        "moe_options": {},  # further options of the upcycled layers (e.g. balance_coef)
        "source_overrides": {},  # dotted run-config keys of the source only (its budget); the
        # user's `source.KEY=VALUE` (e.g. source.train.seed=7) follow them
        "source_seed": 1000,  # the source's train.seed: its data order differs from the rows'
    }

    def plan(self, ctx: PlanContext) -> list[list[RunSpec]]:
        import torch

        from ..models import MoETransformer
        from ..upcycle.core import upcycle_model
        from .presets import _yaml_value

        opts = self.options(ctx.preset)
        source_extra = [f"{k}={_yaml_value(v)}" for k, v in opts["source_overrides"].items()]
        source_cfg = ctx.resolve(*source_extra, "model.algorithm=dense", f"train.seed={opts['source_seed']}",
                                 *ctx.source_overrides)  # the user's source.KEY=VALUE last
        source_dir = ctx.out / "source" / "dense"
        source = ctx.spec("dense-source", "dense", opts["source_seed"], source_dir, source_cfg.to_dict(),
                          tasks=[], limits={}, analysis=False, role="source")
        final = source_dir / "checkpoints" / f"step_{source_cfg.train.max_steps}"
        with torch.device("meta"):  # only the upcycled models' configs are needed here
            dense = MoETransformer(source_cfg.model)
        rows = []
        for seed in range(ctx.seeds):
            base = ctx.resolve("model.algorithm=dense", f"train.seed={seed}")
            for algorithm in ctx.algorithms:
                name = f"{algorithm}-s{seed}"
                prepare: dict[str, Any] = {"source": str(source_dir), "source_checkpoint": str(final),
                                           "source_hash": source.config_hash}
                if algorithm == "dense":  # the dense row: the source itself trains on
                    model, init = source_cfg.model, final
                else:
                    upcycle = {"algorithm": algorithm, "n_experts": opts["n_experts"],
                               "top_k": opts["top_k"], "layers": opts["layers"], "seed": seed,
                               "router_init_std": opts["router_init_std"], **opts["moe_options"]}
                    with torch.device("meta"):
                        model = upcycle_model(dense, **upcycle).config
                    init = ctx.out / "upcycled" / name
                    prepare["upcycle"] = upcycle
                cfg = dataclasses.replace(base, model=model, init=str(init))
                rows.append(ctx.spec(name, algorithm, seed, ctx.out / "runs" / name, cfg.to_dict(),
                                     needs=[source.name], prepare=prepare))
        return [[source], rows]

    def prepare(self, spec: RunSpec, row: dict[str, Any]) -> None:
        """Upcycle the source's final checkpoint into RUN's init directory (unless it is there,
        made from the same source), and record the init's validation perplexity on training's
        evaluation windows (for exact algorithms, the source's final one)."""
        p = spec.prepare
        if not p:  # the source itself trains from a random init
            return
        final = Path(p["source_checkpoint"])
        if not (final / "model.safetensors").is_file():
            raise FileNotFoundError(f"the dense source has no final checkpoint {final}; it did not finish.")
        init = Path(spec.config["init"])
        stamp = {"source_hash": p["source_hash"], "upcycle": p.get("upcycle")}
        run_stamp = Path(spec.run_dir) / "bench_init.json"
        if run_stamp.is_file() and _read_or_none(run_stamp) != stamp:
            from ..train.checkpoint import latest_checkpoint

            if latest_checkpoint(spec.run_dir) is not None:
                raise ValueError(f"{spec.run_dir} holds a run that started from another source model; "
                                 "give a new --out or delete that run.")
        if "upcycle" in p:
            from ..upcycle.core import UPCYCLE_FILE, upcycle_checkpoint

            init_stamp = init / "bench_init.json"
            if not (init_stamp.is_file() and _read_or_none(init_stamp) == stamp
                    and (init / UPCYCLE_FILE).is_file()):
                u = dict(p["upcycle"])
                upcycle_checkpoint(final, init, u.pop("algorithm"), u.pop("n_experts"), u.pop("top_k"),
                                   u.pop("layers"), u.pop("seed"), u.pop("router_init_std"),
                                   overwrite=True, **u)
                write_json(init_stamp, stamp, indent=1)
            info = read_json(init / UPCYCLE_FILE)
            row["upcycle"] = {k: info.get(k) for k in ("source", "seed", "router_init_std",
                                                       "max_abs_logit_diff", "exact_at_init",
                                                       "why_not_exact") if k in info}
        row["init"] = str(init)
        row["init_ppl"] = _init_ppl(init, Path(spec.run_dir) / "bench_init_ppl.json", stamp)
        write_json(run_stamp, stamp, indent=1)

    def summary(self, preset: BenchPreset, support: list[dict[str, Any]]) -> dict[str, Any]:
        opts = self.options(preset)
        source = next((r for r in support if r.get("name") == "dense-source"), {})
        keep = ("name", "run", "status", "error", "step", "train_time_s", "tokens_per_s", "peak_mem_mb",
                "params_total", "train_val_ppl", "ppl", "latency_ms", "skipped")
        return {"regime_options": opts, "source": {k: source[k] for k in keep if k in source}}

    def describe(self, results: dict[str, Any]) -> str:
        cfg, opts, source = results["config"], results["regime_options"], results.get("source") or {}
        m, t = cfg["model"], cfg["train"]
        seq_len = t.get("seq_len") or m["max_seq_len"]
        width = m.get("ffn_dim") or m["top_k"] * m["expert_dim"]
        steps = source.get("step")
        ppl = source.get("ppl")
        src = (f"A dense {m['n_layers']}-layer, d={m['d_model']} model (FFN {width}) was pretrained "
               f"for {steps if steps is not None else '?'} steps (the source, OUT/source/dense"
               + (f", held-out perplexity {ppl:.2f}" if ppl else "")
               + (f", {source['train_time_s']:.0f} s" if source.get("train_time_s") else "") + "). ")
        return (src + f"Each algorithm was upcycled from its final checkpoint ({opts['n_experts']} experts, "
                f"exact copies of the FFN, top-{opts['top_k']}; SharedE-V2/V3 {opts['n_experts'] - 1} "
                f"routed copies + the FFN as one shared expert, mixed 0.5/0.5; routers "
                f"N(0, {opts['router_init_std']}) from the run's seed) and trained for {t['max_steps']} "
                f"more steps of {t['batch_size']} x {seq_len} tokens on {cfg['data']['source']}, as was "
                f"the dense source itself (the dense row): same data, data order and budget, "
                f"{results['seeds']} seed(s). Upcycled layers hold full-width experts, so top-"
                f"{opts['top_k']} costs about {opts['top_k']}x the dense FFN per token: not "
                "compute-matched, as in sparse upcycling.")


def _read_or_none(path: Path) -> Any:
    """The JSON in `path`, or None when it is damaged (a stamp then counts as different)."""
    try:
        return read_json(path)
    except ValueError:
        return None


def _init_ppl(init: Path, cache: Path, stamp: dict[str, Any]) -> float | None:
    """Validation perplexity of the init model on training's evaluation windows (cached)."""
    saved = _read_or_none(cache) if cache.is_file() else None
    if isinstance(saved, dict) and saved.get("stamp") == stamp and "ppl" in saved:
        return saved["ppl"]
    from ..eval.evaluator import validation_perplexity
    from ..models import load_model

    ppl = validation_perplexity(load_model(init), "run")["ppl"]
    write_json(cache, {"stamp": stamp, "ppl": ppl}, indent=None)
    return ppl


class VLMRegime(Regime):
    """The vision-language comparison (the paper's Table 1): PT and PFT once, then VIT for every
    algorithm from the same dense PFT checkpoint. Its runs are VLM stages, not language-model runs,
    so it runs its own pipeline (`libmoe.vlm.bench.run_vlm_bench`) and writes the same outputs."""

    name = "vlm"
    default_preset = "vlm"
    description = "a VLM: PT and PFT once, VIT (sparse upcycling) of every algorithm from one checkpoint"
    standalone = True

    def plan(self, ctx: PlanContext) -> list[list[RunSpec]]:
        raise ValueError("the vlm regime runs through libmoe.vlm.bench.run_vlm_bench.")

    def run(self, out, preset, algorithms, seeds, jobs, compare, overrides, analysis, log, studies=None,
            overwrite=False):
        from ..vlm.bench import run_vlm_bench

        return run_vlm_bench(out, preset, algorithms, seeds, jobs, compare, overrides, analysis, log,
                             studies=studies, overwrite=overwrite)

    def describe(self, results: dict[str, Any]) -> str:
        return self.description + "."


REGIMES: dict[str, Regime] = {r.name: r for r in (Regime(), UpcycleRegime(), VLMRegime())}


def get_regime(name: str) -> Regime:
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}.{did_you_mean(name, list(REGIMES))} "
                         f"Valid: {', '.join(REGIMES)}.")
    return REGIMES[name]
