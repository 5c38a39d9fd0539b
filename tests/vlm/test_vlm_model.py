"""libmoe.vlm model and upcycling: dense equivalence per algorithm, seeded routers, MoE layout,
aux combination, Table 3 parameter counts, save/load, S2 shapes and the text encoding."""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from libmoe.moe import REGISTRY  # noqa: E402
from libmoe.upcycle.core import EXACT_AT_INIT, NOT_EXACT_AT_INIT, SHARED_ALGORITHMS  # noqa: E402
from libmoe.upcycle.hf import find_mlps  # noqa: E402
from libmoe.vlm.model import IMAGE_TOKEN, MODEL_FILE, VLM_FILE, build_vlm  # noqa: E402
from libmoe.vlm.presets import load_vlm_preset  # noqa: E402
from libmoe.vlm.saving import load_vlm, save_vlm  # noqa: E402
from libmoe.vlm.text import encode_conversation, word_tokenizer  # noqa: E402
from libmoe.vlm.upcycle import parameter_report, upcycle_vlm  # noqa: E402

TEXTS = ["<image>\nWhat colour is the square? Please answer yes or no.", "Yes", "No",
         "The square is red.", "Is there a circle in the image?"]
E, K = 4, 2  # the cpu-smoke preset's moe section


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def dense(tok):
    """The cpu-smoke model (S2 scales [1, 2]) with non-trivial biases in every upcycled MLP."""
    torch.manual_seed(0)
    model = build_vlm(load_vlm_preset("cpu-smoke")["model"], tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and (".mlp." in name or name.startswith("connector.")):
                p.normal_(0.0, 0.5)  # SigLIP initialises them near zero; make copying them matter
    return model.eval()


@pytest.fixture(scope="module")
def batch(tok, dense):
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    n = dense.n_image_tokens
    words = tok("what colour is the square ? yes no red", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[words[0], *[img] * n, *words[1:5]], [words[5], *[img] * n, *words[5:9]]])
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, dense.pixel_size, dense.pixel_size, generator=g)
    return ids, pixels


@pytest.fixture(scope="module")
def dense_logits(dense, batch):
    with torch.no_grad():
        return dense(*batch).logits


def _upcycle(dense, algorithm, **kw):
    model = copy.deepcopy(dense)
    upcycle_vlm(model, algorithm, **{"n_experts": E, "top_k": K, "seed": 42, **kw})
    return model.eval()


def _dense_mlps(dense):
    """The dense MLPs in the upcycling's layer order: vision layers by depth, then the connector."""
    return [m for _, m in find_mlps(dense.vision)] + [dense.connector]


# -- dense equivalence ---------------------------------------------------------------------------------
def test_algorithm_lists_cover_the_registry():
    assert set(EXACT_AT_INIT) | set(NOT_EXACT_AT_INIT) == set(REGISTRY) - {"dense"}
    assert not set(EXACT_AT_INIT) & set(NOT_EXACT_AT_INIT)


def test_cpu_smoke_has_s2_and_biases(dense):
    assert dense.scales == [1, 2]
    assert dense.connector.fc1.bias is not None and dense.connector.fc2.bias is not None
    mlps = _dense_mlps(dense)
    assert len(mlps) == dense.vision.config.num_hidden_layers + 1
    assert all(m.fc1.bias is not None and m.fc2.bias is not None for m in mlps)


@pytest.mark.parametrize("algorithm", EXACT_AT_INIT)
def test_upcycled_reproduces_dense_logits(algorithm, dense, batch, dense_logits):
    model = _upcycle(dense, algorithm)
    layers = model.moe_layers()
    assert len(layers) == len(_dense_mlps(dense)) == 3
    with torch.no_grad():
        out = model(*batch)
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, dense_logits, atol=1e-5, rtol=0)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    # experts (and the shared expert) are bit-exact copies of the dense MLP, biases included
    for layer, mlp in zip(layers, _dense_mlps(dense)):
        groups = [layer.moe.experts] + ([layer.moe.shared_experts] if algorithm in SHARED_ALGORITHMS else [])
        for experts in groups:
            for e in range(experts.w1.shape[0]):
                assert torch.equal(experts.w1[e], mlp.fc1.weight.t())
                assert torch.equal(experts.w2[e], mlp.fc2.weight.t())
                assert torch.equal(experts.b1[e], mlp.fc1.bias)
                assert torch.equal(experts.b2[e], mlp.fc2.bias)


