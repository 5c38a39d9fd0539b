"""Routers whose slots are more than the E FFN experts (ALGORITHMS.md section 1): MoE++'s zero,
copy and constant experts beside the FFN experts, and TC-MoE's negated and null slots. Each maps
its slots onto the FFN experts (`expert_plan`) and adds what its computation-free slots output
(`extra_output`), so the experts and the dispatch see only FFN work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .options import check_number
from .routers import TopKRouter, _grad_if

__all__ = ["MoEPlusPlusRouter", "TCMoERouter", "paper_slot_count"]


def paper_slot_count(paper_count: int, n_experts: int) -> int:
    """MoE++'s count of one zero-computation kind at E FFN experts: the paper's count at E = 66
    scaled by E / 66, rounded half up, at least 1 (1 zero, 1 copy and 6 constant at E = 66)."""
    return max(1, math.floor(paper_count * n_experts / MoEPlusPlusRouter.PAPER_EXPERTS + 0.5))


class MoEPlusPlusRouter(TopKRouter):
    """MoE++ (Jin et al. 2024): E FFN experts plus zero, copy and constant experts; gating residual
    z_l <- z_l + W_g z_{l-1} from the previous MoE++ layer's logits (W_g zero-initialised).

    Slots: [0, E) FFN, then n_zero zero experts (output 0), n_copy copy experts (output x), n_const
    constant experts (a0 x + a1 v_c with [a0, a1] = softmax(W_c x)).
    W_g exists only where it is used: gating_residual=True builds it, and forward then needs the
    previous layer's logits (ValueError without them). The default, False, suits a standalone layer
    and a model's first MoE layer, which have no previous logits; a model turns it on for its later
    MoE++ layers. An unused parameter would break DDP's gradient reduction, so constant-expert
    parameters likewise exist only when n_const > 0.
    With output_dim != d_model, copy and constant experts (functions of x, d_model wide) cannot
    exist: their default counts are then 0, explicit non-zero ones a ValueError. Zero experts are
    kept (their output 0 has any width).

    Slot counts: None (the default) scales with E at the paper's ratio, 1 zero, 1 copy and 6
    constant experts per 66 FFN experts, each at least 1 (`paper_slot_count`): 1/1/6 at E = 66,
    1/1/1 at E = 16. Explicit integers (0 allowed) are used as given.
    """

    OPTIONS = {"n_zero": None, "n_copy": None, "n_const": None, "tau_pp": 0.75,
               "gating_residual": False}
    PAPER_EXPERTS = 66  # the paper's E, for which it uses 1 zero, 1 copy and 6 constant experts
    PAPER_SLOTS = {"n_zero": 1, "n_copy": 1, "n_const": 6}
    # Until the counts scaled with E they were fixed at the paper's 1/1/6 for every E.
    SCALED_OPTIONS = dict(PAPER_SLOTS)

    @classmethod
    def resolve_options(cls, opts, n_experts, top_k, d_model):
        x = opts.extra
        same_width = opts.output_dim in (None, d_model)
        for name, paper in cls.PAPER_SLOTS.items():
            if x[name] is None:
                # copy and constant experts output a function of the d_model-wide input
                x[name] = paper_slot_count(paper, n_experts) if same_width or name == "n_zero" else 0

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        x = opts.extra
        for name in ("n_zero", "n_copy", "n_const"):
            check_number(name, x[name], 0, integer=True)
        check_number("tau_pp", x["tau_pp"], 0.0)
        if not isinstance(x["gating_residual"], bool):
            raise ValueError(f"gating_residual={x['gating_residual']!r} is not valid; it must be True "
                             "or False.")

    @classmethod
    def check_output_dim(cls, opts, d_model):
        x = opts.extra
        if opts.output_dim in (None, d_model) or x["n_copy"] == x["n_const"] == 0:
            return
        raise ValueError(
            f"moe_plus_plus with output_dim={opts.output_dim} != d_model={d_model} cannot have copy "
            f"or constant experts (n_copy={x['n_copy']}, n_const={x['n_const']}): they output a "
            "function of the d_model-wide input. Leave n_copy and n_const unset (they then default "
            "to 0) or set them to 0 (zero experts, n_zero, are kept: they output 0)."
        )

    @classmethod
    def slot_count(cls, n_experts, top_k, opts):
        x = opts.extra
        return n_experts + x["n_zero"] + x["n_copy"] + x["n_const"]

    def init_router(self, d_model):
        super().init_router(d_model)
        x, R = self.opts.extra, self.n_slots
        self.gate_residual = None
        if x["gating_residual"]:
            self.gate_residual = nn.Linear(R, R, bias=False)
            nn.init.zeros_(self.gate_residual.weight)
        self.const_proj = self.const_values = None
        if x["n_const"] > 0:
            self.const_proj = nn.Parameter(torch.empty(x["n_const"], 2, d_model))
            nn.init.normal_(self.const_proj, std=self.opts.router_init_std)
            self.const_values = nn.Parameter(torch.empty(x["n_const"], d_model))
            nn.init.normal_(self.const_values, std=0.02)
        eta = torch.full((R,), float(x["tau_pp"]))
        eta[: self.n_experts] = 1.0
        self.register_buffer("eta", eta, persistent=False)

    def logits(self, x, prev_logits):
        z = F.linear(x, self.weight, self.bias)
        if self.gate_residual is not None:
            if prev_logits is None:
                raise ValueError(
                    "this MoE++ layer has a gating residual (gating_residual=True) and needs the "
                    "previous MoE++ layer's logits: call layer(x, prev_logits=prev.routing.logits), "
                    "or build it with gating_residual=False (a first or standalone layer)."
                )
            if prev_logits.shape != z.shape:
                raise ValueError(
                    f"prev_logits has shape {tuple(prev_logits.shape)} but this MoE++ layer's "
                    f"logits have shape {tuple(z.shape)}; pass the previous MoE++ layer's "
                    "routing.logits (same tokens, same slot count)."
                )
            z = z + self.gate_residual(prev_logits)
        return z

    def balance_inputs(self, s, idx):
        return s, idx, self.eta

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files from before these parameters existed only where used: every layer had W_g (zero and
        # unused where no previous logits came) and n_const=0 layers had empty constant tensors.
        # Such entries carry nothing and are dropped; a non-zero W_g stays unexpected (strict error).
        for name, absent in (("gate_residual.weight", self.gate_residual is None),
                             ("const_proj", self.const_proj is None),
                             ("const_values", self.const_values is None)):
            key = prefix + name
            if absent and key in state_dict and not state_dict[key].any():
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def expert_plan(self, routing):
        idx = routing.topk_idx
        return idx.masked_fill(idx >= self.n_experts, -1), routing.topk_weight

    def extra_output(self, x, routing, scale):
        x_cfg, E = self.opts.extra, self.n_experts
        if x_cfg["n_copy"] == x_cfg["n_const"] == 0:
            return None  # zero experts only: they add nothing
        slot_w = torch.zeros(x.shape[0], self.n_slots, dtype=x.dtype, device=x.device)
        slot_w = slot_w.scatter_add(1, routing.topk_idx, routing.topk_weight.to(x.dtype) * scale)
        copy_start = E + x_cfg["n_zero"]
        const_start = copy_start + x_cfg["n_copy"]
        y = x * slot_w[:, copy_start:const_start].sum(-1, keepdim=True)
        if x_cfg["n_const"] > 0:
            wc = slot_w[:, const_start:]  # [T, C]
            a = torch.softmax(torch.einsum("td,cad->tca", x, self.const_proj), dim=-1)
            y = y + x * (wc * a[..., 0]).sum(-1, keepdim=True) + (wc * a[..., 1]) @ self.const_values
        return y


class TCMoERouter(TopKRouter):
    """TC-MoE (Yan et al. 2025): ternary choice. Slots [0, E) use +FFN_e, [E, 2E) use -FFN_{s-E},
    n_null null slots compute nothing. Logit offsets -1 and -10; w_j = p_j / (sum of the selected
    non-null p + sum of ALL null p); balance over base experts plus a null reward -beta*mean(null p).
    """

    OPTIONS = {"n_null": None, "tc_beta": 1e-5}

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        x = opts.extra
        if x["n_null"] is not None:
            check_number("n_null", x["n_null"], 0, integer=True)
        check_number("tc_beta", x["tc_beta"], 0.0)

    @classmethod
    def slot_count(cls, n_experts, top_k, opts):
        n_null = opts.extra["n_null"]
        return 2 * n_experts + (top_k if n_null is None else n_null)

    def init_router(self, d_model):
        super().init_router(d_model)
        E = self.n_experts
        offsets = torch.zeros(self.n_slots)
        offsets[E : 2 * E] = -1.0
        offsets[2 * E :] = -10.0
        self.register_buffer("slot_offsets", offsets, persistent=False)

    def aux_coefficients(self):
        return {**super().aux_coefficients(), "null_reward": self.opts.extra["tc_beta"]}

    def logits(self, x, prev_logits):
        return F.linear(x, self.weight, self.bias) + self.slot_offsets

    def combine(self, z, s, idx, vals):
        E2 = 2 * self.n_experts
        non_null = (idx < E2).to(vals.dtype)
        denom = (vals * non_null).sum(-1, keepdim=True) + s[:, E2:].sum(-1, keepdim=True)
        return vals / denom

    def balance_inputs(self, s, idx):
        """Balance over base experts: P_e = p_hat_e + p_hat_{E+e} (p_hat over the 2E non-null
        slots), selections mapped to their base expert, null selections not counted."""
        E = self.n_experts
        p_hat = s[:, : 2 * E] / s[:, : 2 * E].sum(-1, keepdim=True)
        return p_hat[:, :E] + p_hat[:, E:], torch.where(idx < 2 * E, idx % E, -1), None

    def aux_terms(self, z, s, idx, seq_len):
        terms = super().aux_terms(z, s, idx, seq_len)
        with _grad_if(self.opts.extra["tc_beta"]):
            null_p = s[:, 2 * self.n_experts :].sum(-1)
            terms["null_reward"] = -null_p.mean() if s.shape[0] else s.sum() * 0.0
        return terms

    def expert_plan(self, routing):
        idx, w, E = routing.topk_idx, routing.topk_weight, self.n_experts
        sign = torch.where(idx < E, 1.0, -1.0).to(w.dtype)
        null = idx >= 2 * E
        ids = torch.where(null, -1, idx % E)
        return ids, torch.where(null, torch.zeros_like(w), w * sign)
