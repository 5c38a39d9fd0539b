"""The MoE Transformer: paper parameter counts, causality, RoPE, aux losses, MoE++ chaining."""

import pytest
import torch

from libmoe.models import PRESETS, build_model, count_parameters, model_config
from libmoe.models.transformer import apply_rotary, rotary_tables
from libmoe.moe import ALGORITHMS, MoELayer

PAPER_SEVEN = ("smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe")
PAPER = {"paper-158m": (158e6, 36e6), "paper-679m": (679e6, 131e6)}


@pytest.mark.parametrize("preset", list(PAPER))
@pytest.mark.parametrize("algorithm", PAPER_SEVEN + ("dense",))
def test_paper_parameter_counts_within_3_percent(preset, algorithm):
    with torch.device("meta"):  # count without allocating 679M parameters
        model = build_model(preset, algorithm)
    total, active = count_parameters(model)
    paper_total, paper_active = PAPER[preset]
    if algorithm == "dense":  # compute-matched: its total is the MoE's active count
        assert total == active
        assert abs(total / paper_active - 1) < 0.03
        return
    assert abs(total / paper_total - 1) < 0.03, total
    assert abs(active / paper_active - 1) < 0.03, active


def test_paper_expert_layouts():
    with torch.device("meta"):
        shared = build_model("paper-158m", "sharede_v2").blocks[0].ffn
        plus = build_model("paper-158m", "moe_plus_plus").blocks[0].ffn
        tc = build_model("paper-158m", "tc_moe").blocks[0].ffn
        dense = build_model("paper-158m", "dense").blocks[0].ffn
    assert (shared.n_experts, shared.top_k, shared.shared_experts.n_experts) == (64, 6, 2)
    assert (plus.n_experts, plus.router.n_slots, plus.top_k) == (66, 74, 8)
    assert (tc.n_experts, tc.router.n_slots, tc.top_k) == (66, 2 * 66 + 8, 8)
    assert dense.experts.w1.shape == (1, 512, 1024)


def test_count_parameters_formula_on_micro():
    model = build_model("micro", "smoe")
    cfg = model.config
    total, active = count_parameters(model)
    expert = 2 * cfg.d_model * cfg.expert_dim
    assert total - active == cfg.n_layers * (cfg.n_experts - cfg.top_k) * expert
    assert total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "expert_choice"])
def test_forward_loss_and_causality(algorithm):
    torch.manual_seed(0)
    model = build_model("micro", algorithm)
    tokens = torch.randint(0, 512, (2, 16))
    out = model(tokens, targets=tokens)
    assert out.logits.shape == (2, 16, 512)
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=0.05)
    n_moe = 0 if algorithm == "dense" else model.config.n_layers
    assert len(out.routing) == n_moe
    (out.loss + out.aux_loss).backward()
    # Changing a later token never changes earlier logits (balance-free routing per token).
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 512
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_aux_loss_sums_layers():
    torch.manual_seed(0)
    model = build_model("micro", "smoe", moe_options={"z_coef": 0.001})
    out = model(torch.randint(0, 512, (2, 8)))
    expected = 0.01 * out.aux["balance"] + 0.001 * out.aux["z"]
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux["balance"].item() == pytest.approx(2.0, rel=0.2)  # ~1 per layer, 2 layers


def test_moe_every_nth_layer_and_dense_elsewhere():
    model = build_model("micro", "smoe", n_layers=4, moe_every=2)
    kinds = [isinstance(b.ffn, MoELayer) for b in model.blocks]
    assert kinds == [False, True, False, True]
    assert model.blocks[0].ffn.experts.w1.shape[-1] == model.config.top_k * model.config.expert_dim


def test_moe_plus_plus_layers_receive_previous_logits():
    torch.manual_seed(0)
    model = build_model("micro", "moe_plus_plus", n_layers=3)
    for block in model.blocks[1:]:
        torch.nn.init.normal_(block.ffn.router.gate_residual.weight, std=0.5)
    tokens = torch.randint(0, 512, (1, 8))
    # Layer 2's logits = its own linear logits + W_g(layer 1's logits).
    hidden = {}

    def keep_input(module, args, output):
        hidden["x"] = args[0]

    model.blocks[1].ffn.register_forward_hook(keep_input)
    out = model(tokens)
    r = model.blocks[1].ffn.router
    own = hidden["x"].reshape(-1, 64) @ r.weight.t()
    torch.testing.assert_close(out.routing[1].logits, own + r.gate_residual(out.routing[0].logits))


def test_rotary_rotates_only_the_configured_fraction():
    cfg = model_config("micro", rope_fraction=0.5)
    assert cfg.rope_dim == 16
    cos, sin = rotary_tables(8, cfg.rope_dim, 10000.0)
    q = torch.randn(1, 1, 8, cfg.head_dim)
    r = apply_rotary(q, cos, sin)
    torch.testing.assert_close(r[..., 16:], q[..., 16:])  # the other half passes through
    torch.testing.assert_close(r[..., :16].norm(dim=-1), q[..., :16].norm(dim=-1))  # a rotation
    torch.testing.assert_close(r[:, :, 0], q[:, :, 0])  # position 0: angle 0
    # Relative: <R_m q, R_m k> is the same at every position m (it depends on m - n only).
    k = torch.randn(1, 1, 8, cfg.head_dim)
    q0, k0 = q[0, 0, 3:4].expand(8, -1), k[0, 0, 3:4].expand(8, -1)
    rq0 = apply_rotary(q0.view(1, 1, 8, -1), cos, sin)[0, 0]
    rk0 = apply_rotary(k0.view(1, 1, 8, -1), cos, sin)[0, 0]
    same = (rq0[:, :16] * rk0[:, :16]).sum(-1)
    torch.testing.assert_close(same, same[0].expand(8))


def test_presets_build_and_bad_options_are_named():
    for preset in ("micro", "cpu-tiny"):
        build_model(preset, "smoe")
    assert set(PRESETS) >= {"micro", "cpu-tiny", "paper-158m", "paper-679m"}
    with pytest.raises(ValueError, match="preset"):
        build_model("paper-158", "smoe")
    with pytest.raises(ValueError, match="d_modle"):
        build_model("micro", "smoe", d_modle=32)
    with pytest.raises(ValueError, match="smoe"):
        build_model("micro", "smeo")
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model("micro", "smoe")(torch.zeros(1, 65, dtype=torch.long))
