"""Tokenisation in worker processes (data.num_proc): the packed cache is byte-identical for any
process count, local corpora and Hub streams alike, and its key does not depend on it."""

from pathlib import Path

import pytest

from libmoe.data import Document
from libmoe.data import packed as packed_mod
from libmoe.data.packed import default_num_proc, prepare_data

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
SETTINGS = dict(vocab_size=400, val_fraction=0.2, min_val_tokens=64, seq_len=32)


def _lines() -> list[str]:
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    return SHAKESPEARE.read_text().splitlines()[:6000]


def _files(root: Path) -> dict[str, bytes]:
    (key,) = [d for d in root.iterdir() if d.is_dir()]
    return {f"{key.name}/{f.relative_to(key)}": f.read_bytes() for f in sorted(key.rglob("*")) if f.is_file()}


@pytest.fixture
def small_chunks(monkeypatch):
    # Many chunks of a small corpus, so that every worker gets several and order matters.
    monkeypatch.setattr(packed_mod, "CHUNK_CHARS", 4000)


def test_local_corpus_packs_the_same_bytes_for_any_num_proc(tmp_path, small_chunks):
    lines = _lines()
    for d, domain in enumerate(["comedy", "history", "tragedy"]):
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        for i in range(6):
            start = (d * 6 + i) * 300
            (tmp_path / "corpus" / domain / f"{i}.txt").write_text("\n".join(lines[start : start + 300]))
    caches = {}
    for n in (1, 2, 3, None):
        cache = tmp_path / f"cache_{n}"
        prepare_data(str(tmp_path / "corpus"), cache_dir=cache, num_proc=n, log=lambda _: None, **SETTINGS)
        caches[n] = _files(cache)
    assert caches[1] == caches[2] == caches[3] == caches[None]  # same key (directory name) and bytes
    assert any(name.endswith("train_0.bin") for name in caches[1])


def test_stream_packs_the_same_bytes_for_any_num_proc_and_stops_at_the_same_token(
        tmp_path, small_chunks, monkeypatch):
    lines = _lines()
    docs = [Document("\n".join(lines[i * 40 : (i + 1) * 40]), "ab"[i % 2], f"doc{i}") for i in range(150)]
    monkeypatch.setattr(packed_mod, "iter_hub_documents", lambda name, **_: iter(docs))
    for limit in (None, 20_000):
        caches = {}
        for n in (1, 2):
            cache = tmp_path / f"stream_{limit}_{n}"
            prepare_data("hf:fake/stream", cache_dir=cache, num_proc=n, tokenizer_chars=40_000,
                         max_train_tokens=limit, log=lambda _: None, **SETTINGS)
            caches[n] = _files(cache)
        assert caches[1] == caches[2]


def test_num_proc_must_be_a_positive_count(tmp_path):
    with pytest.raises(ValueError, match="num_proc"):
        prepare_data("embedded", cache_dir=tmp_path, num_proc=0, log=lambda _: None)
    assert 1 <= default_num_proc() <= packed_mod.MAX_NUM_PROC
