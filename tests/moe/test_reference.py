"""Independent per-token reference for every MoE algorithm.

Written from ALGORITHMS.md sections 1-2 and docs/moe.md only (never from the implementation):
each test builds a layer with ``build_moe``, reads its parameters, recomputes routing, output,
auxiliary terms and gradients with plain per-token loops in float64, and compares.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libmoe.moe import ALGORITHMS, build_moe

D, E, M, K = 16, 6, 8, 2
NAMES = [
    "smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe",
    "cosine", "perturbed_cosine", "hyper", "expert_choice", "dense",
]
SIGMOID = {"sigma_moe", "sharede_v3"}
DISPATCHES = ["loop", "padded", "grouped", "blocked", "fused"]
ATOL = RTOL = 1e-5
GATOL = GRTOL = 1e-4  # gradients: float32 implementation vs float64 reference


# --------------------------------------------------------------------------------------------
# layer construction with non-trivial parameters
# --------------------------------------------------------------------------------------------


def _std_for(name: str, pname: str, router_std: float, expert_std: float) -> float:
    if "gate_residual" in pname:
        return 0.1
    if name == "hyper" and pname.startswith("router"):
        if "embedding" in pname:
            return 1.0
        if "hypernet.0" in pname:
            return 0.3
        return 0.03  # last hypernet layer -> W_r entries of std ~0.3
    if pname.startswith("router") or "const" in pname:
        return router_std
    return expert_std


def make_layer(name, k=K, *, d=D, e=E, m=M, seed=0, router_std=0.7, expert_std=0.3,
               dtype=torch.float32, **opts):
    torch.manual_seed(seed)
    layer = build_moe(name, d, e, m, k, **opts)
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            std = _std_for(name, pname, router_std, expert_std)
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
        if name == "tc_moe":
            # make the -10-offset null slots reachable so that the null path is exercised
            layer.router.weight[2 * e:] *= 4.0
    return layer.to(dtype)


def _tensor(obj):
    if isinstance(obj, nn.Module):
        return obj.weight
    return obj


def _find(layer, *suffixes):
    for n, p in list(layer.named_parameters()) + list(layer.named_buffers()):
        for s in suffixes:
            if n == s or n.endswith("." + s):
                return p
    raise AssertionError(f"contract: layer has no parameter/buffer named *{suffixes}")


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu}


def _ffn(mod, e, xt, act):
    h = xt @ mod.w1[e].double()
    h_act = _ACT[act](h)
    if act in ("swiglu", "geglu"):
        h_act = h_act * (xt @ mod.w3[e].double())
    return h_act @ mod.w2[e].double(), h.detach()


def _bias(lin):
    b = getattr(lin, "bias", None)
    return None if b is None else b.double()


def _router_logits(name, layer, xt, opts, e, prev_t):
    r = layer.router
    d = xt.shape[0]
    if name == "xmoe":
        h = F.linear(xt, r.proj.weight.double(), _bias(r.proj))
        q = r.expert_embeddings.double()
        q = 1.5 * q / q.norm(dim=1, keepdim=True)
        return (h / h.norm()) @ q.T / opts.get("xmoe_tau", 0.3)
    if name == "hyper":
        emb = _tensor(r.embedding).double().reshape(-1)
        l1, l2 = r.hypernet[0], r.hypernet[2]
        o = F.linear(F.relu(F.linear(emb, l1.weight.double(), _bias(l1))),
                     l2.weight.double(), _bias(l2))
        w_r = o[: e * d].reshape(e, d)
        b_r = o[e * d: e * d + e]
        return w_r @ xt + b_r
    w = r.weight.double()
    if name == "cosine":
        return (w @ xt) / (xt.norm() * w.norm(dim=1))
    if name == "perturbed_cosine":
        th = opts.get("theta", 0.1)
        return (w @ xt) / ((xt.norm() + th) * (w.norm(dim=1) + th))
    z = w @ xt
    b = getattr(r, "bias", None)
    if isinstance(b, torch.Tensor):
        z = z + b.double()
    if name == "moe_plus_plus" and prev_t is not None:
        z = z + r.gate_residual.weight.double() @ prev_t.double()
    if name == "tc_moe":
        off = torch.zeros_like(z)
        off[e: 2 * e] = 1.0
        off[2 * e:] = 10.0
        z = z - off
    return z


def reference(layer, name, x, opts=None, k=K, e=E, prev_logits=None):
    """Naive per-token recomputation. Returns a dict of expected quantities (float64, with
    autograd graph to the layer's parameters and x)."""
    opts = dict(opts or {})
    act = opts.get("activation", "relu")
    tau = opts.get("temperature", 1.0)
    d = x.shape[-1]
    xs = x.reshape(-1, d).double()
    n_tok = xs.shape[0]
    ex = layer.experts
    res = {"T": n_tok, "margin": math.inf, "preact": math.inf}

    shared = getattr(layer, "shared_experts", None)
    shared_scaling = opts.get("shared_scaling", 1.0)

    def shared_out(xt):
        if shared is None or getattr(shared, "w1", None) is None or shared.w1.shape[0] == 0:
            return 0.0
        acc = 0.0
        for s in range(shared.w1.shape[0]):
            y, h = _ffn(shared, s, xt, act)
            res["preact"] = min(res["preact"], h.abs().min().item())
            acc = acc + y
        return shared_scaling * acc

    if name == "dense":
        outs = []
        for t in range(n_tok):
            y, h = _ffn(ex, 0, xs[t], act)
            res["preact"] = min(res["preact"], h.abs().min().item())
            outs.append(y)
        out = torch.stack(outs) if outs else xs.new_zeros(0, d)
        res["output"] = out.reshape(x.shape)
        res["aux_loss"] = xs.new_zeros(())
        return res

    # ---- router: logits and probabilities per token
    logits, probs = [], []
    for t in range(n_tok):
        prev_t = None if prev_logits is None else prev_logits.reshape(n_tok, -1)[t]
        z = _router_logits(name, layer, xs[t], opts, e, prev_t)
        p = torch.sigmoid(z / tau) if name in SIGMOID else torch.softmax(z / tau, 0)
        logits.append(z)
        probs.append(p)
    n_slots = logits[0].shape[0] if logits else None

    # ---- slot functions
    # MoE++ slot counts default to the paper's 1 zero + 1 copy per 66 FFN experts, at least 1
    n_zero = opts.get("n_zero", max(1, math.floor(e / 66 + 0.5)))
    n_copy = opts.get("n_copy", max(1, math.floor(e / 66 + 0.5)))

    def slot_out(slot, xt):
        if name == "tc_moe":
            if slot < e:
                y, h = _ffn(ex, slot, xt, act)
            elif slot < 2 * e:
                y, h = _ffn(ex, slot - e, xt, act)
                y = -y
            else:
                return None
            res["preact"] = min(res["preact"], h.abs().min().item())
            return y
        if name == "moe_plus_plus" and slot >= e:
            j = slot - e
            if j < n_zero:
                return torch.zeros_like(xt)
            j -= n_zero
            if j < n_copy:
                return xt
            j -= n_copy
            cp = _find(layer, "const_proj.weight", "const_proj").double()
            cv = _find(layer, "const_values").double()
            a = torch.softmax(cp[j] @ xt, 0)
            return a[0] * xt + a[1] * cv[j]
        y, h = _ffn(ex, slot, xt, act)
        res["preact"] = min(res["preact"], h.abs().min().item())
        return y

    # ---- selection and weights: sels[t] = list of (slot, weight) sorted by weight desc
    sels = []
    if name == "expert_choice":
        cf = opts.get("capacity_factor", 1.0)
        cap = min(math.ceil(cf * n_tok * k / e), n_tok)
        chosen = [dict() for _ in range(n_tok)]
        for ei in range(e):
            order = sorted(range(n_tok), key=lambda t: -probs[t][ei].item())
            for t in order[:cap]:
                chosen[t][ei] = probs[t][ei]
            if cap < n_tok:
                gap = probs[order[cap - 1]][ei].item() - probs[order[cap]][ei].item()
                res["margin"] = min(res["margin"], gap)
        sels = [sorted(c.items(), key=lambda sw: -sw[1].item()) for c in chosen]
    else:
        bias_b = None
        if opts.get("bias_balancing") and hasattr(layer.router, "expert_bias"):
            bias_b = layer.router.expert_bias.detach().double()
        n_group, topk_group = opts.get("n_group"), opts.get("topk_group")
        res["group_changed"] = False
        for t in range(n_tok):
            p = probs[t]
            sc = p.detach().clone()
            if bias_b is not None:
                sc = sc + bias_b
            allowed = list(range(n_slots))
            if n_group:
                gs = n_slots // n_group
                gscore = [sorted(sc[g * gs:(g + 1) * gs].tolist(), reverse=True)[:2]
                          for g in range(n_group)]
                gscore = [sum(v) for v in gscore]
                keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
                allowed = [i for i in allowed if i // gs in keep]
            order = sorted(allowed, key=lambda i: -sc[i].item())
            chosen = order[:k]
            if len(order) > k:
                res["margin"] = min(res["margin"], sc[chosen[-1]].item() - sc[order[k]].item())
            if n_group:
                free = sorted(range(n_slots), key=lambda i: -sc[i].item())[:k]
                res["group_changed"] |= set(free) != set(chosen)
            v = torch.stack([p[c] for c in chosen])
            if name == "tc_moe":
                denom = sum(p[c] for c in chosen if c < 2 * e) + p[2 * e:].sum()
                w = v / denom
            elif name == "xmoe" and opts.get("xmoe_weights", "renorm") == "softmax":
                w = torch.softmax(v, 0)
            elif name == "sigma_moe" and not opts.get("sigma_renormalize", True):
                w = v  # Csordas et al.'s sigma-MoE: the selected sigmoid scores as they are
            else:
                w = v / v.sum()
            sels.append(sorted(zip(chosen, w), key=lambda sw: -sw[1].item()))

    # ---- capacity (token choice): Switch style, first C assignments in (token, rank) order
    kept = [[True] * len(s) for s in sels]
    cf = opts.get("capacity_factor")
    if cf is not None and name != "expert_choice":
        cap = math.ceil(cf * n_tok * k / e)
        count = [0] * n_slots
        n_drop = 0
        for t in range(n_tok):
            for j, (slot, _) in enumerate(sels[t]):
                if count[slot] < cap:
                    count[slot] += 1
                else:
                    kept[t][j] = False
                    n_drop += 1
        res["dropped_fraction"] = n_drop / max(1, n_tok * k)
        res["capacity"] = cap

    # ---- output
    outs = []
    for t in range(n_tok):
        xt = xs[t]
        y = torch.zeros_like(xt)
        for j, (slot, w) in enumerate(sels[t]):
            if not kept[t][j]:
                continue
            o = slot_out(slot, xt)
            if o is not None:
                y = y + w * o
        # routed_scaling scales the routed output; topk_weight stays normalised (docs/moe.md)
        outs.append(opts.get("routed_scaling", 1.0) * y + shared_out(xt))
    out = torch.stack(outs) if outs else xs.new_zeros(0, d)
    res["output"] = out.reshape(x.shape)
    res["logits"] = torch.stack(logits) if logits else None
    res["probs"] = torch.stack(probs) if probs else None
    res["sels"] = sels

    # ---- auxiliary terms
    if n_tok == 0:
        return res
    bc, zc = opts.get("balance_coef", 0.01), opts.get("z_coef", 0.0)
    res["z"] = torch.stack([torch.logsumexp(z, 0) ** 2 for z in logits]).mean()
    aux_loss = zc * res["z"]
    if name != "expert_choice":
        top1 = opts.get("balance_count", "topk") == "top1"
        phats, bsel, eta = [], [], None
        for t in range(n_tok):
            p = probs[t]
            slots = [s for s, _ in sels[t]]
            if top1:
                slots = slots[:1]
            if name == "moe_plus_plus":
                n_bal = n_slots
                phat = p
                eta = [1.0] * e + [opts.get("tau_pp", 0.75)] * (n_slots - e)
            elif name == "tc_moe":
                n_bal = e
                pn = p[: 2 * e] / p[: 2 * e].sum()
                phat = pn[:e] + pn[e:]
                slots = [s % e for s in slots if s < 2 * e]
            elif name in SIGMOID:
                n_bal = e
                phat = p / p.sum()
            else:
                n_bal = e
                phat = p
            phats.append(phat)
            bsel.append(slots)
        eta = torch.tensor(eta or [1.0] * n_bal, dtype=torch.float64)
        scope = opts.get("balance_scope", "sequence")
        seq = x.shape[-2] if (scope == "sequence" and x.dim() >= 3) else n_tok
        vals = []
        for g0 in range(0, n_tok, seq):
            toks = range(g0, g0 + seq)
            cnt = torch.zeros(n_bal, dtype=torch.float64)
            for t in toks:
                for s in bsel[t]:
                    cnt[s] += 1
            f = cnt / cnt.sum() if cnt.sum() > 0 else cnt
            pm = torch.stack([phats[t] for t in toks]).mean(0)
            vals.append(n_bal * (eta * f * pm).sum())
        res["balance"] = torch.stack(vals).mean()
        aux_loss = aux_loss + bc * res["balance"]
    if name == "tc_moe":
        res["null_reward"] = -torch.stack([p[2 * e:].sum() for p in probs]).mean()
        aux_loss = aux_loss + opts.get("tc_beta", 1e-5) * res["null_reward"]
    if name == "sigma_moe":  # sum_e pbar_e log pbar_e, pbar = mean_t softmax(z_t) (before tau)
        pbar = torch.stack([torch.softmax(z, 0) for z in logits]).mean(0)
        res["entropy"] = (pbar * pbar.log()).sum()
        aux_loss = aux_loss + opts.get("sigma_entropy_coef", 0.0) * res["entropy"]
    res["aux_loss"] = aux_loss
    return res


# --------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------


def _diff(actual, expected, what, errs, atol=ATOL, rtol=RTOL):
    a = torch.as_tensor(actual).detach().double()
    b = torch.as_tensor(expected).detach().double()
    if a.shape != b.shape:
        errs.append(f"{what}: shape {tuple(a.shape)} != expected {tuple(b.shape)}")
        return
    if not torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=False):
        md = (a - b).abs().max().item() if a.numel() else 0.0
        errs.append(f"{what}: max abs diff {md:.3g}; actual {_short(a)} expected {_short(b)}")


def _short(t):
    return [round(v, 6) for v in t.reshape(-1)[:8].tolist()]


def _rows(routing, n_tok):
    idx = routing.topk_idx.detach()
    w = routing.topk_weight.detach().double()
    assert idx.dtype == torch.int64, f"topk_idx dtype {idx.dtype}"
    rows = []
    for t in range(n_tok):
        rows.append([(int(i), float(v)) for i, v in zip(idx[t].tolist(), w[t].tolist())])
    return rows


def check(layer, name, x, opts=None, k=K, e=E, prev_logits=None, *, routing=True, aux=True,
          grads=True, weights=True, seed=0):
    """Run the layer and the reference; collect every mismatch; fail listing them all."""
    opts = dict(opts or {})
    errs = []
    x = x.clone().requires_grad_(True)
    out = layer(x) if prev_logits is None else layer(x, prev_logits=prev_logits)
    ref = reference(layer, name, x, opts, k=k, e=e, prev_logits=prev_logits)
    n_tok = ref["T"]

    _diff(out.output, ref["output"], "output", errs)
    if name == "dense":
        assert out.routing is None, "dense: routing must be None"
        _diff(out.aux_loss, 0.0, "aux_loss", errs)
    if routing and name != "dense":
        r = out.routing
        if name == "expert_choice" and tuple(r.topk_idx.shape) != (n_tok, e):
            errs.append(f"expert_choice topk_idx shape {tuple(r.topk_idx.shape)} != {(n_tok, e)}")
        _diff(r.logits, ref["logits"], "routing.logits", errs)
        _diff(r.probs, ref["probs"], "routing.probs", errs)
        rows = _rows(r, n_tok)
        for t in range(n_tok):
            act_row = rows[t]
            valid = [(i, v) for i, v in act_row if i >= 0]
            pad = [(i, v) for i, v in act_row if i < 0]
            if any(v != 0.0 for _, v in pad):
                errs.append(f"token {t}: padding entries with non-zero weight {pad}")
            exp = {s: float(w.detach()) for s, w in ref["sels"][t]}
            got = dict(valid)
            if set(got) != set(exp):
                errs.append(f"token {t}: selected {sorted(got)} expected {sorted(exp)}")
                continue
            ws = [v for _, v in act_row]
            if any(ws[j] < ws[j + 1] - 1e-6 for j in range(len(ws) - 1)):
                errs.append(f"token {t}: topk_weight not sorted descending {ws}")
            if weights:
                for s in exp:
                    if not math.isclose(got[s], exp[s], abs_tol=ATOL, rel_tol=RTOL):
                        errs.append(
                            f"token {t} slot {s}: weight {got[s]:.7f} expected {exp[s]:.7f}")
    if aux and name != "dense" and n_tok:
        if name != "expert_choice":
            _diff(out.aux["balance"], ref["balance"], "aux['balance']", errs)
            _diff(out.aux_loss, ref["aux_loss"], "aux_loss", errs)
        if "z" in out.aux or name != "expert_choice":
            _diff(out.aux["z"], ref["z"], "aux['z']", errs)
        if name == "tc_moe":
            _diff(out.aux["null_reward"], ref["null_reward"], "aux['null_reward']", errs)
        if name == "sigma_moe":
            _diff(out.aux["entropy"], ref["entropy"], "aux['entropy']", errs)
    if "dropped_fraction" in ref:
        got = out.stats.get("dropped_fraction") if out.stats else None
        if got is None or not math.isclose(float(got), ref["dropped_fraction"], abs_tol=1e-6):
            errs.append(f"stats['dropped_fraction'] = {got} expected {ref['dropped_fraction']}")

    if grads and not errs:
        g = torch.Generator().manual_seed(seed + 77)
        cot = torch.randn(out.output.shape, generator=g, dtype=torch.float64)
        params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        leaves = [x] + [p for _, p in params]
        loss = (out.output.double() * cot).sum() + out.aux_loss.double()
        got = torch.autograd.grad(loss, leaves, allow_unused=True)
        ref_loss = (ref["output"] * cot).sum() + ref["aux_loss"]
        exp = torch.autograd.grad(ref_loss, leaves, allow_unused=True)
        for n, a, b in zip(["x"] + [n for n, _ in params], got, exp):
            a = torch.zeros_like(leaves[0] if n == "x" else dict(params)[n]) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            if not torch.isfinite(a).all():
                errs.append(f"grad {n}: not finite")
            _diff(a, b, f"grad {n}", errs, atol=GATOL, rtol=GRTOL)
    assert not errs, f"{name} {opts}:\n  " + "\n  ".join(errs)
    return out, ref


def _x(shape=(2, 5, D), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(1234 + seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------
# 0. registry
# --------------------------------------------------------------------------------------------


def test_all_algorithms_registered():
    missing = set(NAMES) - set(ALGORITHMS)
    assert not missing, f"ALGORITHMS lacks {missing}"


# --------------------------------------------------------------------------------------------
# 1. forward / backward against the reference
# --------------------------------------------------------------------------------------------

_CASES = [(n, "auto") for n in NAMES] + [
    (n, dsp) for n in NAMES if n not in ("dense", "expert_choice") for dsp in DISPATCHES
]


@pytest.mark.parametrize("name,dispatch", _CASES)
def test_matches_reference_default_options(name, dispatch):
    opts = {} if dispatch == "auto" else {"dispatch": dispatch}
    x = _x((2, 8, D)) if name in ("moe_plus_plus", "tc_moe") else _x()
    layer = make_layer(name, **opts)
    if name == "hyper":  # the default progress is not specified by the contract
        _set_progress(layer, 1.0)
    _, ref = check(layer, name, x, opts)
    if name == "moe_plus_plus":  # the test must exercise every zero-computation kind
        used = {s for row in ref["sels"] for s, _ in row}
        assert used & {E}, "setup: zero expert never selected"
        assert used & {E + 1}, "setup: copy expert never selected"
        assert used & set(range(E + 2, layer.router.n_slots)), "setup: constant experts never selected"
    if name == "tc_moe":
        used = {s for row in ref["sels"] for s, _ in row}
        assert used & set(range(E, 2 * E)), "setup: negative slots never selected"
        assert used & set(range(2 * E, 2 * E + K)), "setup: null slots never selected"


OPTION_CASES = [
    ("smoe", {"temperature": 0.5}),
    ("smoe", {"temperature": 3.0}),
    ("sigma_moe", {"temperature": 2.0}),
    ("smoe", {"z_coef": 0.1}),
    ("smoe", {"z_coef": 0.1, "balance_coef": 0.5}),
    ("smoe", {"balance_scope": "batch"}),
    ("smoe", {"balance_scope": "global"}),
    ("smoe", {"balance_count": "top1"}),
    ("sigma_moe", {"balance_count": "top1", "balance_scope": "batch"}),
    ("sigma_moe", {"z_coef": 0.01}),
    ("sigma_moe", {"sigma_renormalize": False}),
    ("sigma_moe", {"sigma_entropy_coef": 0.1}),
    ("sigma_moe", {"sigma_renormalize": False, "sigma_entropy_coef": 0.05, "temperature": 2.0}),
    ("sigma_moe", {"sigma_expert_dropout": 0.3}),  # evaluation: no dropout
    ("smoe", {"activation": "relu"}),
    ("smoe", {"activation": "gelu"}),
    ("smoe", {"activation": "silu"}),
    ("smoe", {"activation": "swiglu"}),
    ("smoe", {"activation": "geglu"}),
    ("sharede_v2", {"activation": "swiglu"}),
    ("smoe", {"bias": True}),
    ("sharede_v2", {"n_shared": 1}),
    ("sharede_v2", {"n_shared": 3, "shared_scaling": 0.5}),
    ("sharede_v3", {"temperature": 2.0, "z_coef": 0.01}),
    ("xmoe", {"xmoe_weights": "softmax"}),
    ("xmoe", {"xmoe_tau": 0.5, "xmoe_dim": 4}),
    ("xmoe", {"temperature": 0.5}),
    ("moe_plus_plus", {"n_zero": 2, "n_copy": 1, "n_const": 2, "tau_pp": 0.5}),
    ("moe_plus_plus", {"balance_scope": "batch", "temperature": 2.0}),
    ("tc_moe", {"n_null": 3, "tc_beta": 0.1}),
    ("tc_moe", {"temperature": 2.0, "z_coef": 0.01, "balance_scope": "batch"}),
    ("cosine", {"temperature": 0.1}),
    ("perturbed_cosine", {"theta": 0.5}),
    ("perturbed_cosine", {"temperature": 0.2}),
    ("expert_choice", {"capacity_factor": 0.5}),
    ("expert_choice", {"capacity_factor": 2.0, "temperature": 2.0}),
    ("dense", {"activation": "swiglu"}),
]


@pytest.mark.parametrize("name,opts", OPTION_CASES, ids=[f"{n}-{o}" for n, o in OPTION_CASES])
def test_matches_reference_options(name, opts):
    layer = make_layer(name, **opts)
    if "sigma_expert_dropout" in opts:  # training-only noise: in evaluation, the plain router
        layer.eval()
    if name == "hyper":
        _set_progress(layer, 1.0)
    x = _x((2, 8, D)) if name in ("moe_plus_plus", "tc_moe") else _x()
    check(layer, name, x, opts)


SCALING_CASES = [
    {"routed_scaling": 2.5},
    {"routed_scaling": 0.5, "shared_scaling": 0.5, "n_shared": 1},
    {"routed_scaling": 0.5, "shared_scaling": 0.5, "n_shared": 1, "activation": "swiglu"},
]


@pytest.mark.parametrize("opts", SCALING_CASES, ids=str)
def test_sharede_v3_routed_scaling_output(opts):
    """Output, aux and gradients with routed_scaling / shared_scaling (weights not compared)."""
    layer = make_layer("sharede_v3", **opts)
    check(layer, "sharede_v3", _x(), opts, weights=False)


@pytest.mark.parametrize("opts", SCALING_CASES[:2], ids=str)
def test_sharede_v3_topk_weight_stays_normalised_under_routed_scaling(opts):
    """routed_scaling multiplies the routed output; routing.topk_weight stays the normalised
    weights that traces record (docs/moe.md)."""
    layer = make_layer("sharede_v3", **opts)
    check(layer, "sharede_v3", _x(), opts, grads=False)


@pytest.mark.parametrize("shape", [(7, D), (2, 2, 3, D), (1, 9, D)])
@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "tc_moe"])
def test_leading_dims_and_sequence_scope(name, shape):
    """Per-sequence balance: a sequence is the second-to-last dim; a 2-D input is one sequence."""
    layer = make_layer(name)
    check(layer, name, _x(shape), {})


@pytest.mark.parametrize("name", ["sharede_v3", "smoe", "sigma_moe"])
def test_bias_balancing_affects_selection_not_weights(name):
    """Aux-loss-free balancing: selection on scores + b, weights from the unbiased scores.
    b only acts when bias_balancing (gamma) > 0 ("b = 0 when bias balancing is off")."""
    opts = {"n_shared": 1, "bias_balancing": 0.001} if name == "sharede_v3" else {
        "bias_balancing": 0.001}
    layer = make_layer(name, **opts)
    assert "router.expert_bias" in dict(layer.named_buffers()), "expert_bias must be a buffer"
    assert "router.expert_bias" not in dict(layer.named_parameters())
    x = _x()
    scale = 0.2 if name == "smoe" else 1.0
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.3, 0.5, 0.0, -0.5]) * scale)
    _, ref = check(layer, name, x, opts)
    # sanity: the bias changes at least one selection in this setup
    layer_nb = make_layer(name, **opts)
    ref_nb = reference(layer_nb, name, x, opts)
    assert any({s for s, _ in a} != {s for s, _ in b}
               for a, b in zip(ref["sels"], ref_nb["sels"])), "setup: bias changed nothing"


