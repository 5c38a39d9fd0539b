"""Packed token data: the stratified validation split, prepare_data (tokens, cache, shards, errors),
the resumable SequenceSampler, validation windows and the probe set."""

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libmoe.data import Document
from libmoe.data import packed as packed_mod
from libmoe.data.packed import (
    PackedData,
    SequenceSampler,
    prepare_data,
    probe_set,
    split_validation,
    tokenizer_fingerprint,
    validation_windows,
)

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"

# Small but real: 4 domains of 5, 4, 2 and 1 documents of 60 lines of Shakespeare each.
LAYOUT = {"comedy": 5, "history": 2, "solo": 1, "tragedy": 4}
LINES_PER_DOC = 60
VOCAB = 400
SEQ = 32
SETTINGS = dict(vocab_size=VOCAB, val_fraction=0.2, min_val_tokens=64, seq_len=SEQ)


# --------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def shakespeare_lines():
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    return SHAKESPEARE.read_text().splitlines(keepends=True)


def write_corpus(root: Path, lines: list[str], layout=LAYOUT, start: int = 0) -> dict[str, list[str]]:
    """Write documents of consecutive Shakespeare lines into root/<domain>/docN.txt; return
    {domain: [texts in file order]}."""
    texts: dict[str, list[str]] = {}
    pos = start
    for domain, n in layout.items():
        (root / domain).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            text = "".join(lines[pos : pos + LINES_PER_DOC])
            pos += LINES_PER_DOC
            (root / domain / f"doc{i}.txt").write_text(text, encoding="utf-8")
            texts.setdefault(domain, []).append(text)
    return texts


def split_at_eos(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """Documents of a packed array (each ends with EOS)."""
    tokens = np.asarray(tokens)
    assert len(tokens) == 0 or tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)]


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_lines):
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "text", shakespeare_lines)
    return root / "text", texts


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, texts = corpus
    cache = tmp_path_factory.mktemp("cache")
    log = Log()
    data = prepare_data(str(root), cache_dir=cache, log=log, **SETTINGS)
    return data, texts, cache, log


def docs_of(n_per_domain: dict[str, list[int]]) -> list[Document]:
    """Documents with the given character lengths; unique sources identify them."""
    docs = []
    for domain, lengths in n_per_domain.items():
        for i, n in enumerate(lengths):
            docs.append(Document("x" * n, domain, f"{domain}/{i}"))
    return docs


def chars(docs) -> int:
    return sum(len(d.text) for d in docs)


# --------------------------------------------------------------------------------------------
# split_validation


def test_split_share_follows_val_fraction():
    docs = docs_of({"a": [1000] * 100})
    train, val = split_validation(docs, 0.05, 0)
    assert len(val) == 5 and len(train) == 95
    train, val = split_validation(docs, 0.2, 10)
    assert len(val) == 20


def test_split_is_stratified_per_domain():
    docs = docs_of({"a": [500] * 40, "b": [2000] * 10, "single": [10_000], "pair": [300, 300]})
    train, val = split_validation(docs, 0.1, 0)
    per = Counter(d.domain for d in val)
    # 10% of each domain's characters: a 2000 of 20000 -> 4 docs; b 2000 of 20000 -> 1 doc;
    # pair: at least one of two documents, and one stays in training; single stays in training
    assert per == {"a": 4, "b": 1, "pair": 1}
    assert Counter(d.domain for d in train) == {"a": 36, "b": 9, "single": 1, "pair": 1}


def test_split_grows_to_min_chars():
    docs = docs_of({"a": [500] * 40, "b": [2000] * 10})  # 40,000 chars
    _, val = split_validation(docs, 0.01, 12_000)
    assert chars(val) >= 12_000
    # grown proportionally: 30% of each domain
    assert Counter(d.domain for d in val) == {"a": 12, "b": 3}


def test_split_min_chars_beyond_the_corpus_keeps_one_train_doc_per_domain():
    docs = docs_of({"a": [100] * 7, "b": [50] * 3, "c": [80]})
    train, val = split_validation(docs, 0.01, 10**9)
    assert Counter(d.domain for d in train) == {"a": 1, "b": 1, "c": 1}
    assert Counter(d.domain for d in val) == {"a": 6, "b": 2}


