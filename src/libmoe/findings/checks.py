"""The LibMoE paper's claims (Section 5, Appendices C-E) as checks over a bench output.

Each check tests one or more *parts* (usually one per algorithm) with the method of
`libmoe.findings.stats` and combines them: reproduced when every part is, not reproduced when
any part is contradicted, inconclusive otherwise; not applicable when the output lacks the
inputs (which it then names).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..analysis.metrics import selections, token_change, token_margin, token_weight_entropy
from .inputs import Bench, Run, finite, same_units, sequence_ids, unit_sums
from .registry import finding
from .stats import (
    SEED,
    bootstrap_part,
    combine,
    counts,
    method_sentence,
    multiplicities,
    not_applicable,
    seeds_part,
    stratified_multiplicities,
    weighted_mean,
)

SMOE_FAMILY = ("smoe", "sigma_moe", "sharede_v2", "sharede_v3")  # top-k routers over softmax/sigmoid
SHARED = ("sharede_v2", "sharede_v3")
MARK = {"reproduced": "✓", "not_reproduced": "✗", "inconclusive": "?", "not_applicable": "–"}

Stat = Callable[[Tensor | None], Tensor]  # multiplicities [B, S] (None: the point estimate) -> [B]


def _result(parts: list[dict], summary: str, why: str, **measured) -> dict:
    verdict = combine([p["verdict"] for p in parts])
    sentence = method_sentence(parts)
    return {"measured": {"summary": summary, "parts": parts, **measured}, "verdict": verdict,
            "why": " ".join(x for x in (sentence, why, counts(parts) + ".") if x)}


def _na(why: str, **measured) -> dict:
    return {"measured": {"summary": "not measured", **measured}, "verdict": "not_applicable", "why": why}


def _point(stat: Stat) -> float:
    return float(stat(None)[0])


def _stat_part(name: str, per_seed: list[tuple[Stat, int | Callable[[], Tensor]]], sign: int, unit: str,
               **extra) -> dict:
    """A part from one statistic per seed: [(stat, number of units, or a function drawing the
    multiplicities)]; several seeds: the t interval over seeds; one: the bootstrap over its units."""
    if len(per_seed) >= 2:
        return seeds_part(name, [_point(s) for s, _ in per_seed], sign, **extra)
    stat, n = per_seed[0]
    w = multiplicities(n) if isinstance(n, int) else n()
    return bootstrap_part(name, _point(stat), stat(w), sign, w.shape[1], unit, **extra)


def _short(parts: list[dict], fmt: Callable[[dict], str]) -> str:
    return "; ".join(f"{p['name']} {fmt(p)}{MARK[p['verdict']]}" if p["verdict"] != "not_applicable"
                     else f"{p['name']} –" for p in parts)


def _ones(n: int) -> Tensor:
    return torch.ones(1, n, dtype=torch.float64)


def _w(w: Tensor | None, n: int) -> Tensor:
    return _ones(n) if w is None else w


# ----------------------------------------------------------------------------- a: MoE beats dense


@finding("a_moe_beats_dense", "Every MoE algorithm reaches a lower validation perplexity than the "
         "compute-matched dense model.", "Table 2", figure="bench_ppl.png", percent=True)
def a_moe_beats_dense(bench: Bench) -> dict:
    if bench.regime != "pretrain":
        return _na(f"the claim compares models pretrained from scratch at matched compute; this is a "
                   f"{bench.regime} bench" + (" (upcycled experts are full-width copies, so top-k costs "
                                              "k x the dense FFN: not compute-matched)."
                                              if bench.regime == "upcycle" else
                                              " (scored by accuracy, with no compute-matched dense LM)."))
    algs = bench.by_algorithm()
    dense = {r.seed: r for r in algs.get("dense", []) if finite(r.ppl)}
    moe = {a: {r.seed: r for r in runs if finite(r.ppl)} for a, runs in bench.moe().items()}
    if not dense or not any(moe.values()):
        return _na("the bench has no finished dense row and MoE rows with a validation perplexity "
                   "(run the bench with dense among --algorithms).")
    parts = []
    for alg, runs in moe.items():
        seeds = sorted(set(runs) & set(dense))
        if not seeds:
            parts.append(not_applicable(alg, "no run of a seed the dense model has"))
            continue
        ppl = sum(runs[s].ppl for s in seeds) / len(seeds)
        dppl = sum(dense[s].ppl for s in seeds) / len(seeds)
        if len(seeds) >= 2:
            p = seeds_part(alg, [math.log(runs[s].ppl) - math.log(dense[s].ppl) for s in seeds], -1)
        else:
            m, d = runs[seeds[0]].val_windows, dense[seeds[0]].val_windows
            if m is None or d is None or len(m) != len(d):
                est = math.log(ppl) - math.log(dppl)
                p = {"name": alg, "estimate": est, "verdict": "inconclusive",
                     "why": "one seed and no per-window validation losses of both runs to bootstrap"}
            else:
                diff = m - d
                p = bootstrap_part(alg, float(diff.mean()), weighted_mean(multiplicities(len(diff)), diff),
                                   -1, len(diff), "validation windows (paired)")
        p.update(ppl=ppl, dense_ppl=dppl)
        parts.append(p)
    summary = f"dense {sum(r.ppl for r in dense.values()) / len(dense):.2f}; " + _short(
        parts, lambda p: f"{p['ppl']:.2f} ({100 * math.expm1(p['estimate']):+.1f}%)")
    return _result(parts, summary, "Statistic: difference of mean validation loss (log perplexity), MoE "
                   "minus dense, per algorithm; the claim needs it below 0 for every algorithm.")


# ----------------------------------------------------------------------------- b: change rate falls


def _change_sums(traces, pairs: list[tuple[int, int]]) -> tuple[Tensor, Tensor, int]:
    """Per probe sequence: (sum over its tokens of the change rate, mean over layers and `pairs`
    of traces; token count; number of sequences)."""
    ids = sequence_ids(traces[0])
    n = int(ids.max()) + 1
    per_token = torch.zeros(traces[0].n_tokens, dtype=torch.float64)
    for i, j in pairs:
        for l in range(traces[i].n_layers):
            per_token += token_change(traces[i].topk_idx[l], traces[j].topk_idx[l]).double()
    per_token /= len(pairs) * traces[0].n_layers
    sums, cnt = unit_sums(per_token, ids, n)
    return sums, cnt, n


@finding("b_change_rate_falls", "The expert change rate falls over training, for every algorithm.",
         "Fig. 3", figure="change_rate.png")
def b_change_rate_falls(bench: Bench) -> dict:
    parts = []
    for alg, runs in bench.moe().items():
        per_seed = []
        for run in runs:
            traces = run.traces
            if len(traces) < 3 or not same_units(traces):
                continue
            first = _change_sums(traces, [(0, 1)])
            last = _change_sums(traces, [(len(traces) - 2, len(traces) - 1)])

            def stat(w, first=first, last=last):
                return (weighted_mean(_w(w, first[2]), first[0], first[1])
                        - weighted_mean(_w(w, last[2]), last[0], last[1]))

            per_seed.append((stat, first[2], [t.step for t in traces]))
        if not per_seed:
            parts.append(not_applicable(alg, "fewer than three routing traces of one probe set (two "
                                        "checkpoint intervals) in its run"))
            continue
        steps = per_seed[0][2]
        parts.append(_stat_part(alg, [(s, n) for s, n, _ in per_seed], 1, "probe sequences (paired)",
                                first_interval=f"{steps[0]}->{steps[1]}",
                                last_interval=f"{steps[-2]}->{steps[-1]}"))
    if not parts:
        return _na("the bench has no MoE run.")
    summary = _short(parts, lambda p: f"{p['estimate']:+.3f}")
    return _result(parts, "change rate first minus last interval: " + summary,
                   "Statistic: the change rate (share of each probe token's top-k slots that differ, "
                   "mean over MoE layers) between the first two checkpoints minus that between the "
                   "last two; the claim needs it above 0 for every algorithm.")


# ----------------------------------------------------------------------------- c: init std


BLOCK = 3  # logged steps per bootstrap unit (consecutive losses are correlated)


@finding("c_init_std_balance", "A smaller router init std gives a lower balance loss early in "
         "training.", "Fig. 11 (Appendix C)", figure="init_std.png", seeded=False)
def c_init_std_balance(bench: Bench) -> dict:
    data = bench.init_std
    if not data:
        return _na("no router init-std study in this output (`libmoe bench --studies init-std`; the "
                   "default preset runs it).")
    early = int(data.get("early_steps") or 0)
    curves = {float(k): v for k, v in (data.get("curves") or {}).items()}
    stds = sorted(curves)
    if len(stds) < 2:
        return _na("the init-std study has fewer than two stds.")

    def window(std: float) -> dict[int, float]:
        c = curves[std]
        return {int(s): float(b) for s, b in zip(c["step"], c["balance"]) if int(s) <= early}

    parts = []
    for lo, hi in zip(stds, stds[1:]):
        a, b = window(lo), window(hi)
        steps = sorted(set(a) & set(b))
        name = f"{hi:g} vs {lo:g}"
        if len(steps) < 2 * BLOCK:
            parts.append(not_applicable(name, f"fewer than {2 * BLOCK} logged steps in the early window"))
            continue
        diff = torch.tensor([b[s] - a[s] for s in steps], dtype=torch.float64)
        blocks = math.ceil(len(diff) / BLOCK)
        ids = torch.arange(len(diff)) // BLOCK
        sums, cnt = unit_sums(diff, ids, blocks)
        samples = weighted_mean(multiplicities(blocks), sums, cnt)
        parts.append(bootstrap_part(name, float(diff.mean()), samples, 1, blocks,
                                    f"blocks of {BLOCK} logged steps (paired by step)",
                                    early_balance={f"{lo:g}": sum(a.values()) / len(a),
                                                   f"{hi:g}": sum(b.values()) / len(b)}))
    balance = data.get("early_balance") or {}
    summary = (f"{data.get('algorithm', 'smoe')}, steps 1-{early}: " + ", ".join(
        f"std {k} {v:.4f}" for k, v in balance.items() if finite(v)) + " " +
        "".join(MARK[p["verdict"]] for p in parts))
    return _result(parts, summary, "Statistic: mean balance loss over the first "
                   f"{early} steps, each std minus the next smaller one (one study seed; its logged "
                   "steps are the units); the claim needs every difference above 0.",
                   early_balance=balance, stds=stds)


# ----------------------------------------------------------------------------- d: margin by depth


def _slope(m: Tensor) -> Tensor:
    """[B] least-squares slope over layers of [B, L] per-layer values."""
    x = torch.arange(m.shape[1], dtype=torch.float64)
    x = x - x.mean()
    return ((m - m.mean(1, keepdim=True)) * x).sum(1) / (x * x).sum()


def _depth_layers(t) -> list[int]:
    """A VLM trace's vision-tower layers in depth order, less the last (by the trace's layer names;
    without names, every layer but the last)."""
    names = t.meta.get("layer_names") or []
    vision = [i for i, n in enumerate(names) if str(n).startswith("vision")] if names else \
        list(range(t.n_layers))
    return vision[:-1]


@finding("d_margin_grows_with_depth", "The router margin (top-1 minus top-2 weight) increases with "
         "layer depth.", "Fig. 8", figure="margin_by_depth.png")
def d_margin_grows_with_depth(bench: Bench) -> dict:
    vlm = bench.regime == "vlm"  # the vision tower only, less its final layer (the paper's exception)
    parts = []
    for alg, runs in bench.moe().items():
        per_seed = []
        for run in runs:
            if not run.traces:
                continue
            t = run.traces[-1]
            layers = _depth_layers(t) if vlm else list(range(t.n_layers))
            if len(layers) < 2 or t.topk_idx[0].shape[1] < 2:
                continue
            ids = sequence_ids(t)
            n = int(ids.max()) + 1
            per_layer = [unit_sums(m, ids, n, ok) for m, ok in
                         (token_margin(t.topk_idx[l], t.topk_weight[l]) for l in layers)]

            def stat(w, per_layer=per_layer, n=n):
                ww = _w(w, n)
                return _slope(torch.stack([weighted_mean(ww, s, c) for s, c in per_layer], 1))

            margins = [float(s.sum() / c.sum().clamp_min(1)) for s, c in per_layer]
            per_seed.append((stat, n, margins))
        if not per_seed:
            parts.append(not_applicable(alg, "no final routing trace with top-2 choices in two or more "
                                        "layers"))
            continue
        parts.append(_stat_part(alg, [(s, n) for s, n, _ in per_seed], 1, "probe sequences",
                                margin_by_layer=per_seed[0][2]))
    if not parts:
        return _na("the bench has no MoE run.")
    summary = _short(parts, lambda p: f"{p.get('margin_by_layer', [0])[0]:.2f}->"
                     f"{p.get('margin_by_layer', [0])[-1]:.2f}")
    return _result(parts, "margin first->last layer: " + summary,
                   "Statistic: least-squares slope of the mean router margin over the MoE layers (final "
                   "checkpoint's probe trace" + (", over the vision tower's MoE layers but its last, as in "
                                                 "the paper; the connector left out" if vlm else "") +
                   "); the claim needs it above 0 for every algorithm.")


# ----------------------------------------------------------------------------- e, f: interventions


def _metric(bench: Bench) -> tuple[str, str, str, int]:
    """(per-unit metric, flat metric, unit, sign of harm): loss goes up when harmed, accuracy down."""
    if bench.regime == "vlm":
        return "synth_mme/correct", "synth_mme/acc", "questions (paired)", -1
    return "val_nll", "val_ppl", "validation windows (paired)", 1


def _flat(run: Run, study: str, name: str, key: str) -> float | None:
    entry = (run.analysis or {}).get(study) or {}
    if name == "unperturbed":
        value = (entry.get("baseline") or {}).get(key)
    else:
        value = next((r["metrics"].get(key) for r in entry.get("runs") or [] if r["name"] == name), None)
    if value is None:
        return None
    return math.log(value) if key == "val_ppl" else float(value)


def _harm_part(bench: Bench, alg: str, runs: list[Run], study: str, worse: str, better: str,
               label: str) -> dict:
    """A part "measurement `worse` harms more than `better`": harm = (worse - better) in loss, or
    (better - worse) in accuracy; above 0 is the claim."""
    unit_key, flat_key, unit, sign = _metric(bench)
    per_seed = []
    for run in runs:
        a, b = _flat(run, study, worse, flat_key), _flat(run, study, better, flat_key)
        if a is None or b is None:
            continue
        units = ((run.units or {}).get("runs") or {})
        ua, ub = (units.get(worse) or {}).get(unit_key), (units.get(better) or {}).get(unit_key)
        if ua is not None and ub is not None and len(ua) == len(ub):
            diff = sign * (torch.tensor(ua, dtype=torch.float64) - torch.tensor(ub, dtype=torch.float64))
            per_seed.append((lambda w, d=diff: weighted_mean(_w(w, len(d)), d), len(diff)))
        else:
            value = sign * (a - b)
            per_seed.append((lambda w, v=value: torch.full((1 if w is None else w.shape[0],), v), 0))
    name = f"{alg} {label}" if label else alg
    if not per_seed:
        return not_applicable(name, f"no {worse} / {better} measurement in its analysis")
    if len(per_seed) == 1 and per_seed[0][1] == 0:
        return {"name": name, "estimate": _point(per_seed[0][0]), "verdict": "inconclusive",
                "why": "one seed and no per-unit results to bootstrap (intervention_units.json)"}
    return _stat_part(name, per_seed, 1, unit)


def _intervention_check(bench: Bench, study: str, comparisons: list[tuple[str, str, str]], title: str,
                        statistic: str) -> dict:
    """Claims e and f: per algorithm, one harm part per (worse, better, label) comparison of the
    `study`'s measurements; not applicable when the study did not run."""
    if study not in bench.studies:
        return _na(f"the {study} study did not run in this bench (`libmoe bench --studies {study}`; the "
                   "default preset runs it).")
    if not any((r.analysis or {}).get(study) for r in bench.runs):
        return _na(f"no run's analysis holds the {study} study (analysis off, or every run dense).")
    parts = [_harm_part(bench, alg, runs, study, worse, better, label)
             for alg, runs in bench.moe().items() for worse, better, label in comparisons]
    return _result(parts, title + _short(parts, _harm_format(bench)),
                   f"Statistic: the {_harm_text(bench)} {statistic}")


