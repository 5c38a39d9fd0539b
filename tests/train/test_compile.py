"""train.compile: every block compiled with fullgraph=True gives the eager losses and gradients.

Backends, chosen for this 2-core CPU (seconds measured there, micro preset, 2 blocks, one
forward+backward): torch.compile's default backend, inductor, takes about 17-30 s per algorithm
(C++ code generation of both blocks' forward and backward graphs), so all seven paper
algorithms would take minutes. "aot_eager" takes 2-3 s per algorithm and still checks what
matters here: dynamo captures each block whole (fullgraph=True raises on any graph break: a host
sync, a data-dependent branch) and AOTAutograd traces the joint forward+backward graph, so its
losses and gradients must match eager to float rounding. Inductor itself (its fused kernels,
hence a looser tolerance) runs for smoe only.
"""

import copy
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from libmoe.models import build_model
from libmoe.moe import REGISTRY, RoutingRecorder
from libmoe.train import train

PAPER = ["smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from an empty cache and counts its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pair(algorithm, backend, **overrides):
    torch.manual_seed(0)
    eager = build_model("micro", algorithm, **overrides)
    compiled = copy.deepcopy(eager).compile_blocks(backend=backend)
    return eager, compiled


def step(model, tokens):
    out = model(tokens[:, :-1], tokens[:, 1:])
    (out.loss + out.aux_loss).backward()
    return out


def assert_same_step(eager, compiled, tokens, rtol, atol):
    a, b = step(eager, tokens), step(compiled, tokens)
    torch.testing.assert_close(b.loss, a.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(b.logits, a.logits, rtol=rtol, atol=atol)
    assert b.aux.keys() == a.aux.keys()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=name)
    for ra, rb in zip(a.routing, b.routing):
        assert torch.equal(ra.topk_idx, rb.topk_idx)


def test_paper_algorithms_are_listed():
    assert all(name in REGISTRY for name in PAPER)


@pytest.mark.parametrize("algorithm", PAPER)
def test_compiled_blocks_match_eager(algorithm):
    eager, compiled = pair(algorithm, "aot_eager")
    tokens = torch.randint(0, eager.config.vocab_size, (3, 33), generator=torch.Generator().manual_seed(1))
    assert_same_step(eager, compiled, tokens, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled


def test_inductor_matches_eager():
    eager, compiled = pair("smoe", "inductor", n_layers=1)  # one graph to generate code for
    tokens = torch.randint(0, eager.config.vocab_size, (3, 33), generator=torch.Generator().manual_seed(1))
    assert_same_step(eager, compiled, tokens, rtol=1e-4, atol=1e-5)


def test_batch_sizes_and_eval_reuse_graphs():
    """Graphs per (first MoE layer or not, grad mode), never per batch size; a RoutingRecorder's
    hooks run the blocks eagerly and record the same routing."""
    eager, compiled = pair("moe_plus_plus", "aot_eager")
    gen = torch.Generator().manual_seed(2)
    for batch in (4, 3, 5):
        step(compiled, torch.randint(0, 512, (batch, 33), generator=gen))
    assert counters["stats"]["unique_graphs"] == 2  # first block (no previous logits), the rest
    compiled.eval()
    with torch.no_grad():
        for batch in (4, 2, 7):
            compiled(torch.randint(0, 512, (batch, 32), generator=gen))
    assert counters["stats"]["unique_graphs"] == 4
    probe = torch.randint(0, 512, (5, 32), generator=gen)
    traces = []
    for model in (eager, compiled):
        with RoutingRecorder(model) as rec:
            rec.record(probe, batch_size=3)
        traces.append(rec.trace(step=1))
    assert counters["stats"]["unique_graphs"] == 4
    for a, b in zip(traces[0].topk_idx, traces[1].topk_idx):
        assert torch.equal(a, b)


def test_train_with_compile_runs_and_validates(micro_config, tmp_path, monkeypatch):
    from libmoe.models import MoETransformer

    calls = []
    original = MoETransformer.compile_blocks

    def aot_eager(self, backend="inductor", **options):  # the fast backend, see the module docstring
        calls.append(backend)
        return original(self, "aot_eager", **options)

    monkeypatch.setattr(MoETransformer, "compile_blocks", aot_eager)
    cfg = micro_config("train.compile=true", steps=4)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert calls == ["inductor"], "train() did not call compile_blocks under train.compile=true"
    assert summary["step"] == 4 and summary["val_loss"] == summary["val_loss"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [4]
    assert counters["stats"]["unique_graphs"] >= 2