@pytest.mark.parametrize("with_bias", [False, True])
def test_group_limited_routing(with_bias):
    opts = {"n_group": 2, "topk_group": 1}
    if with_bias:
        opts["bias_balancing"] = 0.001
    layer = make_layer("sharede_v3", **opts)
    if with_bias:
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.1, -0.2, 0.3]))
    _, ref = check(layer, "sharede_v3", _x((2, 6, D)), opts)
    assert ref["group_changed"], "setup: the group limit changed no selection"
    for row in ref["sels"]:
        assert len({s // 3 for s, _ in row}) == 1


def test_moe_plus_plus_prev_logits():
    layer = make_layer("moe_plus_plus", gating_residual=True)
    x = _x((2, 8, D))
    n_slots = layer.router.weight.shape[0]
    assert n_slots == E + 3  # 1 zero, 1 copy, 1 constant expert at E = 6
    assert tuple(layer.router.gate_residual.weight.shape) == (n_slots, n_slots)
    g = torch.Generator().manual_seed(5)
    prev = torch.randn(16, n_slots, generator=g) * 2.0
    out, ref = check(layer, "moe_plus_plus", x, {}, prev_logits=prev)
    ref0 = reference(layer, "moe_plus_plus", x, {})
    assert not torch.allclose(ref["logits"], ref0["logits"]), "setup: residual had no effect"


def test_moe_plus_plus_gate_residual_zero_init():
    layer = build_moe("moe_plus_plus", D, E, M, K, gating_residual=True)
    assert torch.count_nonzero(layer.router.gate_residual.weight) == 0
    assert getattr(layer.router.gate_residual, "bias", None) is None


def _set_progress(layer, p):
    fn = getattr(layer, "set_training_progress", None)
    if fn is None:
        fn = layer.router.set_training_progress
    fn(p)


@pytest.mark.parametrize("progress,k_eff", [(0.0, 1), (0.5, 2), (1.0, 3)])
def test_hyper_training_progress(progress, k_eff):
    opts = {"hyper_k_min": 1}
    layer = make_layer("hyper", k=3, **opts)
    _set_progress(layer, progress)
    out, ref = check(layer, "hyper", _x(), opts, k=k_eff)
    n_valid = (out.routing.topk_idx >= 0).sum(1)
    assert (n_valid == k_eff).all()


def test_hyper_frozen_hypernet_trainable_embedding():
    layer = build_moe("hyper", D, E, M, K)
    for n, p in layer.router.hypernet.named_parameters():
        assert not p.requires_grad, f"hypernet.{n} must be frozen"
    assert _tensor(layer.router.embedding).requires_grad
    out = layer(_x())
    (out.output.sum() + out.aux_loss).backward()
    assert _tensor(layer.router.embedding).grad is not None


def test_dense_is_one_expert_of_width_k_m():
    layer = build_moe("dense", D, E, M, K)
    assert tuple(layer.experts.w1.shape) == (1, D, K * M)
    assert tuple(layer.experts.w2.shape) == (1, K * M, D)


# ---- capacity (token dropping) -------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["auto"] + DISPATCHES)
@pytest.mark.parametrize("cf,seq", [(0.5, 6), (0.75, 6), (0.75, 5), (1.0, 5)])
def test_capacity_factor_switch_style(cf, seq, dispatch):
    """C = ceil(cf*T*K/E) over all T tokens of the call (T*K/E = 4 for seq 6: no rounding
    question; 10/3 for seq 5: ceil); the first C assignments of each expert in flattened
    (token, rank) order are kept, the others contribute nothing; kept weights are not
    renormalised; stats['dropped_fraction'] = dropped / (T*K)."""
    opts = {"capacity_factor": cf}
    if dispatch != "auto":
        opts["dispatch"] = dispatch
    layer = make_layer("smoe", router_std=1.5, **opts)
    x = _x((2, seq, D))
    ref = reference(layer, "smoe", x, opts)
    assert ref["dropped_fraction"] > 0, "setup: nothing dropped"
    try:
        check(layer, "smoe", x, opts, routing=False, aux=False)
    except AssertionError as err:
        # diagnose which alternative semantics the implementation follows
        alt = _capacity_alternatives(layer, x, opts)
        raise AssertionError(f"{err}\n  alternatives matching the output: {alt}") from None


def _capacity_alternatives(layer, x, opts):
    with torch.no_grad():
        got = layer(x).output.double().reshape(-1, D)
        base = reference(layer, "smoe", x, {k: v for k, v in opts.items()
                                            if k != "capacity_factor"})
    xs = x.reshape(-1, D).double()
    n_tok = xs.shape[0]
    sels = base["sels"]
    found = []
    for cap_rule in ("ceil", "floor", "round"):
        raw = opts["capacity_factor"] * n_tok * K / E
        cap = {"ceil": math.ceil, "floor": math.floor, "round": round}[cap_rule](raw)
        for order_name in ("token_rank", "rank_token", "by_weight"):
            pairs = [(t, j) for t in range(n_tok) for j in range(K)]
            if order_name == "rank_token":
                pairs = sorted(pairs, key=lambda tj: (tj[1], tj[0]))
            elif order_name == "by_weight":
                pairs = sorted(pairs, key=lambda tj: -float(sels[tj[0]][tj[1]][1]))
            for renorm in (False, True):
                count = [0] * E
                kept = set()
                for t, j in pairs:
                    s = sels[t][j][0]
                    if count[s] < cap:
                        count[s] += 1
                        kept.add((t, j))
                y = torch.zeros(n_tok, D, dtype=torch.float64)
                with torch.no_grad():
                    for t in range(n_tok):
                        ws = [(j, s, w) for j, (s, w) in enumerate(sels[t]) if (t, j) in kept]
                        tot = sum(float(w) for _, _, w in ws) or 1.0
                        for _, s, w in ws:
                            ww = float(w) / tot if renorm else float(w)
                            y[t] += ww * _ffn(layer.experts, s, xs[t], "relu")[0]
                if torch.allclose(y, got, atol=1e-5):
                    found.append(f"C={cap_rule}, order={order_name}, renorm={renorm}")
    return found or "none of ceil/floor/round x token_rank/rank_token/by_weight x renorm"


# ---- zero-token experts, k = 1, k = E -----------------------------------------------------


@pytest.mark.parametrize("dispatch", ["auto"] + DISPATCHES)
@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "sharede_v3", "tc_moe", "moe_plus_plus"])
def test_experts_with_zero_tokens(name, dispatch):
    opts = {} if dispatch == "auto" else {"dispatch": dispatch}
    layer = make_layer(name, k=1, **opts)
    x = _x((1, 2, D))
    _, ref = check(layer, name, x, opts, k=1)
    used = {s % E if name == "tc_moe" else s for row in ref["sels"] for s, _ in row}
    assert len(set(range(E)) - used) >= 4
    # unused experts receive exactly zero gradient (checked against the reference in check())


