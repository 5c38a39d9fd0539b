"""libmoe.vlm.synth: the procedurally generated LLaVA-format dataset."""

import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from libmoe.vlm.synth import SUBTASK_GROUPS, SUBTASKS, write_synth_dataset

N_TRAIN, N_TEST, SIZE = 12, 6, 48


def _hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root, name):
    return json.loads((root / name).read_text())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    lines = []
    manifest = write_synth_dataset(root, n_per_task=N_TRAIN, n_test_per_task=N_TEST, seed=3,
                                   image_size=SIZE, log=lines.append)
    return root, manifest, lines


def test_subtasks_and_groups():
    assert len(SUBTASKS) >= 8 and len(set(SUBTASKS)) == len(SUBTASKS)
    expected = {"existence", "colour", "count", "position", "ocr", "digits", "texture", "arithmetic"}
    assert expected <= set(SUBTASKS)
    assert set(SUBTASK_GROUPS) == set(SUBTASKS)
    assert SUBTASK_GROUPS["colour"] == "perception" and SUBTASK_GROUPS["ocr"] == "reading"


def test_layout_manifest_and_log(synth):
    root, manifest, lines = synth
    assert json.loads((root / "dataset.json").read_text()) == manifest
    assert manifest["name"] == "libmoe-synth" and manifest["subtasks"] == list(SUBTASKS)
    assert manifest["groups"] == SUBTASK_GROUPS
    assert (manifest["seed"], manifest["n_per_task"], manifest["n_test_per_task"], manifest["image_size"]) \
        == (3, N_TRAIN, N_TEST, SIZE)
    n = len(SUBTASKS)
    assert manifest["counts"] == {"images/train": N_TRAIN * n, "images/test": N_TEST * n,
                                  "pt.json": N_TRAIN * n, "instruct.json": 3 * N_TRAIN * n,
                                  "mme.json": 2 * N_TEST * n, "open.json": N_TEST * n}
    for name, count in manifest["counts"].items():
        got = len(list((root / name).glob("*.png"))) if name.startswith("images") else len(_load(root, name))
        assert got == count, name
    assert len(lines) == n and all(sub in line for sub, line in zip(SUBTASKS, lines))
    for sub in SUBTASKS:
        for split, k in (("train", N_TRAIN), ("test", N_TEST)):
            for i in range(k):
                with Image.open(root / "images" / split / f"{sub}_{i}.png") as im:
                    assert im.mode == "RGB" and im.size == (SIZE, SIZE)


def test_pt_and_instruct_records(synth):
    root, _, _ = synth
    pt, instruct = _load(root, "pt.json"), _load(root, "instruct.json")
    for rec in pt:
        assert set(rec) == {"id", "image", "conversations", "subtask"}
        assert rec["image"].startswith("images/train/") and (root / rec["image"]).is_file()
        (h, g), = [rec["conversations"]]
        assert h["from"] == "human" and h["value"].startswith("<image>\n") and g["from"] == "gpt"
        assert g["value"] and "<image>" not in g["value"]
    per_task = defaultdict(Counter)
    per_image = defaultdict(list)
    for rec in instruct:  # single-turn records (the default), three per image
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"]
        assert turns[0]["value"].startswith("<image>\n") and turns[0]["value"].count("<image>") == 1
        per_image[rec["image"]].append(turns[1]["value"])
        per_task[rec["subtask"]][turns[1]["value"]] += 1
    for answers in per_image.values():
        assert len(answers) == 3 and answers.count("Yes") == answers.count("No") == 1
        opens = [a for a in answers if a not in ("Yes", "No")]
        assert opens and all(a == a.lower() and len(a.split()) == 1 for a in opens)
    assert set(per_task) == set(SUBTASKS)
    for counts in per_task.values():
        assert counts["Yes"] == counts["No"] == N_TRAIN


def test_multi_turn_records(tmp_path):
    """multi_turn: one LLaVA-665K style record per image with its three questions as turns."""
    write_synth_dataset(tmp_path, subtasks=["colour"], n_per_task=4, n_test_per_task=1, seed=0, log=None,
                        multi_turn=True)
    instruct = _load(tmp_path, "instruct.json")
    assert len(instruct) == 4
    for rec in instruct:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        answers = [t["value"] for t in turns[1::2]]
        assert answers.count("Yes") == answers.count("No") == 1


def test_mme_pairs_and_open(synth):
    root, _, _ = synth
    mme, open_qs = _load(root, "mme.json"), _load(root, "open.json")
    pairs = defaultdict(list)
    for rec in mme:
        assert set(rec) == {"question_id", "image", "question", "answer", "category", "pair"}
        assert rec["image"].startswith("images/test/")
        assert rec["question"].endswith(" Please answer yes or no.")
        pairs[(rec["pair"], rec["image"])].append(rec["answer"])
    assert len(pairs) == N_TEST * len(SUBTASKS)
    assert all(sorted(a) == ["No", "Yes"] for a in pairs.values())
    assert len({r["question_id"] for r in mme}) == len(mme)
    assert Counter(r["category"] for r in mme) == {s: 2 * N_TEST for s in SUBTASKS}
    assert {r["image"] for r in open_qs} == {r["image"] for r in mme}
    for rec in open_qs:
        assert set(rec) == {"question_id", "image", "question", "answer", "category"}
        assert rec["answer"] == rec["answer"].lower() and len(rec["answer"].split()) == 1


