"""RoutingRecorder and the trace format (libmoe.analysis.trace)."""

import json

import pytest
import torch

from libmoe.analysis import RoutingRecorder, Trace, list_traces
from libmoe.models import ModelConfig, MoETransformer


def tiny_model(algorithm="smoe", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, head_dim=8, max_seq_len=12,
                      algorithm=algorithm, n_experts=6, expert_dim=8, top_k=2, **kw)
    return MoETransformer(cfg).eval()


def test_recorder_keeps_every_layers_routing_with_labels_positions_and_mask():
    model = tiny_model()
    tokens = torch.randint(0, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 6:] = False  # padding of the last row
    with torch.no_grad():
        reference = model(tokens).routing
    with RoutingRecorder(model, labels=["news", "code"]) as rec:
        rec.record(tokens, labels=torch.tensor([0, 1, 1]), mask=mask, batch_size=2)
    trace = rec.trace(step=7)
    keep = mask.reshape(-1)
    assert trace.n_layers == 3 and trace.n_tokens == 26 and trace.step == 7
    assert torch.equal(trace.tokens, tokens.reshape(-1)[keep])
    assert torch.equal(trace.position, torch.arange(10).repeat(3)[keep])
    assert torch.equal(trace.label, torch.tensor([0] * 10 + [1] * 16))
    for l, routing in enumerate(reference):
        assert torch.equal(trace.topk_idx[l], routing.topk_idx[keep])
        torch.testing.assert_close(trace.topk_weight[l], routing.topk_weight[keep])
        torch.testing.assert_close(trace.probs[l], routing.probs[keep])
    assert trace.meta["algorithm"] == "smoe" and trace.meta["layers"] == [0, 1, 2]
    assert trace.meta["top_k"] == 2 and trace.meta["n_experts"] == 6


def test_recorder_captures_forward_calls_the_user_makes_and_unhooks_on_exit():
    model = tiny_model()
    a, b = torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (1, 5))
    with RoutingRecorder(model) as rec:
        rec.set_labels("wiki")
        model(a)
        rec.set_labels("code")
        model(b)
    model(a)  # after the block: not recorded
    trace = rec.trace()
    assert trace.labels == ["all", "wiki", "code"] and trace.n_tokens == 15
    assert torch.equal(trace.label, torch.tensor([1] * 10 + [2] * 5))
    assert set(trace.by_label()) == {"wiki", "code"}
    assert trace.by_label()["code"].n_tokens == 5


def test_trace_round_trips_through_the_checkpoint_format(tmp_path):
    model = tiny_model("tc_moe")  # more router slots than experts
    with RoutingRecorder(model, labels=["x"]) as rec:
        rec.record(torch.randint(0, 50, (2, 8)))
    trace = rec.trace(step=3, label_kind="task")
    trace.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "routing_trace.json").read_text())
    assert meta["n_slots"] == [2 * 6 + 2] * 3 and meta["domains"] == ["x"] and meta["n_tokens"] == 16
    back = Trace.load(tmp_path / "t")
    assert back.labels == ["x"] and back.meta["label_kind"] == "task" and back.step == 3
    for l in range(3):
        assert torch.equal(back.topk_idx[l], trace.topk_idx[l])
        assert torch.equal(back.probs[l], trace.probs[l])
    assert torch.equal(back.tokens, trace.tokens) and torch.equal(back.position, trace.position)


def test_dense_models_have_nothing_to_record_and_missing_traces_are_explained(tmp_path):
    with pytest.raises(ValueError, match="no MoE layers"), RoutingRecorder(tiny_model("dense")):
        pass
    with pytest.raises(FileNotFoundError, match="no routing trace"):
        Trace.load(tmp_path)


def test_list_traces_merges_checkpoints_and_pruned_traces(tmp_path):
    model = tiny_model()
    with RoutingRecorder(model) as rec:
        rec.record(torch.randint(0, 50, (1, 4)))
    trace = rec.trace()
    for where in ("traces/step_5", "checkpoints/step_10", "checkpoints/step_15"):
        trace.save(tmp_path / where)
    (tmp_path / "checkpoints" / "step_20").mkdir()  # no trace: ignored
    assert [s for s, _ in list_traces(tmp_path)] == [5, 10, 15]