def test_split_is_deterministic_and_seeded():
    docs = docs_of({"a": [random.Random(i).randint(50, 500) for i in range(60)], "b": [100] * 30})

    def val_ids(seed):
        return [d.source for d in split_validation(docs, 0.1, 0, seed=seed)[1]]

    assert val_ids(0) == val_ids(0)
    assert val_ids(3) == val_ids(3)
    assert val_ids(0) != val_ids(1)
    assert len({tuple(val_ids(s)) for s in range(6)}) >= 5


def test_split_of_nothing_and_of_single_documents():
    assert split_validation([], 0.1, 100) == ([], [])
    docs = docs_of({"a": [100], "b": [200]})
    train, val = split_validation(docs, 0.3, 1000)
    assert train == docs and val == []


domain_sizes = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e"]),
    st.lists(st.integers(1, 400), min_size=1, max_size=25),
    min_size=1,
)


@settings(max_examples=150, deadline=None)
@given(sizes=domain_sizes, fraction=st.floats(0.001, 0.49), min_chars=st.integers(0, 6000),
       seed=st.integers(0, 2**16))
def test_split_properties(sizes, fraction, min_chars, seed):
    docs = docs_of(sizes)
    rng = random.Random(seed)
    rng.shuffle(docs)  # domains interleaved
    train, val = split_validation(docs, fraction, min_chars, seed=seed)

    # no document lost or duplicated, and each split keeps the corpus order
    assert sorted(d.source for d in train + val) == sorted(d.source for d in docs)
    assert len(train) + len(val) == len(docs)
    position = {d.source: i for i, d in enumerate(docs)}
    assert [position[d.source] for d in train] == sorted(position[d.source] for d in train)
    assert [position[d.source] for d in val] == sorted(position[d.source] for d in val)

    total = chars(docs)
    share = max(fraction, min_chars / total)
    all_reached = True
    for domain, lengths in sizes.items():
        d_train = [d for d in train if d.domain == domain]
        d_val = [d for d in val if d.domain == domain]
        if len(lengths) == 1:
            assert d_val == [] and len(d_train) == 1
            all_reached = False
            continue
        assert len(d_val) >= 1 and len(d_train) >= 1
        target = share * sum(lengths)
        got = chars(d_val)
        if len(d_train) > 1:
            # stopped because the target was reached, and not later than needed
            assert got >= target
        else:
            all_reached = all_reached and got >= target
        assert got - max(len(d.text) for d in d_val) < target
    if all_reached:
        assert chars(val) >= min_chars - 1e-6
        assert chars(val) >= fraction * total - 1e-6


# --------------------------------------------------------------------------------------------
# prepare_data: content


def test_prepared_tokens_decode_back_to_the_documents(prepared):
    data, texts, _, _ = prepared
    tok = data.tokenizer
    eos = data.meta["eos_id"]
    assert eos == tok.eos_id == 1

    train_docs = [tok.decode(seg.tolist()) for shard in data.train for seg in split_at_eos(shard, eos)]
    val_segments = split_at_eos(data.val, eos)
    val_docs = [tok.decode(seg.tolist()) for seg in val_segments]
    every = [t for domain in texts for t in texts[domain]]
    # every document exactly once, in one of the splits
    assert sorted(train_docs + val_docs) == sorted(every)
    assert len(train_docs) == data.meta["n_train_documents"]
    assert len(val_docs) == data.meta["n_val_documents"]
    assert not set(train_docs) & set(val_docs)
    # each split in corpus order (sorted file paths)
    order = {t: i for i, t in enumerate(t for d in sorted(texts) for t in texts[d])}
    assert [order[t] for t in train_docs] == sorted(order[t] for t in train_docs)
    assert [order[t] for t in val_docs] == sorted(order[t] for t in val_docs)
    # every id is a valid token id; EOS only between documents
    assert int(np.asarray(data.val).max()) < data.meta["vocab_size"]
    assert all(int(np.asarray(s).max()) < VOCAB for s in data.train)


