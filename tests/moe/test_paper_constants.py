"""Scale-aware constants of the paper algorithms (issue 22): MoE++'s zero-computation slot counts
scale with E; older files keep their fixed 1/1/6 layout."""

import pytest
import torch

from libmoe.moe import build_moe, layer_options, legacy_options, scaled_options
from libmoe.moe.slot_routers import MoEPlusPlusRouter, paper_slot_count

D, M, K = 16, 8, 2
COUNTS = ("n_zero", "n_copy", "n_const")


def _counts(layer):
    return tuple(layer.opts.extra[k] for k in COUNTS)


# -- MoE++ slot counts -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts, counts", [
    (4, (1, 1, 1)), (16, (1, 1, 1)), (22, (1, 1, 2)), (33, (1, 1, 3)), (66, (1, 1, 6)),
    (99, (2, 2, 9)), (132, (2, 2, 12)),
])
def test_moe_plus_plus_counts_scale_with_e_at_the_paper_ratio(n_experts, counts):
    layer = build_moe("moe_plus_plus", D, n_experts, M, K)
    assert _counts(layer) == counts
    assert layer.router.n_slots == n_experts + sum(counts)
    assert layer.router.const_proj.shape == (counts[2], 2, D)
    assert tuple(paper_slot_count(p, n_experts) for p in (1, 1, 6)) == counts


def test_moe_plus_plus_paper_shape_keeps_the_papers_8_of_74_slots():
    assert MoEPlusPlusRouter.PAPER_SLOTS == {"n_zero": 1, "n_copy": 1, "n_const": 6}
    with torch.device("meta"):
        layer = build_moe("moe_plus_plus", 512, 66, 128, 8)
    assert layer.router.n_slots == 74


@pytest.mark.parametrize("options", [{"n_zero": 0}, {"n_copy": 0, "n_const": 0},
                                     {"n_zero": 3, "n_copy": 2, "n_const": 6}])
def test_explicit_moe_plus_plus_counts_are_used_as_given(options):
    layer = build_moe("moe_plus_plus", D, 16, M, K, **options)
    expected = {**dict(zip(COUNTS, (1, 1, 1))), **options}
    assert _counts(layer) == tuple(expected[k] for k in COUNTS)
    assert layer.router.n_slots == 16 + sum(expected.values())
    layer(torch.randn(2, 5, D))


@pytest.mark.parametrize("name, value", [("n_zero", -1), ("n_const", 1.5), ("n_copy", "one")])
def test_bad_moe_plus_plus_counts_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name}="):
        build_moe("moe_plus_plus", D, 16, M, K, **{name: value})


def test_scaled_options_name_the_resolved_counts():
    assert scaled_options("moe_plus_plus", D, 16, K) == {"n_zero": 1, "n_copy": 1, "n_const": 1}
    assert scaled_options("moe_plus_plus", D, 66, 8, n_const=2) == {"n_zero": 1, "n_copy": 1,
                                                                    "n_const": 2}
    assert scaled_options("moe_plus_plus", D, 16, K, output_dim=24)["n_const"] == 0
    assert scaled_options("smoe", D, 16, K) == {} == scaled_options("dense", D, 16, K)
    assert layer_options("moe_plus_plus", D, 16, K).extra["n_const"] == 1


def test_legacy_options_recognise_the_fixed_1_1_6_layout():
    # E = 16 saved before the counts scaled: 16 + 8 router rows and no counts in its options
    assert legacy_options("moe_plus_plus", D, 16, K, 24) == {"n_zero": 1, "n_copy": 1, "n_const": 6}
    assert legacy_options("moe_plus_plus", D, 16, K, 19) == {}  # today's layout: nothing to add
    assert legacy_options("moe_plus_plus", D, 66, 8, 74) == {}  # E = 66: both layouts agree
    assert legacy_options("moe_plus_plus", D, 16, K, 30) == {}  # nothing explains 30 rows
    # explicit counts were saved as given: only the unset ones take their old value
    assert legacy_options("moe_plus_plus", D, 16, K, 19, n_const=1) == {}
    assert legacy_options("moe_plus_plus", D, 132, 8, 139, n_const=5) == {"n_zero": 1, "n_copy": 1}
    assert legacy_options("smoe", D, 16, K, 16) == {}
    layer = build_moe("moe_plus_plus", D, 16, M, K, **legacy_options("moe_plus_plus", D, 16, K, 24))
    assert layer.router.n_slots == 24


