"""Routing maths shared by every router: top-k selection, weight normalisation, balance and z losses.

Shapes: T tokens, E experts (or R router slots), K experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def renorm(values: Tensor) -> Tensor:
    """w_j = v_j / sum_i v_i over the selected values (last dim)."""
    return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)


def group_limited_mask(scores: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Keep the experts of the `topk_group` best groups, -inf elsewhere (DeepSeek-V3 node-limited routing).

    A group's score is the sum of its two largest scores (its largest when a group has one expert).
    """
    T, E = scores.shape
    grouped = scores.view(T, n_group, E // n_group)
    top = min(2, E // n_group)
    group_scores = grouped.topk(top, dim=-1).values.sum(-1)  # [T, G]
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(T, E)
    return scores.masked_fill(~keep, float("-inf"))


def select_topk(
    scores: Tensor,
    k: int,
    bias: Tensor | None = None,
    drop_top: int = 0,
    n_group: int = 0,
    topk_group: int = 0,
) -> tuple[Tensor, Tensor]:
    """Choose k slots per token from `scores` [T, R]; return (idx [T, k], unbiased scores [T, k]).

    Selection uses `scores + bias` when a balancing bias is given (DeepSeek-V3); the returned values
    are always the unbiased scores. `drop_top = n` skips the n best slots and takes ranks n+1..n+k
    (the DropTop perturbation of the analysis tools).
    """
    choose = scores if bias is None else scores + bias
    if n_group > 0:
        choose = group_limited_mask(choose, n_group, topk_group)
    idx = choose.topk(k + drop_top, dim=-1).indices[:, drop_top:]
    return idx, scores.gather(-1, idx)


def sort_by_weight(idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Order each token's selections by weight, descending (the layer contract's order)."""
    weight, order = weight.sort(dim=-1, descending=True, stable=True)
    return idx.gather(-1, order), weight


def selection_counts(idx: Tensor, n_slots: int) -> Tensor:
    """Number of selections of each slot over all tokens (ids outside [0, n_slots) ignored)."""
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < n_slots)
    # scatter_add into fixed-size buckets: no boolean-mask index or bincount, so no host sync.
    counts = torch.zeros(n_slots, dtype=torch.long, device=idx.device)
    return counts.scatter_add_(0, flat.clamp(0, max(n_slots - 1, 0)), valid.long())


def balance_loss(
    p_hat: Tensor,
    idx: Tensor,
    seq_len: int | None = None,
    scope: str = "sequence",
    count: str = "topk",
    eta: Tensor | None = None,
) -> Tensor:
    """Switch balance loss N * sum_e eta_e f_e P_e, without the coefficient alpha (ALGORITHMS.md 2).

    p_hat [T, N]: router probabilities normalised to sum 1 over the N balanced slots.
    idx [T, K]: selected slots; ids outside [0, N) are not counted (e.g. TC-MoE null slots).
    f_e is the fraction of the counted selections that went to e, P_e the mean of p_hat.
    scope "sequence": computed per sequence of `seq_len` tokens and averaged; "batch": over all T;
    "global": like batch with f summed across data-parallel ranks (P stays local, as it carries the
    gradient). Uniform routing gives exactly 1.
    """
    T, N = p_hat.shape
    if T == 0:
        return p_hat.sum() * 0.0
    if count == "top1":
        idx = idx[:, :1]
    seq_len = T if scope != "sequence" or seq_len is None else seq_len
    B = T // seq_len
    idx = idx.reshape(B, -1)
    valid = (idx >= 0) & (idx < N)
    counts = torch.zeros(B, N, dtype=p_hat.dtype, device=p_hat.device)
    counts.scatter_add_(1, idx.clamp(0, N - 1), valid.to(p_hat.dtype))
    if scope == "global" and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    f = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    P = p_hat.reshape(B, seq_len, N).mean(1)
    fp = f * P if eta is None else eta * f * P
    return N * fp.sum(-1).mean()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss of ST-MoE: mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def neg_entropy_of_mean(logits: Tensor) -> Tensor:
    """sum_e pbar_e log pbar_e, pbar = mean over the tokens of softmax(logits) [T, E]: minus the
    entropy of the average selection distribution (sigma-MoE's regulariser, Csordas et al. 2023;
    its minimum -log E at balanced use). Computed in log space as the paper's code does."""
    T = logits.shape[0]
    if T == 0:
        return logits.sum() * 0.0
    log_mean = torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(T)
    return (log_mean.exp() * log_mean).sum()

