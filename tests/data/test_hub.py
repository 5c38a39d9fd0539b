"""Hugging Face `datasets` corpora, fully offline: a local directory laid out like SlimPajama on the Hub
(``train/chunk1/*.jsonl``, ``validation/chunk1/*.jsonl``; `datasets` infers the split from the top
folder name), the ``slimpajama`` alias with `load_dataset` redirected, ``hf:`` sources, bad input."""

import json
import sys

import pytest

datasets = pytest.importorskip("datasets")

from libmoe.data import HUB_ALIASES, load_corpus, load_hub_corpus  # noqa: E402

TRAIN = [  # (file, text, redpajama_set_name), in stream order
    ("example_train_0", "the article about rivers", "RedPajamaWikipedia"),
    ("example_train_0", "def f(x):\n    return x\n", "RedPajamaGithub"),
    ("example_train_0", "   ", "RedPajamaWikipedia"),  # blank: skipped, but keeps its index
    ("example_train_1", "a paper on proofs", "RedPajamaArXiv"),
    ("example_train_1", "chapter one, in which", "RedPajamaBook"),
]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network whatever the import order: `datasets` reads these variables at import time, so
    its config constants are patched too; its cache (lock files) goes under tmp_path."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture
def slimpajama_dir(tmp_path, offline):
    root = tmp_path / "SlimPajama-mini"
    for split, rows in [
        ("train", TRAIN),
        ("validation", [("example_holdout_0", "held out text", "RedPajamaC4")]),
    ]:
        (root / split / "chunk1").mkdir(parents=True)
        for file, text, set_name in rows:
            with (root / split / "chunk1" / f"{file}.jsonl").open("a") as f:
                f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}}) + "\n")
    return root


def test_local_slimpajama_layout_texts_domains_sources_in_order(slimpajama_dir):
    name = str(slimpajama_dir)
    corpus = load_hub_corpus(name, split="train", domain_field="meta.redpajama_set_name")
    kept = [(i, t, s) for i, (_, t, s) in enumerate(TRAIN) if t.strip()]
    assert [d.text for d in corpus.documents] == [t for _, t, _ in kept]
    assert [d.domain for d in corpus.documents] == [s for _, _, s in kept]
    assert [d.source for d in corpus.documents] == [f"{name}:train:{i}" for i, _, _ in kept]
    assert corpus.domains == ["RedPajamaWikipedia", "RedPajamaGithub", "RedPajamaArXiv", "RedPajamaBook"]

    val = load_hub_corpus(name, split="validation", domain_field="meta.redpajama_set_name")
    assert [(d.text, d.domain) for d in val.documents] == [("held out text", "RedPajamaC4")]

    # no domain field, or one missing from the records: the dataset name's last component
    for field in (None, "meta.no_such_key", "text.deeper"):
        plain = load_hub_corpus(name, domain_field=field)
        assert {d.domain for d in plain.documents} == {"SlimPajama-mini"}
    assert load_hub_corpus(name, domain_field="meta").documents[0].domain.startswith("{")


def test_max_documents_caps_and_none_takes_all(slimpajama_dir):
    name = str(slimpajama_dir)
    assert [d.text for d in load_hub_corpus(name, max_documents=2).documents] == [
        TRAIN[0][1], TRAIN[1][1]]
    assert len(load_hub_corpus(name, max_documents=3)) == 3  # the blank record does not count
    assert len(load_hub_corpus(name, max_documents=None)) == 4
    with pytest.raises(ValueError, match="max_documents=0 must be at least 1"):
        load_hub_corpus(name, max_documents=0)


