"""The `upcycle` regime: one dense LM is pretrained (the source, ``OUT/source/dense``), upcycled into
every algorithm (``OUT/upcycled/<algorithm>-s<seed>``: experts exact copies of the dense FFN, routers
N(0, router_init_std) from one seeded generator; shared-expert algorithms E-1 routed copies plus the
FFN as one shared expert, mixed 0.5/0.5, as `libmoe upcycle` does), and every upcycled model and the
dense source itself (the dense row) train on with the same data, data order and budget. Its runs,
tables and report are the `pretrain` regime's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ...eval import validation_perplexity
from ...files import read_json, write_json
from ...models import MoETransformer, latest_checkpoint, load_model
from ...upcycle import upcycle_checkpoint, upcycle_model
from ...upcycle.core import UPCYCLE_FILE
from ..presets import BenchPreset, yaml_value
from ..spec import RunSpec
from .base import PlanContext
from .pretrain import PretrainRegime


class UpcycleRegime(PretrainRegime):
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
        opts = self.options(ctx.preset)
        source_extra = [f"{k}={yaml_value(v)}" for k, v in opts["source_overrides"].items()]
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
                               "router_init_std": opts["router_init_std"], **opts["moe_options"],
                               **(ctx.preset.algorithm_options.get(algorithm) or {})}
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
        if run_stamp.is_file() and _read_or_none(run_stamp) != stamp \
                and latest_checkpoint(spec.run_dir) is not None:
            raise ValueError(f"{spec.run_dir} holds a run that started from another source model; "
                             "give a new --out or delete that run.")
        if "upcycle" in p:
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
    ppl = validation_perplexity(load_model(init), "run")["ppl"]
    write_json(cache, {"stamp": stamp, "ppl": ppl}, indent=None)
    return ppl