# -- expert_init: the MoE output at init on the dense FFN's scale ---------------------------------

PAPER_SEVEN = ("smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe")
TD, TE, TM, TK = 128, 16, 128, 4  # the cpu-tiny layer


def _tiny_layer(name, **options):
    if name.startswith("sharede"):  # as cpu-tiny builds it: 2 of the 16 experts and of k 4 shared
        return build_moe(name, TD, TE - 2, TM, TK - 2, n_shared=2, **options)
    return build_moe(name, TD, TE, TM, TK, **options)


@pytest.fixture(scope="module")
def probe_and_dense_std():
    x = torch.randn(2048, TD, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    with torch.no_grad():
        return x, build_moe("dense", TD, TE, TM, TK)(x).output.std().item()


@pytest.mark.parametrize("router_std", [0.02, 0.1])
@pytest.mark.parametrize("name", PAPER_SEVEN)
def test_dense_match_puts_the_output_at_init_on_the_dense_ffns_scale(name, router_std,
                                                                      probe_and_dense_std):
    x, dense_std = probe_and_dense_std
    ratio = {}
    for init in ("default", "dense_match"):
        torch.manual_seed(1)
        layer = _tiny_layer(name, router_init_std=router_std, expert_init=init)
        with torch.no_grad():
            ratio[init] = layer(x).output.std().item() / dense_std
    assert 0.8 <= ratio["dense_match"] <= 1.25, ratio
    if not name.startswith("sharede"):  # shared experts alone already carry the dense scale
        assert ratio["default"] < 0.8, ratio  # ~1/K: 0.25 for smoe (0.058 vs 0.234 in issue 22)


def test_dense_match_only_rescales_w2_and_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    a = build_moe("sharede_v2", TD, 14, TM, 2, n_shared=2)
    after_a = torch.rand(1)
    torch.manual_seed(3)
    b = build_moe("sharede_v2", TD, 14, TM, 2, n_shared=2, expert_init="dense_match")
    assert torch.equal(torch.rand(1), after_a)  # the probe draws from its own generator
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if key.endswith("w2"):
            factor = (sb[key] / sa[key]).flatten()
            torch.testing.assert_close(factor, factor[:1].expand_as(factor))  # one factor per module
            assert factor[0] != 1
        else:
            assert torch.equal(sa[key], sb[key]), key


def test_init_weight_square_is_one_over_k_for_uniform_renormalised_top_k():
    for name in ("smoe", "sigma_moe", "xmoe", "cosine"):
        layer = build_moe(name, D, 8, M, 4)
        with torch.no_grad():
            for p in layer.router.parameters():
                p.fill_(1.0 if name in ("xmoe", "cosine") else 0.0)  # every slot the same score
        assert layer.router.init_weight_square(torch.randn(32, D)) == pytest.approx(1 / 4)


def test_expert_init_is_validated_and_dense_accepts_it():
    with pytest.raises(ValueError, match="expert_init='nope'.*dense_match"):
        build_moe("smoe", D, 4, M, K, expert_init="nope")
    build_moe("dense", D, 4, M, K, expert_init="dense_match")
    with torch.device("meta"):  # weights loaded later: nothing to measure
        build_moe("smoe", D, 4, M, K, expert_init="dense_match")


def test_upcycled_experts_stay_exact_copies_with_dense_match():
    from libmoe.models import build_model
    from libmoe.upcycle import upcycle_model

    torch.manual_seed(0)
    dense = build_model("micro", "dense").eval()
    up = upcycle_model(dense, "smoe", 4, 2, expert_init="dense_match").eval()
    for block, source in zip(up.blocks, dense.blocks):
        w2 = block.ffn.experts.w2
        torch.testing.assert_close(w2, source.ffn.experts.w2.expand_as(w2))
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(up(tokens).logits, dense(tokens).logits)


# -- sigma_moe: LibMoE's renormalised sigmoid or Csordas et al.'s sigma-MoE -----------------------


def test_sigma_renormalize_false_uses_the_selected_sigmoid_scores_as_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 6, D)
    plain = build_moe("sigma_moe", D, 8, M, K, sigma_renormalize=False, router_init_std=0.5)
    r = plain(x).routing
    torch.testing.assert_close(r.topk_weight, r.probs.gather(-1, r.topk_idx))
    assert (r.topk_weight.sum(-1) < 2).all() and not torch.allclose(r.topk_weight.sum(-1),
                                                                   torch.ones(12))
    torch.manual_seed(0)
    renorm = build_moe("sigma_moe", D, 8, M, K, router_init_std=0.5)  # the default: LibMoE's
    torch.testing.assert_close(renorm(x).routing.topk_weight.sum(-1), torch.ones(12))
    # near-uniform sigmoid scores of 1/2 each: S = K/4, so dense_match scales by about 2
    with torch.no_grad():
        plain.router.weight.zero_()
    assert plain.router.init_weight_square(torch.randn(16, D)) == pytest.approx(K / 4)


