"""Routing metrics (ALGORITHMS.md section 3), each computed from traces only, except
`expert_similarity` (expert weights).

Selections are router slots: ids in [0, R) of ``topk_idx``; ids < 0 (padding of expert-choice
rows) are not selections. For MoE++ the slots include its zero-computation experts and for
TC-MoE its negated and null slots, so entropies are normalised by log R, the router's choices.
Per-layer results are dicts keyed by the 0-based MoE layer index as a string; undefined values
(e.g. a margin under top-1 routing) are None.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..moe import MoELayer
from ..moe.trace import Trace


def selections(idx: Tensor) -> Tensor:
    """The mask of real selections in `topk_idx` (ids < 0 pad expert-choice rows)."""
    return idx >= 0



def _overlap(a: Tensor, b: Tensor) -> Tensor:
    """|S_a ∩ S_b| per token for selections a [N, Ka], b [N, Kb] (ids < 0 ignored)."""
    same = (a[:, :, None] == b[:, None, :]) & selections(a)[:, :, None] & selections(b)[:, None, :]
    return same.any(-1).sum(-1)


def _check_pair(a: Trace, b: Trace) -> None:
    if a.n_tokens != b.n_tokens or not torch.equal(a.tokens, b.tokens) or a.n_layers != b.n_layers:
        raise ValueError(f"traces of steps {a.step} and {b.step} cover different tokens or layers; "
                         "compare traces of the same probe set (checkpoints of one run).")


def token_change(a: Tensor, b: Tensor) -> Tensor:
    """[N] each token's set-form change between selections a and b: 1 - |S_a ∩ S_b| / k with
    k = max(|S_a|, |S_b|)."""
    k = torch.maximum(selections(a).sum(-1), selections(b).sum(-1)).clamp_min(1)
    return 1 - _overlap(a, b) / k


def change_rate(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(set form, top-1 form) between selections a and b of the same tokens: the mean of
    `token_change`, and the fraction of tokens whose top-1 slot changed."""
    set_form = token_change(a, b).float().mean()
    top1 = (a[:, 0] != b[:, 0]).float().mean()
    return float(set_form), float(top1)


def expert_change_rate(a: Trace, b: Trace) -> dict[str, Any]:
    """Expert change rate from trace `a` to trace `b` of the same probe set, per layer and mean."""
    _check_pair(a, b)
    rates = [change_rate(a.topk_idx[l], b.topk_idx[l]) for l in range(a.n_layers)]
    return {
        "from": a.step, "to": b.step,
        "by_layer": {str(l): r[0] for l, r in enumerate(rates)}, "mean": _mean([r[0] for r in rates]),
        "top1_by_layer": {str(l): r[1] for l, r in enumerate(rates)},
        "top1_mean": _mean([r[1] for r in rates]),
    }


def saturation(a: Tensor, final: Tensor) -> tuple[float, float]:
    """(top-k, top-1) router saturation of selections `a` against the final ones:
    mean_t |S_t ∩ S_final| / |S_final|, and the fraction of tokens with the final top-1."""
    k = selections(final).sum(-1).clamp_min(1)
    return float((_overlap(a, final) / k).float().mean()), float((a[:, 0] == final[:, 0]).float().mean())


def router_saturation(trace: Trace, final: Trace) -> dict[str, Any]:
    """Router saturation of `trace` against the final checkpoint's trace, per layer and mean."""
    _check_pair(trace, final)
    sat = [saturation(trace.topk_idx[l], final.topk_idx[l]) for l in range(trace.n_layers)]
    return {
        "step": trace.step, "top1": _mean([s[1] for s in sat]), "topk": _mean([s[0] for s in sat]),
        "top1_by_layer": {str(l): s[1] for l, s in enumerate(sat)},
        "topk_by_layer": {str(l): s[0] for l, s in enumerate(sat)},
    }


