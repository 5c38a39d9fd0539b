"""Experts with biases (expert_bias): every dispatch backend equals a per-token reference, outputs
and gradients; the gelu_tanh activation and its hand-written derivative."""

import pytest
import torch
import torch.nn.functional as F
from expert_cases import backend, forward_backward, make_case, naive

from libmoe.moe import ACTIVATIONS, Experts, build_moe, run_experts

BACKENDS = ("loop", "fused", "blocked", "grouped", "padded")


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
@pytest.mark.parametrize("name", ["fused", "blocked", "grouped", "padded"])
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
