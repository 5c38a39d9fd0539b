"""The MoE layer (router + routed experts + optional shared experts), the dense baseline, and
`build_moe`, the one factory behind every algorithm name."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..overrides import did_you_mean
from .experts import Experts
from .options import LIBMOE_INIT, MoEOptions, check_number, unknown_option_error
from .registry import REGISTRY
from .routers import ExpertChoiceRouter, Router, Routing


@dataclass
class MoEOutput:
    """What every MoE layer returns.

    output: x's shape, the last dim output_dim (default d_model). aux_loss: scalar, the weighted
    sum of the aux terms (zero when none). aux: unweighted named terms ("balance", "z", ...).
    routing: the layer's Routing (None for dense). stats: detached 0-dim tensors on the layer's
    device (e.g. "dropped_fraction" when a capacity applies): kept on the device so that forward
    never waits for it; read them with float() when logging.
    """

    output: Tensor
    aux_loss: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    routing: Routing | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)


def drop_over_capacity(ids: Tensor, n_experts: int, capacity: int) -> Tensor:
    """Keep each expert's first `capacity` assignments in (token, rank) order; others become -1."""
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < n_experts)
    keyed = torch.where(valid, flat, n_experts)
    sorted_ids, order = torch.sort(keyed, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, keyed, torch.ones_like(keyed))  # no bincount: no host sync
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=ids.device) - starts[sorted_ids]
    keep = torch.empty_like(valid)
    keep[order] = rank < capacity
    return torch.where(keep & valid, flat, -1).view_as(ids)