def _harm_format(bench: Bench) -> Callable[[dict], str]:
    """A part's harm for the table: log-perplexity, or accuracy points for a VLM."""
    if bench.regime == "vlm":
        return lambda p: f"{100 * p['estimate']:+.2f} pp"
    return lambda p: f"{p['estimate']:+.3f}"


def _harm_text(bench: Bench) -> str:
    return ("increase in validation loss (log perplexity)" if bench.regime != "vlm"
            else "drop in held-out MME accuracy")


@finding("e_droptop_hurts", "DropTop1 (the top-1 expert replaced by the top-(k+1)) degrades the "
         "metrics, and DropTop1&2 degrades them more.", "Fig. 5", figure="droptop.png")
def e_droptop_hurts(bench: Bench) -> dict:
    return _intervention_check(
        bench, "droptop",
        [("DropTop1", "unperturbed", "DropTop1"), ("DropTop1&2", "DropTop1", "DropTop1&2 vs 1")],
        "harm: ", "under DropTop1 against the unperturbed model, and under DropTop1&2 against DropTop1; "
        "the claim needs both above 0 for every algorithm.")


@finding("f_temperature", "A router temperature of 10 hurts more than a temperature of 0.1 (the "
         "models favour cooperation over competition).", "Table 7 (Appendix E)", figure="temperature.png")
