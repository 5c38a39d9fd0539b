"""Dispatch backends: every backend equals the per-expert loop reference, outputs and gradients."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import libmoe.moe.dispatch as dispatch
from libmoe.moe import ACTIVATIONS, build_moe, run_experts
from libmoe.moe.dispatch import BLOCKED_MIN_LOAD, grouped_mm_supported, resolve_backend

BACKENDS = ("fused", "blocked", "grouped", "padded")


def naive_experts(x, ids, weights, w1, w2, w3, act):
    """Token by token: y_t = sum_j w_tj FFN_{ids_tj}(x_t), skipping ids outside [0, E)."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < w1.shape[0]:
                a = act.fn(x[t] @ w1[e])
                if w3 is not None:
                    a = a * (x[t] @ w3[e])
                y = y + weights[t, j] * (a @ w2[e])
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def make_case(T, D, E, M, K, activation, seed, dtype=torch.float64, holes=True):
    g = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[activation]
    x = torch.randn(T, D, generator=g, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.zeros(0, K, dtype=torch.long)
    if holes and T:
        ids[torch.rand(T, K, generator=g) < 0.2] = -1  # skipped slots (null / zero experts)
    weights = torch.rand(T, K, generator=g, dtype=dtype)
    w1 = torch.randn(E, D, M, generator=g, dtype=dtype) / D**0.5
    w2 = torch.randn(E, M, D, generator=g, dtype=dtype) / M**0.5
    w3 = torch.randn(E, D, M, generator=g, dtype=dtype) / D**0.5 if act.gated else None
    return x, ids, weights, w1, w2, w3, act


def outputs_and_grads(backend, x, ids, weights, w1, w2, w3, act, seed=0):
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, w1, w2)]
    w3l = w3.clone().requires_grad_(True) if w3 is not None else None
    y = run_experts(backend, leaves[0], ids, leaves[1], leaves[2], leaves[3], w3l, act)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    grads = [t.grad for t in leaves + ([w3l] if w3l is not None else [])]
    return y.detach(), [gr if gr is not None else torch.zeros_like(t)
                        for gr, t in zip(grads, leaves + [w3l] * (w3l is not None))]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_loop_matches_naive_per_token(activation):
    case = make_case(9, 6, 4, 5, 2, activation, seed=1)
    y = run_experts("loop", *case)
    torch.testing.assert_close(y, naive_experts(*case), rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 24),
    D=st.integers(1, 8),
    E=st.integers(1, 7),
    M=st.integers(1, 6),
    k_frac=st.floats(0, 1),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    seed=st.integers(0, 2**16),
    holes=st.booleans(),
)
def test_backends_equal_loop_reference(T, D, E, M, k_frac, activation, seed, holes):
    K = 1 + round(k_frac * (E - 1))
    case = make_case(T, D, E, M, K, activation, seed, holes=holes)
    check_backends_against_loop(case, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(0, 40),
    D=st.sampled_from([4, 5, 8, 12]),
    E=st.integers(1, 9),
    M=st.sampled_from([3, 4, 8]),
    k_frac=st.floats(0, 1),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    seed=st.integers(0, 2**16),
)
def test_backends_equal_loop_reference_float32(T, D, E, M, k_frac, activation, seed):
    """float32 exercises torch._grouped_mm (aligned dims) and its fallback (unaligned dims)."""
    K = 1 + round(k_frac * (E - 1))
    case = make_case(T, D, E, M, K, activation, seed, dtype=torch.float32)
    check_backends_against_loop(case, rtol=1e-4, atol=1e-5)


def check_backends_against_loop(case, rtol, atol):
    y_ref, g_ref = outputs_and_grads("loop", *case)
    for backend in BACKENDS:
        y, grads = outputs_and_grads(backend, *case)
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg=backend)
        for gr, gr_ref in zip(grads, g_ref):
            torch.testing.assert_close(gr, gr_ref, rtol=rtol, atol=atol, msg=backend)


@pytest.mark.parametrize("backend", ("loop",) + BACKENDS)
def test_float32_backends_agree_at_moderate_shape(backend):
    case = make_case(200, 32, 12, 16, 4, "swiglu", seed=3, dtype=torch.float32)
    y_ref = naive_experts(*case)
    y = run_experts(backend, *case)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ("loop",) + BACKENDS)
