"""The layer contract: shapes and layout, option validation, structural identities of the algorithms."""

import pytest
import torch
import torch.nn.functional as F

from libmoe.moe import ALGORITHMS, REGISTRY, build_moe, set_training_progress
from libmoe.moe.routers import Router

D, E, M, K = 12, 6, 8, 2
PAPER_SEVEN = ("smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe")


def test_registry_holds_every_required_algorithm():
    required = PAPER_SEVEN + ("cosine", "perturbed_cosine", "hyper", "expert_choice", "dense")
    assert set(required) <= set(ALGORITHMS)
    assert tuple(REGISTRY) == ALGORITHMS
    # One registered Router subclass per algorithm (dense alone has none), built as registered.
    for name, spec in REGISTRY.items():
        if name == "dense":
            assert spec.router is None
            continue
        assert issubclass(spec.router, Router)
        assert type(build_moe(name, D, E, M, K).router) is spec.router


@pytest.mark.parametrize("name", [a for a in ALGORITHMS if a != "dense"])
def test_output_contract(name):
    torch.manual_seed(0)
    layer = build_moe(name, D, E, M, K, activation="swiglu")
    x = torch.randn(3, 5, D)
    out = layer(x)
    assert out.output.shape == x.shape
    assert out.aux_loss.dim() == 0
    assert set(out.aux) >= ({"z"} if name == "expert_choice" else {"balance", "z"})
    r = out.routing
    R = layer.router.n_slots
    assert layer.router.weight.shape == (R, D)
    assert layer.experts.w1.shape == (E, D, M)
    assert layer.experts.w2.shape == (E, M, D)
    assert layer.experts.w3.shape == (E, D, M)
    assert r.probs.shape == (15, R) and r.logits.shape == (15, R)
    assert r.topk_idx.dtype == torch.long and r.topk_idx.shape == r.topk_weight.shape
    assert r.topk_idx.shape[0] == 15
    # Sorted by weight, descending.
    assert (r.topk_weight[:, :-1] >= r.topk_weight[:, 1:]).all()


def test_dense_is_compute_matched_ffn():
    layer = build_moe("dense", D, E, M, K)
    assert layer.experts.w1.shape == (1, D, K * M)
    out = layer(torch.randn(4, D))
    assert out.routing is None and float(out.aux_loss) == 0.0 and out.aux == {}
    x = torch.randn(4, D)
    ref = torch.relu(x @ layer.experts.w1[0]) @ layer.experts.w2[0]
    torch.testing.assert_close(layer(x).output, ref)


@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "xmoe", "cosine", "perturbed_cosine",
                                  "hyper", "sharede_v2", "tc_moe"])
def test_one_expert_top1_equals_dense_ffn(name):
    """With E = 1, k = 1 and renormalised weights, the MoE layer is exactly its expert."""
    torch.manual_seed(0)
    moe = build_moe(name, D, 1, M, 1, activation="gelu", n_shared=0)
    dense = build_moe("dense", D, 1, M, 1, activation="gelu")
    dense.experts.load_state_dict(moe.experts.state_dict())
    x = torch.randn(10, D)
    if name == "tc_moe":
        # The -FFN and null slots can win; force the +FFN slot by making its logit dominant.
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.bias = torch.nn.Parameter(torch.tensor([50.0, 0.0, 0.0]))
        out = moe(x).output
        # w = p_+ / (p_+ + p_null) < 1 exactly, so compare against that scale.
        p = torch.softmax(torch.tensor([50.0, -1.0, -10.0]), 0)
        torch.testing.assert_close(out, dense(x).output * p[0] / (p[0] + p[2]))
        return
    torch.testing.assert_close(moe(x).output, dense(x).output)


@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "xmoe", "cosine", "perturbed_cosine",
                                  "hyper", "sharede_v3"])
def test_identical_experts_reproduce_the_dense_ffn(name):
    """Sparse-upcycling identity: copies of one FFN + renormalised top-k == that FFN."""
    torch.manual_seed(0)
    layer = build_moe(name, D, E, M, K, n_shared=0)
    ffn = build_moe("dense", D, 1, M, 1)
    with torch.no_grad():
        layer.experts.w1.copy_(ffn.experts.w1.expand_as(layer.experts.w1))
        layer.experts.w2.copy_(ffn.experts.w2.expand_as(layer.experts.w2))
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(layer(x).output, ffn(x).output, rtol=1e-5, atol=1e-6)