def selection_fractions(idx: Tensor, n_slots: int) -> Tensor:
    """q_e: the fraction of all selections that went to slot e [R] (zeros when none)."""
    flat = idx[selections(idx)]
    counts = torch.bincount(flat, minlength=n_slots).double()
    return counts / counts.sum() if counts.sum() > 0 else counts


def allocation_entropy(idx: Tensor, n_slots: int) -> float | None:
    """EAE = -sum_e q_e log q_e / log R over the selections (1 = perfectly even)."""
    q = selection_fractions(idx, n_slots)
    if n_slots < 2 or q.sum() == 0:
        return None
    q = q[q > 0]
    return float(-(q * q.log()).sum() / math.log(n_slots))


def _normalised_weights(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """(per-token weights over the valid selections, summing to 1; number of valid selections)."""
    w = torch.where(selections(idx), w.abs().double(), 0.0)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-300), selections(idx).sum(-1)


def token_weight_entropy(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """([N] each token's H(w_t) / log k_t of its normalised weights, [N] mask of the tokens with
    k_t >= 2 selections, where it is defined)."""
    p, k = _normalised_weights(idx, w)
    ok = k >= 2
    h = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0)).sum(-1)
    return h / k.clamp_min(2).double().log(), ok


def weight_entropy(idx: Tensor, w: Tensor) -> float | None:
    """EWA = mean_t H(w_t) / log k_t over each token's k_t >= 2 normalised weights."""
    h, ok = token_weight_entropy(idx, w)
    return float(h[ok].mean()) if bool(ok.any()) else None


def token_margin(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """([N] each token's w_t,1 - w_t,2 of its normalised, descending weights, [N] mask of the
    tokens with two or more selections, where it is defined)."""
    p, k = _normalised_weights(idx, w)
    ok = k >= 2
    if p.shape[-1] < 2:  # top-1 routing: no token has a second weight
        return torch.zeros(p.shape[0], dtype=p.dtype), ok
    top2 = p.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1], ok


def margin(idx: Tensor, w: Tensor) -> float | None:
    """Router margin: mean_t (w_t,1 - w_t,2) of the normalised, descending weights."""
    m, ok = token_margin(idx, w)
    return float(m[ok].mean()) if bool(ok.any()) else None


def coactivation(idx: Tensor, n_slots: int) -> Tensor:
    """CA [R, R]: CA_ij = N(i and j selected together) / N(i selected); diagonal 0, and rows of
    never-selected slots 0."""
    x = torch.zeros(idx.shape[0], n_slots, dtype=torch.float64)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    v = selections(idx)
    x[rows[v], idx[v]] = 1.0
    together = x.t() @ x
    n = together.diagonal().clone()
    ca = together / n.clamp_min(1)[:, None]
    ca.fill_diagonal_(0.0)
    return ca


def top_coactivated(ca: Tensor, n: int = 16) -> list[int]:
    """The slots of the strongest co-activation pairs, strongest first, at most `n` of them."""
    R = ca.shape[0]
    order = torch.argsort(ca.flatten(), descending=True, stable=True)
    picked: list[int] = []
    for flat in order.tolist():
        if len(picked) >= min(n, R):
            break
        for e in divmod(flat, R):
            if e not in picked and len(picked) < n:
                picked.append(e)
    return picked


def coactivation_summary(idx: Tensor, n_slots: int, n: int = 16) -> dict[str, Any]:
    """The `n` most co-activated slots, their CA sub-matrix, and the mean / max off-diagonal CA
    over the slots that were selected at all."""
    ca = coactivation(idx, n_slots)
    used = selection_fractions(idx, n_slots) > 0
    off = ca[used][:, used][~torch.eye(int(used.sum()), dtype=torch.bool)]
    experts = top_coactivated(ca, n)
    return {
        "experts": experts,
        "matrix": ca[experts][:, experts].tolist(),
        "mean": float(off.mean()) if off.numel() else None,
        "max": float(off.max()) if off.numel() else None,
    }