def f_temperature(bench: Bench) -> dict:
    return _intervention_check(
        bench, "temperature", [("tau=10", "tau=0.1", "")], "harm(τ=10) − harm(τ=0.1): ",
        "at τ = 10 minus that at τ = 0.1 (logits divided by τ at inference); the claim needs it above 0 "
        "for every algorithm.")


# ----------------------------------------------------------------------------- g: regimes


def _other_bench(bench: Bench, entry: dict) -> Bench | None:
    path = Path(str(entry.get("bench")))
    if path.resolve() == bench.dir.resolve() or entry.get("regime") == bench.regime:
        return bench
    try:
        return Bench(path)
    except FileNotFoundError:
        return None


def _bench_rates(b: Bench, algorithms: list[str], seed: int):
    """{algorithm: (sums, counts, S)} of the change rate per probe sequence (mean over layers and
    checkpoint pairs) of each algorithm's run of `seed`, or None when one lacks traces."""
    out = {}
    for alg in algorithms:
        run = next((r for r in b.by_algorithm().get(alg, []) if r.seed == seed), None)
        if run is None or len(run.traces) < 2 or not same_units(run.traces):
            return None
        out[alg] = _change_sums(run.traces, [(i, i + 1) for i in range(len(run.traces) - 1)])
    return out


