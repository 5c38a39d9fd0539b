"""Shared by the expert-dispatch tests (test_expert_bias, test_output_dim): a per-token reference,
random cases and a forward/backward probe. Every function takes the experts' arguments in
`naive`'s order: (x, ids, weights, w1, w2, w3, act, b1, b2, b3)."""

import torch

from libmoe.moe import ACTIVATIONS, run_experts


def naive(x, ids, weights, w1, w2, w3, act, b1, b2, b3):
    """Token by token: y_t = sum_j w_tj (act(x_t w1_e + b1_e) [* (x_t w3_e + b3_e)]) w2_e + w_tj b2_e,
    e = ids_tj (skipped outside [0, E)); y_t has w2's output width; biases may be None."""
    rows = []
    for t in range(x.shape[0]):
        y = x.new_zeros(w2.shape[-1])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < w1.shape[0]:
                a = act.fn(x[t] @ w1[e] + (b1[e] if b1 is not None else 0))
                if w3 is not None:
                    a = a * (x[t] @ w3[e] + (b3[e] if b3 is not None else 0))
                y = y + weights[t, j] * (a @ w2[e] + (b2[e] if b2 is not None else 0))
        rows.append(y)
    return torch.stack(rows)


def make_case(T, D, E, M, K, activation, seed, bias=True, d_out=None, dtype=torch.float64):
    """(ids [T, K], activation, tensors) with skipped slots and an expert that gets no token."""
    g = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[activation]
    d_out = d_out or D

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[torch.rand(T, K, generator=g) < 0.2] = -1  # skipped slots
    ids[ids == E - 1] = -1  # the last expert gets no token: its gradients must be zero
    tensors = {
        "x": randn(T, D), "weights": torch.rand(T, K, generator=g, dtype=dtype),
        "w1": randn(E, D, M, scale=D**-0.5), "w2": randn(E, M, d_out, scale=M**-0.5),
        "w3": randn(E, D, M, scale=D**-0.5) if act.gated else None,
        "b1": randn(E, M, scale=0.5) if bias else None,
        "b2": randn(E, d_out, scale=0.5) if bias else None,
        "b3": randn(E, M, scale=0.5) if bias and act.gated else None,
    }
    return ids, act, tensors


def forward_backward(fn, ids, act, tensors, seed=0):
    """fn's output and the gradients of <output, fixed random G> for every tensor (zeros if unused)."""
    leaves = {k: v.clone().requires_grad_(True) if v is not None else None for k, v in tensors.items()}
    y = fn(leaves["x"], ids, leaves["weights"], leaves["w1"], leaves["w2"], leaves["w3"], act,
           leaves["b1"], leaves["b2"], leaves["b3"])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v))
             for k, v in leaves.items() if v is not None}
    return y.detach(), grads


def backend(name):
    """A dispatch backend in `naive`'s argument order."""
    return lambda x, ids, weights, w1, w2, w3, act, b1, b2, b3: run_experts(
        name, x, ids, weights, w1, w2, w3, act, b1=b1, b2=b2, b3=b3)
