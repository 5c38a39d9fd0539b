"""Experts with biases (expert_bias): every dispatch backend equals a per-token reference, outputs
and gradients; the gelu_tanh activation and its hand-written derivative."""

import pytest
import torch
import torch.nn.functional as F

from libmoe.moe import ACTIVATIONS, Experts, build_moe, run_experts

BACKENDS = ("loop", "blocked", "grouped", "padded")
NAMES = ("x", "weights", "w1", "w2", "w3", "b1", "b2", "b3")


def naive(x, ids, weights, w1, w2, w3, act, b1, b2, b3):
    """y_t = sum_j w_tj (act(x_t w1_e + b1_e) [* (x_t w3_e + b3_e)]) w2_e + w_tj b2_e, e = ids_tj."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < w1.shape[0]:
                a = act.fn(x[t] @ w1[e] + b1[e])
                if w3 is not None:
                    a = a * (x[t] @ w3[e] + b3[e])
                y = y + weights[t, j] * (a @ w2[e] + b2[e])
        rows.append(y)
    return torch.stack(rows)


def make_case(T, D, E, M, K, activation, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    act = ACTIVATIONS[activation]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[torch.rand(T, K, generator=g) < 0.2] = -1  # skipped slots
    ids[ids == E - 1] = -1  # the last expert gets no token: its gradients must be zero
    tensors = {
        "x": randn(T, D), "weights": torch.rand(T, K, generator=g, dtype=dtype),
        "w1": randn(E, D, M, scale=D**-0.5), "w2": randn(E, M, D, scale=M**-0.5),
        "w3": randn(E, D, M, scale=D**-0.5) if act.gated else None,
        "b1": randn(E, M, scale=0.5), "b2": randn(E, D, scale=0.5),
        "b3": randn(E, M, scale=0.5) if act.gated else None,
    }
    return ids, act, tensors


def forward_backward(fn, ids, act, tensors, seed=0):
    leaves = {k: v.clone().requires_grad_(True) if v is not None else None for k, v in tensors.items()}
    y = fn(leaves["x"], ids, leaves["weights"], leaves["w1"], leaves["w2"], leaves["w3"], act,
           leaves["b1"], leaves["b2"], leaves["b3"])
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * g).sum().backward()
    grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v))
             for k, v in leaves.items() if v is not None}
    return y.detach(), grads


def backend(name):
    return lambda x, ids, weights, w1, w2, w3, act, b1, b2, b3: run_experts(
        name, x, ids, weights, w1, w2, w3, act, b1=b1, b2=b2, b3=b3)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("name", BACKENDS)
def test_biased_backends_match_per_token_reference_with_gradients(name, activation):
    ids, act, tensors = make_case(11, 6, 5, 4, 2, activation, seed=7)
    y_ref, g_ref = forward_backward(naive, ids, act, tensors)
    y, grads = forward_backward(backend(name), ids, act, tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(g_ref)
    for key in grads:
        torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-9, atol=1e-10, msg=f"{name} {key}")
    assert grads["b1"][-1].abs().sum() == 0 and grads["b2"][-1].abs().sum() == 0  # unused expert
    assert grads["b2"][0].abs().sum() > 0


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu", "relu"])
@pytest.mark.parametrize("name", ["blocked", "grouped", "padded"])
def test_biased_backends_match_loop_in_float32(name, activation):
    # float32 with 16-byte-aligned rows runs torch._grouped_mm where it exists.
    ids, act, tensors = make_case(48, 8, 4, 8, 2, activation, seed=3, dtype=torch.float32)
    y_ref, g_ref = forward_backward(backend("loop"), ids, act, tensors)
    y, grads = forward_backward(backend(name), ids, act, tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_biased_blocked_under_cpu_autocast_runs_in_bf16():
    ids, act, tensors = make_case(16, 8, 4, 8, 2, "relu", seed=2, dtype=torch.float32)
    args = [tensors[k] for k in ("x", "weights", "w1", "w2", "w3")]
    bias = {k: tensors[k] for k in ("b1", "b2", "b3")}
    ref = run_experts("loop", args[0], ids, *args[1:], act, **bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_experts("blocked", args[0], ids, *args[1:], act, **bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


def test_gelu_tanh_and_its_derivative():
    act = ACTIVATIONS["gelu_tanh"]
    h = torch.linspace(-8, 8, 401, dtype=torch.float64, requires_grad=True)
    y = act.fn(h)
    torch.testing.assert_close(y, F.gelu(h, approximate="tanh"))
    c = (2 / torch.pi) ** 0.5  # transformers' gelu_new, written out
    torch.testing.assert_close(y, 0.5 * h * (1 + torch.tanh(c * (h + 0.044715 * h**3))))
    (grad,) = torch.autograd.grad(y.sum(), h)
    torch.testing.assert_close(act.grad(h.detach()), grad, rtol=1e-12, atol=1e-12)
    assert not act.gated


def test_zero_biases_equal_no_biases_and_dense_forward_adds_them():
    torch.manual_seed(0)
    plain = Experts(3, 6, 4, "geglu")
    biased = Experts(3, 6, 4, "geglu", bias=True)
    biased.load_state_dict(plain.state_dict(), strict=False)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in (biased.b1, biased.b2, biased.b3))
    x = torch.randn(5, 6)
    ids, w = torch.tensor([[0, 2]] * 5), torch.rand(5, 2)
    torch.testing.assert_close(biased(x, ids, w), plain(x, ids, w))
    with torch.no_grad():
        for b in (biased.b1, biased.b2, biased.b3):
            b.normal_()
    every = torch.arange(3).expand(5, 3)
    torch.testing.assert_close(biased.dense_forward(x), biased(x, every, torch.ones(5, 3), "loop"))
    assert "bias=True" in repr(biased)


def test_expert_bias_option_reaches_routed_shared_and_dense_experts():
    plain = build_moe("sharede_v2", 8, 4, 6, 2, n_shared=1)
    assert not any(k.endswith((".b1", ".b2", ".b3")) for k in plain.state_dict())  # unchanged layout
    layer = build_moe("sharede_v2", 8, 4, 6, 2, n_shared=1, activation="swiglu", expert_bias=True)
    for experts, E in ((layer.experts, 4), (layer.shared_experts, 1)):
        assert experts.b1.shape == (E, 6) and experts.b3.shape == (E, 6) and experts.b2.shape == (E, 8)
    dense = build_moe("dense", 8, 4, 6, 2, expert_bias=True)
    assert dense.experts.b2.shape == (1, 8) and dense.experts.b3 is None
    with pytest.raises(ValueError, match="expert_bias"):
        build_moe("smoe", 8, 4, 6, 2, expert_bias="yes")


def test_biased_layer_with_one_expert_at_top1_is_the_dense_ffn():
    torch.manual_seed(1)
    layer = build_moe("smoe", 8, 1, 6, 1, activation="gelu_tanh", expert_bias=True)
    with torch.no_grad():
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
    ex = layer.experts
    x = torch.randn(2, 5, 8)
    ref = F.gelu(x @ ex.w1[0] + ex.b1[0], approximate="tanh") @ ex.w2[0] + ex.b2[0]
    torch.testing.assert_close(layer(x).output, ref)