def test_train_and_test_images_are_disjoint(synth):
    root, _, _ = synth

    def pixels(split):
        return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest(): p.name
                for p in (root / "images" / split).glob("*.png")}

    train, test = pixels("train"), pixels("test")
    assert len(train) == N_TRAIN * len(SUBTASKS) and len(test) == N_TEST * len(SUBTASKS)  # no duplicates
    assert not set(train) & set(test)


def test_deterministic_by_seed(synth, tmp_path):
    root, _, _ = synth
    again = write_synth_dataset(tmp_path / "a", n_per_task=N_TRAIN, n_test_per_task=N_TEST, seed=3,
                                image_size=SIZE, log=None)
    assert _hashes(tmp_path / "a") == _hashes(root) and again == _load(root, "dataset.json")
    write_synth_dataset(tmp_path / "b", n_per_task=N_TRAIN, n_test_per_task=N_TEST, seed=4, image_size=SIZE,
                        log=None)
    other = _hashes(tmp_path / "b")
    assert other.keys() == _hashes(root).keys()
    assert sum(other[k] != v for k, v in _hashes(root).items()) > len(other) // 2


def test_subset_reproduces_the_same_images(synth, tmp_path):
    root, _, _ = synth
    manifest = write_synth_dataset(tmp_path, subtasks="texture,colour", n_per_task=N_TRAIN,
                                   n_test_per_task=N_TEST, seed=3, image_size=SIZE, log=None)
    assert manifest["subtasks"] == ["colour", "texture"]
    assert manifest["groups"] == {"colour": "perception", "texture": "perception"}
    sub = {k: v for k, v in _hashes(tmp_path).items() if k.startswith("images/")}
    full = _hashes(root)
    assert len(sub) == 2 * (N_TRAIN + N_TEST) and all(full[k] == v for k, v in sub.items())
    # a rerun over the same folder leaves only this run's images
    write_synth_dataset(tmp_path, subtasks=["colour"], n_per_task=2, n_test_per_task=1, seed=3,
                        image_size=SIZE, log=None)
    left = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    assert left == ["colour_0.png", "colour_1.png"]


def test_answers_match_the_drawing(synth):
    """Spot checks that the images say what the records claim."""
    root, _, _ = synth
    open_qs = _load(root, "open.json") + [
        {"image": r["image"], "category": r["subtask"], "answer": r["conversations"][k + 1]["value"],
         "question": r["conversations"][k]["value"]}
        for r in _load(root, "instruct.json") for k in range(0, len(r["conversations"]), 2)
        if r["conversations"][k + 1]["value"] not in ("Yes", "No")]
    means = {"red": (220, 40, 40), "blue": (40, 90, 235), "green": (40, 190, 60)}
    for rec in open_qs:
        pixels = np.asarray(Image.open(root / rec["image"]), dtype=np.float32)
        if rec["category"] == "colour" and rec["answer"] in means:
            bright = pixels[pixels.max(-1) > 100]  # the shape (the background is dark grey)
            assert np.abs(bright.mean(0) - means[rec["answer"]]).max() < 40
        if rec["category"] == "position":
            ys, xs = np.nonzero(pixels.max(-1) > 100)
            cy, cx = ys.mean() / SIZE, xs.mean() / SIZE
            side = {"left": cx < 0.3, "right": cx > 0.7, "top": cy < 0.3, "bottom": cy > 0.7}
            assert side[rec["answer"]] and sum(side.values()) == 1
        if rec["category"] == "texture":
            r, g, b = pixels.reshape(-1, 3).mean(0)
            kind = "brick" if r > g + 20 else "grass" if g > r + 20 else "gravel"
            assert kind == rec["answer"]


def test_unknown_subtask(tmp_path):
    with pytest.raises(ValueError, match=r"unknown synth subtask 'colur'\. Did you mean colour"
                                         r".*Valid subtasks: existence, colour"):
        write_synth_dataset(tmp_path, subtasks=["colur"], log=None)
    manifest = write_synth_dataset(tmp_path, subtasks="color", n_per_task=2, n_test_per_task=1, log=None)
    assert manifest["subtasks"] == ["colour"]


def test_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_per_task"):
        write_synth_dataset(tmp_path, n_per_task=0, log=None)
    with pytest.raises(ValueError, match="image_size"):
        write_synth_dataset(tmp_path, image_size=8, log=None)
    with pytest.raises(ValueError, match="load_digits"):
        write_synth_dataset(tmp_path, subtasks="digits", n_per_task=1700, n_test_per_task=200, log=None)


def test_digits_match_sklearn():
    """The digits are read from the file scikit-learn ships, as load_digits() reads them."""
    from libmoe.vlm.synth import _load_digits

    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    images, targets = _load_digits()
    ref = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(targets, ref.target)
