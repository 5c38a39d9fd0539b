"""Task formats (the harness's prompts) on real records, and the metrics' definitions."""

import json
from pathlib import Path

import pytest

from libmoe.eval.evaluator import evaluate_tasks, score_task
from libmoe.eval.tasks import TASKS, Doc, get_task, load_records

EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
needs_eval = pytest.mark.skipif(not EVAL.is_dir(), reason="shared eval data not present")


@needs_eval
def test_piqa_and_arc_prompts_on_real_records():
    piqa = load_records(get_task("piqa"), EVAL, limit=3)
    assert len(piqa) == 3
    doc = get_task("piqa").to_doc(piqa[0])
    assert doc.context == f"Question: {piqa[0]['goal']}\nAnswer:"
    assert doc.choices == [piqa[0]["sol1"], piqa[0]["sol2"]] and doc.gold == piqa[0]["label"]
    arc = load_records(get_task("arc_easy"), EVAL, limit=50)
    for record in arc:
        doc = get_task("arc_easy").to_doc(record)
        assert doc.choices[doc.gold] == record["choices"]["text"][
            record["choices"]["label"].index(record["answerKey"])]
        assert doc.context.startswith("Question: ") and doc.context.endswith("\nAnswer:")


def test_hellaswag_preprocessing_like_the_harness():
    record = {"activity_label": "Making a cake", "ctx_a": "A woman mixes flour [header] in a bowl.",
              "ctx_b": "then she", "endings": [" adds  eggs [step] slowly.", "sings."], "label": 0}
    doc = get_task("hellaswag").to_doc(record)
    assert doc.context == "Making a cake: A woman mixes flour in a bowl. Then she"
    assert doc.choices == ["adds eggs slowly.", "sings."] and doc.gold == 0
    titled = dict(record, ctx_a="Cakes [title] Mix the flour.", ctx_b="")
    assert get_task("hellaswag").to_doc(titled).context.startswith("Making a cake: Cakes. Mix")


def test_lambada_target_is_the_last_word():
    doc = get_task("lambada_openai").to_doc({"text": "He opened the door and saw his brother"})
    assert doc.context == "He opened the door and saw his" and doc.choices == ["brother"]


class FixedScorer:
    """Returns preset log-likelihoods per continuation, to check the metric arithmetic."""

    def __init__(self, table):
        self.table, self.requests = table, []

    def loglikelihood(self, requests, desc=None):
        self.requests += requests
        return [self.table[cont] for _, cont in requests]


def test_acc_and_acc_norm_definitions():
    # Choice "a" has the higher total, "bbbbbbbbbb" the higher per-character score.
    scorer = FixedScorer({" a": (-2.0, False), " bbbbbbbbbb": (-5.0, False)})
    docs = [Doc("q1", ["a", "bbbbbbbbbb"], 0), Doc("q2", ["a", "bbbbbbbbbb"], 1)]
    result = score_task(scorer, get_task("piqa"), docs)
    assert (result["acc"], result["acc_norm"], result["acc_bytes"], result["n"]) == (0.5, 0.5, 0.5, 2)
    assert result["acc_stderr"] == pytest.approx(0.5)  # sqrt(var_ddof1 / n) = sqrt(0.5 / 2)
    assert scorer.requests[:2] == [("q1", " a"), ("q1", " bbbbbbbbbb")]  # delimiter " "
    only_gold_1 = score_task(scorer, get_task("piqa"), [docs[1]])
    assert only_gold_1["acc"] == 0.0 and only_gold_1["acc_norm"] == 1.0


def test_lambada_metrics():
    scorer = FixedScorer({" dog": (-1.0, True), " cat": (-3.0, False)})
    docs = [Doc("the", ["dog"]), Doc("a", ["cat"])]
    result = score_task(scorer, get_task("lambada_openai"), docs)
    assert result["acc"] == 0.5 and result["perplexity"] == pytest.approx(2.718281828**2)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'piqq'.*piqa.*Known tasks"):
        evaluate_tasks(None, ["piqq"])
    missing = r"arc_easy.test.jsonl.*allenai/ai2_arc \(config ARC-Easy\), split test"
    with pytest.raises(FileNotFoundError, match=missing):
        load_records(get_task("arc_easy"), tmp_path)


def test_local_file_limit(tmp_path):
    with (tmp_path / "piqa.validation.jsonl").open("w") as f:
        for i in range(5):
            f.write(json.dumps({"goal": f"g{i}", "sol1": "x", "sol2": "y", "label": i % 2}) + "\n")
    assert [r["goal"] for r in load_records(TASKS["piqa"], tmp_path, limit=3)] == ["g0", "g1", "g2"]
    assert len(load_records(TASKS["piqa"], tmp_path)) == 5