class MoELayer(nn.Module):
    """A sparse MoE FFN: `router` (one class per algorithm), `experts` (w1 [E, D, M],
    w2 [E, M, D_out]; b1 [E, M], b2 [E, D_out] with expert_bias) and, when n_shared > 0,
    `shared_experts` that every token uses. D_out is opts.output_dim, d_model unless set.

    forward(x [..., D], prev_logits=None) -> MoEOutput with output [..., D_out]. `prev_logits` is
    the previous MoE layer's `routing.logits`: required by a moe_plus_plus layer built with
    gating_residual=True, ignored by other routers. Every parameter takes part in each forward.
    """

    def __init__(
        self,
        algorithm: str,
        router: Router,
        d_model: int,
        n_experts: int,
        expert_dim: int,
        top_k: int,
        opts: MoEOptions,
    ):
        super().__init__()
        self.algorithm, self.opts = algorithm, opts
        self.d_model, self.n_experts, self.expert_dim, self.top_k = (
            d_model, n_experts, expert_dim, top_k
        )
        self.output_dim = opts.output_dim or d_model
        type(router).check_output_dim(opts, d_model)
        self.router = router
        # Experts start like the compute-matched dense FFN of width top_k * expert_dim.
        # `expert_bias` gives routed and shared experts biases (b1, b2, b3), e.g. to upcycle GPT-2.
        init, bias, out = top_k * expert_dim, opts.expert_bias, opts.output_dim
        self.experts = Experts(n_experts, d_model, expert_dim, opts.activation, init, bias, out)
        self.shared_experts = (
            Experts(opts.n_shared, d_model, expert_dim, opts.activation, init, bias, out)
            if opts.n_shared > 0
            else None
        )
        if opts.expert_init == "dense_match":
            match_dense_output_scale(self)

    def fresh_copy(self) -> MoELayer:
        """A newly built layer of the same construction (router and experts freshly initialised)."""
        return MoELayer(self.algorithm, self.router.fresh_copy(), self.d_model, self.n_experts,
                        self.expert_dim, self.top_k, self.opts)

    def forward(self, x: Tensor, prev_logits: Tensor | None = None) -> MoEOutput:
        _check_input(x, self.d_model)
        shape = x.shape
        x2 = x.reshape(-1, self.d_model)
        T = x2.shape[0]
        seq_len = shape[-2] if x.dim() >= 3 and shape[-2] > 0 else max(T, 1)
        if prev_logits is not None:
            prev_logits = prev_logits.reshape(T, prev_logits.shape[-1])
        # The router runs outside autocast, in its parameters' dtype (fp32 unless the model was
        # cast): top-k choices and balance losses are sensitive to bf16 rounding.
        with torch.autocast(x.device.type, enabled=False):
            dtype = self.router.param_dtype()
            routing, aux = self.router(
                x2.to(dtype), seq_len, prev_logits.to(dtype) if prev_logits is not None else None
            )

        ids, weights = self.router.expert_plan(routing)
        scale = self.opts.routed_scaling
        if scale != 1.0:
            weights = weights * scale
        stats: dict[str, Tensor] = {}
        cf = self.opts.capacity_factor
        if cf is not None and not isinstance(self.router, ExpertChoiceRouter) and T > 0:
            capacity = math.ceil(cf * T * self.top_k / self.n_experts)
            kept = drop_over_capacity(ids, self.n_experts, capacity)
            routed = (ids >= 0).sum().clamp_min(1)
            stats["dropped_fraction"] = (((ids >= 0) & (kept < 0)).sum() / routed).detach()
            ids = kept

        y = self.experts(x2, ids, weights, self.opts.dispatch)
        extra = self.router.extra_output(x2, routing, scale)
        if extra is not None:
            y = y + extra
        if self.shared_experts is not None:
            y = y + self.opts.shared_scaling * self.shared_experts.dense_forward(x2)
        y = y.view(*shape[:-1], self.output_dim)
        return MoEOutput(y, _weighted_sum(aux, self.router.aux_coefficients(), x), aux, routing, stats)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: call after each optimizer step (see attach_bias_balancing)."""
        self.router.update_bias()

    def set_training_progress(self, fraction: float) -> None:
        self.router.set_training_progress(fraction)

    def extra_repr(self) -> str:
        return f"algorithm={self.algorithm!r}, top_k={self.top_k}, router_slots={self.router.n_slots}"


PROBE_TOKENS = 512
"""Tokens of the fixed N(0, 1) probe batch `match_dense_output_scale` measures the router on."""


@torch.no_grad()
def match_dense_output_scale(layer: MoELayer) -> dict[str, float]:
    """expert_init="dense_match": rescale the output projections (w2) of `layer`'s experts so that
    its output at init has the variance of the dense FFN of its active width, K + n_shared
    experts of width M. Returns the factors applied ({"routed": c_r, "shared": c_s}).

    With experts initialised like the compute-matched dense FFN (w2 ~ U(±1/sqrt(K*M))), one
    expert's output has variance u, and any dense FFN of that init has K*u, whatever its width.
    Each of the K + n_shared active experts is given an equal share of K*u: the n_shared shared
    experts (weight shared_scaling each) are scaled by c_s = sqrt(K / ((K + n_shared) *
    shared_scaling^2)); the routed ones, whose output variance is S * u * routed_scaling^2 with S =
    `router.init_weight_square` (1/K for near-uniform renormalised top-K), by c_r so that they add
    up to K/(K + n_shared) of K*u less the variance of slots that are not FFN experts (MoE++'s copy
    and constant experts), never below a quarter of their share. u, S and that variance are
    measured on a fixed probe of N(0, 1) tokens (the scale of a LayerNorm output) from a private
    generator: the global RNG, hence every other initial weight, is the same as with "default".
    A layer on the meta device is left as it is (its weights are loaded later)."""
    experts, router, opts = layer.experts, layer.router, layer.opts
    if experts.w1.is_meta:
        return {}
    w = experts.w1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, layer.d_model, generator=g, dtype=torch.float64, device="cpu")
    x = x.to(device=w.device, dtype=w.dtype)
    T, E, K = x.shape[0], layer.n_experts, layer.top_k
    # u: one expert's output variance at weight 1 (tokens spread over up to 8 experts)
    ids = (torch.arange(T, device=x.device) % min(E, 8)).unsqueeze(1)
    u = float(experts(x, ids, torch.ones(T, 1, dtype=x.dtype, device=x.device)).double().var())
    n_shared = opts.n_shared if layer.shared_experts is not None else 0
    share = K * u * K / (K + n_shared)  # the routed experts' part of the dense variance K*u
    factors: dict[str, float] = {}
    if n_shared and opts.shared_scaling != 0:
        factors["shared"] = math.sqrt(K / ((K + n_shared) * opts.shared_scaling ** 2))
        layer.shared_experts.w2.mul_(factors["shared"])
    square = router.init_weight_square(x.to(router.param_dtype())) * opts.routed_scaling ** 2
    if square > 0 and u > 0:
        routing, _ = _eval_routing(router, x.to(router.param_dtype()))
        extra = router.extra_output(x, routing, opts.routed_scaling)
        rest = float(extra.double().var()) if extra is not None else 0.0
        factors["routed"] = math.sqrt(max(share - rest, share / 4) / (square * u))
        experts.w2.mul_(factors["routed"])
    return factors


def _eval_routing(router: Router, x: Tensor) -> tuple[Routing, dict[str, Tensor]]:
    """The router's decision on x without training-only effects (noise, selection counts)."""
    was_training = router.training
    router.eval()
    try:
        return router(x, x.shape[0], x.new_zeros(x.shape[0], router.n_slots))
    finally:
        router.train(was_training)


def _check_input(x: Tensor, d_model: int) -> None:
    if x.shape[-1] != d_model:
        raise ValueError(
            f"input has last dimension {x.shape[-1]} but the MoE layer has d_model="
            f"{d_model}; pass x of shape [..., {d_model}]."
        )