def load(idx: Tensor, n_slots: int) -> dict[str, Any]:
    """Selection fraction of each slot, Jain's fairness index (sum q)^2 / (R sum q^2), and the
    slots never selected (dead) in the trace."""
    q = selection_fractions(idx, n_slots)
    dead = int((q == 0).sum())
    jain = float(q.sum() ** 2 / (n_slots * (q**2).sum())) if q.sum() > 0 else None
    return {"fraction": q.tolist(), "jain": jain, "dead": dead, "dead_fraction": dead / n_slots}


def jaccard(a: Tensor, b: Tensor) -> float:
    """Mean per-token Jaccard index |S_a ∩ S_b| / |S_a ∪ S_b| of two selections."""
    inter = _overlap(a, b)
    union = selections(a).sum(-1) + selections(b).sum(-1) - inter
    return float((inter / union.clamp_min(1)).float().mean())


def layer_overlap(trace: Trace) -> dict[str, Any]:
    """Layer x layer mean Jaccard of the tokens' top-k slot sets, and its adjacent pairs. Slot ids
    name different experts in different layers, so this is mostly informative after upcycling,
    where expert e of every layer starts from the same weights."""
    L = trace.n_layers
    m = [[1.0 if i == j else jaccard(trace.topk_idx[i], trace.topk_idx[j]) for j in range(L)]
         for i in range(L)]
    return {"matrix": m, "adjacent": {f"{i}-{i + 1}": m[i][i + 1] for i in range(L - 1)}}


def per_layer(trace: Trace, fn) -> dict[str, Any]:
    """{layer: fn(topk_idx, topk_weight, n_slots)} over the trace's MoE layers."""
    return {str(l): fn(trace.topk_idx[l], trace.topk_weight[l], trace.n_slots(l))
            for l in range(trace.n_layers)}


def eae(trace: Trace) -> dict[str, float | None]:
    return per_layer(trace, lambda idx, w, R: allocation_entropy(idx, R))


def ewa(trace: Trace) -> dict[str, float | None]:
    return per_layer(trace, lambda idx, w, R: weight_entropy(idx, w))


def router_margin(trace: Trace) -> dict[str, float | None]:
    return per_layer(trace, lambda idx, w, R: margin(idx, w))


def by_label(trace: Trace, fn) -> dict[str, dict[str, Any]]:
    """{layer: {label: value}}: a per-layer metric (eae, ewa, router_margin) of each label's tokens."""
    parts = {name: fn(sub) for name, sub in trace.by_label().items()}
    return {str(l): {name: values[str(l)] for name, values in parts.items()} for l in range(trace.n_layers)}


def expert_similarity(model: nn.Module) -> dict[str, float]:
    """Mean pairwise cosine similarity of the experts' flattened output weights W2_e, per MoE layer."""
    out = {}
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for l, layer in enumerate(layers):
        w2 = layer.experts.w2.detach().float().flatten(1)
        E = w2.shape[0]
        if E < 2:
            continue
        unit = torch.nn.functional.normalize(w2, dim=-1)
        sim = unit @ unit.t()
        out[str(l)] = float((sim.sum() - sim.diagonal().sum()) / (E * (E - 1)))
    return out


def trace_metrics(trace: Trace, coactivated: int = 16) -> dict[str, Any]:
    """Every single-trace metric of `trace`: eae, ewa, router_margin (and their by-label forms),
    load and layer_overlap."""
    kind = trace.meta.get("label_kind", "domain")
    return {
        "eae": eae(trace), f"eae_by_{kind}": by_label(trace, eae),
        "ewa": ewa(trace), f"ewa_by_{kind}": by_label(trace, ewa),
        "router_margin": router_margin(trace),
        "load": per_layer(trace, lambda idx, w, R: load(idx, R)),
        "layer_overlap": layer_overlap(trace),
    }


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