def test_val_domains_match_and_split_is_stratified(prepared):
    data, texts, _, _ = prepared
    domains = data.domains
    assert domains == sorted(LAYOUT)  # first-seen order of the sorted file paths
    domain_of = {t: d for d, ts in texts.items() for t in ts}
    eos = data.meta["eos_id"]
    assert len(data.val_domain) == len(data.val)
    assert data.val_domain.dtype == np.uint16

    ends = np.flatnonzero(np.asarray(data.val) == eos)
    start = 0
    seen = Counter()
    for end in ends:
        ids = np.asarray(data.val_domain[start : end + 1])
        text = data.tokenizer.decode(np.asarray(data.val[start:end]).tolist())
        assert (ids == ids[0]).all()  # one domain per document, EOS included
        assert domains[int(ids[0])] == domain_of[text]
        seen[domain_of[text]] += 1
        start = end + 1
    assert start == len(data.val)
    # every domain with two or more documents is in validation; the single-document one is not
    assert set(seen) == {d for d, n in LAYOUT.items() if n >= 2}
    for d, n in seen.items():
        assert n < LAYOUT[d]


def test_meta_and_files(prepared):
    data, texts, cache, log = prepared
    meta = json.loads((data.directory / "meta.json").read_text())
    assert meta == data.meta
    assert data.directory.parent == cache
    assert meta["n_train_tokens"] == sum(len(s) for s in data.train) > 0
    assert meta["n_val_tokens"] == len(data.val) > SEQ
    assert meta["n_train_shards"] == len(data.train) == 1
    assert meta["dtype"] == "uint16" and data.val.dtype == np.uint16
    assert meta["domains"] == sorted(LAYOUT)
    assert meta["n_train_documents"] + meta["n_val_documents"] == sum(LAYOUT.values())
    assert meta["skipped_files"] == 0
    assert meta["vocab_size"] == VOCAB and data.tokenizer.vocab_size == VOCAB
    assert meta["val_fraction"] == 0.2 and meta["min_val_tokens"] == 64
    assert meta["tokenizer_hash"] == tokenizer_fingerprint(data.tokenizer_dir) == data.tokenizer_hash
    assert (data.tokenizer_dir / "tokenizer.model").is_file()
    assert (data.directory / "train_0.bin").stat().st_size == 2 * meta["n_train_tokens"]
    assert (data.directory / "val.bin").stat().st_size == 2 * meta["n_val_tokens"]
    assert (data.directory / "val_domain.bin").stat().st_size == 2 * meta["n_val_tokens"]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    assert any("training a 400-piece BPE tokenizer" in m for m in log)
    # the training split holds about 80% of the text (val_fraction 0.2)
    share = meta["n_val_tokens"] / (meta["n_val_tokens"] + meta["n_train_tokens"])
    assert 0.1 < share < 0.45
    # reopening the directory gives the same arrays
    again = PackedData.open(data.directory)
    assert np.array_equal(again.val, data.val) and np.array_equal(again.train[0], data.train[0])


def test_tokenizer_is_trained_on_the_training_split_only(prepared, monkeypatch, corpus, tmp_path):
    data, texts, _, _ = prepared
    eos = data.meta["eos_id"]
    val_texts = {data.tokenizer.decode(s.tolist()) for s in split_at_eos(data.val, eos)}
    seen: list[str] = []
    real = packed_mod.train_tokenizer

    def spy(texts_iter, *args, **kwargs):
        got = list(texts_iter)
        seen.extend(got)
        return real(got, *args, **kwargs)

    monkeypatch.setattr(packed_mod, "train_tokenizer", spy)
    root, _ = corpus
    fresh = prepare_data(str(root), cache_dir=tmp_path / "cache", log=Log(), **SETTINGS)
    assert seen and not set(seen) & val_texts
    assert fresh.tokenizer_hash == data.tokenizer_hash  # deterministic training


# --------------------------------------------------------------------------------------------
# prepare_data: the cache


def test_second_call_reuses_the_cache(prepared, corpus, monkeypatch):
    data, _, cache, _ = prepared
    root, _ = corpus

    def no_training(*a, **k):
        raise AssertionError("the tokenizer was retrained")

    monkeypatch.setattr(packed_mod, "train_tokenizer", no_training)
    log = Log()
    again = prepare_data(str(root), cache_dir=cache, log=log, **SETTINGS)
    assert again.directory == data.directory
    assert log == [f"data: using cached tokens in {data.directory}"]
    assert np.array_equal(again.val, data.val)
    # seq_len does not change the tokens, so it shares the directory
    assert prepare_data(str(root), cache_dir=cache, log=log,
                        **{**SETTINGS, "seq_len": 16}).directory == data.directory
    # so does the same text at another path
    copy = root.parent / "copy"
    shutil.copytree(root, copy)
    assert prepare_data(str(copy), cache_dir=cache, log=log, **SETTINGS).directory == data.directory
    assert not any("training" in m for m in log)