@pytest.mark.parametrize("algorithm", sorted(NOT_EXACT_AT_INIT))
def test_not_exact_algorithms_build_and_run(algorithm, dense, batch, dense_logits):
    reason = NOT_EXACT_AT_INIT[algorithm]
    assert isinstance(reason, str) and len(reason) > 20
    model = _upcycle(dense, algorithm).train()
    ids, pixels = batch
    out = model(ids, pixels, labels=ids)
    assert out.logits.shape == dense_logits.shape and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    layers = model.moe_layers()  # the last vision layer is past feature_layer -2: only aux loss grads
    assert layers[0].moe.router.weight.grad is not None and layers[-1].moe.router.weight.grad is not None


def test_dense_algorithm_is_refused(dense):
    with pytest.raises(ValueError, match="no router"):
        upcycle_vlm(copy.deepcopy(dense), "dense")
    with pytest.raises(ValueError, match="unknown MoE algorithm"):
        upcycle_vlm(copy.deepcopy(dense), "smeo")


def test_upcycling_twice_is_refused(dense):
    model = _upcycle(dense, "smoe")
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle_vlm(model, "smoe")


# -- routers -------------------------------------------------------------------------------------------
def _routers(model):
    return [m.moe.router.weight.detach().clone() for m in model.moe_layers()]


