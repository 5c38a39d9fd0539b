"""Balance loss and auxiliary-loss-free bias balancing (ALGORITHMS.md section 2)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from libmoe.moe import attach_bias_balancing, build_moe, update_bias_balancing
from libmoe.moe import functional as fn


def test_balance_loss_hand_computed():
    # 2 tokens, 3 experts, k = 1: token 0 -> e0, token 1 -> e0. f = [1, 0, 0].
    p = torch.tensor([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    idx = torch.tensor([[0], [0]])
    # N * sum f P = 3 * (1 * 0.6) = 1.8
    assert fn.balance_loss(p, idx, scope="batch").item() == pytest.approx(1.8)
    # per sequence of one token: 3 * 0.5 and 3 * 0.7 -> mean 1.8 too; now mix choices:
    idx = torch.tensor([[0], [2]])
    assert fn.balance_loss(p, idx, scope="batch").item() == pytest.approx(3 * (0.5 * 0.6 + 0.5 * 0.175))
    assert fn.balance_loss(p, idx, seq_len=1).item() == pytest.approx((3 * 0.5 + 3 * 0.1) / 2)


def test_balance_loss_is_one_for_uniform_probabilities_whatever_the_choice():
    T, N = 12, 5
    p = torch.full((T, N), 1.0 / N)
    idx = torch.randint(0, N, (T, 2))
    for scope in ("sequence", "batch", "global"):
        assert fn.balance_loss(p, idx, seq_len=4, scope=scope).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["smoe", "sigma_moe", "sharede_v2", "sharede_v3", "xmoe",
                                  "cosine", "perturbed_cosine", "hyper"])
def test_layer_aux_loss_equals_alpha_when_router_is_uniform(name):
    torch.manual_seed(0)
    layer = build_moe(name, 8, 4, 4, 2, balance_coef=0.01)
    router = layer.router
    with torch.no_grad():
        if name == "xmoe":
            router.expert_embeddings.fill_(1.0)  # identical expert embeddings: equal logits
        elif name == "hyper":
            router.hypernet[2].weight.zero_()
        else:
            router.weight.zero_()
    out = layer(torch.randn(2, 6, 8))
    assert out.aux_loss.item() == pytest.approx(0.01, abs=1e-7)


def _skewed_layer(gamma):
    torch.manual_seed(0)
    layer = build_moe("smoe", 16, 8, 8, 2, bias_balancing=gamma, balance_coef=0.0)
    with torch.no_grad():
        # Experts 0 and 1 win for most (positive) tokens.
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[0] += 0.3
        layer.router.weight[1] += 0.2
    return layer


def _load_stats(layer, x):
    idx = layer(x).routing.topk_idx
    q = torch.bincount(idx.flatten(), minlength=8).float()
    q = q / q.sum()
    return q.max().item(), (q.sum() ** 2 / (8 * (q**2).sum())).item()


def test_bias_balancing_drives_a_skewed_router_toward_even_load():
    layer = _skewed_layer(gamma=0.003)
    x = torch.randn(512, 16).abs()  # positive inputs so the skewed rows dominate
    max0, jain0 = _load_stats(layer, x)
    assert max0 > 0.4
    layer.train()
    for _ in range(300):
        layer.router(x, seq_len=512)  # routing only: the experts do not affect the counts
        update_bias_balancing(layer)
    max1, jain1 = _load_stats(layer, x)
    assert max1 < 0.2 and jain1 > 0.95 and jain0 < 0.3
    assert layer.router.expert_bias[:2].max() < layer.router.expert_bias[2:].min()
    assert not layer.router.expert_bias.requires_grad


def test_bias_is_updated_by_optimizer_hook_and_not_in_eval():
    layer = _skewed_layer(gamma=0.01)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    attach_bias_balancing(layer, opt)
    x = torch.randn(64, 16).abs()
    layer.eval()
    layer(x)
    opt.step()
    assert layer.router.expert_bias.abs().sum() == 0  # eval forwards do not count
    layer.train()
    out = layer(x)
    out.output.sum().backward()
    opt.step()
    assert layer.router.expert_bias.abs().sum() > 0
    assert layer.router.load_counts.sum() == 0  # counts reset after the update


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = _skewed_layer(gamma=0.5)
        torch.manual_seed(100 + rank)  # each rank sees different tokens
        x = torch.randn(32, 16).abs()
        layer.train()
        counts = torch.bincount(layer(x).routing.topk_idx.flatten(), minlength=8).float()
        update_bias_balancing(layer)
        results[rank] = (counts, layer.router.expert_bias.clone())
        # global balance scope: f from all ranks' counts
        g = build_moe("smoe", 16, 8, 8, 2, balance_scope="global")
        results[f"global{rank}"] = g(x).aux["balance"].item()
    finally:
        dist.destroy_process_group()


def test_bias_balancing_all_reduces_counts_across_ranks():
    results = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    (c0, b0), (c1, b1) = results[0], results[1]
    total = c0 + c1
    expected = 0.5 * torch.sign(total.mean() - total)
    torch.testing.assert_close(b0, expected)
    torch.testing.assert_close(b1, expected)
    assert not torch.equal(c0, c1)  # the ranks did see different loads