def test_changed_text_or_setting_gives_a_new_directory(corpus, shakespeare_lines, tmp_path):
    root, _ = corpus
    work = tmp_path / "text"
    shutil.copytree(root, work)
    cache = tmp_path / "cache"
    base = prepare_data(str(work), cache_dir=cache, log=Log(), **SETTINGS)

    other = prepare_data(str(work), cache_dir=cache, log=Log(), **{**SETTINGS, "val_fraction": 0.3})
    assert other.directory != base.directory
    assert other.meta["n_val_tokens"] > base.meta["n_val_tokens"]
    for key, value in [("vocab_size", 420), ("split_seed", 1), ("min_val_tokens", 65),
                       ("max_doc_chars", 10_000)]:
        d = prepare_data(str(work), cache_dir=cache, log=Log(), **{**SETTINGS, key: value})
        assert d.directory != base.directory, key

    target = work / "comedy" / "doc0.txt"
    target.write_text(target.read_text() + "A NEW LINE OF TEXT\n")
    log = Log()
    changed = prepare_data(str(work), cache_dir=cache, log=log, **SETTINGS)
    assert changed.directory != base.directory
    assert not any("using cached" in m for m in log)
    eos = changed.meta["eos_id"]
    decoded = [changed.tokenizer.decode(s.tolist())
               for arr in [*changed.train, changed.val] for s in split_at_eos(arr, eos)]
    assert target.read_text() in decoded
    # the old directory is still there and still valid
    assert (base.directory / "meta.json").is_file()


def test_small_shards_concatenate_to_the_single_shard(prepared, corpus, tmp_path):
    data, _, _, _ = prepared
    root, _ = corpus
    small = prepare_data(str(root), cache_dir=tmp_path, log=Log(), **SETTINGS, shard_tokens=1000)
    n = data.meta["n_train_tokens"]
    assert small.directory != data.directory
    assert small.meta["n_train_shards"] == len(small.train) == math.ceil(n / 1000) >= 3
    assert [len(s) for s in small.train[:-1]] == [1000] * (len(small.train) - 1)
    assert 0 < len(small.train[-1]) <= 1000
    assert np.array_equal(np.concatenate(small.train), data.train[0])
    assert np.array_equal(small.val, data.val)
    assert small.tokenizer_hash == data.tokenizer_hash
    assert small.meta["n_train_tokens"] == n


def test_corpus_shorter_than_one_sequence(prepared, corpus, tmp_path):
    data, _, _, _ = prepared
    (tmp_path / "text" / "a").mkdir(parents=True)
    (tmp_path / "text" / "a" / "1.txt").write_text("To be, or not to be, that is the question.\n")
    (tmp_path / "text" / "a" / "2.txt").write_text("Whether 'tis nobler in the mind to suffer.\n")
    # a saved tokenizer, since a 400-piece BPE cannot be trained on two lines
    with pytest.raises(ValueError, match=r"too short: \d+ training and \d+ validation tokens, but one "
                                         r"sequence needs 129.*train.seq_len"):
        prepare_data(str(tmp_path / "text"), tokenizer=str(data.tokenizer_dir),
                     cache_dir=tmp_path / "cache", seq_len=128, min_val_tokens=1, log=Log())
    # a real corpus that is shorter than one (long) sequence
    root, _ = corpus
    n = data.meta["n_val_tokens"]
    with pytest.raises(ValueError, match=rf"too short: .* and {n} validation tokens.*needs {n + 1}"):
        prepare_data(str(root), cache_dir=tmp_path / "cache", log=Log(), **{**SETTINGS, "seq_len": n})


def test_single_document_corpus_cannot_be_split(tmp_path):
    (tmp_path / "one.txt").write_text("To be, or not to be, that is the question.\n" * 3)
    with pytest.raises(ValueError, match=r"too small: 1 document\(s\).*validation split"):
        prepare_data(str(tmp_path / "one.txt"), cache_dir=tmp_path / "cache", vocab_size=VOCAB,
                     log=Log())
    assert cache_entries(tmp_path / "cache") == []


