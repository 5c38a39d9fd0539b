"""The findings' statistics (libmoe.findings.stats) and input helpers (libmoe.findings.inputs)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from findings_fixtures import make_trace

from libmoe.findings.inputs import same_units, sequence_ids, unit_sums
from libmoe.findings.stats import (
    MIN_UNITS,
    RESAMPLES,
    SCOPE_RUN,
    Z975,
    bootstrap_part,
    combine,
    judge,
    multiplicities,
    overturn_spread,
    part,
    percentile_interval,
    seeds_part,
    stratified_multiplicities,
    t_interval,
    weighted_mean,
)


def test_multiplicities_are_resamples_and_seeded():
    w = multiplicities(7, 500, seed=3)
    assert w.shape == (500, 7) and torch.all(w.sum(1) == 7) and w.dtype == torch.float64
    assert torch.equal(w, multiplicities(7, 500, seed=3))
    assert not torch.equal(w, multiplicities(7, 500, seed=4))
    assert multiplicities(4).shape == (RESAMPLES, 4) and RESAMPLES >= 1000


def test_stratified_multiplicities_keep_each_group_size():
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    w = stratified_multiplicities(groups, 300)
    for g in (0, 1, 2):
        assert torch.all(w[:, groups == g].sum(1) == int((groups == g).sum()))


def test_bootstrap_interval_covers_the_mean_of_a_known_sample():
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randn(400, generator=g, dtype=torch.float64)
    low, high = percentile_interval(weighted_mean(multiplicities(len(x)), x))
    se = float(x.std()) / math.sqrt(len(x))
    assert low < float(x.mean()) < high
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal interval's width
    # unit sums with counts: the ratio of resampled sums
    sums, counts = torch.tensor([2.0, 4.0, 9.0]), torch.tensor([1.0, 2.0, 3.0])
    ones = torch.ones(1, 3, dtype=torch.float64)
    assert float(weighted_mean(ones, sums, counts)[0]) == pytest.approx(15 / 6)


def test_t_interval_matches_the_t_table():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.303 * statistics.stdev([1, 2, 3]) / math.sqrt(3))
    with pytest.raises(ValueError):
        t_interval([1.0])


def test_judge_and_combine():
    assert judge(0.1, 0.3) == "reproduced" and judge(-0.3, -0.1) == "not_reproduced"
    assert judge(-0.1, 0.1) == "inconclusive" and judge(math.nan, 1.0) == "inconclusive"
    assert judge(-0.3, -0.1, sign=-1) == "reproduced" and judge(0.1, 0.3, sign=-1) == "not_reproduced"
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["reproduced", "not_reproduced", "inconclusive"]) == "not_reproduced"
    assert combine(["reproduced", "inconclusive"]) == "inconclusive"
    assert combine(["reproduced", "not_applicable"]) == "reproduced"
    assert combine(["not_applicable"]) == combine([]) == "not_applicable"


def test_too_few_units_are_inconclusive():
    samples = torch.full((100,), 1.0)
    assert bootstrap_part("x", 1.0, samples, 1, MIN_UNITS, "u")["verdict"] == "reproduced"
    few = bootstrap_part("x", 1.0, samples, 1, MIN_UNITS - 1, "u")
    assert few["verdict"] == "inconclusive" and "fewer than" in few["why"]


def test_parts_say_their_scope():
    one = bootstrap_part("x", 1.0, torch.full((100,), 1.0), 1, MIN_UNITS, "u")
    assert one["scope"] == SCOPE_RUN == "this training run" and one["seeds"] == 1
    many = seeds_part("x", [0.1, 0.3, 0.2], 1)
    assert many["scope"] == "over 3 seeds" and many["seeds"] == 3
    assert many["seed_spread"] == pytest.approx(0.1)  # the sample sd of the per-seed values


def test_overturn_spread_is_the_seed_sd_that_leaves_a_part_undecided():
    # no evaluation noise: |estimate| / 1.96
    assert overturn_spread(part("x", -0.02, -0.02, -0.02, -1, "m", seeds=1)) == pytest.approx(0.02 / Z975)
    # evaluation sd e (the interval's end nearest 0 is 1.96 e away): sqrt((D / 1.96)^2 - e^2)
    d, e = 0.05, 0.01
    p = part("x", d, d - Z975 * e, d + 3 * e, 1, "m", seeds=1)
    s_star = overturn_spread(p)
    assert s_star == pytest.approx(math.sqrt((d / Z975) ** 2 - e * e))
    # at s*, the interval D +- 1.96 sqrt(s*^2 + e^2) just reaches 0
    assert d - Z975 * math.sqrt(s_star ** 2 + e * e) == pytest.approx(0.0, abs=1e-12)
    # contradicted parts too; undecided and multi-seed parts have none
    assert overturn_spread(part("x", 0.05, 0.03, 0.07, -1, "m", seeds=1)) > 0
    assert overturn_spread(part("x", 0.01, -0.01, 0.03, 1, "m", seeds=1)) is None
    assert overturn_spread(seeds_part("x", [0.1, 0.3, 0.2], 1)) is None


def test_sequence_ids_and_unit_sums():
    t = make_trace([torch.zeros(6, 2, dtype=torch.long)], [torch.ones(6, 2)], seq_len=3, step=1, n_slots=4)
    ids = sequence_ids(t)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1]
    sums, counts = unit_sums(torch.arange(6.0), ids, 2, mask=torch.tensor([True] * 5 + [False]))
    assert sums.tolist() == [3.0, 7.0] and counts.tolist() == [3.0, 2.0]
    other = make_trace([torch.zeros(6, 2, dtype=torch.long)], [torch.ones(6, 2)], seq_len=2, step=2,
                       n_slots=4)
    assert same_units([t, other])  # the same tokens
    t.position = torch.full((6,), 5)  # no restart: every token its own unit
    assert sequence_ids(t).tolist() == list(range(6))