def _weighted_sum(aux: dict[str, Tensor], coefs: dict[str, float], x: Tensor) -> Tensor:
    dtype = torch.promote_types(torch.float32, x.dtype)  # float64 stays float64, bf16 -> fp32
    total = torch.zeros((), dtype=dtype, device=x.device)
    for name, coef in coefs.items():
        if coef != 0 and name in aux:
            total = total + coef * aux[name].to(dtype)
    return total


class DenseFFN(nn.Module):
    """The compute-matched dense baseline: one FFN of width top_k * expert_dim, stored as
    `experts` with a single expert so that parameter layout and initialisation match MoE layers.
    Its output is [..., opts.output_dim] (default d_model)."""

    def __init__(self, d_model: int, width: int, opts: MoEOptions):
        super().__init__()
        self.algorithm, self.opts, self.d_model = "dense", opts, d_model
        self.output_dim = opts.output_dim or d_model
        self.experts = Experts(1, d_model, width, opts.activation, width, opts.expert_bias,
                               opts.output_dim)

    def fresh_copy(self) -> MoELayer:
        """A newly built layer of the same construction (router and experts freshly initialised)."""
        return MoELayer(self.algorithm, self.router.fresh_copy(), self.d_model, self.n_experts,
                        self.expert_dim, self.top_k, self.opts)

    def forward(self, x: Tensor, prev_logits: Tensor | None = None) -> MoEOutput:
        _check_input(x, self.d_model)
        y = self.experts.dense_forward(x.reshape(-1, self.d_model))
        y = y.view(*x.shape[:-1], self.output_dim)
        return MoEOutput(y, torch.zeros((), device=x.device), {}, None, {})

    def update_bias(self) -> None:
        pass

    def set_training_progress(self, fraction: float) -> None:
        pass


def check_algorithm(name: str) -> None:
    """Raise ValueError naming the valid algorithms (and the closest ones) for an unknown name."""
    if name not in REGISTRY:
        raise ValueError(
            f"unknown MoE algorithm {name!r}.{did_you_mean(name, REGISTRY)} "
            f"Valid names: {', '.join(REGISTRY)}."
        )


def build_moe(
    name: str, d_model: int, n_experts: int, expert_dim: int, top_k: int, **options: Any
) -> MoELayer | DenseFFN:
    """Build the MoE layer of algorithm `name` (see ALGORITHMS and docs/moe.md for the options).

    For shared-expert algorithms `n_experts` counts the routed experts. `dense` builds the
    compute-matched dense FFN of width top_k * expert_dim. `output_dim` sets the output width
    (default d_model); moe_plus_plus's copy and constant experts then default to none.
    """
    check_algorithm(name)
    for arg, value in (("d_model", d_model), ("n_experts", n_experts),
                       ("expert_dim", expert_dim), ("top_k", top_k)):
        check_number(arg, value, 1, integer=True)
    opts = layer_options(name, d_model, n_experts, top_k, **options)
    router_cls = REGISTRY[name].router
    if router_cls is None:
        return DenseFFN(d_model, top_k * expert_dim, opts)
    router = router_cls(d_model, n_experts, top_k, opts)
    return MoELayer(name, router, d_model, n_experts, expert_dim, top_k, opts)


def layer_options(name: str, d_model: int, n_experts: int, top_k: int, **options: Any) -> MoEOptions:
    """The validated MoEOptions `build_moe` gives a layer of algorithm `name`: the algorithm's and
    the generic defaults filled in, the defaults that scale with the layer's size (the router's
    SCALED_OPTIONS, e.g. MoE++'s slot counts) resolved. ValueError, one sentence, for any wrong
    name, size or option."""
    check_algorithm(name)
    spec = REGISTRY[name]
    for arg, value in (("d_model", d_model), ("n_experts", n_experts), ("top_k", top_k)):
        check_number(arg, value, 1, integer=True)
    if top_k > n_experts:
        raise ValueError(
            f"top_k={top_k} exceeds n_experts={n_experts}; lower top_k or add experts."
        )
    router_cls = spec.router
    own = dict(router_cls.OPTIONS) if router_cls is not None else {}
    generic = MoEOptions.generic_names()
    merged = {**spec.defaults, **options}
    extra = dict(own)
    for key in list(merged):
        if key in own:
            extra[key] = merged.pop(key)
        elif key not in generic:
            raise unknown_option_error(key, generic + list(own), name)
    opts = MoEOptions(**merged, extra=extra)
    if opts.router_init_std == LIBMOE_INIT:
        raise ValueError(
            "router_init_std='libmoe' depends on the model's depth, which one layer does not know: "
            "pass router_init_std=libmoe_router_init_std(d_model, n_layers) (a MoETransformer "
            "resolves it from its config)."
        )
    if router_cls is None:
        return opts
    if opts.bias and not router_cls.ROUTER_BIAS:  # a bias the logits never add gets no gradient
        raise ValueError(f"bias=True is not supported by {name!r}: its router logits have no bias "
                         "term; leave bias unset.")
    router_cls.resolve_options(opts, n_experts, top_k, d_model)
    router_cls.check_options(opts, n_experts, top_k)
    _check_group_routing(name, opts, router_cls, n_experts, top_k)
    return opts