def test_invalid_utf8_file_is_skipped_and_counted(corpus, prepared, tmp_path):
    data, _, _, _ = prepared
    root, _ = corpus
    work = tmp_path / "text"
    shutil.copytree(root, work)
    (work / "comedy" / "zz_latin1.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 50)
    (work / "tragedy" / "bad.txt").write_bytes(b"\xff\xfe\x00broken\n")
    log = Log()
    got = prepare_data(str(work), cache_dir=tmp_path / "cache", log=log, **SETTINGS)
    assert got.meta["skipped_files"] == 2
    assert any(m.startswith("data: skipped 2 files that are not UTF-8") for m in log)
    # the rest is used exactly as without the bad files
    assert np.array_equal(got.val, data.val)
    assert np.array_equal(got.train[0], data.train[0])
    assert got.meta["n_train_documents"] + got.meta["n_val_documents"] == sum(LAYOUT.values())


def test_failed_tokenizer_training_leaves_no_cache(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    cache = tmp_path / "cache"

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(packed_mod, "train_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_data(str(root), cache_dir=cache, log=Log(), **SETTINGS)
    assert cache_entries(cache) == []
    # a real failure inside the library (vocab too small for the characters) cleans up too
    monkeypatch.undo()
    with pytest.raises(ValueError, match="tokenizer training failed"):
        prepare_data(str(root), cache_dir=cache, log=Log(), **{**SETTINGS, "vocab_size": 300})
    assert cache_entries(cache) == []


def test_interrupt_after_writing_tokens_leaves_no_cache(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    cache = tmp_path / "cache"
    calls = []

    def interrupted(directory):
        calls.append(sorted(p.name for p in Path(directory).parent.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(packed_mod, "tokenizer_fingerprint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(root), cache_dir=cache, log=Log(), **SETTINGS)
    # it was interrupted after the token files were written, in a temporary directory
    assert calls and {"train_0.bin", "val.bin", "val_domain.bin", "tokenizer"} <= set(calls[0])
    assert cache_entries(cache) == []
    monkeypatch.undo()
    log = Log()
    data = prepare_data(str(root), cache_dir=cache, log=log, **SETTINGS)
    assert not any("using cached" in m for m in log)
    assert cache_entries(cache) == [data.directory.name]


def test_directory_without_meta_is_rebuilt(corpus, tmp_path):
    root, _ = corpus
    cache = tmp_path / "cache"
    first = prepare_data(str(root), cache_dir=cache, log=Log(), **SETTINGS)
    val = np.array(first.val)
    (first.directory / "meta.json").unlink()
    (first.directory / "junk.bin").write_bytes(b"junk")
    log = Log()
    again = prepare_data(str(root), cache_dir=cache, log=log, **SETTINGS)
    assert again.directory == first.directory
    assert any("training a" in m for m in log) and not any("using cached" in m for m in log)
    assert not (again.directory / "junk.bin").exists()
    assert np.array_equal(again.val, val)
    assert cache_entries(cache) == [first.directory.name]


# --------------------------------------------------------------------------------------------
# SequenceSampler


def make_shards():
    # distinct values (gaps between shards) identify each token's shard and position
    return [np.arange(0, 1000, dtype=np.uint16), np.arange(2000, 2537, dtype=np.uint16),
            np.arange(4000, 4050, dtype=np.uint16), np.arange(6000, 6065, dtype=np.uint16)]


def expected_windows(shards, L):
    out = set()
    for s in shards:
        for i in range((len(s) - 1) // L):
            out.add(tuple(int(x) for x in s[i * L : i * L + L + 1]))
    return out


def test_one_epoch_visits_every_window_once():
    shards, L = make_shards(), 64
    sampler = SequenceSampler(shards, L, seed=3)
    # 999 // 64 = 15, 536 // 64 = 8, 49 // 64 = 0, 64 // 64 = 1
    assert sampler.n_windows == 24
    batch = sampler.next_batch(24)
    assert batch.shape == (24, L + 1) and batch.dtype == torch.int64
    rows = [tuple(r) for r in batch.tolist()]
    assert len(set(rows)) == 24
    assert set(rows) == expected_windows(shards, L)
    # contiguous: a window never crosses a shard boundary (there are gaps between shards)
    assert (batch[:, 1:] - batch[:, :-1] == 1).all()
    assert sampler.state_dict() == {"epoch": 0, "index": 24, "seed": 3}


def test_windows_are_exact_slices():
    shards, L = make_shards(), 64
    sampler = SequenceSampler(shards, L)
    flat = [(s, i) for s in range(len(shards)) for i in range((len(shards[s]) - 1) // L)]
    for w, (s, i) in enumerate(flat):
        assert np.array_equal(sampler.window(w), shards[s][i * L : i * L + L + 1])
    assert np.array_equal(sampler.window(23), shards[3])  # exactly L + 1 tokens: one window


def test_epochs_are_reshuffled():
    shards, L = make_shards(), 64
    sampler = SequenceSampler(shards, L, seed=0)
    first = sampler.next_batch(24)
    second = sampler.next_batch(24)
    assert sampler.state_dict()["epoch"] == 1
    assert not torch.equal(first, second)
    assert {tuple(r) for r in second.tolist()} == {tuple(r) for r in first.tolist()}
    # crossing the boundary inside a batch
    s2 = SequenceSampler(shards, L, seed=0)
    both = torch.cat([s2.next_batch(10), s2.next_batch(30), s2.next_batch(8)])
    assert torch.equal(both, torch.cat([first, second]))


def test_different_seeds_give_different_orders():
    shards, L = make_shards(), 64
    a = SequenceSampler(shards, L, seed=0).next_batch(24)
    b = SequenceSampler(shards, L, seed=1).next_batch(24)
    assert not torch.equal(a, b)
    assert torch.equal(a, SequenceSampler(shards, L, seed=0).next_batch(24))


@pytest.mark.parametrize("split", [0, 1, 7, 23, 24, 25, 47, 48, 60])
def test_state_dict_resumes_exactly(split):
    shards, L = make_shards(), 64
    ref = SequenceSampler(shards, L, seed=5)
    full = ref.next_batch(80)

    a = SequenceSampler(shards, L, seed=5)
    if split:
        a.next_batch(split)
    state = json.loads(json.dumps(a.state_dict()))  # plain, serialisable
    b = SequenceSampler(shards, L, seed=99)  # its own seed is replaced by the state's
    b.load_state_dict(state)
    assert b.seed == 5
    rest = b.next_batch(80 - split)
    assert torch.equal(rest, full[split:])
    assert torch.equal(a.next_batch(80 - split), rest)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 400), min_size=1, max_size=5), L=st.integers(1, 50),
       seed=st.integers(0, 10**6), split=st.integers(0, 200), extra=st.integers(1, 60))
def test_sampler_properties(lengths, L, seed, split, extra):
    shards, base = [], 0
    for n in lengths:
        shards.append(np.arange(base, base + n, dtype=np.int64))
        base += n + 1000
    n_windows = sum(max(0, (n - 1) // L) for n in lengths)
    if n_windows == 0:
        with pytest.raises(ValueError, match="no window"):
            SequenceSampler(shards, L, seed)
        return
    sampler = SequenceSampler(shards, L, seed)
    assert sampler.n_windows == n_windows
    epoch = sampler.next_batch(n_windows)
    assert {tuple(r) for r in epoch.tolist()} == expected_windows(shards, L)
    assert len({tuple(r) for r in epoch.tolist()}) == n_windows

    a = SequenceSampler(shards, L, seed)
    if split:
        a.next_batch(split)
    b = SequenceSampler(shards, L, seed + 1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch(extra), b.next_batch(extra))


def test_sampler_without_windows_is_an_error():
    with pytest.raises(ValueError, match="no window of 65 tokens"):
        SequenceSampler([np.arange(64), np.arange(10)], 64)


def test_sampler_on_prepared_shards(prepared, corpus, tmp_path):
    root, _ = corpus
    small = prepare_data(str(root), cache_dir=tmp_path, log=Log(), **SETTINGS, shard_tokens=1000)
    sampler = SequenceSampler(small.train, SEQ, seed=0)
    assert sampler.n_windows == sum((len(s) - 1) // SEQ for s in small.train)
    rows = {tuple(r) for r in sampler.next_batch(sampler.n_windows).tolist()}
    assert rows == expected_windows(small.train, SEQ)


# --------------------------------------------------------------------------------------------
# validation_windows and probe_set


def test_validation_windows():
    val = np.arange(1000, dtype=np.uint16)
    w = validation_windows(val, 64)
    assert w.shape == (15, 65) and w.dtype == torch.int64  # (1000 - 1) // 64
    for i in range(15):
        assert w[i].tolist() == val[i * 64 : i * 64 + 65].tolist()
    assert validation_windows(val, 64, max_tokens=100).shape == (2, 65)  # ceil(100 / 64)
    assert validation_windows(val, 64, max_tokens=64).shape == (1, 65)
    assert validation_windows(val, 64, max_tokens=65).shape == (2, 65)
    assert torch.equal(validation_windows(val, 64, max_tokens=10**9), w)
    assert torch.equal(validation_windows(val, 64, max_tokens=128), w[:2])
    assert validation_windows(np.arange(65), 64).shape == (1, 65)
    assert validation_windows(np.arange(64), 64).shape == (0, 65)


def test_validation_windows_on_prepared_data(prepared):
    data, _, _, _ = prepared
    w = validation_windows(data.val, SEQ, max_tokens=200)
    assert w.shape == (math.ceil(200 / SEQ), SEQ + 1)
    val = np.asarray(data.val).astype(np.int64)
    for i in range(len(w)):
        assert np.array_equal(w[i].numpy(), val[i * SEQ : i * SEQ + SEQ + 1])


def test_probe_set_spreads_over_domains():
    val = np.arange(1000, dtype=np.uint16)  # token value == position
    dom = np.array([0] * 500 + [2] * 300 + [5] * 20 + [2] * 180, dtype=np.uint16)
    tokens, domains = probe_set(val, dom, n_tokens=600, seq_len=64)
    # 3 domains -> 200 tokens each, rows of 64 -> 3 rows from each domain with 200 tokens;
    # domain 5 (20 tokens) has too few for a row
    assert tokens.shape == domains.shape == (6, 64)
    assert tokens.dtype == domains.dtype == torch.int64
    assert sorted(set(domains.flatten().tolist())) == [0, 2]
    assert (domains == domains[:, :1]).all()  # one domain per row
    # each token's domain id is val_domain at the token's position
    assert np.array_equal(dom[tokens.numpy()], domains.numpy())
    # the first tokens of each domain, in order
    assert tokens[domains[:, 0] == 0].flatten().tolist() == list(range(192))
    assert tokens[domains[:, 0] == 2].flatten().tolist() == list(range(500, 692))


def test_probe_set_short_rows_when_few_tokens_per_domain():
    val = np.arange(300, dtype=np.uint16)
    dom = np.repeat(np.arange(3, dtype=np.uint16), 100)
    tokens, domains = probe_set(val, dom, n_tokens=60, seq_len=64)
    # 20 tokens per domain: one row of L = min(64, 20) from each
    assert tokens.shape == (3, 20)
    assert domains[:, 0].tolist() == [0, 1, 2]
    assert tokens.tolist() == [list(range(0, 20)), list(range(100, 120)), list(range(200, 220))]


def test_probe_set_on_prepared_data(prepared):
    data, _, _, _ = prepared
    val = np.asarray(data.val).astype(np.int64)
    vdom = np.asarray(data.val_domain).astype(np.int64)
    present, counts = np.unique(vdom, return_counts=True)
    n_tokens = 150 * len(present)
    assert counts.min() >= 150  # every validation domain has enough tokens for this test
    tokens, domains = probe_set(data.val, data.val_domain, n_tokens, SEQ)
    assert tokens.shape[1] == SEQ
    assert set(domains.flatten().tolist()) == set(present.tolist())
    assert Counter(domains[:, 0].tolist()) == {int(d): 150 // SEQ for d in present}
    # validation documents of one domain are contiguous here, so each domain's rows are the
    # validation tokens from where that domain starts
    for d in present:
        first = int(np.flatnonzero(vdom == d)[0])
        rows = tokens[domains[:, 0] == int(d)].flatten().numpy()
        assert np.array_equal(rows, val[first : first + len(rows)])
        assert (vdom[first : first + len(rows)] == d).all()


def test_probe_set_with_domains_smaller_than_a_row():
    val = np.arange(180, dtype=np.uint16)
    domain = np.repeat(np.array([0, 1, 2], np.uint16), [60, 60, 30])[:180]
    domain = np.concatenate([domain, np.full(30, 2, np.uint16)])
    tokens, ids = probe_set(val, domain, 4096, 128)
    assert tokens.shape == (3, 60)  # rows as long as the largest domain allows
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert torch.equal(tokens[2], torch.arange(120, 180))