def _relative(rates: dict[str, Tensor], alg: str) -> Tensor:
    others = torch.stack([v for a, v in rates.items() if a != alg], 0).mean(0)
    return rates[alg] / others.clamp_min(1e-12)


@finding("g_shared_experts_stabler_when_upcycled", "SharedE-V2/V3 change rates are lower relative to "
         "the other algorithms in the upcycling regime than in pretraining.", "Section 5a, Fig. 4",
         figure="regime_comparison.png")
def g_shared_experts_stabler_when_upcycled(bench: Bench) -> dict:
    entries = (bench.results.get("regime_comparison") or {}).get("regimes") or []
    by_regime = {e.get("regime"): e for e in entries}
    if not {"upcycle", "pretrain"} <= set(by_regime):
        return _na("needs the change rates of an upcycle and a pretrain bench: run one with `--compare "
                   "OTHER_BENCH` (e.g. `libmoe bench --regime upcycle --compare PRETRAIN_BENCH`); this "
                   f"output holds {', '.join(sorted(map(str, by_regime))) or 'no'} regime(s).")
    benches = {k: _other_bench(bench, by_regime[k]) for k in ("upcycle", "pretrain")}
    if any(b is None for b in benches.values()):
        missing = [by_regime[k].get("bench") for k, b in benches.items() if b is None]
        return _na(f"the compared bench output {missing[0]} is not here to read its traces.")
    algs = [a for a in benches["upcycle"].moe() if a in benches["pretrain"].moe()]
    shared = [a for a in SHARED if a in algs]
    if not shared or len(algs) < 2:
        return _na("both benches need SharedE-V2 or V3 and at least one other MoE algorithm.")
    parts = []
    seeds = [sorted({r.seed for a in algs for r in b.moe()[a]}) for b in benches.values()]
    common = sorted(set(seeds[0]) & set(seeds[1]))
    per_seed = []
    for seed in common:
        up, pre = (_bench_rates(benches[k], algs, seed) for k in ("upcycle", "pretrain"))
        if up is not None and pre is not None:
            per_seed.append((up, pre))
    if not per_seed:
        return _na("the runs of the two benches hold fewer than two routing traces each.")
    for alg in shared:

        def stat(w, up, pre, alg=alg):
            n_up, n_pre = next(iter(up.values()))[2], next(iter(pre.values()))[2]
            if w is None:
                wu, wp = _ones(n_up), _ones(n_pre)
            else:  # independent resamples of the two benches' probe sequences
                wu, wp = w, multiplicities(n_pre, w.shape[0], SEED + 1)
                if n_up != w.shape[1]:
                    wu = multiplicities(n_up, w.shape[0], SEED)
            ru = {a: weighted_mean(wu, s, c) for a, (s, c, _) in up.items()}
            rp = {a: weighted_mean(wp, s, c) for a, (s, c, _) in pre.items()}
            return _relative(ru, alg) - _relative(rp, alg)

        stats = [((lambda w, u=u, p=p: stat(w, u, p)), next(iter(u.values()))[2]) for u, p in per_seed]
        up0, pre0 = per_seed[0]
        rel_up, rel_pre = (float(_relative({a: weighted_mean(_ones(v[2]), v[0], v[1]) for a, v in b.items()},
                                           alg)[0]) for b in (up0, pre0))
        parts.append(_stat_part(alg, stats, -1, "probe sequences of each bench, resampled independently",
                                relative_upcycle=rel_up, relative_pretrain=rel_pre))
    summary = _short(parts, lambda p: f"{p['relative_upcycle']:.2f} upcycled vs {p['relative_pretrain']:.2f} "
                     "pretrained")
    return _result(parts, "relative change rate: " + summary,
                   "Statistic: each shared-expert algorithm's change rate divided by the mean rate of the "
                   f"other algorithms ({', '.join(a for a in algs if a not in SHARED)}), upcycled minus "
                   "pretrained; the claim needs it below 0 for SharedE-V2 and V3.", algorithms=algs)