def test_routers_differ_between_layers_but_reproduce(dense):
    torch.manual_seed(123)
    a = _routers(_upcycle(dense, "smoe", seed=7))
    torch.manual_seed(456)  # the global RNG does not matter: one generator seeded with `seed`
    b = _routers(_upcycle(dense, "smoe", seed=7))
    c = _routers(_upcycle(dense, "smoe", seed=8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == a[1].shape and not torch.equal(a[0], a[1])
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    std = torch.cat([w.flatten() for w in a]).std().item()
    assert 0.01 < std < 0.04  # router_init_std 0.02


# -- layout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", SHARED_ALGORITHMS)
def test_shared_expert_algorithms_use_e_minus_1_routed(algorithm, dense):
    for layer in _upcycle(dense, algorithm).moe_layers():
        moe = layer.moe
        assert moe.experts.w1.shape[0] == E - 1 and moe.n_experts == E - 1
        assert moe.shared_experts is not None and moe.shared_experts.w1.shape[0] == 1
        assert moe.top_k == K - 1
        assert moe.opts.shared_scaling == moe.opts.routed_scaling == 0.5


def test_moe_plus_plus_copy_and_constant_experts_only_where_widths_match(dense):
    layers = _upcycle(dense, "moe_plus_plus").moe_layers()
    *vision, connector = layers
    d_v = dense.vision.config.hidden_size
    for layer in vision:
        extra = layer.moe.router.opts.extra
        assert layer.moe.d_model == layer.moe.output_dim == d_v
        assert extra["n_copy"] > 0 and extra["n_const"] > 0
    extra = connector.moe.router.opts.extra
    assert extra["n_copy"] == 0 and extra["n_const"] == 0 and extra["n_zero"] > 0
    assert connector.chain is None
    # the first MoE layer of the chain has no gating residual, later vision layers do
    assert vision[0].moe.router.opts.extra["gating_residual"] is False
    assert vision[1].moe.router.opts.extra["gating_residual"] is True


def test_connector_moe_changes_width(dense):
    model = _upcycle(dense, "smoe")
    connector = model.moe_layers()[-1]
    assert model.connector is connector and connector.chain is None
    d_v, d_lm = dense.vision.config.hidden_size, dense.lm.config.hidden_size
    assert connector.moe.d_model == d_v * len(dense.scales)
    assert connector.moe.output_dim == d_lm
    assert connector.moe.experts.w2.shape == (E, d_lm, d_lm)  # mlp2x_gelu: fc1 d_in -> d_lm, fc2 d_lm -> d_lm


# -- aux combination ---------------------------------------------------------------------------------------
def test_aux_combine_mean_is_sum_over_layers(dense, batch):
    summed = _upcycle(dense, "smoe", aux_combine="sum").train()
    mean = _upcycle(dense, "smoe", aux_combine="mean").train()
    a, b = summed(*batch), mean(*batch)
    n = len(summed.moe_layers())
    assert n == 3
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(b.aux_loss, a.aux_loss / n)
    assert set(a.aux) == set(b.aux) >= {"balance", "z"}
    for name in a.aux:
        torch.testing.assert_close(b.aux[name], a.aux[name] / n)
    per_layer = torch.stack([m.aux_loss for m in summed.moe_layers()]).sum()
    torch.testing.assert_close(a.aux_loss, per_layer)
    with pytest.raises(ValueError, match="aux_combine"):
        _upcycle(dense, "smoe", aux_combine="max")


# -- parameter counts ----------------------------------------------------------------------------------------
def test_parameter_report_paper_table3(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the preset has the dims
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    r = parameter_report("paper-phi35-siglip")
    assert set(r) == {"vision_moe", "connector_moe", "lm", "total"}
    b = {k: round(v / 1e9, 3) for k, v in r.items()}
    assert b == {"vision_moe": 1.752, "connector_moe": 0.099, "lm": 3.821, "total": 5.672}
    assert f"{r['total'] / 1e9:.2f}B" == "5.67B"
    assert r["vision_moe"] + r["connector_moe"] + r["lm"] == r["total"]


def test_parameter_report_cpu_smoke_parts_sum_to_total():
    r = parameter_report("cpu-smoke")
    assert r["vision_moe"] + r["connector_moe"] + r["lm"] == r["total"]
    assert all(v > 0 for v in r.values())
    real = parameter_report("cpu-smoke", device="cpu")
    assert real == r  # meta and real tensors count alike


# -- save / load ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", [None, "smoe", "moe_plus_plus"])
def test_save_load_round_trip(algorithm, dense, tok, batch, tmp_path):
    from safetensors import safe_open

    model = dense if algorithm is None else _upcycle(dense, algorithm)
    with torch.no_grad():
        want = model(*batch).logits
    save_vlm(model, tok, tmp_path / "m", extra={"stage": "test"})
    loaded, tok2, meta = load_vlm(tmp_path / "m")
    assert meta["stage"] == "test"
    assert len(loaded.moe_layers()) == len(model.moe_layers())
    with torch.no_grad():
        got = loaded(*batch).logits
    assert torch.equal(got, want)
    assert tok2("what colour is the square")["input_ids"] == tok("what colour is the square")["input_ids"]
    # tied embeddings stored once, and tied again after loading
    assert loaded.lm.config.tie_word_embeddings
    with safe_open(str(tmp_path / "m" / MODEL_FILE), "pt") as f:
        keys = set(f.keys())
    tied = {"lm.model.embed_tokens.weight", "lm.lm_head.weight"}
    assert len(keys & tied) == 1
    assert loaded.lm.lm_head.weight.data_ptr() == loaded.lm.get_input_embeddings().weight.data_ptr()


def test_load_of_a_non_vlm_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a libmoe VLM"):
        load_vlm(tmp_path)


# -- S2 and image tokens -----------------------------------------------------------------------------------
def test_s2_feature_shapes(dense, batch):
    _, pixels = batch
    d_v, d_lm = dense.vision.config.hidden_size, dense.lm.config.hidden_size
    assert dense.connector.fc1.in_features == d_v * len(dense.scales)
    assert dense.pixel_size == dense.image_size * dense.scales[-1]
    assert dense.n_image_tokens == dense.grid ** 2 == (dense.image_size // dense.patch_size) ** 2
    with torch.no_grad():
        feats = dense.image_features(pixels)
    assert feats.shape == (2, dense.grid ** 2, d_lm)


def test_image_token_count_must_match_images(dense, batch):
    ids, pixels = batch
    with pytest.raises(ValueError, match="image tokens"):
        dense(ids, pixels[:1])  # 2 images' worth of tokens, 1 image
    with pytest.raises(ValueError, match="image tokens"):
        dense(ids[:1], pixels)  # 1 image's worth of tokens, 2 images
    text_only = ids[:, -3:]
    with pytest.raises(ValueError, match="no <image>"):
        dense(text_only, pixels)
    with pytest.raises(ValueError, match="no pixel_values"):
        dense(ids, None)
    assert dense(text_only).logits.shape[:2] == text_only.shape


# -- text ----------------------------------------------------------------------------------------------------
CONV = [{"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "The square is red."},
        {"from": "human", "value": "Is there a circle in the image?"},
        {"from": "gpt", "value": "No"}]


def _words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_encode_conversation_labels_only_answers(tok):
    n = 4
    img, eos = tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.eos_token_id
    ids, labels = encode_conversation(tok, CONV, "simple", n, max_length=1000)
    assert len(ids) == len(labels)
    assert ids.count(img) == n
    first = ids.index(img)
    assert ids[first:first + n] == [img] * n  # expanded in place, contiguous
    assert [t for t in labels if t == img] == []
    supervised = [t for t in labels if t != -100]
    assert supervised == _words(tok, "The square is red.") + [eos] + _words(tok, "No") + [eos]
    for i, lab in zip(ids, labels):
        assert lab in (-100, i)
    # each answer's labels sit exactly on its tokens
    spans = [i for i, lab in enumerate(labels) if lab != -100]
    assert ids[spans[-1]] == eos and labels[-1] == eos
    # the plain template (PT): image then caption, the loss on the caption
    ids, labels = encode_conversation(tok, CONV[:2], "plain", n, max_length=1000)
    assert ids[:n] == [img] * n and labels[:n] == [-100] * n
    assert ids[n:] == labels[n:] == _words(tok, "The square is red.") + [eos]
    with pytest.raises(ValueError, match="template"):
        encode_conversation(tok, CONV, "nope", n, 1000)


def test_encode_conversation_truncation_never_cuts_the_image(tok):
    n = 4
    img = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, labels = encode_conversation(tok, CONV, "simple", n, max_length=1000)
    end_of_image = ids.index(img) + n
    short, short_labels = encode_conversation(tok, CONV, "simple", n, max_length=end_of_image + 2)
    assert short == ids[:end_of_image + 2] and short_labels == labels[:end_of_image + 2]
    assert short.count(img) == n
    for cut in (end_of_image - 1, ids.index(img) + 1, 1):
        with pytest.raises(ValueError, match="max_length"):
            encode_conversation(tok, CONV, "simple", n, max_length=cut)


def test_package_exports_resolve():
    import libmoe.vlm as vlm

    for name in vlm.__all__:
        assert getattr(vlm, name) is not None, name
    assert vlm.parameter_report is parameter_report  # the libmoe.vlm.parameter_report
    with pytest.raises(AttributeError):
        vlm.not_a_name  # noqa: B018


def test_a_moe_plus_plus_vlm_saved_before_the_slot_counts_scaled_loads(dense, tok, batch, tmp_path):
    # then: 1 zero + 1 copy + 6 constant experts whatever E, and no counts in vlm.json
    model = _upcycle(dense, "moe_plus_plus", options={"n_zero": 1, "n_copy": 1, "n_const": 6})
    with torch.no_grad():
        want = model(*batch).logits
    save_vlm(model, tok, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / VLM_FILE).read_text())
    meta["model"]["moe"]["options"] = {}
    (tmp_path / "m" / VLM_FILE).write_text(json.dumps(meta))
    loaded, _, _ = load_vlm(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(*batch).logits, want)