@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3",
                                  "moe_plus_plus", "tc_moe", "cosine", "perturbed_cosine",
                                  "hyper"])
@pytest.mark.parametrize("k", [1, E])
def test_k_one_and_k_all(name, k):
    layer = make_layer(name, k=k)
    if name == "hyper":
        _set_progress(layer, 1.0)
    x = _x((2, 8, D)) if name in ("moe_plus_plus", "tc_moe") else _x()
    out, ref = check(layer, name, x, {}, k=k)
    if k == 1 and name in ("smoe", "sigma_moe", "xmoe", "sharede_v2", "cosine",
                           "perturbed_cosine", "hyper", "moe_plus_plus"):
        assert torch.allclose(out.routing.topk_weight, torch.ones_like(out.routing.topk_weight))


def test_top1_single_expert_equals_dense_ffn():
    """E = 1, k = 1 smoe is exactly its single expert (megablocks-style check)."""
    layer = make_layer("smoe", k=1, e=1)
    x = _x()
    out = layer(x)
    ex = layer.experts
    exp = F.relu(x @ ex.w1[0]) @ ex.w2[0]
    torch.testing.assert_close(out.output, exp, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 2. gradcheck (float64) per dispatch backend
# --------------------------------------------------------------------------------------------

GD, GE, GM, GK = 4, 4, 3, 2
GC_NAMES = ["smoe", "sigma_moe", "xmoe", "sharede_v3", "moe_plus_plus", "tc_moe"]


def _gc_layer(name, dispatch, **extra):
    """Seed search on the reference only: top-k margins and ReLU pre-activations must be far
    from the non-differentiable points (eps = 1e-6)."""
    opts = {"dispatch": dispatch, "z_coef": 0.1, "balance_coef": 0.1, **extra}
    gated = {"gating_residual": True} if name == "moe_plus_plus" else {}  # gradients reach prev_logits
    for seed in range(200):
        layer = make_layer(name, k=GK, d=GD, e=GE, m=GM, seed=seed, router_std=1.0,
                           expert_std=1.0, dtype=torch.float64, **opts, **gated)
        if name == "sharede_v3":
            with torch.no_grad():
                layer.router.expert_bias.zero_()
        x = _x((1, 3, GD), seed=seed, dtype=torch.float64)
        prev = None
        if name == "moe_plus_plus":
            n_slots = layer.router.weight.shape[0]
            prev = torch.randn(3, n_slots, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = reference(layer, name, x, opts, k=GK, e=GE, prev_logits=prev)
        if ref["margin"] > 1e-3 and ref["preact"] > 1e-3:
            return layer, x, prev, opts
    raise AssertionError("no tie-free seed found")


def _aux_outputs(out, name):
    # aux terms are checked unweighted: out.aux_loss is float32 even for a float64 layer
    # (see test_aux_loss_dtype_follows_input), which would make a float64 gradcheck meaningless
    terms = [out.output, out.aux["balance"], out.aux["z"]]
    if name == "tc_moe":
        terms.append(out.aux["null_reward"])
    if name == "sigma_moe":
        terms.append(out.aux["entropy"])
    return tuple(terms)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("name", GC_NAMES)
def test_gradcheck(name, dispatch):
    """float64 gradcheck of output and aux terms: full Jacobian w.r.t. the input, fast mode
    (random projections) w.r.t. every trainable parameter (and MoE++'s prev_logits)."""
    _gradcheck(name, dispatch)


GC_OPTION_CASES = [
    ("sigma_moe", {"sigma_renormalize": False, "sigma_entropy_coef": 0.1}),
    ("sigma_moe", {"sigma_entropy_coef": 0.1, "sigma_expert_dropout": 0.25}),
]


@pytest.mark.parametrize("dispatch", ["loop", "blocked", "fused"])
@pytest.mark.parametrize("name,extra", GC_OPTION_CASES, ids=[f"{n}-{o}" for n, o in GC_OPTION_CASES])
def test_gradcheck_options(name, extra, dispatch):
    """The algorithm options that change the maths (expert dropout in training mode, each call
    drawing the same mask from a re-seeded RNG)."""
    _gradcheck(name, dispatch, **extra)


def _gradcheck(name, dispatch, **extra):
    layer, x, prev, opts = _gc_layer(name, dispatch, **extra)
    pnames = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [dict(layer.named_parameters())[n].detach().clone().requires_grad_(True)
              for n in pnames]

    def run(x_, prev_, ps):
        kwargs = {} if prev_ is None else {"prev_logits": prev_}
        torch.manual_seed(0)  # the same expert-dropout mask at every evaluation
        out = torch.func.functional_call(layer, dict(zip(pnames, ps)), (x_,), kwargs)
        return _aux_outputs(out, name)

    fixed = [p.detach() for p in params]
    assert torch.autograd.gradcheck(
        lambda x_: run(x_, prev, fixed), (x.clone().requires_grad_(True),),
        eps=1e-6, atol=1e-5, rtol=1e-3)
    if prev is None:
        fn, inputs = (lambda *ps: run(x, None, ps)), tuple(params)
    else:
        fn = lambda prev_, *ps: run(x, prev_, ps)  # noqa: E731
        inputs = (prev.clone().requires_grad_(True), *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize("name", ["smoe", "tc_moe", "moe_plus_plus"])
def test_aux_loss_dtype_follows_input(name):
    layer = make_layer(name, dtype=torch.float64, z_coef=0.1)
    out = layer(_x(dtype=torch.float64))
    assert out.aux["balance"].dtype == torch.float64
    assert out.aux_loss.dtype == torch.float64, (
        f"aux_loss is {out.aux_loss.dtype} for a float64 layer: its gradient is then only "
        "float32-accurate and a float64 gradcheck of aux_loss fails")


# --------------------------------------------------------------------------------------------
# 3. uniform router -> balance = 1, aux_loss = balance_coef
# --------------------------------------------------------------------------------------------


def _make_uniform(layer, name):
    with torch.no_grad():
        r = layer.router
        if name == "xmoe":
            r.expert_embeddings.copy_(torch.ones_like(r.expert_embeddings))
        elif name == "hyper":
            r.hypernet[2].weight.zero_()
            if r.hypernet[2].bias is not None:
                r.hypernet[2].bias.zero_()
        elif name == "cosine":
            r.weight.copy_(torch.ones_like(r.weight))
        else:
            r.weight.zero_()
            if isinstance(getattr(r, "bias", None), torch.Tensor):
                r.bias.zero_()


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3",
                                  "cosine", "perturbed_cosine", "hyper", "tc_moe"])
def test_uniform_router_balance_equals_coef(name, scope):
    layer = make_layer(name, balance_scope=scope)
    _make_uniform(layer, name)
    x = _x()
    out = layer(x)
    torch.testing.assert_close(out.aux["balance"].double(),
                               torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0)
    expected = 0.01
    if name == "tc_moe":  # reward term: -beta * mean_t sum_null p (logits 0, -1, -10)
        pn = K * math.exp(-10) / (E + E * math.exp(-1) + K * math.exp(-10))
        torch.testing.assert_close(out.aux["null_reward"].double(),
                                   torch.tensor(-pn, dtype=torch.float64), atol=1e-7, rtol=1e-5)
        expected = 0.01 - 1e-5 * pn
    torch.testing.assert_close(out.aux_loss.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-7, rtol=1e-6)
    if name in ("smoe", "sharede_v2", "sigma_moe", "sharede_v3"):
        z_exp = math.log(E) ** 2
        torch.testing.assert_close(out.aux["z"].double(),
                                   torch.tensor(z_exp, dtype=torch.float64), atol=1e-5, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# 4. edge cases and errors
# --------------------------------------------------------------------------------------------


_EMPTY = [(n, False) for n in NAMES] + [("moe_plus_plus", True)]


@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
@pytest.mark.parametrize("name,with_prev", _EMPTY)
def test_empty_input(name, with_prev, shape):
    layer = make_layer(name)
    x = torch.zeros(shape, requires_grad=True)
    kwargs = {}
    if with_prev:
        kwargs["prev_logits"] = torch.zeros(0, layer.router.weight.shape[0])
    out = layer(x, **kwargs)
    assert out.output.shape == x.shape
    assert out.aux_loss.dim() == 0
    assert torch.isfinite(out.aux_loss), f"aux_loss on empty input is {out.aux_loss}"
    if out.routing is not None:
        assert out.routing.topk_idx.shape[0] == 0
        assert out.routing.probs.shape[0] == 0
    (out.output.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for n, p in layer.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"grad {n} not finite"


@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3",
                                  "cosine", "perturbed_cosine", "hyper"])
def test_top_k_larger_than_n_experts_raises(name):
    with pytest.raises(ValueError, match="top_k"):
        build_moe(name, D, E, M, E + 1)


def test_unknown_algorithm_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_moe("no_such_router", D, E, M, K)
    msg = str(info.value)
    assert "no_such_router" in msg
    for n in NAMES:
        assert n in msg, f"error message does not list {n!r}: {msg}"


BAD_OPTIONS = [
    ("smoe", "activation", "tanh", "swiglu"),
    ("smoe", "balance_scope", "foo", "sequence"),
    ("smoe", "balance_count", "foo", "top1"),
    ("smoe", "dispatch", "foo", "padded"),
    ("xmoe", "xmoe_weights", "foo", "softmax"),
    ("dense", "activation", "tanh", "relu"),
]


@pytest.mark.parametrize("name,option,value,allowed", BAD_OPTIONS)
def test_bad_option_value_raises(name, option, value, allowed):
    with pytest.raises(ValueError) as info:
        build_moe(name, D, E, M, K, **{option: value})
    msg = str(info.value)
    assert option in msg and value in msg, msg
    assert allowed in msg, f"message does not say what is allowed: {msg}"


# --------------------------------------------------------------------------------------------
# 5. parameter shapes and initialisation from the specification
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts,n_shared", [
    ("sharede_v2", {}, 2), ("sharede_v3", {}, 2), ("sharede_v2", {"n_shared": 3}, 3),
    ("sharede_v3", {"n_shared": 1, "activation": "swiglu"}, 1),
])
def test_shared_experts_shapes(name, opts, n_shared):
    """SharedE: n_shared (default 2, the paper's 64 routed + 2 shared) experts of width M."""
    layer = build_moe(name, D, E, M, K, **opts)
    sh = layer.shared_experts
    assert tuple(sh.w1.shape) == (n_shared, D, M)
    assert tuple(sh.w2.shape) == (n_shared, M, D)
    if opts.get("activation") == "swiglu":
        assert tuple(sh.w3.shape) == (n_shared, D, M)
    assert tuple(layer.experts.w1.shape) == (E, D, M)