def test_shared_experts_add_dense_output_with_scaling():
    torch.manual_seed(0)
    layer = build_moe("sharede_v2", D, E, M, K, shared_scaling=0.5, routed_scaling=0.5)
    assert layer.shared_experts.w1.shape == (2, D, M)
    x = torch.randn(7, D)
    out = layer(x).output
    s = layer.shared_experts
    shared = sum(torch.relu(x @ s.w1[i]) @ s.w2[i] for i in range(2))
    layer.shared_experts = None
    layer.opts.routed_scaling = 1.0
    routed = layer(x).output
    torch.testing.assert_close(out, 0.5 * routed + 0.5 * shared, rtol=1e-5, atol=1e-6)


def test_sharede_v3_zero_bias_equals_sigma_moe_routing():
    torch.manual_seed(0)
    v3 = build_moe("sharede_v3", D, E, M, K, bias_balancing=0.01)
    torch.manual_seed(0)
    sig = build_moe("sigma_moe", D, E, M, K)
    sig.router.weight.data.copy_(v3.router.weight.data)
    x = torch.randn(20, D)
    a, b = v3(x).routing, sig(x).routing
    assert torch.equal(a.topk_idx, b.topk_idx)
    torch.testing.assert_close(a.topk_weight, b.topk_weight)


def test_selection_bias_changes_choice_but_not_weights():
    torch.manual_seed(0)
    layer = build_moe("sharede_v3", D, E, M, K, bias_balancing=0.01)
    x = torch.randn(30, D)
    layer.router.expert_bias[3] = 10.0  # expert 3 always selected...
    r = layer(x).routing
    assert (r.topk_idx == 3).any(-1).all()
    s = torch.sigmoid(layer.router.weight @ x.t()).t()
    # ...but weights come from the unbiased sigmoid scores, renormalised.
    w = s.gather(1, r.topk_idx)
    torch.testing.assert_close(r.topk_weight, w / w.sum(-1, keepdim=True))


def test_group_limited_routing_keeps_selected_groups():
    torch.manual_seed(0)
    layer = build_moe("sharede_v3", D, 8, M, 2, n_group=4, topk_group=1)
    r = layer(torch.randn(50, D)).routing
    groups = r.topk_idx // 2
    assert (groups[:, 0] == groups[:, 1]).all()  # both choices in the single kept group


def test_moe_plus_plus_gate_residual():
    torch.manual_seed(0)
    layer = build_moe("moe_plus_plus", D, E, M, K, gating_residual=True)
    R = layer.router.n_slots
    assert R == E + 1 + 1 + 1  # 1 zero, 1 copy, 1 constant expert at E = 6 (scaled from 66)
    x = torch.randn(2, 4, D)
    prev = torch.randn(8, R)
    base = F.linear(x.reshape(8, D), layer.router.weight)  # the layer's own logits
    # W_g is zero-initialised: the residual has no effect at initialisation.
    torch.testing.assert_close(layer(x, prev_logits=prev).routing.logits, base)
    with torch.no_grad():
        layer.router.gate_residual.weight.copy_(torch.eye(R) * 0.5)
    torch.testing.assert_close(layer(x, prev_logits=prev).routing.logits, base + 0.5 * prev)
    with pytest.raises(ValueError, match="prev_logits"):
        layer(x, prev_logits=torch.randn(8, R + 1))


def test_moe_plus_plus_copy_and_zero_experts():
    torch.manual_seed(0)
    layer = build_moe("moe_plus_plus", D, E, M, 1, n_const=0)
    x = torch.randn(5, D)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[E + 1] = 0  # copy slot
        layer.router.bias = torch.nn.Parameter(torch.zeros(E + 2))
        layer.router.bias[E + 1] = 20.0
    out = layer(x)
    assert (out.routing.topk_idx[:, 0] == E + 1).all()
    torch.testing.assert_close(out.output, x)  # top-1 copy expert with weight 1
    with torch.no_grad():
        layer.router.bias[E + 1], layer.router.bias[E] = 0.0, 20.0  # zero expert
    torch.testing.assert_close(layer(x).output, torch.zeros_like(x))


