"""Routing metrics against small examples computed by hand (libmoe.analysis.metrics)."""

import math

import pytest
import torch

from libmoe.analysis import Trace
from libmoe.analysis import metrics as M
from libmoe.moe import build_moe


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


def make_trace(layers, step=0, weights=None, labels=None, names=("a", "b"), n_slots=4):
    """A trace of N tokens from per-layer selections [N, k] (weights default uniform)."""
    n = len(layers[0])
    idx = [t(rows) for rows in layers]
    w = [torch.tensor(ws, dtype=torch.float32) for ws in weights] if weights else [
        torch.full(i.shape, 1.0 / i.shape[1]) for i in idx]
    return Trace(topk_idx=idx, topk_weight=w, probs=[torch.zeros(n, n_slots) for _ in idx],
                 tokens=torch.arange(n), position=torch.arange(n),
                 label=torch.tensor(labels if labels is not None else [0] * n), labels=list(names),
                 meta={"step": step})


def test_change_rate_set_and_top1_forms():
    a, b = t([[0, 1], [2, 3]]), t([[1, 0], [2, 4]])
    # token 0: same set, different top-1; token 1: one of two kept, same top-1
    assert M.change_rate(a, b) == pytest.approx((0.25, 0.5))
    assert M.change_rate(a, a) == (0.0, 0.0)
    assert M.change_rate(t([[0, 1]]), t([[2, 3]])) == (1.0, 1.0)


def test_expert_change_rate_per_layer_and_mean():
    first = make_trace([[[0, 1], [2, 3]], [[0, 1], [0, 1]]], step=10)
    second = make_trace([[[1, 0], [2, 4]], [[2, 3], [0, 1]]], step=20)
    ecr = M.expert_change_rate(first, second)
    assert (ecr["from"], ecr["to"]) == (10, 20)
    assert ecr["by_layer"] == pytest.approx({"0": 0.25, "1": 0.5})
    assert ecr["mean"] == pytest.approx(0.375)
    assert ecr["top1_by_layer"] == pytest.approx({"0": 0.5, "1": 0.5})


def test_traces_of_different_tokens_are_refused():
    a = make_trace([[[0, 1], [2, 3]]])
    b = make_trace([[[0, 1]]])
    with pytest.raises(ValueError, match="different tokens"):
        M.expert_change_rate(a, b)


def test_saturation_against_the_final_selection():
    now, final = t([[0, 1], [2, 3]]), t([[1, 0], [2, 4]])
    assert M.saturation(now, final) == pytest.approx((0.75, 0.5))  # (top-k, top-1)
    s = M.router_saturation(make_trace([now.tolist()], 5), make_trace([final.tolist()], 9))
    assert s["step"] == 5 and s["topk"] == pytest.approx(0.75) and s["top1"] == pytest.approx(0.5)
    assert M.saturation(final, final) == (1.0, 1.0)


def test_allocation_entropy_is_one_when_even_and_half_on_half_the_experts():
    assert M.allocation_entropy(t([[0, 1], [2, 3]]), 4) == pytest.approx(1.0)
    assert M.allocation_entropy(t([[0, 1], [0, 1]]), 4) == pytest.approx(math.log(2) / math.log(4))
    assert M.allocation_entropy(t([[0, 0]]), 1) is None
    # expert-choice padding (-1) is not a selection
    assert M.allocation_entropy(t([[0, -1], [1, -1]]), 4) == pytest.approx(0.5)


