"""Scale-aware constants of the paper algorithms (issue 22): MoE++'s zero-computation slot counts
scale with E; older files keep their fixed 1/1/6 layout."""

import pytest
import torch

from libmoe.moe import build_moe, layer_options, legacy_options, scaled_options
from libmoe.moe.routers import MoEPlusPlusRouter, paper_slot_count

D, M, K = 16, 8, 2
COUNTS = ("n_zero", "n_copy", "n_const")


def _counts(layer):
    return tuple(layer.opts.extra[k] for k in COUNTS)


# -- MoE++ slot counts -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts, counts", [
    (4, (1, 1, 1)), (16, (1, 1, 1)), (22, (1, 1, 2)), (33, (1, 1, 3)), (66, (1, 1, 6)),
    (99, (2, 2, 9)), (132, (2, 2, 12)),
])
def test_moe_plus_plus_counts_scale_with_e_at_the_paper_ratio(n_experts, counts):
    layer = build_moe("moe_plus_plus", D, n_experts, M, K)
    assert _counts(layer) == counts
    assert layer.router.n_slots == n_experts + sum(counts)
    assert layer.router.const_proj.shape == (counts[2], 2, D)
    assert tuple(paper_slot_count(p, n_experts) for p in (1, 1, 6)) == counts


def test_moe_plus_plus_paper_shape_keeps_the_papers_8_of_74_slots():
    assert MoEPlusPlusRouter.PAPER_SLOTS == {"n_zero": 1, "n_copy": 1, "n_const": 6}
    with torch.device("meta"):
        layer = build_moe("moe_plus_plus", 512, 66, 128, 8)
    assert layer.router.n_slots == 74


@pytest.mark.parametrize("options", [{"n_zero": 0}, {"n_copy": 0, "n_const": 0},
                                     {"n_zero": 3, "n_copy": 2, "n_const": 6}])
def test_explicit_moe_plus_plus_counts_are_used_as_given(options):
    layer = build_moe("moe_plus_plus", D, 16, M, K, **options)
    expected = {**dict(zip(COUNTS, (1, 1, 1))), **options}
    assert _counts(layer) == tuple(expected[k] for k in COUNTS)
    assert layer.router.n_slots == 16 + sum(expected.values())
    layer(torch.randn(2, 5, D))


@pytest.mark.parametrize("name, value", [("n_zero", -1), ("n_const", 1.5), ("n_copy", "one")])
def test_bad_moe_plus_plus_counts_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name}="):
        build_moe("moe_plus_plus", D, 16, M, K, **{name: value})


def test_scaled_options_name_the_resolved_counts():
    assert scaled_options("moe_plus_plus", D, 16, K) == {"n_zero": 1, "n_copy": 1, "n_const": 1}
    assert scaled_options("moe_plus_plus", D, 66, 8, n_const=2) == {"n_zero": 1, "n_copy": 1,
                                                                    "n_const": 2}
    assert scaled_options("moe_plus_plus", D, 16, K, output_dim=24)["n_const"] == 0
    assert scaled_options("smoe", D, 16, K) == {} == scaled_options("dense", D, 16, K)
    assert layer_options("moe_plus_plus", D, 16, K).extra["n_const"] == 1


def test_legacy_options_recognise_the_fixed_1_1_6_layout():
    # E = 16 saved before the counts scaled: 16 + 8 router rows and no counts in its options
    assert legacy_options("moe_plus_plus", D, 16, K, 24) == {"n_zero": 1, "n_copy": 1, "n_const": 6}
    assert legacy_options("moe_plus_plus", D, 16, K, 19) == {}  # today's layout: nothing to add
    assert legacy_options("moe_plus_plus", D, 66, 8, 74) == {}  # E = 66: both layouts agree
    assert legacy_options("moe_plus_plus", D, 16, K, 30) == {}  # nothing explains 30 rows
    # explicit counts were saved as given: only the unset ones take their old value
    assert legacy_options("moe_plus_plus", D, 16, K, 19, n_const=1) == {}
    assert legacy_options("moe_plus_plus", D, 132, 8, 139, n_const=5) == {"n_zero": 1, "n_copy": 1}
    assert legacy_options("smoe", D, 16, K, 16) == {}
    layer = build_moe("moe_plus_plus", D, 16, M, K, **legacy_options("moe_plus_plus", D, 16, K, 24))
    assert layer.router.n_slots == 24
