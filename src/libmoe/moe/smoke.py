"""A tiny, self-contained training run of one MoE layer: the `libmoe bench` placeholder and a
quick end-to-end check that every algorithm learns (loss goes down) through its router."""

from __future__ import annotations

import time

import torch

from .layer import build_moe, set_training_progress, update_bias_balancing
from .registry import REGISTRY


def smoke_train(
    algorithms: list[str] | None = None,
    steps: int = 30,
    seed: int = 0,
    d_model: int = 32,
    n_experts: int = 8,
    expert_dim: int = 16,
    top_k: int = 2,
    tokens: int = 256,
) -> list[dict]:
    """Fit y = f(x) (a fixed random two-layer teacher) with each algorithm's layer; one row each."""
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(d_model, 4 * d_model, generator=gen) / d_model**0.5
    x = torch.randn(8, tokens // 8, d_model, generator=gen)
    y = torch.tanh(x @ teacher) @ teacher.t() / 2
    rows = []
    for name in algorithms or list(REGISTRY):
        torch.manual_seed(seed)
        layer = build_moe(name, d_model, n_experts, expert_dim, top_k)
        opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
        losses = []
        start = time.perf_counter()
        for step in range(steps):
            set_training_progress(layer, step / max(steps - 1, 1))
            out = layer(x)
            loss = torch.nn.functional.mse_loss(out.output, y)
            (loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_bias_balancing(layer)
            losses.append(loss.item())
        ms = (time.perf_counter() - start) * 1000 / steps
        rows.append({"algorithm": name, "loss_start": losses[0], "loss_end": losses[-1],
                     "ms_per_step": ms})
    return rows