def test_tc_moe_negative_and_null_slots():
    torch.manual_seed(0)
    layer = build_moe("tc_moe", D, E, M, 1)
    assert layer.router.n_slots == 2 * E + 1
    x = torch.randn(4, D)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias = torch.nn.Parameter(torch.zeros(2 * E + 1))
        layer.router.bias[E + 2] = 30.0  # the "-FFN_2" slot
    out = layer(x)
    assert (out.routing.topk_idx[:, 0] == E + 2).all()
    e = layer.experts
    ffn2 = torch.relu(x @ e.w1[2]) @ e.w2[2]
    w = out.routing.topk_weight[:, :1]
    torch.testing.assert_close(out.output, -w * ffn2)
    with torch.no_grad():
        layer.router.bias[E + 2], layer.router.bias[2 * E] = 0.0, 40.0  # null slot
    out = layer(x)
    assert (out.routing.topk_idx[:, 0] == 2 * E).all()
    torch.testing.assert_close(out.output, torch.zeros_like(x))


def test_hyper_router_k_schedule_and_frozen_hypernet():
    torch.manual_seed(0)
    layer = build_moe("hyper", D, E, M, 4, hyper_k_min=1)
    x = torch.randn(6, D)
    ks = []
    for p in (0.0, 0.5, 1.0):
        set_training_progress(layer, p)
        ks.append(layer(x).routing.topk_idx.shape[1])
    assert ks == [1, round(1 + 3 * 0.5), 4]
    assert not any(p.requires_grad for p in layer.router.hypernet.parameters())
    out = layer(x)
    (out.output.sum() + out.aux_loss).backward()
    assert layer.router.embedding.grad is not None and layer.router.embedding.grad.abs().sum() > 0


def test_expert_choice_capacity_and_padding():
    torch.manual_seed(0)
    layer = build_moe("expert_choice", D, 4, M, 2, capacity_factor=1.0)
    x = torch.randn(10, D)
    r = layer(x).routing
    C = 5  # ceil(1.0 * 10 * 2 / 4)
    counts = torch.bincount(r.topk_idx[r.topk_idx >= 0], minlength=4)
    assert counts.tolist() == [C] * 4
    assert ((r.topk_idx < 0) == (r.topk_weight == 0)).all()
    torch.testing.assert_close(r.topk_weight.sum(), (r.probs.topk(C, dim=0).values).sum())


def test_capacity_factor_drops_tokens_in_order():
    torch.manual_seed(0)
    free = build_moe("smoe", D, E, M, K)
    torch.manual_seed(0)
    capped = build_moe("smoe", D, E, M, K, capacity_factor=100.0)
    x = torch.randn(16, D)
    torch.testing.assert_close(free(x).output, capped(x).output)
    assert capped(x).stats["dropped_fraction"] == 0.0
    capped.opts.capacity_factor = 0.25  # capacity ceil(0.25*16*2/6) = 2 per expert
    out = capped(x)
    assert 0 < out.stats["dropped_fraction"] < 1


def test_drop_top_and_temperature_interventions():
    torch.manual_seed(0)
    layer = build_moe("smoe", D, E, M, K)
    x = torch.randn(9, D)
    base = layer(x).routing
    order = base.probs.argsort(-1, descending=True)
    layer.router.drop_top = 1
    dropped = layer(x).routing
    assert torch.equal(dropped.topk_idx.sort(-1).values, order[:, 1 : K + 1].sort(-1).values)
    layer.router.drop_top = 0
    layer.router.temperature = 10.0
    hot = layer(x).routing
    torch.testing.assert_close(hot.probs, torch.softmax(base.logits / 10.0, -1))


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"activation": "tanh"}, "activation"),
        ({"balance_scope": "foo"}, "balance_scope"),
        ({"balance_count": "top2"}, "balance_count"),
        ({"dispatch": "fast"}, "dispatch"),
        ({"temperature": 0}, "temperature"),
        ({"router_init_std": -1.0}, "router_init_std"),
        ({"n_shared": -1}, "n_shared"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"bias_balancing": -0.1}, "bias_balancing"),
        ({"z_coef": "big"}, "z_coef"),
        ({"n_group": 4, "topk_group": 1}, "n_group"),
        ({"temprature": 2.0}, "temperature"),  # typo: suggests the real name
        ({"xmoe_tau": 0.3}, "xmoe_tau"),  # another algorithm's knob
    ],
)
def test_bad_options_raise_value_error_naming_the_option(options, needle):
    with pytest.raises(ValueError, match=needle):
        build_moe("smoe", D, E, M, K, **options)