@needs_eval
def test_social_i_qa_and_commonsense_qa_prompts():
    siqa = load_records(get_task("social_i_qa"), EVAL, limit=1)[0]
    doc = get_task("social_i_qa").to_doc(siqa)
    assert doc.context == f"Q: {siqa['context']} {siqa['question']}\nA:"
    assert doc.choices == [siqa["answerA"], siqa["answerB"], siqa["answerC"]]
    assert doc.gold == int(siqa["label"]) - 1
    csqa = load_records(get_task("commonsense_qa"), EVAL, limit=1)[0]
    doc = get_task("commonsense_qa").to_doc(csqa)
    lines = doc.context.split("\n")
    assert lines[0] == f"Question: {csqa['question'].strip()}" and lines[-1] == "Answer:"
    assert lines[1:6] == [f"{l}. {t}" for l, t in zip("ABCDE", csqa["choices"]["text"])]
    assert doc.choices == ["A", "B", "C", "D", "E"] and "ABCDE"[doc.gold] == csqa["answerKey"]


class LengthScorer:
    """Shorter continuations are more likely: a scorer whose choices are easy to predict."""

    def __init__(self):
        self.requests = []

    def loglikelihood(self, requests, desc=None):
        self.requests += requests
        return [(-float(len(cont)), False) for _, cont in requests]


@needs_eval
def test_blimp_group_is_the_mean_of_its_67_paradigms():
    scorer = LengthScorer()
    results = evaluate_tasks(scorer, ["blimp"], EVAL, limit=4)
    paradigms = [t for t in TASKS if t.startswith("blimp_")]
    assert len(paradigms) == 67 and results["blimp"]["subtasks"] == 67
    expected = {}
    for name in paradigms:
        records = load_records(TASKS[name], EVAL, limit=4)
        expected[name] = sum(len(r["sentence_good"]) <= len(r["sentence_bad"]) for r in records) / 4
        assert results[name]["acc"] == expected[name]
    assert results["blimp"]["acc"] == pytest.approx(sum(expected.values()) / 67)
    assert results["blimp"]["n"] == 67 * 4
    assert all(context == "" for context, _ in scorer.requests)  # empty context, then " " + sentence
    assert scorer.requests[0][1] == " " + load_records(TASKS[paradigms[0]], EVAL, limit=1)[0]["sentence_good"]


CBT = {"sentences": [f"Sentence {i} about the king ." for i in range(19)] + ["The queen smiled ."],
       "question": "Then XXXXX went to the castle .", "answer": "queen",
       "options": ["king", "queen", "castle", "dog", "cat", "bird", "tree", "road", "sea", "sun"]}


def test_cbt_scores_the_query_sentence_with_each_candidate(tmp_path):
    doc = get_task("cbt_ne").to_doc(CBT)
    assert doc.context.startswith("Sentence 0 about the king . Sentence 1") and doc.context.endswith(
        "The queen smiled .")
    assert doc.choices[1] == "Then queen went to the castle ." and len(doc.choices) == 10 and doc.gold == 1
    for name in ("cbt_cn", "cbt_ne"):
        (tmp_path / f"{name}.test.jsonl").write_text(json.dumps(CBT) + "\n")
    # Shorter continuations win: "Then dog/cat/sun went ..." beat "queen"; the group is the mean.
    results = evaluate_tasks(LengthScorer(), ["cbt"], tmp_path)
    assert results["cbt_cn"]["acc"] == results["cbt_ne"]["acc"] == results["cbt"]["acc"] == 0.0
    assert results["cbt"]["subtasks"] == 2 and results["cbt"]["n"] == 2


def test_acc_bytes_differs_from_acc_norm_on_non_ascii_choices():
    # Both choices have 3 characters; "été" has 5 bytes. Per character "abc" wins (-3 > -3.3),
    # per byte "été" wins (-3.3 / 5 > -3 / 3).
    scorer = FixedScorer({" abc": (-3.0, False), " été": (-3.3, False)})
    result = score_task(scorer, get_task("piqa"), [Doc("q", ["abc", "été"], 1)])
    assert (result["acc"], result["acc_norm"], result["acc_bytes"]) == (0.0, 0.0, 1.0)
    assert result["acc_stderr"] is None  # one document: no spread


def test_multiple_input_scores_contexts_with_one_continuation():
    doc = get_task("winogrande").to_doc({"sentence": "Ann helped Bo because _ was kind.",
                                         "option1": "Ann", "option2": "Bo", "answer": "1"})
    assert get_task("winogrande").requests(doc) == [("Ann helped Bo because Ann", " was kind."),
                                                     ("Ann helped Bo because Bo", " was kind.")]
    # acc_norm normalises by the contexts' lengths, as the harness does for multiple inputs.
    scorer = FixedScorer({})
    scorer.loglikelihood = lambda reqs, desc=None: [(-2.0, False), (-1.95, False)]
    result = score_task(scorer, get_task("winogrande"), [doc])
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0  # -2/25 > -1.95/24
