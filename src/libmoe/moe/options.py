"""Validated options of an MoE layer: the generic ones here, each algorithm's own knobs on its router."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..overrides import did_you_mean
from .dispatch import DISPATCH_BACKENDS
from .experts import ACTIVATIONS

LIBMOE_INIT = "libmoe"
"""The `router_init_std` value that asks for LibMoE's language-model router init,
N(0, d_model^-1/2 * sqrt(2 / n_layers)) (`libmoe_router_init_std`)."""


def libmoe_router_init_std(d_model: int, n_layers: int) -> float:
    """LibMoE's language-model router init std d_model^-1/2 * sqrt(2 / n_layers): 0.0625 at
    d_model 128 with 4 layers (cpu-tiny), 0.015625 at 512 with 16 (paper-158m)."""
    check_number("d_model", d_model, 1, integer=True)
    check_number("n_layers", n_layers, 1, integer=True)
    return d_model ** -0.5 * (2.0 / n_layers) ** 0.5


EXPERT_INITS = ("default", "dense_match")
"""Values of the `expert_init` option: "default" initialises experts like the compute-matched dense
FFN's weights; "dense_match" rescales the experts' output projections so that the layer's output
at init has the dense FFN's scale (docs/moe.md)."""


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise ValueError unless value is one of `choices` (the message lists them)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}.")


def check_number(name: str, value: Any, low: float | None = None, strict: bool = False,
                 integer: bool = False) -> None:
    """Raise ValueError unless value is a number (an int when `integer`) above `low`."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        what = "an integer" if integer else "a number"
        if low is not None:
            what += f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{name}={value!r} is not valid; it must be {what}.")


def unknown_option_error(name: str, valid: list[str], algorithm: str) -> ValueError:
    return ValueError(
        f"unknown option {name!r} for algorithm {algorithm!r}.{did_you_mean(name, valid)} "
        f"Valid options: {', '.join(sorted(valid))}."
    )


@dataclass
class MoEOptions:
    """Options every algorithm understands (ALGORITHMS.md sections 1-2; docs/moe.md).

    `extra` holds the algorithm's own knobs (declared by its router class, e.g. xmoe_tau).
    `output_dim` is the width of the layer's output (None: d_model), for layers that change width
    (e.g. a vision-language connector). `expert_init` is one of EXPERT_INITS.
    """

    activation: str = "relu"
    temperature: float = 1.0
    router_init_std: float | str = 0.02
    n_shared: int = 0
    balance_coef: float = 0.01
    balance_scope: str = "sequence"
    balance_count: str = "topk"
    z_coef: float = 0.0
    bias_balancing: float = 0.0
    capacity_factor: float | None = None
    routed_scaling: float = 1.0
    shared_scaling: float = 1.0
    dispatch: str = "auto"
    n_group: int = 0
    topk_group: int = 0
    bias: bool = False
    expert_bias: bool = False
    output_dim: int | None = None
    expert_init: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_number("temperature", self.temperature, 0.0, strict=True)
        if self.router_init_std != LIBMOE_INIT:
            ok = isinstance(self.router_init_std, (int, float)) and not isinstance(self.router_init_std, bool)
            if not ok or self.router_init_std < 0:
                raise ValueError(f"router_init_std={self.router_init_std!r} is not valid; it must be a "
                                 f"number >= 0 or {LIBMOE_INIT!r} (LibMoE's d^-1/2 * sqrt(2/L)).")
        check_number("n_shared", self.n_shared, 0, integer=True)
        check_number("balance_coef", self.balance_coef, 0.0)
        check_choice("balance_scope", self.balance_scope, ("sequence", "batch", "global"))
        check_choice("balance_count", self.balance_count, ("topk", "top1"))
        check_number("z_coef", self.z_coef, 0.0)
        check_number("bias_balancing", self.bias_balancing, 0.0)
        if self.capacity_factor is not None:
            check_number("capacity_factor", self.capacity_factor, 0.0, strict=True)
        check_number("routed_scaling", self.routed_scaling)
        check_number("shared_scaling", self.shared_scaling)
        check_choice("dispatch", self.dispatch, DISPATCH_BACKENDS)
        check_number("n_group", self.n_group, 0, integer=True)
        check_number("topk_group", self.topk_group, 0, integer=True)
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias={self.bias!r} is not valid; it must be True or False.")
        if not isinstance(self.expert_bias, bool):
            raise ValueError(f"expert_bias={self.expert_bias!r} is not valid; it must be True or False.")
        if self.output_dim is not None:
            check_number("output_dim", self.output_dim, 1, integer=True)
        check_choice("expert_init", self.expert_init, EXPERT_INITS)

    @classmethod
    def generic_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]