def test_sigma_entropy_term_is_its_own_aux_term_and_weighted_into_the_loss():
    torch.manual_seed(0)
    layer = build_moe("sigma_moe", D, 8, M, K, sigma_entropy_coef=0.1, z_coef=0.01)
    x = torch.randn(3, 5, D)
    out = layer(x)
    z = out.routing.logits
    pbar = torch.softmax(z, -1).mean(0)
    torch.testing.assert_close(out.aux["entropy"], (pbar * pbar.log()).sum())
    expected = 0.01 * out.aux["balance"] + 0.01 * out.aux["z"] + 0.1 * out.aux["entropy"]
    torch.testing.assert_close(out.aux_loss, expected)
    out.aux_loss.backward()
    assert layer.router.weight.grad is not None
    with torch.no_grad():  # uniform logits: the entropy's maximum, log E
        layer.router.weight.zero_()
    assert layer(x).aux["entropy"].item() == pytest.approx(-torch.log(torch.tensor(8.0)).item())
    off = build_moe("sigma_moe", D, 8, M, K)(x)  # coefficient 0: logged, no graph, not in the loss
    assert "entropy" in off.aux and not off.aux["entropy"].requires_grad


def test_sigma_entropy_reaches_the_model_outputs():
    from libmoe.models import build_model

    torch.manual_seed(0)
    model = build_model("micro", "sigma_moe", moe_options={"sigma_entropy_coef": 0.01})
    out = model(torch.randint(0, 512, (2, 8)))
    layers = model.config.n_layers
    assert out.aux["entropy"].item() == pytest.approx(-layers * torch.log(torch.tensor(8.0)).item(),
                                                      rel=0.05)
    expected = 0.01 * out.aux["balance"] + 0.01 * out.aux["entropy"]
    torch.testing.assert_close(out.aux_loss, expected)


def test_sigma_expert_dropout_removes_experts_per_token_in_training_only():
    torch.manual_seed(0)
    layer = build_moe("sigma_moe", D, 8, M, K, sigma_expert_dropout=0.5, router_init_std=0.5)
    x = torch.randn(64, D)
    torch.manual_seed(7)
    a = layer(x).routing
    torch.manual_seed(7)
    dropped = torch.rand(64, 8) < 0.5  # the mask the layer drew: one draw per (token, expert)
    torch.manual_seed(7)
    b = layer(x).routing
    assert torch.equal(a.topk_idx, b.topk_idx)  # seeded runs reproduce
    live = (~dropped).sum(-1) >= K
    chosen = dropped.gather(-1, a.topk_idx)
    assert not chosen[live].any()  # with K experts left, only they are picked
    assert (a.topk_weight[chosen] == 0).all()  # a dropped expert picked anyway weighs 0
    layer.eval()
    ref = build_moe("sigma_moe", D, 8, M, K, router_init_std=0.5)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x).output, ref(x).output)  # never in evaluation


