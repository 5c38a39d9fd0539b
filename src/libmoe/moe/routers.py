"""Routers: one small registered class per routing algorithm (ALGORITHMS.md section 1).

A router maps tokens x [T, D] to a `Routing` record (T tokens, K choices, R router slots) and a
dict of unweighted auxiliary terms. It also says how its slots map onto the FFN experts
(`expert_plan`) and adds the output of any computation-free slots (`extra_output`), so the
experts and the dispatch never see the router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as fn
from .options import MoEOptions, check_choice, check_number


@dataclass(frozen=True)
class Routing:
    """One MoE layer's routing decision for T tokens.

    topk_idx [T, K] int64 slot ids sorted by weight, descending (-1 pads expert_choice rows);
    topk_weight [T, K] normalised combine weights; probs [T, R] router probabilities (sigmoid
    routers: the sigmoid scores); logits [T, R] router logits before temperature.
    """

    topk_idx: Tensor
    topk_weight: Tensor
    probs: Tensor
    logits: Tensor


class Router(nn.Module):
    """Base class. Subclasses set `n_slots` and implement `forward`.

    OPTIONS lists the algorithm's own knobs and their defaults; `check_options` validates them.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {}
    ROUTER_BIAS: ClassVar[bool] = False  # whether the logits add a learned bias (option `bias`)
    # Options whose default (None) scales with the layer's size, each mapped to the fixed value it
    # had before it scaled: a file saved then records no value for it (`legacy_options`).
    SCALED_OPTIONS: ClassVar[dict[str, Any]] = {}
    # Whether a token's routing depends on that token alone (its input, the previous layer's logits),
    # not on the other tokens of the batch: then decoding token by token with a KV cache routes as a
    # forward over the whole sequence does.
    PER_TOKEN: ClassVar[bool] = True

    def __init__(self, d_model: int, n_experts: int, top_k: int, opts: MoEOptions):
        super().__init__()
        self.d_model, self.n_experts, self.top_k, self.opts = d_model, n_experts, top_k, opts
        self.n_slots = n_experts
        self.temperature = opts.temperature  # mutable at inference (temperature study)
        self.drop_top = 0  # DropTop-n perturbation at inference (analysis tools)

    def fresh_copy(self) -> Router:
        """A newly built router of the same class and construction (freshly initialised weights,
        the constants' values): what restores what meta-device loading leaves unset."""
        return type(self)(self.d_model, self.n_experts, self.top_k, self.opts)

    def forward(
        self, x: Tensor, seq_len: int, prev_logits: Tensor | None = None
    ) -> tuple[Routing, dict[str, Tensor]]:
        """Route x [T, D] (sequences of `seq_len` tokens) -> (Routing, unweighted aux terms)."""
        raise NotImplementedError

    @classmethod
    def resolve_options(cls, opts: MoEOptions, n_experts: int, top_k: int, d_model: int) -> None:
        """Replace, in opts.extra, the None defaults of SCALED_OPTIONS by this layer's values
        (called before check_options; explicit values stay as given)."""

    @classmethod
    def check_options(cls, opts: MoEOptions, n_experts: int, top_k: int) -> None:
        """Validate the algorithm's own options (opts.extra, defaults filled in)."""

    @classmethod
    def check_output_dim(cls, opts: MoEOptions, d_model: int) -> None:
        """Raise ValueError if the router's slots cannot produce an output of opts.output_dim
        (default d_model) from an input of d_model. FFN experts, negated and null slots can."""

    def aux_coefficients(self) -> dict[str, float]:
        return {"balance": self.opts.balance_coef, "z": self.opts.z_coef}

    @torch.no_grad()
    def init_weight_square(self, x: Tensor) -> float:
        """E_t[sum_e w_te^2] over the tokens x [T, D], with w_te the weight token t gives FFN
        expert e (the weights of slots that run the same expert added, signs kept: TC-MoE's +FFN_e
        and -FFN_e cancel), routed as in evaluation (no training-only noise or counts).

        Experts are independent at init, so the routed output's variance is this times one
        expert's: what `expert_init="dense_match"` divides by. Near-uniform renormalised top-K
        weights give 1/K (factor K), a sigmoid without renormalisation about K/4, MoE++ less
        than 1/K as zero-computation slots take weight. Measured on the router's own weights, so
        it holds for every router, temperature and init std (docs/moe.md)."""
        T = x.shape[0]
        was_training = self.training
        self.eval()
        try:
            routing, _ = self(x, T, x.new_zeros(T, self.n_slots))
        finally:
            self.train(was_training)
        ids, w = self.expert_plan(routing)
        valid = (ids >= 0) & (ids < self.n_experts)
        per_expert = x.new_zeros(T, self.n_experts).scatter_add_(
            1, ids.clamp(0, self.n_experts - 1), torch.where(valid, w.to(x.dtype), 0.0))
        return float(per_expert.square().sum(-1).mean())

    def param_dtype(self) -> torch.dtype:
        """The dtype the router computes in: that of its (first floating) parameter."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def expert_plan(self, routing: Routing) -> tuple[Tensor, Tensor]:
        """(expert ids [T, K], combine weights [T, K]) for the FFN experts; ids < 0 are skipped."""
        return routing.topk_idx, routing.topk_weight

    def extra_output(self, x: Tensor, routing: Routing, scale: float) -> Tensor | None:
        """Output of routed slots that are not FFN experts (MoE++ zero-computation experts)."""
        return None

    def update_bias(self) -> None:
        """Apply auxiliary-loss-free bias balancing after an optimizer step (no-op by default)."""

    def set_training_progress(self, fraction: float) -> None:
        """Tell schedule-dependent routers (hyper) how far training has gone, in [0, 1]."""


def _grad_if(coef: float):
    """Build an aux term with autograd only when its coefficient can make it matter."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and coef != 0)