def scaled_options(name: str, d_model: int, n_experts: int, top_k: int, **options: Any) -> dict[str, Any]:
    """{option: value} of algorithm `name`'s options whose default scales with the layer's size
    (its router's SCALED_OPTIONS: MoE++'s n_zero, n_copy, n_const), as resolved for this layer;
    {} for the algorithms that have none. A saved config records them, so that it reloads with
    the same layout whatever later defaults say."""
    check_algorithm(name)
    router_cls = REGISTRY[name].router
    if router_cls is None or not router_cls.SCALED_OPTIONS:
        return {}
    opts = layer_options(name, d_model, n_experts, top_k, **options)
    return {key: opts.extra[key] for key in router_cls.SCALED_OPTIONS}


def legacy_options(name: str, d_model: int, n_experts: int, top_k: int, router_rows: int,
                   **options: Any) -> dict[str, Any]:
    """The options a layer saved before its router's SCALED_OPTIONS scaled with the layer's size
    was built with: {option: its fixed value then} for each one `options` leaves unset, when
    today's defaults would give the router another number of slots than the `router_rows` rows of
    the saved router weight and those values give exactly `router_rows`; else {} (nothing to add,
    or nothing that explains the saved shape). Loaders add them to the saved options
    (ModelConfig.with_saved_layout)."""
    check_algorithm(name)
    router_cls = REGISTRY[name].router
    if router_cls is None:
        return {}
    unset = {k: v for k, v in router_cls.SCALED_OPTIONS.items() if k not in options}
    if not unset:
        return {}
    now = layer_options(name, d_model, n_experts, top_k, **options)
    if router_cls.slot_count(n_experts, top_k, now) == router_rows:
        return {}
    try:
        then = layer_options(name, d_model, n_experts, top_k, **options, **unset)
    except ValueError:  # e.g. copy experts at output_dim != d_model: not how that file was made
        return {}
    return unset if router_cls.slot_count(n_experts, top_k, then) == router_rows else {}


def _check_group_routing(name, opts, router_cls, n_experts, top_k) -> None:
    if opts.n_group == 0 and opts.topk_group == 0:
        return
    if router_cls.slot_count(n_experts, top_k, opts) != n_experts or router_cls is ExpertChoiceRouter:
        raise ValueError(
            f"n_group is not supported by {name!r}; use it with smoe, sigma_moe, sharede_v2, "
            "sharede_v3 or another router whose slots are the experts."
        )
    g, kg = opts.n_group, opts.topk_group
    if g < 1 or n_experts % g:
        raise ValueError(f"n_group={g} must divide n_experts={n_experts}.")
    if not 1 <= kg <= g:
        raise ValueError(f"topk_group={kg} must be between 1 and n_group={g}.")
    if kg * (n_experts // g) < top_k:
        raise ValueError(
            f"topk_group={kg} groups of {n_experts // g} experts hold fewer than top_k={top_k}; "
            "raise topk_group."
        )


def moe_layers(model: nn.Module) -> Iterator[MoELayer | DenseFFN]:
    """Every libmoe MoE/dense FFN layer inside `model`, in module order."""
    for module in model.modules():
        if isinstance(module, (MoELayer, DenseFFN)):
            yield module


def routes_per_token(model: nn.Module) -> bool:
    """Whether every MoE layer of `model` routes each token by itself (Router.PER_TOKEN, and no
    capacity_factor dropping tokens over an expert's share of the batch), so that decoding with a
    KV cache routes as the whole sequence does. Expert choice does not."""
    return all(type(layer.router).PER_TOKEN and layer.opts.capacity_factor is None
               for layer in model.modules() if isinstance(layer, MoELayer))


def update_bias_balancing(model: nn.Module) -> None:
    """Apply the auxiliary-loss-free bias update of every layer (call after optimizer.step())."""
    for layer in moe_layers(model):
        layer.update_bias()


def attach_bias_balancing(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Register an optimizer step post-hook that updates every layer's balancing bias."""
    return optimizer.register_step_post_hook(lambda *_: update_bias_balancing(model))


def set_training_progress(model: nn.Module, fraction: float) -> None:
    """Tell every layer how far training has gone (Hyper-R's growing k uses it)."""
    for layer in moe_layers(model):
        layer.set_training_progress(fraction)