@pytest.mark.parametrize("name,opts,n_slots", [
    ("smoe", {}, E), ("moe_plus_plus", {}, E + 3),
    ("moe_plus_plus", {"n_zero": 1, "n_copy": 1, "n_const": 6}, E + 8),
    ("moe_plus_plus", {"n_zero": 2, "n_copy": 0, "n_const": 3}, E + 5),
    ("tc_moe", {}, 2 * E + K), ("tc_moe", {"n_null": 3}, 2 * E + 3),
])
def test_router_slot_count(name, opts, n_slots):
    layer = build_moe(name, D, E, M, K, **opts)
    assert tuple(layer.router.weight.shape) == (n_slots, D)
    out = layer(_x())
    assert tuple(out.routing.probs.shape) == (10, n_slots)
    assert tuple(out.routing.logits.shape) == (10, n_slots)
    assert tuple(out.routing.topk_idx.shape) == (10, K)


def test_xmoe_projection_and_orthogonal_embeddings():
    layer = build_moe("xmoe", D, E, M, K)
    d_r = E // 2
    assert tuple(layer.router.proj.weight.shape) == (d_r, D)
    q = layer.router.expert_embeddings.detach().double()
    assert tuple(q.shape) == (E, d_r)
    # orthogonal init with gain 0.32: the d_r columns are orthogonal with norm 0.32
    torch.testing.assert_close(q.T @ q, 0.32 ** 2 * torch.eye(d_r, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_router_init_std():
    g_default = build_moe("smoe", 64, 32, M, K).router.weight.detach()
    g_wide = build_moe("smoe", 64, 32, M, K, router_init_std=0.06).router.weight.detach()
    assert 0.018 < g_default.std().item() < 0.022
    assert 0.054 < g_wide.std().item() < 0.066
    assert abs(g_default.mean().item()) < 0.003


def test_hyper_hypernet_init_std():
    layer = build_moe("hyper", D, E, M, K)
    for i in (0, 2):
        w = layer.router.hypernet[i].weight.detach()
        assert 0.017 < w.std().item() < 0.023, f"hypernet[{i}] std {w.std().item()}"
    assert tuple(layer.router.hypernet[2].weight.shape)[0] == E * D + E