@pytest.mark.parametrize("K,E", [(1, 5), (5, 5), (2, 5)])
def test_layer_edge_cases_forward_backward(backend, K, E):
    torch.manual_seed(0)
    layer = build_moe("smoe", 8, E, 4, K, dispatch=backend)
    for T in (0, 1, 7):
        x = torch.randn(T, 8, requires_grad=True)
        out = layer(x)
        assert out.output.shape == (T, 8)
        (out.output.sum() + out.aux_loss).backward()
        assert x.grad is not None and x.grad.shape == (T, 8)
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_tokens_get_zero_gradient(backend):
    # Every token goes to experts 0 and 2: experts 1 and 3 must get exact zero gradients.
    x, _, weights, w1, w2, w3, act = make_case(6, 4, 4, 3, 2, "relu", seed=5, holes=False)
    ids = torch.tensor([[0, 2]] * 6)
    y_ref, g_ref = outputs_and_grads("loop", x, ids, weights, w1, w2, w3, act)
    y, grads = outputs_and_grads(backend, x, ids, weights, w1, w2, w3, act)
    torch.testing.assert_close(y, y_ref)
    for gr, gr_ref in zip(grads, g_ref):
        torch.testing.assert_close(gr, gr_ref)
    gw1 = grads[2]
    assert gw1[1].abs().sum() == 0 and gw1[3].abs().sum() == 0
    assert gw1[0].abs().sum() > 0


def resolve_without_kernel(x, load):
    if load / 66 >= BLOCKED_MIN_LOAD:
        return "blocked"
    return "grouped" if grouped_mm_supported(x) else "padded"


def test_auto_backend_choice_on_cpu(monkeypatch):
    x = torch.zeros(1, 8)
    kernel = dispatch.fused_kernel() is not None
    for dtype in (torch.float32, torch.float64):  # fused at every load where the kernel builds
        for load in (4096 * 8, 512 * 8, 8):
            assert resolve_backend("auto", x.to(dtype), n_assignments=load, n_experts=66) == (
                "fused" if kernel else resolve_without_kernel(x.to(dtype), load))
    # bf16 (CPU autocast), or no compiler: blocked from BLOCKED_MIN_LOAD rows, grouped/padded below
    monkeypatch.setattr(dispatch, "fused_kernel", lambda: None)
    assert resolve_backend("auto", x, n_assignments=4096 * 8, n_experts=66) == "blocked"
    assert resolve_backend("auto", x, n_assignments=512 * 8, n_experts=66) == "grouped"
    assert resolve_backend("auto", x.double(), n_assignments=512 * 8, n_experts=66) == "padded"
    assert resolve_backend("padded", x) == "padded"
    assert resolve_backend("auto", torch.zeros(1, 5), n_assignments=8, n_experts=66) == "padded"
    monkeypatch.undo()
    assert resolve_backend("auto", x.bfloat16(), n_assignments=4096 * 8, n_experts=66) == "blocked"
    assert not grouped_mm_supported(torch.zeros(1, 8, dtype=torch.float64))
    assert not grouped_mm_supported(torch.zeros(1, 5), torch.zeros(2, 5, 8))  # 20-byte rows
    assert grouped_mm_supported(torch.zeros(1, 8), torch.zeros(2, 8, 4)) == hasattr(torch, "_grouped_mm")


def test_blocked_under_cpu_autocast_runs_in_bf16():
    case = make_case(16, 8, 4, 8, 2, "relu", seed=2, dtype=torch.float32, holes=False)
    ref = run_experts("loop", *case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_experts("blocked", *case)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_gradients_match_loop(backend):
    # grouped uses torch._grouped_mm only in float32/bf16, so check its gradients here.
    case = make_case(64, 16, 6, 8, 3, "swiglu", seed=4, dtype=torch.float32)
    y_ref, g_ref = outputs_and_grads("loop", *case)
    y, grads = outputs_and_grads(backend, *case)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for gr, gr_ref in zip(grads, g_ref):
        torch.testing.assert_close(gr, gr_ref, rtol=1e-4, atol=1e-5)