def test_weight_entropy_and_margin_of_normalised_weights():
    idx = t([[0, 1], [2, 3]])
    w = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert M.weight_entropy(idx, w) == pytest.approx((h + 1.0) / 2)
    assert M.margin(idx, w) == pytest.approx((0.5 + 0.0) / 2)
    assert M.weight_entropy(t([[0, 1]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(0.0)
    # weights that do not sum to one (TC-MoE's null share) are normalised first
    assert M.margin(t([[0, 1]]), torch.tensor([[0.3, 0.1]])) == pytest.approx(0.5)
    # undefined under top-1 routing
    assert M.weight_entropy(t([[0], [1]]), torch.ones(2, 1)) is None
    assert M.margin(t([[0], [1]]), torch.ones(2, 1)) is None


def test_coactivation_matrix_and_most_coactivated():
    idx = t([[0, 1], [0, 2], [1, 2], [0, 1]])
    ca = M.coactivation(idx, 3)
    expected = torch.tensor([[0, 2 / 3, 1 / 3], [2 / 3, 0, 1 / 3], [1 / 2, 1 / 2, 0]], dtype=torch.float64)
    torch.testing.assert_close(ca, expected)
    assert M.top_coactivated(ca, 2) == [0, 1]
    summary = M.coactivation_summary(idx, 3, n=2)
    assert summary["experts"] == [0, 1]
    torch.testing.assert_close(torch.tensor(summary["matrix"]), torch.tensor([[0, 2 / 3], [2 / 3, 0]]),
                               check_dtype=False)
    assert summary["max"] == pytest.approx(2 / 3)
    assert summary["mean"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 6)


def test_load_fractions_jain_and_dead_experts():
    out = M.load(t([[0, 1], [0, 2]]), 4)
    assert out["fraction"] == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert out["jain"] == pytest.approx(1.0 / (4 * (0.25 + 0.0625 + 0.0625)))
    assert out["dead"] == 1 and out["dead_fraction"] == 0.25
    assert M.load(t([[0, 1], [2, 3]]), 4)["jain"] == pytest.approx(1.0)


def test_layer_overlap_is_the_mean_jaccard_of_topk_sets():
    assert M.jaccard(t([[0, 1]]), t([[1, 2]])) == pytest.approx(1 / 3)
    trace = make_trace([[[0, 1], [2, 3]], [[1, 2], [2, 3]], [[3, 0], [0, 1]]])
    lo = M.layer_overlap(trace)
    assert lo["adjacent"]["0-1"] == pytest.approx((1 / 3 + 1) / 2)
    assert lo["adjacent"]["1-2"] == pytest.approx(0.0)
    assert lo["matrix"][0][2] == pytest.approx((1 / 3 + 0) / 2) and lo["matrix"][1][1] == 1.0


def test_per_label_metrics_split_the_tokens():
    trace = make_trace([[[0, 1], [0, 1], [0, 1], [2, 3]]], labels=[0, 0, 1, 1])
    by = M.by_label(trace, M.eae)
    assert by["0"]["a"] == pytest.approx(0.5) and by["0"]["b"] == pytest.approx(1.0)
    assert M.eae(trace)["0"] == pytest.approx(-(0.375 * math.log(0.375) * 2 + 0.125 * math.log(0.125) * 2)
                                              / math.log(4))


def test_expert_similarity_is_the_mean_pairwise_cosine_of_output_weights():
    layer = build_moe("smoe", d_model=2, n_experts=3, expert_dim=1, top_k=1)
    with torch.no_grad():
        layer.experts.w2.copy_(torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[0.0, 3.0]]]))
    model = torch.nn.Sequential(layer)
    assert M.expert_similarity(model) == {"0": pytest.approx(1 / 3)}


def test_trace_metrics_bundles_single_trace_metrics_with_string_layer_keys():
    trace = make_trace([[[0, 1], [2, 3]], [[0, 1], [0, 1]]], weights=[[[0.6, 0.4]] * 2, [[0.9, 0.1]] * 2])
    out = M.trace_metrics(trace)
    assert set(out) == {"eae", "eae_by_domain", "ewa", "ewa_by_domain", "router_margin", "load",
                        "layer_overlap"}
    assert list(out["eae"]) == ["0", "1"]
    assert out["router_margin"] == pytest.approx({"0": 0.2, "1": 0.8})
