"""Routed experts as stacked weights, and their activations.

Expert e computes act(x @ w1[e]) @ w2[e]; gated activations compute
(act(x @ w1[e]) * (x @ w3[e])) @ w2[e]. With `bias=True` every projection adds its bias
(b1, b3 [E, M], b2 [E, D_out]): act(x @ w1[e] + b1[e]) @ w2[e] + b2[e], as in GPT-2's MLP. The
combine weight multiplies the whole expert output, b2 included. The experts never see the router: they take
(x [T, D], expert ids [T, K], combine weights [T, K]) and return [T, D_out] (ids outside [0, E) are
skipped), through one of the dispatch backends in `dispatch.py`. D_out is `output_dim`, d_model
unless set (a layer that changes width, e.g. a vision-language connector).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import run_experts


@dataclass(frozen=True)
class Activation:
    """An expert activation: forward fn, its derivative (for the fused backward), gated or not."""

    name: str
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]
    gated: bool


def _gelu_grad(h: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + h * pdf


_TANH_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh(h: Tensor) -> Tensor:
    return F.gelu(h, approximate="tanh")


def _gelu_tanh_grad(h: Tensor) -> Tensor:
    # d/dh 0.5 h (1 + tanh(u)), u = c (h + 0.044715 h^3)
    t = torch.tanh(_TANH_C * (h + 0.044715 * h * h * h))
    du = _TANH_C * (1.0 + 3 * 0.044715 * h * h)
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * du


def _silu_grad(h: Tensor) -> Tensor:
    s = torch.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", F.relu, lambda h: (h > 0).to(h.dtype), gated=False),
    "gelu": Activation("gelu", F.gelu, _gelu_grad, gated=False),
    # GPT-2's gelu_new / gelu_pytorch_tanh: the tanh approximation of GELU.
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_grad, gated=False),
    "silu": Activation("silu", F.silu, _silu_grad, gated=False),
    "swiglu": Activation("swiglu", F.silu, _silu_grad, gated=True),
    "geglu": Activation("geglu", F.gelu, _gelu_grad, gated=True),
}


class Experts(nn.Module):
    """E feed-forward experts of width M stored as w1 [E, D, M], w2 [E, M, D_out] (and w3 when
    gated), with `bias`, also b1 [E, M], b2 [E, D_out] (and b3 [E, M] when gated). D_out is
    `output_dim` (default d_model).

    Initialisation matches a dense FFN of width `init_width` (default M) built from nn.Linear,
    so that a compute-matched dense baseline and the experts start from the same distribution.
    Biases start at zero, so a fresh biased layer computes what an unbiased one does.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        expert_dim: int,
        activation: str = "relu",
        init_width: int | None = None,
        bias: bool = False,
        output_dim: int | None = None,
    ):
        super().__init__()
        self.n_experts, self.d_model, self.expert_dim = n_experts, d_model, expert_dim
        self.output_dim = output_dim or d_model
        self.activation = ACTIVATIONS[activation]
        self.init_width = init_width or expert_dim
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, expert_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_dim, self.output_dim))
        self.w3 = (
            nn.Parameter(torch.empty(n_experts, d_model, expert_dim))
            if self.activation.gated
            else None
        )
        self.b1 = nn.Parameter(torch.zeros(n_experts, expert_dim)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(n_experts, self.output_dim)) if bias else None
        self.b3 = (
            nn.Parameter(torch.zeros(n_experts, expert_dim)) if bias and self.activation.gated else None
        )
        self.reset_parameters()

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None

    def reset_parameters(self) -> None:
        bound_in, bound_out = 1.0 / math.sqrt(self.d_model), 1.0 / math.sqrt(self.init_width)
        nn.init.uniform_(self.w1, -bound_in, bound_in)
        nn.init.uniform_(self.w2, -bound_out, bound_out)
        if self.w3 is not None:
            nn.init.uniform_(self.w3, -bound_in, bound_in)
        for b in (self.b1, self.b2, self.b3):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor, dispatch: str = "auto") -> Tensor:
        return run_experts(dispatch, x, ids, weights, self.w1, self.w2, self.w3, self.activation,
                           b1=self.b1, b2=self.b2, b3=self.b3)

    def dense_forward(self, x: Tensor) -> Tensor:
        """Every token through every expert with weight 1 (shared experts, dense FFN): [T, D_out]."""
        E, D, M = self.w1.shape
        # Summing E experts with weight 1 is one FFN of width E*M: concatenate along the hidden dim.
        h = x @ self.w1.permute(1, 0, 2).reshape(D, E * M)
        if self.b1 is not None:
            h = h + self.b1.reshape(E * M)
        a = self.activation.fn(h)
        if self.w3 is not None:
            g = x @ self.w3.permute(1, 0, 2).reshape(D, E * M)
            a = a * (g + self.b3.reshape(E * M) if self.b3 is not None else g)
        y = a @ self.w2.reshape(E * M, self.output_dim)
        return y + self.b2.sum(0) if self.b2 is not None else y

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, d_model={self.d_model}, "
            f"expert_dim={self.expert_dim}, activation={self.activation.name}"
            + (f", output_dim={self.output_dim}" if self.output_dim != self.d_model else "")
            + (", bias=True" if self.has_bias else "")
        )