# ----------------------------------------------------------------------------- h: specialisation


def _label_counts(t, layer: int, ids: Tensor, n: int) -> Tensor:
    """[S, R] selections of each slot per probe sequence."""
    idx = t.topk_idx[layer]
    R = t.n_slots(layer)
    flat = (ids[:, None].expand_as(idx) * R + idx.clamp_min(0))[selections(idx)]
    return torch.bincount(flat, minlength=n * R).reshape(n, R).double()


def _entropy(c: Tensor) -> Tensor:
    """[B] normalised entropy of [B, R] counts."""
    q = c / c.sum(-1, keepdim=True).clamp_min(1e-300)
    h = -(torch.where(q > 0, q * q.clamp_min(1e-300).log(), 0.0)).sum(-1)
    return h / math.log(c.shape[-1])


def _spec_inputs(run: Run):
    """(stat of the EAE spread across labels, stat of the mean EWA, number of sequences) of the
    run's final probe trace, or None."""
    if not run.traces:
        return None
    t = run.traces[-1]
    ids = sequence_ids(t)
    n = int(ids.max()) + 1
    seq_label = torch.zeros(n, dtype=torch.long).scatter_(0, ids, t.label.reshape(-1).long())  # one label
    # per probe sequence (a sequence is drawn from one domain / image)
    labels = [int(x) for x in torch.unique(seq_label)]
    if len(labels) < 2:
        return None
    counts_by_layer = [_label_counts(t, l, ids, n) for l in range(t.n_layers)]
    ewa_layers = []
    for l in range(t.n_layers):
        h, ok = token_weight_entropy(t.topk_idx[l], t.topk_weight[l])
        if bool(ok.any()):
            ewa_layers.append(unit_sums(h, ids, n, ok))

    def spread(w):
        ww = _w(w, n)
        per_layer = []
        for c in counts_by_layer:
            e = torch.stack([_entropy(ww[:, seq_label == lab] @ c[seq_label == lab]) for lab in labels], 1)
            per_layer.append(e.std(1, unbiased=False))
        return torch.stack(per_layer, 1).mean(1)

    def ewa(w):
        ww = _w(w, n)
        return torch.stack([weighted_mean(ww, s, c) for s, c in ewa_layers], 1).mean(1)

    def draw():  # sequences resampled within each label, so every label keeps its size
        return stratified_multiplicities(seq_label)

    return spread, (ewa if ewa_layers else None), draw


