"""The MoE Transformer: paper parameter counts, causality, RoPE, aux losses, MoE++ chaining."""

import pytest
import torch

from libmoe.models import (
    PRESETS,
    ModelConfig,
    MoETransformer,
    build_model,
    count_parameters,
    model_config,
)
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


# -- MoE++ slot counts scale with E; models saved before that still load ---------------------------


def test_moe_plus_plus_config_records_its_slot_counts():
    cfg = model_config("cpu-tiny", "moe_plus_plus")
    assert cfg.n_experts == 16 and "n_const" not in cfg.moe_options
    assert cfg.to_dict()["moe_options"] == {"n_zero": 1, "n_copy": 1, "n_const": 1}
    assert model_config("paper-158m", "moe_plus_plus").to_dict()["moe_options"] == {
        "n_zero": 1, "n_copy": 1, "n_const": 6}
    assert model_config("cpu-tiny", "smoe").to_dict()["moe_options"] == {}  # other configs unchanged
    again = ModelConfig(**cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    with torch.device("meta"):
        assert MoETransformer(again).blocks[0].ffn.router.n_slots == 16 + 3


def _old_moe_plus_plus_dir(tmp_path, hf_tokenizer_dir):
    """A model directory as libmoe wrote it before the counts scaled with E: E = 4 FFN experts,
    1 zero + 1 copy + 6 constant experts, and no counts in config.yaml / config.json."""
    import json

    import yaml

    from libmoe.models.loading import save_model_dir

    torch.manual_seed(0)
    old = {"n_zero": 1, "n_copy": 1, "n_const": 6}
    cfg = ModelConfig(vocab_size=400, d_model=16, n_layers=2, n_heads=2, head_dim=8, max_seq_len=16,
                      algorithm="moe_plus_plus", n_experts=4, expert_dim=8, top_k=2, moe_options=old)
    model = MoETransformer(cfg).eval()
    tok = hf_tokenizer_dir(tmp_path, ["First Citizen: Before we proceed any further."] * 20)
    out = save_model_dir(tmp_path / "old", model, {"preset": "micro"}, tok, log=lambda msg: None)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["model"]["moe_options"] = {}
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    if (out / "config.json").is_file():  # as libmoe wrote it then: the ModelConfig under "libmoe"
        hf = {"model_type": "libmoe", "architectures": ["LibMoEForCausalLM"], "libmoe": saved["model"],
              "vocab_size": 400, "hidden_size": 16, "tie_word_embeddings": False}
        (out / "config.json").write_text(json.dumps(hf))
    return out, model


def test_a_moe_plus_plus_model_saved_before_the_counts_scaled_loads_with_its_layout(
        tmp_path, hf_tokenizer_dir):
    from libmoe.models import load_model

    out, model = _old_moe_plus_plus_dir(tmp_path, hf_tokenizer_dir)
    loaded = load_model(out)
    assert [b.ffn.router.n_slots for b in loaded.model.blocks] == [4 + 8, 4 + 8]
    assert loaded.model.config.moe_options == {"n_zero": 1, "n_copy": 1, "n_const": 6}
    assert loaded.config["model"]["moe_options"] == {"n_zero": 1, "n_copy": 1, "n_const": 6}
    tokens = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens).logits, model(tokens).logits)
    if (out / "config.json").is_file():  # transformers installed: AutoModelForCausalLM too
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert hf.model.blocks[1].ffn.router.n_slots == 12
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens).logits, model(tokens).logits)


def test_an_upcycled_transformers_moe_plus_plus_model_records_and_recovers_its_slot_counts(tmp_path):
    import json

    transformers = pytest.importorskip("transformers")
    from libmoe.upcycle.hf_saving import wrap_upcycled

    torch.manual_seed(0)
    small = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    source = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**small)).eval()
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    old = {"n_zero": 1, "n_copy": 1, "n_const": 6}  # the fixed layout of files saved before scaling
    wrapped = wrap_upcycled(source, "moe_plus_plus", 4, 2, **old).eval()
    wrapped.save_pretrained(str(tmp_path / "up"))
    config_path = tmp_path / "up" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["moe_options"] == old  # saved with its counts
    # as libmoe saved it before the counts scaled with E: no counts, and the config nested
    spec = {"algorithm": "algorithm", "num_experts": "n_experts", "num_experts_per_tok": "top_k",
            "moe_layers": "layers", "upcycle_seed": "seed", "router_init_std": "router_init_std"}
    own = {*spec, "moe_options", "model_type", "architectures", "base_model_type", "transformers_version"}
    nested = {"model_type": "libmoe_upcycled", "architectures": config["architectures"],
              "upcycle": {new: config[key] for key, new in spec.items()} | {"options": {}},
              "base": {k: v for k, v in config.items() if k not in own} | {"model_type": "llama"}}
    config_path.write_text(json.dumps(nested))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "up")).eval()
    layer = next(m for m in back.modules() if isinstance(m, MoELayer))
    assert layer.router.n_slots == 4 + 8
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, wrapped(tokens).logits)
    fresh = wrap_upcycled(transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**small)), "moe_plus_plus", 4, 2)
    assert fresh.config.upcycle["options"] == {"n_zero": 1, "n_copy": 1, "n_const": 1}


def test_init_from_a_moe_plus_plus_model_saved_before_the_counts_scaled(tmp_path, hf_tokenizer_dir):
    # --init reads the old layout off the saved tensors: the same layout is accepted, the new
    # default (1/1/1 at E = 4) refused in one sentence rather than a size mismatch at load
    from dataclasses import replace

    from libmoe.data.packed import tokenizer_fingerprint
    from libmoe.models import find_tokenizer, resolve_config
    from libmoe.train.trainer import init_weights

    out, model = _old_moe_plus_plus_dir(tmp_path, hf_tokenizer_dir)
    tok_hash = tokenizer_fingerprint(find_tokenizer(out))
    run = resolve_config(preset="micro")
    old = replace(run, model=replace(model.config, moe_options={"n_zero": 1, "n_copy": 1, "n_const": 6}))
    weights = init_weights(out, old, tok_hash)
    assert weights["blocks.0.ffn.router.weight"].shape[0] == 4 + 8
    with pytest.raises(ValueError, match="holds a different model"):
        init_weights(out, replace(run, model=replace(model.config, moe_options={})), tok_hash)