def test_slimpajama_alias_asks_for_the_hub_id_with_meta_domain(slimpajama_dir, monkeypatch):
    real_load = datasets.load_dataset
    asked = []

    def fake_load(name, config=None, **kwargs):
        asked.append((name, config, kwargs))
        return real_load(str(slimpajama_dir), config, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert HUB_ALIASES["slimpajama"]["name"] == "cerebras/SlimPajama-627B"

    corpus = load_hub_corpus("slimpajama", max_documents=3)
    assert asked == [("cerebras/SlimPajama-627B", None, {"split": "train", "streaming": True})]
    assert [d.domain for d in corpus.documents] == [
        "RedPajamaWikipedia", "RedPajamaGithub", "RedPajamaArXiv"]
    assert corpus.documents[2].source == "cerebras/SlimPajama-627B:train:3"

    # explicit arguments override the alias's defaults
    plain = load_hub_corpus("slimpajama", split="validation", domain_field="meta.nope")
    assert asked[-1][2]["split"] == "validation"
    assert [(d.text, d.domain) for d in plain.documents] == [("held out text", "SlimPajama-627B")]

    # load_corpus: the bare alias and hf:<hub id> both delegate, hub_options passed through
    via_alias = load_corpus("slimpajama", hub_options={"max_documents": 1})
    assert asked[-1][0] == "cerebras/SlimPajama-627B"
    assert [d.domain for d in via_alias.documents] == ["RedPajamaWikipedia"]
    via_prefix = load_corpus("hf:cerebras/SlimPajama-627B", hub_options={"max_documents": 2})
    assert asked[-1][0] == "cerebras/SlimPajama-627B"
    assert [d.domain for d in via_prefix.documents] == ["SlimPajama-627B"] * 2  # no alias defaults


def test_load_corpus_hf_prefix_reads_a_local_dataset(slimpajama_dir, tmp_path, monkeypatch):
    corpus = load_corpus("hf:" + str(slimpajama_dir))
    assert [d.text for d in corpus.documents] == [t for _, t, _ in TRAIN if t.strip()]
    assert set(corpus.domains) == {"SlimPajama-mini"}
    val = load_corpus(f"hf:{slimpajama_dir}", hub_options={
        "split": "validation", "domain_field": "meta.redpajama_set_name"})
    assert val.domains == ["RedPajamaC4"]

    # a real file or folder named like an alias is still read as such
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slimpajama").mkdir()
    (tmp_path / "slimpajama" / "a.txt").write_text("local text\n")
    assert [d.text for d in load_corpus("slimpajama").documents] == ["local text\n"]

    with pytest.raises(ValueError, match="hub_options apply only to"):
        load_corpus("embedded", hub_options={"split": "train"})
    with pytest.raises(ValueError, match="names no dataset"):
        load_corpus("hf:")


def test_user_errors_are_one_clear_sentence(slimpajama_dir, tmp_path, monkeypatch):
    name = str(slimpajama_dir)
    with pytest.raises(ValueError, match=r"no 'body' field \(the first has \['meta', 'text'\]\)"):
        load_hub_corpus(name, text_field="body")
    with pytest.raises(ValueError, match="could not be opened with config None and split 'test'"):
        load_hub_corpus(name, split="test")

    for missing in ("nobody/no-such-dataset-xyz", str(tmp_path / "no_such_dir")):
        with pytest.raises(FileNotFoundError, match="Hub is unreachable .* or the name is wrong") as info:
            load_hub_corpus(missing)
        assert repr(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="'nobody/none'"):
        load_corpus("hf:nobody/none")

    blank = tmp_path / "blank" / "train"
    blank.mkdir(parents=True)
    (blank / "x.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="holds no non-blank 'text' text"):
        load_hub_corpus(str(tmp_path / "blank"))

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'libmoe\[hub\]'"):
        load_hub_corpus(name)


def test_streamed_hub_source_is_packed_with_a_token_cap(tmp_path, offline):
    """prepare_data on an hf: source streams it once: tokenizer from the first training documents,
    validation filled first, training tokens capped, then the cache is reused without reading."""
    from pathlib import Path

    from libmoe.data.packed import prepare_data

    text = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt")
    if not text.is_file():
        pytest.skip("shared data not present")
    paragraphs = [p for p in text.read_text()[:120_000].split("\n\n") if p.strip()]
    sets = ["RedPajamaBook", "RedPajamaWikipedia", "RedPajamaC4"]
    root = tmp_path / "stream"
    (root / "train").mkdir(parents=True)
    with (root / "train" / "part_0.jsonl").open("w") as f:
        for i, p in enumerate(paragraphs):
            f.write(json.dumps({"text": p, "meta": {"redpajama_set_name": sets[i % 3]}}) + "\n")
    messages = []
    kwargs = dict(vocab_size=400, seq_len=32, min_val_tokens=400, val_fraction=0.01,
                  max_train_tokens=5000, tokenizer_chars=20_000,
                  hub={"domain_field": "meta.redpajama_set_name"}, cache_dir=tmp_path / "cache",
                  log=messages.append)
    data = prepare_data(f"hf:{root}", **kwargs)
    assert data.meta["n_train_tokens"] == 5000 and len(data.train[0]) == 5000
    assert data.meta["n_val_tokens"] >= 400 and data.domains == sets
    tok, eos = data.tokenizer, data.meta["eos_id"]
    val_ids = data.val.tolist()
    first_val = tok.decode(val_ids[: val_ids.index(eos)])
    assert first_val == paragraphs[0]  # validation is filled from the start of the stream
    assert val_ids.count(eos) >= 2
    train_ids = data.train[0].tolist()
    first_train = tok.decode(train_ids[: train_ids.index(eos)])
    assert first_train in paragraphs and first_train != paragraphs[0]
    assert set(data.val_domain.tolist()) <= {0, 1, 2}
    assert any("training a 400-piece BPE tokenizer" in m for m in messages)
    messages.clear()
    again = prepare_data(f"hf:{root}", **kwargs)
    assert again.directory == data.directory
    assert messages == [f"data: using cached tokens in {data.directory}"]
    bigger = prepare_data(f"hf:{root}", **dict(kwargs, max_train_tokens=6000, log=lambda _: None))
    assert bigger.directory != data.directory and bigger.meta["n_train_tokens"] == 6000