@finding("h_subtask_specialisation", "Per-label expert allocation entropy varies more across labels "
         "(subtasks, domains) for XMoE and TC-MoE than for the SMoE family; TC-MoE has the lowest "
         "expert-weight entropy.", "Figs. 6, 7", figure="eae_by_label.png")
def h_subtask_specialisation(bench: Bench) -> dict:
    moe = bench.moe()
    inputs = {a: {r.seed: x for r in runs if (x := _spec_inputs(r)) is not None} for a, runs in moe.items()}
    inputs = {a: v for a, v in inputs.items() if v}
    family = [a for a in SMOE_FAMILY if a in inputs]
    label_kind = "subtasks" if bench.regime == "vlm" else "domains"
    if not inputs:
        return _na(f"no MoE run has a final probe trace with two or more {label_kind}.")
    seeds = sorted(set.intersection(*(set(v) for v in inputs.values())))
    parts = []

    def family_mean(w, seed):
        return torch.stack([inputs[a][seed][0](w) for a in family], 0).mean(0)

    for alg in ("xmoe", "tc_moe"):
        name = f"{alg} spread vs SMoE family"
        if alg not in inputs or not family:
            parts.append(not_applicable(name, f"needs {alg} and one of {', '.join(SMOE_FAMILY)} in the "
                                        "bench"))
            continue
        stats = [((lambda w, s=s, a=alg: inputs[a][s][0](w) - family_mean(w, s)), inputs[alg][s][2])
                 for s in seeds]
        parts.append(_stat_part(name, stats, 1, f"probe sequences (paired, within {label_kind})",
                                spread=_point(inputs[alg][seeds[0]][0]),
                                family_spread=float(family_mean(None, seeds[0])[0])))
    name = "tc_moe lowest weight entropy"
    others = [a for a in inputs if a != "tc_moe" and inputs[a][seeds[0]][1] is not None]
    if "tc_moe" not in inputs or inputs["tc_moe"][seeds[0]][1] is None or not others:
        parts.append(not_applicable(name, "needs tc_moe and another algorithm with top-2 (or wider) routing"))
    else:
        def gap(w, s):
            rest = torch.stack([inputs[a][s][1](w) for a in others], 0).min(0).values
            return inputs["tc_moe"][s][1](w) - rest

        stats = [((lambda w, s=s: gap(w, s)), inputs["tc_moe"][s][2]) for s in seeds]
        ewa = {a: _point(inputs[a][seeds[0]][1]) for a in [*others, "tc_moe"]}
        parts.append(_stat_part(name, stats, -1, f"probe sequences (paired, within {label_kind})", ewa=ewa))
    def shown(p: dict) -> str:
        if "spread" in p:
            return f"{p['spread']:.3f} vs {p['family_spread']:.3f}"
        rest = {a: v for a, v in p["ewa"].items() if a != "tc_moe"}
        low = min(rest, key=rest.get)
        return f"{p['ewa']['tc_moe']:.3f} vs {low} {rest[low]:.3f}"

    summary = _short(parts, shown)
    return _result(parts, summary,
                   f"Statistics: the std over {label_kind} of each {label_kind[:-1]}'s expert allocation "
                   "entropy (mean over layers, final checkpoint's probe trace), XMoE's and TC-MoE's minus "
                   f"the mean of the SMoE family ({', '.join(family) or 'none here'}), above 0; and "
                   "TC-MoE's expert-weight entropy minus the lowest other algorithm's, below 0.")
