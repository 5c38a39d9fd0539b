"""The comparison table reproduces the paper's own AVG and AVG rank from its Table 2 scores."""

import json

import pytest

from libmoe.eval.table import (
    comparison_csv,
    comparison_markdown,
    comparison_rows,
    read_results,
    results_table,
)

COLUMNS = ["lambada_openai", "blimp", "cbt", "hellaswag", "piqa", "arc_easy", "race", "social_i_qa",
           "commonsense_qa"]
# LibMoE paper, Table 2, small model (158M): PPL, nine task scores (%), AVG, AVG rank.
PAPER_158M = {
    "Dense": (17.04, [19.74, 73.48, 81.03, 27.56, 55.82, 32.09, 29.36, 35.72, 25.14], 42.22, 6.78),
    "SMoE": (13.63, [25.27, 77.71, 84.18, 29.43, 57.94, 32.68, 30.11, 35.62, 24.65], 44.18, 4.56),
    "XMoE": (13.98, [24.57, 76.53, 84.12, 29.34, 58.27, 32.26, 29.69, 35.47, 24.49], 43.86, 4.44),
    "sigma-MoE": (13.61, [25.43, 77.38, 84.23, 29.13, 58.92, 32.73, 31.05, 34.90, 24.90], 44.30, 6.56),
    "SharedE-V2": (13.49, [25.29, 77.37, 84.33, 29.38, 60.17, 33.83, 31.02, 35.57, 24.98], 44.66, 3.00),
    "SharedE-V3": (13.42, [25.49, 77.20, 84.40, 29.38, 59.14, 32.52, 30.60, 35.57, 25.47], 44.42, 3.44),
    "TC-MoE": (13.51, [25.60, 76.91, 84.68, 29.27, 59.03, 33.02, 30.63, 36.03, 26.37], 44.62, 2.89),
    "MoE++": (13.54, [25.45, 77.23, 84.83, 29.28, 58.49, 33.49, 30.11, 35.62, 24.49], 44.33, 4.00),
}


def paper_models():
    return {name: {"val_ppl": {"ppl": ppl}, **{t: {"acc": s / 100} for t, s in zip(COLUMNS, scores)}}
            for name, (ppl, scores, _, _) in PAPER_158M.items()}


def test_avg_and_avg_rank_match_the_paper():
    tasks, rows = comparison_rows(paper_models())
    assert tasks == COLUMNS  # the paper's column order
    for row in rows:
        ppl, scores, avg, avg_rank = PAPER_158M[row["model"]]
        assert row["ppl"] == ppl
        assert row["avg"] == pytest.approx(avg, abs=0.005)
        # AVG rank excludes PPL and ties share their mean rank: SMoE ties on RACE and SIQA, and
        # 4.56 needs the mean (first rank would give 4.44). The printed table's other AVG ranks
        # do not follow from its printed, rounded scores (XMoE's 4.44 and sigma-MoE's 6.56 look
        # swapped: these scores give 6.61 and 4.44), so only these three rows are checked.
        if row["model"] in ("Dense", "SMoE", "TC-MoE"):
            assert row["avg_rank"] == pytest.approx(avg_rank, abs=0.005)


def test_ties_share_the_mean_of_their_ranks():
    models = {n: {"piqa": {"acc": a}, "boolq": {"acc": b}} for n, a, b in
              [("x", 0.5, 0.9), ("y", 0.5, 0.1), ("z", 0.2, 0.1)]}
    _, rows = comparison_rows(models)
    # piqa ranks 1.5, 1.5, 3; boolq 1, 2.5, 2.5.
    assert [r["avg_rank"] for r in rows] == [1.25, 2.0, 2.75]


def test_markdown_and_csv_layout():
    models = paper_models()
    models["Dense"]["blimp_adjunct_island"] = {"acc": 0.5}  # a group's member is not a column
    tasks, rows = comparison_rows(models)
    md = comparison_markdown(tasks, rows).splitlines()
    assert md[0] == ("| Model | PPL ↓ | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC-Easy | RACE | SIQA | "
                     "CommonsenseQA | AVG ↑ | AVG Rank ↓ |")
    assert md[2] == ("| Dense | 17.04 | 19.74% | 73.48% | 81.03% | 27.56% | 55.82% | 32.09% | 29.36% | "
                     "35.72% | 25.14% | 42.22% | 6.78 |")
    csv = comparison_csv(tasks, rows).splitlines()
    assert csv[0] == "model,ppl," + ",".join(COLUMNS) + ",avg,avg_rank"
    assert csv[1].startswith("Dense,17.04,19.74,73.48,")


def test_missing_scores_leave_avg_blank_and_acc_norm_is_chosen_where_present():
    models = {"a": {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "blimp": {"acc": 0.8}},
              "b": {"piqa": {"acc": 0.5, "acc_norm": 0.9}}}
    tasks, rows = comparison_rows(models, metric="acc_norm")
    assert tasks == ["blimp", "piqa"]
    assert rows[0]["piqa"] == pytest.approx(70.0) and rows[0]["blimp"] == pytest.approx(80.0)  # acc
    assert rows[1]["blimp"] is None and rows[1]["avg"] is None and rows[1]["avg_rank"] is None
    assert rows[0]["avg"] == pytest.approx(75.0) and rows[0]["avg_rank"] == pytest.approx(1.5)


def test_reads_libmoe_and_harness_result_files(tmp_path):
    run = tmp_path / "tiny-smoe" / "eval"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(
        {"results": {"piqa": {"acc": 0.6, "n": 4}}, "config": {"model": str(tmp_path / "tiny-smoe")}}))
    assert read_results(run / "results.json") == ("tiny-smoe", {"piqa": {"acc": 0.6, "n": 4}})
    harness = tmp_path / "h.json"
    harness.write_text(json.dumps({"results": {"social_iqa": {"alias": "social_iqa", "acc,none": 0.4,
                                                              "acc_stderr,none": 0.1}},
                                   "config": {"model": "libmoe", "model_args": "pretrained=runs/x,"
                                              "batch_size=8"}}))
    name, results = read_results(harness)
    assert name == "x" and results == {"social_i_qa": {"alias": "social_iqa", "acc": 0.4,
                                                       "acc_stderr": 0.1}}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="no \"results\" mapping"):
        read_results(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no results file"):
        read_results(tmp_path / "none.json")


def test_single_model_table_hides_group_members():
    table = results_table({"blimp_adjunct_island": {"acc": 0.5, "n": 2},
                           "blimp": {"acc": 0.75, "n": 4, "subtasks": 2},
                           "lambada_openai": {"acc": 0.25, "perplexity": 40.0, "n": 4}})
    assert table.splitlines() == ["| task | acc | perplexity | n |", "|---|---|---|---|",
                                  "| blimp | 0.7500 |  | 4 |", "| lambada_openai | 0.2500 | 40.0000 | 4 |"]
