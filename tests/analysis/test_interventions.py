"""DropTop and router-temperature interventions (libmoe.analysis.interventions)."""

import pytest
import torch

from libmoe.analysis import routing_intervention
from libmoe.analysis.interventions import flat_metrics
from libmoe.moe import build_moe


def layer(algorithm="smoe", **kw):
    torch.manual_seed(0)
    return build_moe(algorithm, d_model=8, n_experts=6, expert_dim=4, top_k=2, **kw).eval()


def test_droptop_uses_the_next_ranks_and_is_restored():
    m = layer()
    x = torch.randn(20, 8)
    base = m(x).routing
    ranks = base.probs.argsort(dim=-1, descending=True)
    with routing_intervention(m, drop_top=1):
        dropped = m(x).routing
    assert torch.equal(dropped.topk_idx.sort(-1).values, ranks[:, 1:3].sort(-1).values)
    picked = base.probs.gather(-1, dropped.topk_idx)
    torch.testing.assert_close(dropped.topk_weight, picked / picked.sum(-1, keepdim=True))
    with routing_intervention(m, drop_top=2):
        assert torch.equal(m(x).routing.topk_idx.sort(-1).values, ranks[:, 2:4].sort(-1).values)
    assert torch.equal(m(x).routing.topk_idx, base.topk_idx) and m.router.drop_top == 0


def test_temperature_divides_the_logits_and_multiplies_the_trained_one():
    m = layer(temperature=2.0)
    x = torch.randn(10, 8)
    z = m(x).routing.logits
    with routing_intervention(m, temperature=10.0):
        probs = m(x).routing.probs
    torch.testing.assert_close(probs, torch.softmax(z / 20.0, dim=-1))
    assert m.router.temperature == 2.0
    # a hotter router spreads its weights: the top-1 weight falls
    with routing_intervention(m, temperature=10.0):
        hot = m(x).routing.topk_weight[:, 0]
    with routing_intervention(m, temperature=0.1):
        cold = m(x).routing.topk_weight[:, 0]
    assert bool((hot < cold).all())


def test_restored_even_when_the_block_raises():
    m = layer()
    with pytest.raises(RuntimeError), routing_intervention(m, drop_top=1, temperature=5.0):
        raise RuntimeError("boom")
    assert m.router.drop_top == 0 and m.router.temperature == 1.0


def test_invalid_interventions_are_explained():
    ec = layer("expert_choice")
    with pytest.raises(ValueError, match="expert_choice"), routing_intervention(ec, drop_top=1):
        pass
    with pytest.raises(ValueError, match="top_k"), routing_intervention(layer(), drop_top=5):
        pass
    with pytest.raises(ValueError, match="dense"), routing_intervention(torch.nn.Linear(2, 2), drop_top=1):
        pass
    with pytest.raises(ValueError, match="positive"), routing_intervention(layer(), temperature=0):
        pass


def test_flat_metrics_names_task_scores():
    results = {"val_ppl": {"ppl": 12.0, "loss": 2.4}, "piqa": {"acc": 0.6, "acc_norm": 0.55, "n": 4},
               "lambada_openai": {"acc": 0.1, "ppl": 300.0}}
    assert flat_metrics(results) == {"val_ppl": 12.0, "piqa/acc": 0.6, "piqa/acc_norm": 0.55,
                                     "lambada_openai/acc": 0.1, "lambada_openai/ppl": 300.0}