@pytest.mark.parametrize("option, value, needle", [
    ("sigma_renormalize", "yes", "True or False"), ("sigma_entropy_coef", -0.1, ">= 0.0"),
    ("sigma_expert_dropout", 1.0, "below 1"), ("sigma_expert_dropout", -0.1, ">= 0.0"),
])
def test_sigma_options_are_validated(option, value, needle):
    with pytest.raises(ValueError, match=f"{option}=.*{needle}"):
        build_moe("sigma_moe", D, 8, M, K, **{option: value})


def test_sigma_options_belong_to_sigma_moe_only():
    with pytest.raises(ValueError, match="unknown option 'sigma_renormalize' for algorithm 'sharede_v3'"):
        build_moe("sharede_v3", D, 8, M, K, sigma_renormalize=False)


@pytest.mark.parametrize("router_std", [0.02, 0.1])
def test_dense_match_fits_sigma_moe_without_renormalisation(router_std, probe_and_dense_std):
    x, dense_std = probe_and_dense_std
    torch.manual_seed(1)
    layer = _tiny_layer("sigma_moe", router_init_std=router_std, expert_init="dense_match",
                        sigma_renormalize=False)
    with torch.no_grad():
        assert 0.8 <= layer(x).output.std().item() / dense_std <= 1.25


# -- router_init_std: "libmoe" = LibMoE's d^-1/2 * sqrt(2/L) ---------------------------------------


def test_libmoe_router_init_std_formula():
    from libmoe.moe import libmoe_router_init_std

    assert libmoe_router_init_std(128, 4) == pytest.approx(0.0625)  # cpu-tiny
    assert libmoe_router_init_std(512, 16) == pytest.approx(0.015625)  # paper-158m
    with pytest.raises(ValueError, match="n_layers"):
        libmoe_router_init_std(128, 0)


@pytest.mark.parametrize("value", ["lib", -0.1, True, None])
def test_router_init_std_is_a_number_or_libmoe(value):
    from libmoe.moe import MoEOptions

    assert MoEOptions(router_init_std="libmoe").router_init_std == "libmoe"
    MoEOptions(router_init_std=0)
    with pytest.raises(ValueError, match="router_init_std=.*number >= 0 or 'libmoe'"):
        MoEOptions(router_init_std=value)


def test_a_single_layer_cannot_resolve_libmoe_and_says_how():
    with pytest.raises(ValueError, match=r"libmoe_router_init_std\(d_model, n_layers\)"):
        build_moe("smoe", D, 8, M, K, router_init_std="libmoe")


@pytest.mark.parametrize("algorithm", ["smoe", "xmoe", "moe_plus_plus", "sharede_v3"])
def test_models_resolve_libmoe_router_init_from_their_depth(algorithm):
    from libmoe.models import build_model, model_config

    torch.manual_seed(0)
    model = build_model("cpu-tiny", algorithm, moe_options={"router_init_std": "libmoe"})
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers) == (128, 4)
    router = model.blocks[0].ffn.router
    weight = router.proj.weight if algorithm == "xmoe" else router.weight
    assert weight.std().item() == pytest.approx(0.0625, rel=0.1)
    assert router.opts.router_init_std == pytest.approx(0.0625)
    assert cfg.to_dict()["moe_options"]["router_init_std"] == "libmoe"  # the formula, recorded
    assert model_config("cpu-tiny", algorithm, moe_options={"router_init_std": "libmoe"}).moe_args()[2][
        "router_init_std"] == pytest.approx(0.0625)