def test_algorithm_specific_option_validation():
    with pytest.raises(ValueError, match="xmoe_weights"):
        build_moe("xmoe", D, E, M, K, xmoe_weights="max")
    with pytest.raises(ValueError, match="hyper_k_min"):
        build_moe("hyper", D, E, M, K, hyper_k_min=5)
    with pytest.raises(ValueError, match="bias_balancing"):
        build_moe("expert_choice", D, E, M, K, bias_balancing=0.01)


def test_sizes_and_names_are_checked():
    with pytest.raises(ValueError, match=r"top_k=7 exceeds n_experts=6"):
        build_moe("smoe", D, 6, M, 7)
    with pytest.raises(ValueError, match="smoe") as err:
        build_moe("smeo", D, E, M, K)
    assert "sigma_moe" in str(err.value)  # the list of valid names
    layer = build_moe("smoe", D, E, M, K)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, D + 1))


def test_moe_plus_plus_layers_chain_their_logits():
    """How a model threads the gating residual: each MoE++ layer gets the previous one's logits,
    and the gradient reaches the earlier router through W_g."""
    torch.manual_seed(0)
    layers = [build_moe("moe_plus_plus", D, E, M, K, gating_residual=i > 0) for i in range(3)]
    for layer in layers[1:]:
        torch.nn.init.normal_(layer.router.gate_residual.weight, std=0.1)
    h, prev = torch.randn(2, 5, D), None
    for layer in layers:
        out = layer(h, prev_logits=prev)
        h, prev = h + out.output, out.routing.logits
    h.sum().backward()
    assert layers[0].router.weight.grad is not None
    assert all(layer.router.gate_residual.weight.grad.abs().sum() > 0 for layer in layers[1:])
    assert layers[0].router.gate_residual is None  # first layer: no previous logits, no W_g


@pytest.mark.parametrize("backend", ["fused", "blocked", "grouped", "padded", "loop"])
def test_autocast_routes_in_fp32_and_computes_experts_in_bf16(backend):
    torch.manual_seed(0)
    layer = build_moe("smoe", 16, E, 8, K, dispatch=backend)
    x = torch.randn(2, 8, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.output.dtype == torch.bfloat16
    assert out.routing.probs.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert torch.equal(out.routing.topk_idx, ref.routing.topk_idx)  # routing unaffected
    torch.testing.assert_close(out.output.float(), ref.output, rtol=0.05, atol=0.05)
    out.output.float().sum().backward()
    assert layer.experts.w1.grad.dtype == torch.float32


def test_model_cast_to_float64_runs_router_in_float64():
    layer = build_moe("xmoe", D, E, M, K).double()
    out = layer(torch.randn(5, D, dtype=torch.float64))
    assert out.routing.probs.dtype == torch.float64 and out.output.dtype == torch.float64


def test_fresh_copy_builds_the_same_layer_anew():
    torch.manual_seed(0)
    layer = build_moe("moe_plus_plus", 16, 4, 8, 2)
    fresh = layer.fresh_copy()
    ours, theirs = layer.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert type(fresh.router) is type(layer.router) and fresh.opts is layer.opts
    assert not torch.equal(ours["experts.w1"], theirs["experts.w1"])  # newly initialised
    for name in layer.router._non_persistent_buffers_set:  # the constants are the layer's
        assert torch.equal(getattr(fresh.router, name), getattr(layer.router, name))
