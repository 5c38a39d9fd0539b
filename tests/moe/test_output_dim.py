"""output_dim: MoE layers that change width (input d_model, output output_dim), for every algorithm
and dispatch backend; output_dim=None is the old layer; MoE++ without copy/constant experts;
upcycling a dense Linear(8, 16) -> GELU -> Linear(16, 12)."""

import expert_cases
import pytest
import torch
from expert_cases import backend, forward_backward, naive
from torch import nn

import libmoe.moe.dispatch as dispatch_module
from libmoe.moe import ALGORITHMS, MoEOptions, build_moe, run_experts
from libmoe.moe.dispatch import grouped_mm_supported, resolve_backend
from libmoe.upcycle.core import copy_into_experts

D, D_OUT, E, M, K = 8, 12, 4, 16, 2
BACKENDS = ("loop", "fused", "blocked", "grouped", "padded", "auto")
# MoE++'s copy and constant experts are functions of the d_model-wide input.
WIDTH_OPTIONS = {"moe_plus_plus": {"n_copy": 0, "n_const": 0}}


def build(name, **options):
    return build_moe(name, D, E, M, K, output_dim=D_OUT, **WIDTH_OPTIONS.get(name, {}), **options)


def make_case(T, activation, bias, seed, dtype=torch.float64):
    return expert_cases.make_case(T, D, E, M, K, activation, seed, bias=bias, d_out=D_OUT, dtype=dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_changes_width_forward_and_backward(name, bias):
    torch.manual_seed(0)
    layer = build(name, activation="swiglu", expert_bias=bias)
    x = torch.randn(3, 5, D, requires_grad=True)
    out = layer(x)
    assert out.output.shape == (3, 5, D_OUT)
    (out.output.square().sum() + out.aux_loss).backward()
    assert x.grad.shape == x.shape and x.grad.abs().sum() > 0
    experts = [layer.experts] + ([layer.shared_experts] if getattr(layer, "shared_experts", None) else [])
    for ex in experts:
        assert ex.w1.shape[1] == D and ex.w2.shape[-1] == D_OUT and ex.w3.shape[1] == D
        assert ex.w2.grad is not None and ex.w2.grad.abs().sum() > 0
        if bias:
            assert ex.b2.shape == (ex.n_experts, D_OUT) and ex.b1.shape == (ex.n_experts, ex.expert_dim)
    if name != "dense":
        assert layer.router.weight.shape[-1] == D  # the router reads the input
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(2, D_OUT))  # the input check stays on d_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("name", BACKENDS)
def test_backends_match_per_token_reference_with_gradients(name, activation, bias):
    ids, act, tensors = make_case(11, activation, bias, seed=5)
    y_ref, g_ref = forward_backward(naive, ids, act, tensors)
    y, grads = forward_backward(backend(name), ids, act, tensors)
    assert y.shape == (11, D_OUT)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(g_ref)
    for key in grads:
        torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-9, atol=1e-10, msg=f"{name} {key}")
    assert grads["w2"][-1].abs().sum() == 0  # unused expert


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("name", ["fused", "blocked", "grouped", "padded", "auto"])
def test_backends_match_loop_in_float32_with_grouped_mm_and_auto_blocked(name, bias):
    # 16-byte-aligned rows (D, M, D_out) run torch._grouped_mm where it exists; 400 tokens make
    # `auto` pick blocked on CPU.
    ids, act, tensors = make_case(400, "gelu", bias, seed=3, dtype=torch.float32)
    y_ref, g_ref = forward_backward(backend("loop"), ids, act, tensors)
    y, grads = forward_backward(backend(name), ids, act, tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-4, atol=1e-4, msg=f"{name} {key}")


def test_grouped_mm_checks_the_output_row_stride(monkeypatch):
    x, w1 = torch.randn(4, 8), torch.randn(2, 8, 8)
    assert grouped_mm_supported(x, w1, torch.randn(2, 8, 12)) == grouped_mm_supported(x, w1)
    assert not grouped_mm_supported(x, w1, torch.randn(2, 8, 6))  # 24-byte rows
    monkeypatch.setattr(dispatch_module, "fused_kernel", lambda: None)  # auto's choice without `fused`
    assert resolve_backend("auto", x, 8, 2, w1, torch.randn(2, 8, 6)) == "padded"


def test_nothing_routed_gives_a_zero_output_of_output_width():
    _, act, t = make_case(5, "relu", True, seed=1)
    ids = torch.full((5, K), -1)
    x = t["x"].clone().requires_grad_(True)
    y = run_experts("auto", x, ids, t["weights"], t["w1"], t["w2"], None, act, b2=t["b2"])
    assert y.shape == (5, D_OUT) and not y.any()
    y.sum().backward()
    assert x.grad is not None and not x.grad.any()