class TopKRouter(Router):
    """Linear router logits z = W_r x (+ b), scores, top-K selection and combine weights.

    The default is SMoE (softmax, renormalised top-K). Subclasses override one of `logits`,
    `scores`, `balance_inputs`, `combine` or `aux_terms`. Every top-K router supports the
    auxiliary-loss-free balancing bias of DeepSeek-V3 (`bias_balancing` = update rate gamma) and
    group-limited routing (`n_group`, `topk_group`).
    """

    ROUTER_BIAS = True

    def __init__(self, d_model: int, n_experts: int, top_k: int, opts: MoEOptions):
        super().__init__(d_model, n_experts, top_k, opts)
        self.n_slots = self.slot_count(n_experts, top_k, opts)
        self.init_router(d_model)
        self.register_buffer("expert_bias", torch.zeros(self.n_slots))
        self.register_buffer("load_counts", torch.zeros(self.n_slots), persistent=False)

    @classmethod
    def slot_count(cls, n_experts: int, top_k: int, opts: MoEOptions) -> int:
        return n_experts

    def init_router(self, d_model: int) -> None:
        self.weight = nn.Parameter(torch.empty(self.n_slots, d_model))
        nn.init.normal_(self.weight, std=self.opts.router_init_std)
        self.bias = nn.Parameter(torch.zeros(self.n_slots)) if self.opts.bias else None

    def logits(self, x: Tensor, prev_logits: Tensor | None) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def scores(self, z: Tensor) -> Tensor:
        return torch.softmax(z / self.temperature, dim=-1)

    def balance_inputs(self, s: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """What the balance loss sees: probabilities normalised over the N balanced columns
        [T, N], the selections as column ids (others < 0) and per-column weights eta (or None)."""
        return s, idx, None

    def combine(self, z: Tensor, s: Tensor, idx: Tensor, vals: Tensor) -> Tensor:
        return fn.renorm(vals)

    def current_k(self) -> int:
        return self.top_k

    def selection_scores(self, s: Tensor) -> Tensor:
        """The scores top-K selects on and takes its values from (sigma_moe's expert dropout
        zeroes some in training); `s` itself stays the routing record and the balance input."""
        return s

    def aux_terms(self, z: Tensor, s: Tensor, idx: Tensor, seq_len: int) -> dict[str, Tensor]:
        o = self.opts
        with _grad_if(o.balance_coef):
            p_hat, columns, eta = self.balance_inputs(s, idx)
            balance = fn.balance_loss(
                p_hat, columns, seq_len, o.balance_scope, o.balance_count, eta
            )
        with _grad_if(o.z_coef):
            z_term = fn.z_loss(z)
        return {"balance": balance, "z": z_term}

    def forward(
        self, x: Tensor, seq_len: int, prev_logits: Tensor | None = None
    ) -> tuple[Routing, dict[str, Tensor]]:
        z = self.logits(x, prev_logits)
        s = self.scores(z)
        bias = self.expert_bias if self.opts.bias_balancing > 0 else None
        idx, vals = fn.select_topk(
            self.selection_scores(s), self.current_k(), bias, self.drop_top, self.opts.n_group,
            self.opts.topk_group,
        )
        w = self.combine(z, s, idx, vals)
        if bias is not None:  # biased selection order can differ from the weight order
            idx, w = fn.sort_by_weight(idx, w)
        if self.training and self.opts.bias_balancing > 0:
            self.load_counts += fn.selection_counts(idx, self.n_slots).to(self.load_counts)
        return Routing(idx, w, s, z), self.aux_terms(z, s, idx, seq_len)

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_e += gamma * sign(mean(c) - c_e) with the step's counts c (all-reduced across ranks)."""
        if self.opts.bias_balancing <= 0:
            return
        counts = self.load_counts
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        # No `if counts.sum() > 0` (a host sync): with no counts, sign(mean - c) is 0 everywhere.
        self.expert_bias += self.opts.bias_balancing * torch.sign(counts.mean() - counts)
        counts.zero_()


class SigmoidTopKRouter(TopKRouter):
    """Sigmoid scores, top-K, renormalised (sigma-MoE, Csordas et al. 2023; DeepSeek-V3 gate)."""

    def scores(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z / self.temperature)

    def balance_inputs(self, s, idx):
        return s / s.sum(-1, keepdim=True), idx, None


class SigmaMoERouter(SigmoidTopKRouter):
    """sigma_moe: sigmoid scores, top-K. By default the K selected scores are renormalised to sum
    to one, as in the LibMoE code the LibMoE paper benchmarks; Csordas et al. 2023's sigma-MoE
    uses them as they are (`sigma_renormalize=False`), adds an entropy regulariser
    (`sigma_entropy_coef` gamma: aux term "entropy" = sum_e pbar_e log pbar_e, pbar the mean over
    the layer's tokens of softmax(z), minimised, i.e. the entropy of the batch's average selection
    distribution maximised) and expert dropout (`sigma_expert_dropout` delta: in training each
    (token, expert) score is zeroed before top-K with probability delta, so a token picks among
    the others; a dropped expert that is picked anyway weighs 0; never in evaluation)."""

    OPTIONS = {"sigma_renormalize": True, "sigma_entropy_coef": 0.0, "sigma_expert_dropout": 0.0}

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        x = opts.extra
        if not isinstance(x["sigma_renormalize"], bool):
            raise ValueError(f"sigma_renormalize={x['sigma_renormalize']!r} is not valid; it must be "
                             "True or False.")
        check_number("sigma_entropy_coef", x["sigma_entropy_coef"], 0.0)
        check_number("sigma_expert_dropout", x["sigma_expert_dropout"], 0.0)
        if x["sigma_expert_dropout"] >= 1:
            raise ValueError(f"sigma_expert_dropout={x['sigma_expert_dropout']!r} is not valid; it "
                             "must be a probability below 1 (the paper uses 0.05 to 0.1).")

    def aux_coefficients(self):
        return {**super().aux_coefficients(), "entropy": self.opts.extra["sigma_entropy_coef"]}

    def selection_scores(self, s):
        delta = self.opts.extra["sigma_expert_dropout"]
        if not (self.training and delta > 0):
            return s
        # torch's RNG on the scores' device: seeded runs reproduce, and nothing waits on the host
        return s.masked_fill(torch.rand_like(s) < delta, 0.0)  # sigmoid scores are > 0

    def combine(self, z, s, idx, vals):
        return fn.renorm(vals) if self.opts.extra["sigma_renormalize"] else vals

    def aux_terms(self, z, s, idx, seq_len):
        terms = super().aux_terms(z, s, idx, seq_len)
        with _grad_if(self.opts.extra["sigma_entropy_coef"]):
            terms["entropy"] = fn.neg_entropy_of_mean(z)
        return terms


class XMoERouter(TopKRouter):
    """XMoE (Chi et al. 2022): low-dimensional projection, cosine against expert embeddings.

    p = softmax((r/|r|) . Q^T / xmoe_tau / temperature), r = W_p x in R^{d_r}, rows of Q rescaled
    to norm 1.5. `weight` is the effective [E, D] map Q W_p / xmoe_tau (exact up to the per-token
    normalisation of r).
    """

    OPTIONS = {"xmoe_dim": None, "xmoe_tau": 0.3, "xmoe_weights": "renorm"}
    ROUTER_BIAS = False
    Q_NORM = 1.5

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        x = opts.extra
        if x["xmoe_dim"] is not None:
            check_number("xmoe_dim", x["xmoe_dim"], 0, strict=True, integer=True)
        check_number("xmoe_tau", x["xmoe_tau"], 0.0, strict=True)
        check_choice("xmoe_weights", x["xmoe_weights"], ("renorm", "softmax"))

    def init_router(self, d_model: int) -> None:
        d_r = self.opts.extra["xmoe_dim"] or max(1, self.n_slots // 2)
        self.proj = nn.Linear(d_model, d_r, bias=False)
        nn.init.normal_(self.proj.weight, std=self.opts.router_init_std)
        self.expert_embeddings = nn.Parameter(torch.empty(self.n_slots, d_r))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)
        self.bias = None

    def _queries(self) -> Tensor:
        return F.normalize(self.expert_embeddings, dim=-1) * self.Q_NORM

    @property
    def weight(self) -> Tensor:
        return self._queries() @ self.proj.weight / self.opts.extra["xmoe_tau"]

    def logits(self, x, prev_logits):
        r = F.normalize(self.proj(x), dim=-1)
        return r @ self._queries().t() / self.opts.extra["xmoe_tau"]

    def combine(self, z, s, idx, vals):
        if self.opts.extra["xmoe_weights"] == "softmax":
            return torch.softmax(vals, dim=-1)
        return fn.renorm(vals)


class CosineRouter(TopKRouter):
    """Cosine router (LibMoE v1): z_e = x.w_e / ((|x| + theta)(|w_e| + theta)), theta = 0 here;
    weights = softmax of the K selected z / temperature (equal to renormalised probabilities)."""

    theta = 0.0
    ROUTER_BIAS = False

    def logits(self, x, prev_logits):
        th = self.theta
        xn = x.norm(dim=-1, keepdim=True) + th
        wn = self.weight.norm(dim=-1) + th
        if th == 0.0:
            xn, wn = xn.clamp_min(1e-12), wn.clamp_min(1e-12)
        return F.linear(x, self.weight) / (xn * wn)

    def combine(self, z, s, idx, vals):
        return torch.softmax(z.gather(-1, idx) / self.temperature, dim=-1)


class PerturbedCosineRouter(CosineRouter):
    """Perturbed cosine router: theta (default 0.1) keeps the norms away from zero."""

    OPTIONS = {"theta": 0.1}

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        check_number("theta", opts.extra["theta"], 0.0)

    def init_router(self, d_model):
        super().init_router(d_model)
        self.theta = float(self.opts.extra["theta"])


class HyperRouter(TopKRouter):
    """HyperRouter (Do et al. 2023): a FROZEN hypernetwork H maps a trainable embedding e to the
    router's [W_r, b_r]. k grows linearly from hyper_k_min to top_k over training
    (`set_training_progress`); weights = softmax of the k selected logits / temperature."""

    OPTIONS = {"hyper_embed_dim": 32, "hyper_hidden_dim": 64, "hyper_k_min": 1}
    ROUTER_BIAS = False  # the hypernetwork generates the bias

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        x = opts.extra
        check_number("hyper_embed_dim", x["hyper_embed_dim"], 0, strict=True, integer=True)
        check_number("hyper_hidden_dim", x["hyper_hidden_dim"], 0, strict=True, integer=True)
        check_number("hyper_k_min", x["hyper_k_min"], 0, strict=True, integer=True)
        if x["hyper_k_min"] > top_k:
            raise ValueError(
                f"hyper_k_min={x['hyper_k_min']} exceeds top_k={top_k}; lower hyper_k_min."
            )

    def init_router(self, d_model):
        x = self.opts.extra
        E, std = self.n_slots, self.opts.router_init_std
        self.embedding = nn.Parameter(torch.randn(x["hyper_embed_dim"]))
        self.hypernet = nn.Sequential(
            nn.Linear(x["hyper_embed_dim"], x["hyper_hidden_dim"]),
            nn.ReLU(),
            nn.Linear(x["hyper_hidden_dim"], E * d_model + E),
        )
        for layer in (self.hypernet[0], self.hypernet[2]):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
        self.hypernet.requires_grad_(False)
        # The buffer carries the progress in checkpoints; forward reads the Python mirror, as
        # reading a device buffer on the host would sync every step.
        self.register_buffer("progress", torch.zeros(()))
        self._progress = 0.0

    def _generated(self) -> tuple[Tensor, Tensor]:
        out = self.hypernet(self.embedding)
        E, D = self.n_slots, self.d_model
        return out[: E * D].view(E, D), out[E * D :]

    @property
    def weight(self) -> Tensor:
        return self._generated()[0]

    @property
    def bias(self) -> Tensor:
        return self._generated()[1]

    def logits(self, x, prev_logits):
        w, b = self._generated()
        return F.linear(x, w, b)

    def current_k(self) -> int:
        k_min = self.opts.extra["hyper_k_min"]
        return int(round(k_min + (self.top_k - k_min) * self._progress))

    def combine(self, z, s, idx, vals):
        return torch.softmax(z.gather(-1, idx) / self.temperature, dim=-1)

    def set_training_progress(self, fraction: float) -> None:
        self._progress = min(max(float(fraction), 0.0), 1.0)
        self.progress.fill_(self._progress)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._progress = float(self.progress)  # once per load, not per step


class ExpertChoiceRouter(TopKRouter):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score,
    C = ceil(capacity_factor * T * K / E). A token's weights are its scores for the experts that
    chose it; rows of `topk_idx` [T, E] are sorted by weight and padded with -1 (weight 0).

    Selection looks at every token of the batch, so in a causal LM a token's routing depends on
    later tokens: use it for analysis and encoder-style studies, not for autoregressive decoding.
    """

    PER_TOKEN = False

    @classmethod
    def check_options(cls, opts, n_experts, top_k):
        if opts.bias_balancing > 0:
            raise ValueError(
                "bias_balancing is not valid for expert_choice, which is balanced by construction; "
                "set bias_balancing=0."
            )

    def forward(self, x, seq_len, prev_logits=None):
        z = self.logits(x, prev_logits)
        s = self.scores(z)
        T, E = s.shape
        cf = self.opts.capacity_factor or 1.0
        C = min(T, math.ceil(cf * T * self.top_k / E))
        chosen = torch.zeros_like(s, dtype=torch.bool)
        if C > 0:
            chosen.scatter_(0, s.topk(C, dim=0).indices, True)
        masked = torch.where(chosen, s, torch.full_like(s, -1.0))
        w, order = masked.sort(dim=-1, descending=True, stable=True)
        idx = torch.where(w >= 0, order, -1)
        w = w.clamp_min(0.0)
        with _grad_if(self.opts.z_coef):
            z_term = fn.z_loss(z)
        return Routing(idx, w, s, z), {"z": z_term}
