"""Corpus loading: embedded, the shared corpus layout, single files, JSONL, bad input."""

import platform
from pathlib import Path

import pytest

from libmoe.data import Corpus, Document, corpus_hash, corpus_record, load_corpus, split_documents

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_embedded_corpus_has_prose_and_code():
    corpus = load_corpus("embedded")
    assert corpus.domains == ["python_docs", "python_code"]
    sizes = {d: sum(len(x.text) for x in corpus.documents if x.domain == d) for d in corpus.domains}
    assert sizes["python_docs"] > 300_000 and sizes["python_code"] > 1_000_000
    assert any("def " in d.text for d in corpus.documents if d.domain == "python_code")


@pytest.mark.skipif(not (SHARED / "corpus").is_dir(), reason="shared data not present")
def test_shared_corpus_directory_labels_domains_by_folder():
    corpus = load_corpus(SHARED / "corpus")
    assert len(corpus.domains) == 20
    assert {"drama", "poetry", "novel", "scripture", "speech", "brown_news"} <= set(corpus.domains)
    drama = [d for d in corpus.documents if d.domain == "drama"]
    assert len(drama) >= 42 and all(d.source.endswith(".txt") for d in drama)
    assert corpus.skipped == []


def test_directory_root_files_single_file_and_jsonl(tmp_path):
    (tmp_path / "legal").mkdir()
    (tmp_path / "legal" / "a.txt").write_text("the court held that\n")
    (tmp_path / "legal" / "deep").mkdir()
    (tmp_path / "legal" / "deep" / "b.txt").write_text("further text\n")
    (tmp_path / "top.txt").write_text("at the root\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    corpus = load_corpus(tmp_path)
    assert sorted((d.domain, Path(d.source).name) for d in corpus.documents) == [
        ("legal", "a.txt"), ("legal", "b.txt"), (tmp_path.name, "top.txt")]
    assert [Path(p).name for p in corpus.skipped] == ["latin1.txt"]

    single = load_corpus(tmp_path / "top.txt")
    assert [(d.domain, d.text) for d in single.documents] == [("top", "at the root\n")]

    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"text": "one", "domain": "x"}\n\n{"text": "two"}\n')
    assert [(d.text, d.domain) for d in load_corpus(jl).documents] == [("one", "x"), ("two", "docs")]


def test_bad_sources_raise_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        load_corpus(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "oops"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 has no string 'text'"):
        load_corpus(bad)
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="1 file skipped as not UTF-8, e.g. .*x.txt"):
        load_corpus(only_binary)


def test_split_documents_cuts_at_line_breaks(tmp_path):
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 9 chars a line
    f = tmp_path / "long.txt"
    f.write_text(text)
    pieces = split_documents(load_corpus(f), max_chars=100).documents
    assert "".join(p.text for p in pieces) == text
    assert all(len(p.text) <= 100 and p.text.endswith("\n") for p in pieces)
    assert len(pieces) == 10 and pieces[3].source.endswith("long.txt#3")


def test_corpus_hash_is_the_content_whatever_the_paths_and_order(tmp_path):
    for root in ("a", "b"):
        (tmp_path / root / "legal").mkdir(parents=True)
        (tmp_path / root / "legal" / "x.txt").write_text("the court held that\n")
        (tmp_path / root / "legal" / "y.txt").write_text("further text\n")
    first, moved = load_corpus(tmp_path / "a"), load_corpus(tmp_path / "b")
    assert first.documents[0].source != moved.documents[0].source
    assert corpus_hash(first) == corpus_hash(moved)  # same text in another place: same hash
    assert corpus_hash(Corpus(first.documents[::-1])) == corpus_hash(first)
    assert len(corpus_hash(first)) == 64

    (tmp_path / "b" / "legal" / "y.txt").write_text("further text!\n")  # one changed character
    assert corpus_hash(load_corpus(tmp_path / "b")) != corpus_hash(first)
    relabelled = Corpus([Document(d.text, "other", d.source) for d in first.documents])
    assert corpus_hash(relabelled) != corpus_hash(first)  # the domain is part of the content
    assert corpus_hash(Corpus(first.documents[:1])) != corpus_hash(first)
    # Framing: moving text across the domain/text boundary is another corpus.
    assert corpus_hash(Corpus([Document("bc", "a", "s")])) != corpus_hash(Corpus([Document("c", "ab", "s")]))


def test_corpus_record_of_a_directory_the_embedded_corpus_and_a_stream(tmp_path):
    (tmp_path / "top.txt").write_text("at the root\n")
    record = corpus_record(tmp_path)
    assert record == {"source": str(tmp_path), "hash": corpus_hash(load_corpus(tmp_path)),
                      "documents": 1, "chars": 12}
    embedded = corpus_record("embedded")
    assert embedded["hash"] == corpus_hash(load_corpus("embedded")) == corpus_record()["hash"]
    assert embedded["python"] == platform.python_version() and embedded["documents"] > 100
    stream = corpus_record("hf:someone/data", {"split": "train", "max_documents": 10})  # nothing read
    assert stream == {"source": "hf:someone/data", "hash": None,
                      "stream": {"dataset": "someone/data", "split": "train", "max_documents": 10}}