@pytest.mark.parametrize("name", ["smoe", "sharede_v2", "moe_plus_plus", "tc_moe", "dense"])
def test_backends_agree_on_a_layer_with_output_dim(name):
    x = torch.randn(2, 7, D, dtype=torch.float64)
    results = []
    for dispatch in BACKENDS:
        torch.manual_seed(0)
        layer = build(name, dispatch=dispatch, expert_bias=True, activation="geglu").double()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # non-zero biases and routed zero-computation slots
        xi = x.clone().requires_grad_(True)
        out = layer(xi).output
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in layer.parameters()]))
    y0, gx0, gp0 = results[0]
    for y, gx, gp in results[1:]:
        torch.testing.assert_close(y, y0)
        torch.testing.assert_close(gx, gx0)
        for a, b in zip(gp, gp0):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_output_dim_none_or_d_model_is_the_old_layer(name):
    x = torch.randn(2, 5, D)
    layers = []
    for extra in ({}, {"output_dim": None}, {"output_dim": D}):
        torch.manual_seed(0)
        layers.append(build_moe(name, D, E, M, K, expert_bias=True, **extra))
    ref_state = layers[0].state_dict()
    assert layers[0].experts.w2.shape[-1] == D
    for layer in layers[1:]:
        state = layer.state_dict()
        assert list(state) == list(ref_state)
        assert all(torch.equal(state[k], ref_state[k]) for k in state)
        assert torch.equal(layer(x).output, layers[0](x).output)
    assert "output_dim" not in repr(layers[0])


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "12"])
def test_output_dim_is_validated(value):
    with pytest.raises(ValueError, match="output_dim"):
        MoEOptions(output_dim=value)
    with pytest.raises(ValueError, match="output_dim"):
        build_moe("smoe", D, E, M, K, output_dim=value)


@pytest.mark.parametrize("options", [{"n_copy": 1, "n_const": 0}, {"n_copy": 0, "n_const": 2},
                                     {"n_copy": 1}])
def test_moe_plus_plus_refuses_copy_and_constant_experts_across_widths(options):
    with pytest.raises(ValueError, match="Leave n_copy and n_const unset"):
        build_moe("moe_plus_plus", D, E, M, K, output_dim=D_OUT, **options)
    build_moe("moe_plus_plus", D, E, M, K, output_dim=D, **options)  # same width: allowed


def test_moe_plus_plus_default_counts_drop_copy_and_constant_experts_across_widths():
    """The E-scaled default counts resolve to no copy or constant experts when the width changes
    (rather than an error); zero experts stay."""
    wide = build_moe("moe_plus_plus", D, E, M, K, output_dim=D_OUT)
    assert {k: wide.opts.extra[k] for k in ("n_zero", "n_copy", "n_const")} == {
        "n_zero": 1, "n_copy": 0, "n_const": 0}
    assert wide.router.n_slots == E + 1 and wide.router.const_proj is None
    same = build_moe("moe_plus_plus", D, E, M, K)
    assert same.opts.extra["n_copy"] == same.opts.extra["n_const"] == 1


def test_moe_plus_plus_keeps_zero_experts_and_gating_residual_with_output_dim():
    torch.manual_seed(0)
    first = build("moe_plus_plus", n_zero=2, router_init_std=1.0)
    layer = build("moe_plus_plus", n_zero=2, router_init_std=1.0, routed_scaling=0.7, gating_residual=True)
    assert layer.router.n_slots == E + 2
    with torch.no_grad():
        layer.router.gate_residual.weight.normal_()
    x = torch.randn(40, D)
    prev = first(x).routing.logits
    out = layer(x, prev_logits=prev)
    idx = out.routing.topk_idx
    assert (idx >= E).any()  # zero experts are chosen and contribute nothing
    ids, w = layer.router.expert_plan(out.routing)
    torch.testing.assert_close(out.output, layer.experts(x, ids, w * 0.7, "loop"))
    out.output.sum().backward()
    assert layer.router.gate_residual.weight.grad is not None


def dense_mlp():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(D, M), nn.GELU(), nn.Linear(M, D_OUT))
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.5)
    return mlp


@pytest.mark.parametrize("dispatch", BACKENDS)
def test_experts_copied_from_a_width_changing_mlp_reproduce_it(dispatch):
    mlp = dense_mlp()
    torch.manual_seed(0)
    layer = build("smoe", activation="gelu", expert_bias=True, dispatch=dispatch)
    fc1, fc2 = mlp[0], mlp[2]
    copy_into_experts(layer.experts, fc1.weight.t(), fc2.weight.t(), b1=fc1.bias, b2=fc2.bias)
    x = torch.randn(3, 6, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).output, mlp(x), rtol=1e-5, atol=1e-5)
        dense = build_moe("dense", D, 1, M, 1, output_dim=D_OUT, activation="gelu", expert_bias=True)
        copy_into_experts(dense.experts, fc1.weight.t(), fc2.weight.t(), b1=fc1.bias, b2=fc2.bias)
        torch.testing.assert_close(dense(x).output, mlp(x), rtol=1e-5, atol=1e-5)


def test_copy_into_experts_checks_and_reinitialises_output_width():
    mlp = dense_mlp()
    fc1, fc2 = mlp[0], mlp[2]
    layer = build("smoe", activation="gelu", expert_bias=True)
    with pytest.raises(ValueError, match="w2"):
        copy_into_experts(layer.experts, fc1.weight.t(), fc2.weight.t()[:, :D])
    with pytest.raises(ValueError, match="b2"):
        copy_into_experts(layer.experts, fc1.weight.t(), fc2.weight.t(), b2=fc2.bias[:D])
    g = torch.Generator().manual_seed(0)
    copy_into_experts(layer.experts, fc1.weight.t(), fc2.weight.t(), generator=g, reinit_fraction=0.25,
                      b1=fc1.bias, b2=fc2.bias)
    changed = (layer.experts.w2 != fc2.weight.t()).any(-1)  # [E, M]: re-drawn hidden units (rows)
    assert (changed.sum(-1) == 4).all()
    assert torch.equal(layer.experts.b2, fc2.bias.expand(E, D_OUT))
