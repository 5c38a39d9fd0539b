"""libmoe.vlm.data: LLaVA-format loading (files, folders, the Hub), held-out questions and images."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from libmoe.vlm.data import load_conversations, load_image, load_mme, load_open
from libmoe.vlm.synth import SUBTASKS, write_synth_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-data")
    write_synth_dataset(root, n_per_task=3, n_test_per_task=2, image_size=32, log=None)
    return root


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def _image(path, size=(20, 10), colour=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _record(rid="r1", image="a.png", question="<image>\nWhat is it?", answer="A red square."):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question},
                                        {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def test_load_generated_folder(synth):
    instruct = load_conversations(synth)
    assert len(instruct) == 3 * 3 * len(SUBTASKS)  # 3 images per subtask, one record per question
    assert load_conversations(synth / "instruct.json") == instruct
    for rec in instruct:
        assert set(rec) == {"id", "image", "conversations", "subtask"}
        assert os.path.isabs(rec["image"]) and os.path.exists(rec["image"]) and rec["subtask"] in SUBTASKS
    pt = load_conversations(synth, file="pt")
    assert pt == load_conversations(synth, file="pt.json")
    assert [r["id"] for r in pt] == [r["id"].rsplit("_q", 1)[0] for r in instruct[::3]]
    assert all(len(r["conversations"]) == 2 for r in pt)


def test_image_folder_and_text_only(tmp_path):
    images = tmp_path / "imgs"
    _image(images / "a.png")
    (tmp_path / "sub").mkdir()
    data = _write(tmp_path / "sub" / "d.json", [
        _record("1"), _record(2, image=None, question="Hello?", answer="Hi."),
        _record("3", image=str(images / "a.png"), question="Describe.\n<image>"),
    ])
    recs = load_conversations(data, image_folder=images)
    assert [r["id"] for r in recs] == ["1", "2", "3"]
    assert recs[0]["image"] == str(images / "a.png") and recs[2]["image"] == str(images / "a.png")
    assert recs[1]["image"] is None and recs[1]["subtask"] is None
    with pytest.raises(FileNotFoundError, match=r"record '1': image .*sub.a\.png not found"):
        load_conversations(data)  # default image folder: the JSON's own


def test_missing_image_is_one_line(tmp_path):
    _image(tmp_path / "a.png")
    data = _write(tmp_path / "d.json", [_record("ok"), _record("gone", image="x/missing.png"),
                                        _record("gone2", image="y.png")])
    with pytest.raises(FileNotFoundError) as err:
        load_conversations(data)
    msg = str(err.value)
    assert "\n" not in msg and "'gone'" in msg and str(tmp_path / "x" / "missing.png") in msg
    assert "2 of 3" in msg
    assert len(load_conversations(data, check_images=False)) == 3


@pytest.mark.parametrize("record, match", [
    ({"id": "e", "image": "a.png", "conversations": []}, "record 'e'.*no conversations"),
    ({"id": "e", "image": "a.png"}, "record 'e'.*no conversations"),
    ({"id": "e", "image": "a.png", "conversations": [{"from": "gpt", "value": "<image>x"},
                                                    {"from": "human", "value": "y"}]},
     "record 'e'.*alternate human/gpt"),
    ({"id": "e", "image": "a.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                    {"from": "human", "value": "y"}]},
     "record 'e'.*turn 1"),
    ({"id": "e", "image": "a.png", "conversations": [{"from": "human", "value": "<image>x"}]},
     "record 'e'.*no gpt answer"),
    (_record("e", question="no token"), r"record 'e'.*exactly one <image> token \(found 0\)"),
    (_record("e", question="<image><image>"), r"record 'e'.*exactly one <image> token \(found 2\)"),
    (_record("e", image=None), r"record 'e'.*no image but 1 <image>"),
    ({"id": "e", "image": "a.png", "conversations": [{"from": "human", "value": 3},
                                                    {"from": "gpt", "value": "y"}]},
     "record 'e'.*turn 0"),
])
def test_malformed_records(tmp_path, record, match):
    _image(tmp_path / "a.png")
    data = _write(tmp_path / "d.json", [_record("fine"), record])
    with pytest.raises(ValueError, match=match):
        load_conversations(data)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_conversations(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="instruct.json"):
        load_conversations(tmp_path)
    with pytest.raises(ValueError, match="known Hub dataset"):
        load_conversations("someone/some-dataset")
    _write(tmp_path / "d.json", {"not": "a list"})
    with pytest.raises(ValueError, match="JSON list"):
        load_conversations(tmp_path / "d.json")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download answering from a local folder laid out like the Hub repositories."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        path = tmp_path / "hub" / repo_id / filename
        if not path.exists():
            raise FileNotFoundError(path)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return tmp_path / "hub", calls


def test_hub_llava_pretrain(fake_hub, tmp_path):
    hub, calls = fake_hub
    repo = hub / "liuhaotian" / "LLaVA-Pretrain"
    repo.mkdir(parents=True)
    records = [{"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Give a brief description of the image.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "002239345", "image": "00223/002239345.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
            {"from": "gpt", "value": "a grey watch with an army style strap"}]}]
    _write(repo / "blip_laion_cc_sbu_558k.json", records)
    with zipfile.ZipFile(repo / "images.zip", "w") as z:
        for rec in records:
            src = _image(tmp_path / "src" / rec["image"])
            z.write(src, rec["image"])
    recs = load_conversations("liuhaotian/LLaVA-Pretrain")
    assert calls == [("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", "dataset"),
                     ("liuhaotian/LLaVA-Pretrain", "images.zip", "dataset")]
    assert [r["id"] for r in recs] == ["004539375", "002239345"]
    assert recs[0]["image"] == str(repo / "images" / "00453" / "004539375.jpg")
    assert recs[0]["subtask"] is None and os.path.exists(recs[1]["image"])
    assert not (repo / "images.partial").exists()
    calls.clear()
    assert load_conversations("llava-558k") == recs  # the alias; the extracted images are reused
    assert calls == [("liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", "dataset")]


def test_hub_llava_665k(fake_hub, tmp_path):
    hub, calls = fake_hub
    repo = hub / "liuhaotian" / "LLaVA-Instruct-150K"
    repo.mkdir(parents=True)
    _write(repo / "llava_v1_5_mix665k.json", [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
            {"from": "gpt", "value": "Check homogeneity, distinctiveness and reachability."}]}])
    with pytest.raises(ValueError, match="COCO.*GQA.*OCR-VQA.*TextVQA.*Visual Genome.*image_folder"):
        load_conversations("liuhaotian/LLaVA-Instruct-150K")
    assert calls == []  # nothing downloaded before the error
    images = tmp_path / "llava-images"
    _image(images / "coco" / "train2017" / "000000033471.jpg")
    recs = load_conversations("llava-665k", image_folder=images)
    assert calls == [("liuhaotian/LLaVA-Instruct-150K", "llava_v1_5_mix665k.json", "dataset")]
    assert recs[0]["image"] == str(images / "coco" / "train2017" / "000000033471.jpg")
    assert len(recs[0]["conversations"]) == 4 and recs[1]["image"] is None and recs[1]["id"] == "i6IyJda_0"


def test_load_mme_and_open(synth):
    mme = load_mme(synth)
    assert mme == load_mme(synth / "mme.json")
    assert len(mme) == 2 * 2 * len(SUBTASKS)
    assert all(os.path.isabs(r["image"]) and os.path.exists(r["image"]) for r in mme)
    assert sorted(r["answer"] for r in mme[:2]) == ["No", "Yes"] and mme[0]["pair"] == mme[1]["pair"]
    open_qs = load_open(synth)
    assert len(open_qs) == 2 * len(SUBTASKS) and {r["category"] for r in open_qs} == set(SUBTASKS)
    assert all(r["answer"] == r["answer"].lower() for r in open_qs)


def test_load_mme_validation(tmp_path):
    _image(tmp_path / "a.png")

    def mme(*answers, pair="p", image="a.png"):
        return [{"question_id": f"q{i}", "image": image, "question": "Is it red? Please answer yes or no.",
                 "answer": a, "category": "colour", "pair": pair} for i, a in enumerate(answers)]

    assert len(load_mme(_write(tmp_path / "m.json", mme("Yes", "No")))) == 2
    with pytest.raises(ValueError, match="pair 'p' must hold one 'Yes' and one 'No'"):
        load_mme(_write(tmp_path / "m.json", mme("Yes", "Yes")))
    with pytest.raises(ValueError, match="pair 'p'"):
        load_mme(_write(tmp_path / "m.json", mme("Yes")))
    with pytest.raises(ValueError, match="'Yes' or 'No', got 'yes'"):
        load_mme(_write(tmp_path / "m.json", mme("yes", "No")))
    with pytest.raises(ValueError, match="appears twice"):
        load_mme(_write(tmp_path / "m.json", mme("Yes", "No") + mme("Yes")))
    with pytest.raises(FileNotFoundError, match=r"record 'q0': image .*b\.png not found"):
        load_mme(_write(tmp_path / "m.json", mme("Yes", "No", image="b.png")))
    with pytest.raises(ValueError, match="lacks answer"):
        load_open(_write(tmp_path / "o.json", [{"question_id": "x", "image": "a.png", "question": "?"}]))


def test_load_image(tmp_path):
    path = _image(tmp_path / "a.png", size=(30, 20), colour=(255, 0, 128))
    x = load_image(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x[:, 8, 8], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    y = load_image(path, 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert y.shape == (3, 8, 8) and torch.allclose(y[0], torch.ones(8, 8))
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((5, 5), 51, dtype=np.uint8), "L").save(gray)
    g = load_image(gray, 5)
    assert g.shape == (3, 5, 5) and torch.allclose(g, torch.full((3, 5, 5), 51 / 255 * 2 - 1))
