"""The GPU hot path never makes the host wait: routing, `grouped` dispatch, aux losses and the
balancing updates run without a host-synchronising op (counted on CPU with HostSyncCounter, which
sees the ops a GPU run would sync on). Also: `grouped` equals the `loop` reference exactly where
its fixed-shape rows are masked, and under autocast the combine runs in fp32."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from libmoe.models import build_model
from libmoe.moe import ACTIVATIONS, build_moe, run_experts, update_bias_balancing
from libmoe.moe.dispatch import grouped_mm_supported, resolve_backend, sort_by_expert
from libmoe.syncs import HostSyncCounter

PAPER = ["smoe", "sigma_moe", "xmoe", "sharede_v2", "sharede_v3", "moe_plus_plus", "tc_moe"]


def _step(model, tokens):
    out = model(tokens, tokens)
    (out.loss + out.aux_loss).backward()


@pytest.mark.parametrize("algorithm", PAPER + ["dense"])
def test_paper_models_forward_backward_without_host_sync(algorithm):
    torch.manual_seed(0)
    model = build_model("micro", algorithm, moe_options={"dispatch": "grouped"})
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    _step(model, tokens)  # first call outside the counter (lazy initialisation)
    with HostSyncCounter() as syncs:
        _step(model, tokens)
    assert syncs.count == 0, syncs.summary()


@pytest.mark.parametrize("moe_options", [
    {"sigma_renormalize": False, "sigma_entropy_coef": 1e-3, "sigma_expert_dropout": 0.1},
    {"sigma_entropy_coef": 1e-4, "expert_init": "dense_match"},
])
def test_sigma_moe_model_with_csordas_options_without_host_sync(moe_options):
    torch.manual_seed(0)
    model = build_model("micro", "sigma_moe", moe_options={"dispatch": "grouped", **moe_options})
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    _step(model, tokens)
    with HostSyncCounter() as syncs:
        _step(model, tokens)
    assert syncs.count == 0, syncs.summary()


@pytest.mark.parametrize("algorithm, options", [
    ("smoe", {"capacity_factor": 1.0}),
    ("smoe", {"bias_balancing": 1e-3, "n_group": 2, "topk_group": 1}),
    ("sharede_v3", {"bias_balancing": 1e-3, "balance_scope": "batch"}),
    ("hyper", {}),
    ("expert_choice", {"capacity_factor": 1.5}),
    ("moe_plus_plus", {"gating_residual": False, "capacity_factor": 1.25}),
    ("tc_moe", {"z_coef": 1e-3, "balance_count": "top1"}),
    ("smoe", {"activation": "swiglu", "expert_bias": True, "routed_scaling": 2.0}),
    ("sigma_moe", {"sigma_renormalize": False, "sigma_entropy_coef": 1e-3,
                   "sigma_expert_dropout": 0.1}),
    ("sigma_moe", {"sigma_entropy_coef": 1e-4, "sigma_expert_dropout": 0.05, "bias_balancing": 1e-3}),
    ("moe_plus_plus", {"expert_init": "dense_match"}),
])
def test_layer_options_without_host_sync(algorithm, options):
    torch.manual_seed(0)
    layer = build_moe(algorithm, 32, 8, 16, 2, dispatch="grouped", **options)
    layer.set_training_progress(0.5)  # hyper: k from the host-side mirror
    x = torch.randn(2, 12, 32, requires_grad=True)
    with HostSyncCounter() as syncs:
        out = layer(x)
        (out.output.square().mean() + out.aux_loss).backward()
        update_bias_balancing(layer)
    assert syncs.count == 0, syncs.summary()
    if "capacity_factor" in options and algorithm != "expert_choice":
        fraction = out.stats["dropped_fraction"]
        assert isinstance(fraction, torch.Tensor) and fraction.dim() == 0 and not fraction.requires_grad


def test_bias_balancing_update_matches_the_counts():
    layer = build_moe("smoe", 16, 4, 8, 2, bias_balancing=0.1, dispatch="grouped")
    layer.router.load_counts.copy_(torch.tensor([3.0, 1.0, 0.0, 4.0]))
    layer.update_bias()
    assert layer.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, -0.1])
    layer.update_bias()  # no counts since: no change (what `if counts.sum() > 0` used to guard)
    assert layer.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, -0.1])


def test_hyper_progress_survives_a_state_dict_round_trip():
    a = build_moe("hyper", 16, 8, 8, 4, hyper_k_min=1)
    a.set_training_progress(1.0)
    b = build_moe("hyper", 16, 8, 8, 4, hyper_k_min=1)
    assert b.router.current_k() == 1
    b.load_state_dict(a.state_dict())
    assert b.router.current_k() == 4 == a.router.current_k()


def test_sort_by_expert_has_fixed_shapes_and_invalid_last():
    ids = torch.tensor([[2, -1], [0, 2], [5, 0]])
    order = sort_by_expert(ids, 3)
    assert order.tok.tolist() == [1, 2, 0, 1, 0, 2]
    assert order.pos.tolist() == [2, 5, 0, 3, 1, 4]
    assert order.expert.tolist() == [0, 0, 2, 2, 3, 3]
    assert order.counts.tolist() == [2, 0, 2]


def _case(seed, T, D, E, M, K, activation, bias, invalid, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    ids[torch.rand(T, K, generator=g) < invalid] = -1
    ids[ids == E - 1] = E  # expert E-1 gets no token; id E is outside [0, E)
    if invalid >= 1:
        ids.fill_(-1)
    gated = ACTIVATIONS[activation].gated
    tensors = {
        "x": torch.randn(T, D, generator=g, dtype=dtype),
        "weights": torch.rand(T, K, generator=g, dtype=dtype),
        "w1": torch.randn(E, D, M, generator=g, dtype=dtype) / D**0.5,
        "w2": torch.randn(E, M, D, generator=g, dtype=dtype) / M**0.5,
        "w3": torch.randn(E, D, M, generator=g, dtype=dtype) / D**0.5 if gated else None,
        "b1": torch.randn(E, M, generator=g, dtype=dtype) if bias else None,
        "b2": torch.randn(E, D, generator=g, dtype=dtype) if bias else None,
        "b3": torch.randn(E, M, generator=g, dtype=dtype) if bias and gated else None,
    }
    return ids, ACTIVATIONS[activation], tensors


def _run(backend, ids, act, tensors):
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    t = {k: leaves.get(k) for k in tensors}
    y = run_experts(backend, t["x"], ids, t["weights"], t["w1"], t["w2"], t["w3"], act,
                    t["b1"], t["b2"], t["b3"])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * gy).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("activation, bias, invalid, M", [
    ("relu", False, 0.0, 16),
    ("gelu", True, 0.3, 16),
    ("swiglu", True, 0.3, 16),
    ("swiglu", False, 0.5, 16),
    ("geglu", True, 1.0, 16),  # every id invalid: zero output, zero expert gradients
    ("silu", True, 0.3, 6),  # 24-byte rows: grouped pads them to 16-byte multiples
])
def test_grouped_matches_loop_outputs_and_gradients(activation, bias, invalid, M):
    ids, act, tensors = _case(0, 24, 16, 5, M, 3, activation, bias, invalid)
    with HostSyncCounter() as syncs:
        y, grads = _run("grouped", ids, act, tensors)
    assert syncs.count == 0, syncs.summary()
    y_ref, grads_ref = _run("loop", ids, act, tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.isfinite(grads[name]).all(), name
    # The expert that got no token has exactly zero gradient (no leak from the masked tail).
    for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
        if name in grads:
            assert grads[name][-1].abs().max() == 0, name


class _DtypeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.log.append((func.__name__, out.dtype))
        return out


@pytest.mark.parametrize("backend", ["grouped", "loop", "padded"])
def test_autocast_combines_in_fp32(backend):
    ids, act, t = _case(0, 16, 16, 4, 16, 2, "swiglu", True, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16), _DtypeLog() as seen:
        y = run_experts(backend, t["x"], ids, t["weights"], t["w1"], t["w2"], t["w3"], act,
                        t["b1"], t["b2"], t["b3"])
    assert y.dtype == torch.bfloat16  # what the layer returned before: callers unchanged
    adds = [dtype for name, dtype in seen.log if name.startswith("index_add")]
    matmuls = {dtype for name, dtype in seen.log if name.startswith(("_grouped_mm", "mm", "bmm"))}
    assert adds == [torch.float32] and matmuls == {torch.bfloat16}
    # Same as the bf16 experts combined in fp32 by hand (the loop reference under autocast).
    if backend != "loop":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = run_experts("loop", t["x"], ids, t["weights"], t["w1"], t["w2"], t["w3"], act,
                              t["b1"], t["b2"], t["b3"])
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_layer_under_autocast_keeps_router_and_combine_in_fp32():
    layer = build_moe("smoe", 32, 4, 16, 2, dispatch="grouped")
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), _DtypeLog() as seen:
        out = layer(x)
    assert out.routing.probs.dtype == out.routing.topk_weight.dtype == torch.float32
    assert [d for n, d in seen.log if n.startswith("index_add")] == [torch.float32]
    assert out.output.dtype == torch.bfloat16


def test_auto_picks_grouped_under_compile_and_traces_without_graph_break():
    ids, act, t = _case(0, 16, 16, 4, 16, 2, "relu", False, 0.3)
    calls = []

    def f(x, weights):
        calls.append(resolve_backend("auto", x, 10**6, 1))  # blocked-sized load: still grouped
        return run_experts("auto", x, ids, weights, t["w1"], t["w2"], None, act)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fp32: meta lacks it
    y = compiled(t["x"], t["weights"])
    assert calls == ["grouped"]
    torch.testing.assert_close(y, run_experts("loop", t["x"], ids, t["weights"], t["w1"], t["w2"],
                                              None, act), rtol=1e-5, atol=1e-6)


def test_counter_says_where_each_sync_came_from_and_counts_cuda_synchronize():
    original_tolist, original_sync = torch.Tensor.tolist, torch.cuda.synchronize
    with HostSyncCounter() as syncs:
        x = torch.arange(4.0)
        x.tolist()
        x[x > 1].sum().item()
        with contextlib.suppress(AssertionError, RuntimeError):  # CPU-only torch: counted, then refused
            torch.cuda.synchronize()
    assert syncs.ops == {"Tensor.tolist": 1, "aten::index": 1, "aten::_local_scalar_dense": 1,
                         "torch.cuda.synchronize": 1}
    assert len(syncs.locations) == syncs.count
    assert all("test_sync_free.py" in where for where in syncs.locations[:3]), syncs.locations
    assert torch.Tensor.tolist is original_tolist and torch.cuda.synchronize is original_sync


def test_grouped_mm_supported_covers_fp16_and_fp32():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert grouped_mm_supported(torch.zeros(1, 16, dtype=dtype), torch.zeros(2, 16, 16, dtype=dtype))
    assert not grouped_mm_supported(torch.zeros(1, 16, dtype=torch.float64))


class _CudaLike:
    """Stands in for a CUDA tensor in resolve_backend (a CPU build cannot make one)."""

    def __init__(self, dtype, width=512):
        self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, (8, width)

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


@pytest.mark.parametrize("dtype, major, expected", [
    (torch.bfloat16, 9, "grouped"), (torch.bfloat16, 10, "grouped"),  # torch's fused kernel
    (torch.bfloat16, 8, "padded"), (torch.float16, 9, "padded"), (torch.float32, 9, "padded"),
])
def test_auto_on_cuda_picks_grouped_where_torch_fuses_it(monkeypatch, dtype, major, expected):
    from libmoe.moe.dispatch import resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    w = _CudaLike(dtype, 128)
    assert resolve_backend("auto", _CudaLike(dtype), 4096, 66, w, _CudaLike(dtype)) == expected
    assert resolve_backend("grouped", _CudaLike(dtype), 4096, 66, w, _CudaLike(dtype)) == "grouped"
