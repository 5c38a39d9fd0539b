"""The `fused` dispatch backend's C++ kernel: both thread modes, the no-compiler fallback, and the
memory it keeps for backward. (Its equivalence with the loop reference for every algorithm,
activation and option is in test_dispatch, test_reference, test_expert_bias, test_output_dim.)"""

import os
import subprocess
import sys

import expert_cases
import pytest
import torch
from test_dispatch import make_case, outputs_and_grads

import libmoe.moe.dispatch as dispatch
from libmoe.moe import ACTIVATIONS, build_moe, run_experts
from libmoe.moe.cpu_kernel import fused_kernel

needs_kernel = pytest.mark.skipif(fused_kernel() is None, reason="the fused kernel could not be built here")


@needs_kernel
@pytest.mark.parametrize("block_rows", [0, 7])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("activation", ["relu", "swiglu", "gelu"])
def test_threaded_kernel_matches_loop(monkeypatch, parallel, activation, block_rows):
    """Two intra-op threads: the experts shared out between them, each with its own output and
    input-gradient accumulator (parallel), or one thread with threaded matmuls; each expert's rows
    in one block (0) or in blocks of 7 (weight gradients accumulated over blocks)."""
    monkeypatch.setattr(dispatch, "FUSED_PARALLEL_EXPERTS", parallel)
    monkeypatch.setattr(dispatch, "FUSED_BLOCK_ROWS", block_rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case(300, 16, 12, 8, 3, activation, seed=5)  # float64, with skipped slots
        y_ref, g_ref = outputs_and_grads("loop", *case)
        y, grads = outputs_and_grads("fused", *case)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for gr, gr_ref in zip(grads, g_ref, strict=True):
        torch.testing.assert_close(gr, gr_ref, rtol=1e-9, atol=1e-10)


@needs_kernel
@pytest.mark.parametrize("algorithm", ["smoe", "sharede_v2", "moe_plus_plus"])
def test_one_thread_reproduces_blocked_bitwise(algorithm):
    """On one thread `fused` does `blocked`'s operations in `blocked`'s order (ReLU experts), so
    `auto` choosing it changes no number a one-thread run (the bench's CPU default) computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        results = {}
        for backend in ("blocked", "fused"):
            torch.manual_seed(1)
            layer = build_moe(algorithm, 64, 8, 32, 4, dispatch=backend)
            x.grad = None
            out = layer(x)
            (out.output.square().sum() + out.aux_loss).backward()
            results[backend] = [out.output.detach(), x.grad.clone()] + [
                p.grad.clone() for p in layer.parameters() if p.grad is not None]
    finally:
        torch.set_num_threads(threads)
    assert len(results["fused"]) == len(results["blocked"]) > 3
    for a, b in zip(results["blocked"], results["fused"], strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_threaded_kernel_is_deterministic():
    """Each thread sums a fixed share of the experts: ten calls give bitwise the same output and
    gradients (a share taken as threads free up would change the summation order by timing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = make_case(2048, 32, 24, 16, 4, "relu", seed=9, dtype=torch.float32)
        first_y, first_g = outputs_and_grads("fused", *case)
        for _ in range(9):
            y, grads = outputs_and_grads("fused", *case)
            assert torch.equal(y, first_y)
            assert all(torch.equal(a, b) for a, b in zip(grads, first_g, strict=True))
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("activation", ["relu", "geglu", "silu"])
def test_blocks_accumulate_every_bias_gradient(monkeypatch, activation):
    monkeypatch.setattr(dispatch, "FUSED_BLOCK_ROWS", 5)
    ids, act, tensors = expert_cases.make_case(90, 8, 4, 8, 2, activation, seed=7, bias=True)
    y_ref, g_ref = expert_cases.forward_backward(expert_cases.backend("loop"), ids, act, tensors)
    y, grads = expert_cases.forward_backward(expert_cases.backend("fused"), ids, act, tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert set(grads) == set(g_ref)
    for key in grads:
        torch.testing.assert_close(grads[key], g_ref[key], rtol=1e-9, atol=1e-10, msg=key)


@needs_kernel
def test_kernel_runs_for_fused_and_not_for_bf16(monkeypatch):
    """`fused` really takes the kernel in fp32/fp64 (not blocked's Python loop), and blocked's
    loop under bf16 autocast, where the kernel has no bf16 path."""
    calls = []
    monkeypatch.setattr(dispatch, "blocked_dispatch",
                        lambda *a, **k: calls.append("blocked") or dispatch._BACKENDS["blocked"](*a, **k))
    case = make_case(32, 8, 4, 8, 2, "relu", seed=2, dtype=torch.float32, holes=False)
    ref = run_experts("loop", *case)
    torch.testing.assert_close(run_experts("fused", *case), ref, rtol=1e-5, atol=1e-5)
    assert calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run_experts("fused", *case)
    assert calls == ["blocked"] and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


def test_without_a_compiler_fused_falls_back_to_blocked_with_one_line(tmp_path):
    """No C++ compiler (CXX points nowhere, empty extension cache): one line on stderr, then the
    same numbers as `blocked`, and training goes on."""
    script = (
        "import torch\n"
        "from libmoe.moe import build_moe\n"
        "from libmoe.moe.cpu_kernel import kernel_status\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 64, 16)\n"
        "ys = {}\n"
        "for backend in ('fused', 'blocked', 'fused'):\n"
        "    torch.manual_seed(1)\n"
        "    layer = build_moe('smoe', 16, 8, 8, 2, dispatch=backend)\n"
        "    out = layer(x)\n"
        "    out.output.sum().backward()\n"
        "    ys[backend] = (out.output, layer.experts.w1.grad)\n"
        "assert torch.equal(ys['fused'][0], ys['blocked'][0])\n"
        "assert torch.equal(ys['fused'][1], ys['blocked'][1])\n"
        "print(kernel_status())\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CC=str(tmp_path / "no-such-cc"),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), OMP_NUM_THREADS="1")
    env.pop("LIBMOE_CPU_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("libmoe:")]
    assert len(lines) == 1 and "could not be built" in lines[0] and "'blocked'" in lines[0], proc.stderr
    assert proc.stdout.strip().startswith("unavailable:")


@needs_kernel
def test_two_threads_under_saved_tensor_hooks_do_not_deadlock():
    """Python saved-tensor hooks (memory profilers, activation checkpointing) around the kernel
    on two threads: its workers once copied the caller's thread-local state, hooks included, and
    waited for the GIL the caller held. In a subprocess, so that a hang fails instead of hanging."""
    script = (
        "import torch\n"
        "from libmoe.moe import build_moe\n"
        "torch.set_num_threads(2)\n"
        "layer = build_moe('smoe', 32, 8, 16, 2, dispatch='fused')\n"
        "x = torch.randn(512, 32, requires_grad=True)\n"
        "with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):\n"
        "    out = layer(x)\n"
        "out.output.sum().backward()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_env_switch_skips_the_kernel_silently():
    script = ("from libmoe.moe.cpu_kernel import fused_kernel, kernel_status\n"
              "assert fused_kernel() is None\nprint(kernel_status())\n")
    env = dict(os.environ, LIBMOE_CPU_KERNEL="0")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "unavailable: LIBMOE_CPU_KERNEL=0" and proc.stderr == ""


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `fn()` runs forward
    (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_fused_saves_no_more_than_the_dense_ffn_plus_indices(activation):
    """Deliver: the activations kept for backward are no larger than the compute-matched dense
    FFN's plus the routing indices (token and position per assignment, the counts)."""
    T, D, E, M, K = 512, 32, 16, 16, 4
    x = torch.randn(T, D, requires_grad=True)
    act = ACTIVATIONS[activation]
    layer = build_moe("smoe", D, E, M, K, dispatch="fused", activation=activation)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K, requires_grad=True)
    _, moe = saved_bytes(lambda: run_experts("fused", x, ids, weights, layer.experts.w1,
                                             layer.experts.w2, layer.experts.w3, act))
    w1 = torch.nn.Linear(D, K * M, bias=False)
    w3 = torch.nn.Linear(D, K * M, bias=False) if act.gated else None
    w2 = torch.nn.Linear(K * M, D, bias=False)

    def dense():
        a = act.fn(w1(x))
        return w2(a * w3(x) if w3 is not None else a)

    _, dense_bytes = saved_bytes(dense)
    indices = 2 * T * K * 8 + E * 8  # tok, pos (int64) and counts
    routing_weights = T * K * 4  # the [T, K] weights themselves (their gradient needs them)
    assert moe <= dense_bytes + indices + routing_weights, (moe, dense_bytes)
