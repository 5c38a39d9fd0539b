"""No MoE layer has a parameter its forward can leave without a gradient (DDP without
find_unused_parameters requires it): every registered algorithm and every option that adds
parameters, standalone and inside a model, one forward + backward."""

import pytest
import torch

from libmoe.models import build_model
from libmoe.moe import REGISTRY, build_moe

D, E, M, K = 16, 4, 8, 2

# Options that add (or remove) parameters; each is tried with every algorithm that accepts it.
VARIANTS = {
    "default": {},
    "router_bias": {"bias": True},
    "expert_bias": {"expert_bias": True},
    "shared": {"n_shared": 1},
    "gated": {"activation": "swiglu"},
    "output_dim": {"output_dim": 24},
    "all_generic": {"expert_bias": True, "n_shared": 1, "activation": "geglu", "capacity_factor": 1.0},
    "dense_match": {"expert_init": "dense_match", "n_shared": 1},
}
OWN_VARIANTS = {
    "moe_plus_plus": [{"gating_residual": True}, {"n_const": 0}, {"n_copy": 0, "n_const": 0},
                      {"n_zero": 0, "n_copy": 0, "n_const": 2}, {"output_dim": 24, "n_copy": 0, "n_const": 0},
                      {"output_dim": 24, "n_copy": 0, "n_const": 0, "gating_residual": True}],
    "xmoe": [{"xmoe_dim": 3}],
    "tc_moe": [{"n_null": 0}, {"n_null": 3}],
    "hyper": [{"hyper_embed_dim": 4, "hyper_hidden_dim": 8}],
    "sigma_moe": [{"sigma_renormalize": False, "sigma_entropy_coef": 0.1, "sigma_expert_dropout": 0.2}],
}
CASES = [(name, label, opts) for name in REGISTRY for label, opts in VARIANTS.items()]
CASES += [(name, f"own{i}", opts) for name, variants in OWN_VARIANTS.items()
          for i, opts in enumerate(variants)]


def _without_grad(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]


# The refusals expected: a router bias where the logits add none; MoE++'s own output width option.
REFUSED = {("xmoe", "router_bias"), ("cosine", "router_bias"), ("perturbed_cosine", "router_bias"),
           ("hyper", "router_bias"), ("moe_plus_plus", "output_dim")}


def _build(name: str, opts: dict, label: str | None = None):
    try:
        return build_moe(name, D, E, M, K, **opts)
    except ValueError as err:  # an option the algorithm refuses builds nothing, but only those
        assert (name, label) in REFUSED, f"{name} refuses {opts}: {err}"
        assert "\n" not in str(err)
        return None


@pytest.mark.parametrize(("name", "label", "opts"), CASES, ids=[f"{n}-{lab}" for n, lab, _ in CASES])
def test_standalone_layer_uses_every_parameter(name, label, opts):
    torch.manual_seed(0)
    layer = _build(name, opts, label)
    if layer is None:
        pytest.skip(f"{name} refuses {opts}")
    x = torch.randn(2, 12, D)
    prev = None
    if opts.get("gating_residual"):  # the previous MoE++ layer's logits, as a model passes them
        prev = torch.randn(24, layer.router.n_slots)
    out = layer(x, prev_logits=prev)
    (out.output.square().mean() + out.aux_loss).backward()
    assert _without_grad(layer) == []


def test_moe_plus_plus_gating_residual_only_where_it_is_used():
    layer = build_moe("moe_plus_plus", D, E, M, K)  # standalone: no previous logits, no W_g
    assert layer.router.gate_residual is None
    gated = build_moe("moe_plus_plus", D, E, M, K, gating_residual=True)
    with pytest.raises(ValueError, match="prev_logits"):  # W_g would get no gradient
        gated(torch.randn(4, D))
    no_const = build_moe("moe_plus_plus", D, E, M, K, n_const=0)
    assert not any("const" in n for n, _ in no_const.named_parameters())


@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("options", [{}, {"n_shared": 1, "expert_bias": True, "activation": "swiglu"}],
                         ids=["default", "generic"])
def test_model_uses_every_parameter(name, options):
    torch.manual_seed(0)
    model = build_model("micro", name, n_layers=3, moe_options=options)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(tokens, targets=tokens)
    (out.loss + out.aux_loss).backward()
    assert _without_grad(model) == []


def test_model_moe_plus_plus_gating_residual_follows_the_option():
    gated = [b.ffn.router.gate_residual is not None for b in build_model("micro", "moe_plus_plus",
                                                                           n_layers=3).blocks]
    assert gated == [False, True, True]  # the first MoE layer has no previous logits
    off = build_model("micro", "moe_plus_plus", n_layers=3, moe_options={"gating_residual": False})
    assert all(b.ffn.router.gate_residual is None for b in off.blocks)
    on = build_model("micro", "moe_plus_plus", n_layers=3, moe_options={"gating_residual": True})
    assert [b.ffn.router.gate_residual is not None for b in on.blocks] == [False, True, True]


def test_old_state_dicts_with_unused_moe_plus_plus_parameters_still_load():
    """Files written when every MoE++ layer had W_g (zero where unused) and empty constant-expert
    tensors (n_const=0) load into today's layers, which have neither."""
    torch.manual_seed(0)
    layer = build_moe("moe_plus_plus", D, E, M, K, n_const=0)
    old = dict(layer.state_dict())
    R = layer.router.n_slots
    old["router.gate_residual.weight"] = torch.zeros(R, R)
    old["router.const_proj"] = torch.zeros(0, 2, D)
    old["router.const_values"] = torch.zeros(0, D)
    fresh = build_moe("moe_plus_plus", D, E, M, K, n_const=0)
    fresh.load_state_dict(old)  # strict
    torch.testing.assert_close(fresh.router.weight, layer.router.weight)
    old["router.gate_residual.weight"] = torch.ones(R, R)  # a trained W_g is never dropped silently
    with pytest.raises(RuntimeError, match="gate_residual"):
        fresh.load_state_dict(old)
