"""libmoe.vlm.evaluate: MME scoring by hand, whole pairs under a limit, open-answer normalisation,
and the yes/no choice going to the higher log-likelihood."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from libmoe.vlm.evaluate import _limit_per_category, check_tasks, evaluate_vlm, score_mme, score_open


def _pair(category, pair, first="Yes"):
    second = "No" if first == "Yes" else "Yes"
    return [{"question_id": f"{pair}_0", "image": f"{pair}.png", "question": "q?", "answer": first,
             "category": category, "pair": pair},
            {"question_id": f"{pair}_1", "image": f"{pair}.png", "question": "q?", "answer": second,
             "category": category, "pair": pair}]


def test_score_mme_by_hand():
    rows = (_pair("colour", "a1") + _pair("colour", "a2")
            + _pair("count", "b1", "No") + _pair("count", "b2") + _pair("count", "b3"))
    preds = ["Yes", "No",      # a1: both right           -> pair right
             "No", "No",       # a2: one right            -> pair wrong
             "yes", " Yes ",   # b1 (No, Yes): one right (case and spaces do not matter)
             "YES", "no",      # b2: both right
             "No", "Yes"]      # b3: both wrong
    # colour: acc 3/4, acc+ 1/2, score 100 * (0.75 + 0.5) = 125
    # count:  acc 3/6, acc+ 1/3, score 100 * (0.5 + 1/3) = 83.33
    # overall: acc 6/10, acc+ 2/5, score 208.33; chance 75 per category
    r = score_mme(rows, preds)
    c = r["by_category"]
    assert set(c) == {"colour", "count"}
    assert c["colour"]["acc"] == pytest.approx(0.75) and c["colour"]["acc_plus"] == pytest.approx(0.5)
    assert c["colour"]["score"] == pytest.approx(125.0) and c["colour"]["n"] == 4
    assert c["count"]["acc"] == pytest.approx(0.5) and c["count"]["acc_plus"] == pytest.approx(1 / 3)
    assert c["count"]["score"] == pytest.approx(100 * (0.5 + 1 / 3)) and c["count"]["n"] == 6
    assert r["acc"] == pytest.approx(0.6) and r["acc_plus"] == pytest.approx(0.4)
    assert r["score"] == pytest.approx(125.0 + 100 * (0.5 + 1 / 3))
    assert r["n"] == 10
    assert r["chance"] == {"acc": 0.5, "acc_plus": 0.25, "score": 150.0}


def test_score_mme_pairs_default_to_the_image_and_stay_within_a_category():
    rows = _pair("colour", "x") + _pair("count", "x")
    for r in rows:
        del r["pair"]  # pairs by image: both categories use x.png
    r = score_mme(rows, ["Yes", "No", "Yes", "Yes"])
    assert r["by_category"]["colour"]["acc_plus"] == 1.0
    assert r["by_category"]["count"]["acc_plus"] == 0.0
    assert r["acc_plus"] == 0.5 and r["acc"] == 0.75


def test_limit_per_category_keeps_whole_pairs():
    colour = [p for i in range(4) for p in _pair("colour", f"c{i}")]
    count = [p for i in range(3) for p in _pair("count", f"n{i}", "No")]
    rows = []  # the categories interleaved pair by pair
    for i in range(4):
        rows += colour[2 * i: 2 * i + 2] + count[2 * i: 2 * i + 2]
    for limit in (1, 2, 3, 4, 5, 100):
        kept = _limit_per_category(rows, limit, paired=True)
        pairs = Counter(r["pair"] for r in kept)
        assert all(n == 2 for n in pairs.values()), (limit, pairs)
        per_cat = Counter(r["category"] for r in kept)
        for cat, total in (("colour", 8), ("count", 6)):
            want = min(total, limit + limit % 2)  # rounded up to whole pairs
            assert per_cat[cat] == want, (limit, cat)
        assert kept == [r for r in rows if r in kept]  # order kept
        assert score_mme(kept, [r["answer"] for r in kept])["acc_plus"] == 1.0
    flat = _limit_per_category(rows, 3, paired=False)
    assert Counter(r["category"] for r in flat) == {"colour": 3, "count": 3}


def test_score_open_normalisation():
    rows = [{"category": "colour", "answer": "red"}, {"category": "colour", "answer": "red"},
            {"category": "colour", "answer": "blue"}, {"category": "count", "answer": 3},
            {"category": "count", "answer": "Three"}, {"category": "count", "answer": "four"}]
    preds = ["Red.", " RED! ", "dark blue", "3", "three", "five"]
    r = score_open(rows, preds)
    assert r["by_category"]["colour"] == {"acc": pytest.approx(2 / 3), "n": 3}
    assert r["by_category"]["count"] == {"acc": pytest.approx(2 / 3), "n": 3}
    assert r["acc"] == pytest.approx(4 / 6) and r["n"] == 6


def test_check_tasks():
    assert check_tasks(["synth_mme", "synth_open"]) == ["synth_mme", "synth_open"]
    with pytest.raises(ValueError, match="Did you mean synth_open"):
        check_tasks(["synth_opn"])


class _Stub(nn.Module):
    """Says "yes" exactly when the prompt holds `word` (whatever the image)."""

    n_image_tokens, pixel_size = 1, 32

    def __init__(self, tok, word):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.word, self.yes, self.no = (tok.convert_tokens_to_ids(w) for w in (word, "yes", "no"))
        self.vocab = len(tok)

    def forward(self, ids, pixels, mask=None):
        assert pixels.shape == (ids.shape[0], 3, 32, 32)
        logits = torch.zeros(*ids.shape, self.vocab)
        says_yes = (ids == self.word).any(dim=1)
        logits[says_yes, :, self.yes] = 4.0
        logits[~says_yes, :, self.no] = 4.0
        return SimpleNamespace(logits=logits)


def test_mme_answer_is_the_more_likely_one(tmp_path):
    """The original lmms-eval loader returned the loss as the log-likelihood, inverting every choice."""
    from PIL import Image

    from libmoe.vlm.text import word_tokenizer

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    rows = [{"question_id": "r0", "image": "red.png", "question": "Is the square red?", "answer": "Yes",
             "category": "colour", "pair": "p0"},
            {"question_id": "r1", "image": "red.png", "question": "Is the square blue?", "answer": "No",
             "category": "colour", "pair": "p0"},
            {"question_id": "r2", "image": "red.png", "question": "Is there a blue square?", "answer": "No",
             "category": "existence", "pair": "p1"},
            {"question_id": "r3", "image": "red.png", "question": "Is there a red square?", "answer": "Yes",
             "category": "existence", "pair": "p1"}]
    (tmp_path / "mme.json").write_text(json.dumps(rows))
    tok = word_tokenizer([r["question"] for r in rows] + ["Yes", "No"])
    good = evaluate_vlm(_Stub(tok, "red"), tok, "simple", tmp_path, ["synth_mme"])["synth_mme"]
    assert good["acc"] == 1.0 and good["acc_plus"] == 1.0
    assert set(good["by_category"]) == {"colour", "existence"}
    bad = evaluate_vlm(_Stub(tok, "blue"), tok, "simple", tmp_path, ["synth_mme"])["synth_mme"]
    assert bad["acc"] == 0.0 and bad["acc_plus"] == 0.0
    only = evaluate_vlm(_Stub(tok, "red"), tok, "simple", tmp_path, ["synth_mme"], subtasks=["colour"])
    assert only["synth_mme"]["n"] == 2 and set(only["synth_mme"]["by_category"]) == {"colour"}
    with pytest.raises(FileNotFoundError, match="open.json"):
        evaluate_vlm(_Stub(tok, "red"), tok, "simple", tmp_path, ["synth_open"])
