"""Tokenisation in worker processes (data.num_proc): the packed cache is byte-identical for any
process count, local corpora and Hub streams alike, and its key does not depend on it."""

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from libmoe.data import Document, load_corpus, split_documents
from libmoe.data import encode as encode_mod
from libmoe.data import packed as packed_mod
from libmoe.data.encode import default_num_proc
from libmoe.data.packed import prepare_data
from libmoe.errors import WorkFailed

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
    monkeypatch.setattr(encode_mod, "CHUNK_CHARS", 4000)


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
    assert 1 <= default_num_proc() <= encode_mod.MAX_NUM_PROC


def _fake_stream(monkeypatch) -> None:
    lines = _lines()
    docs = [Document("\n".join(lines[i * 40 : (i + 1) * 40]), "ab"[i % 2], f"doc{i}") for i in range(150)]
    monkeypatch.setattr(packed_mod, "iter_hub_documents", lambda name, **_: iter(docs))


def test_a_dead_worker_fails_with_one_clear_error_instead_of_hanging(tmp_path, small_chunks, monkeypatch):
    _fake_stream(monkeypatch)

    def killed(*_args, **_kwargs):  # what the kernel's OOM killer does to a worker
        os.kill(os.getpid(), signal.SIGKILL)

    # Runs only in the (forked) workers: the parent trains the tokenizer but encodes nothing.
    monkeypatch.setattr(encode_mod, "_encode_packed", killed)
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            prepare_data("hf:fake/stream", cache_dir=tmp_path / "cache", num_proc=2, tokenizer_chars=40_000,
                         log=lambda _: None, **SETTINGS)
        except BaseException as err:  # noqa: BLE001  handed to the test thread
            errors.append(err)

    start = time.monotonic()
    thread = threading.Thread(target=prepare, daemon=True)  # a hang must fail the test, not stall it
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "prepare_data hung after a tokenising worker died"
    assert len(errors) == 1 and isinstance(errors[0], WorkFailed), errors
    assert "data.num_proc" in str(errors[0]) and "memory" in str(errors[0])
    assert time.monotonic() - start < 60
    assert not list((tmp_path / "cache").iterdir())  # no half-written cache left behind


def test_workers_are_spawned_not_forked_once_cuda_is_initialised(tmp_path, small_chunks, monkeypatch):
    _fake_stream(monkeypatch)
    methods = []
    real = encode_mod.ProcessPoolExecutor

    def recording(*args, mp_context, **kwargs):
        methods.append(mp_context.get_start_method())
        return real(*args, mp_context=mp_context, **kwargs)

    monkeypatch.setattr(encode_mod, "ProcessPoolExecutor", recording)
    caches = {}
    for cuda in (False, True):
        monkeypatch.setattr(encode_mod.torch.cuda, "is_initialized", lambda cuda=cuda: cuda)
        cache = tmp_path / f"cache_{cuda}"
        prepare_data("hf:fake/stream", cache_dir=cache, num_proc=2, tokenizer_chars=40_000,
                     max_train_tokens=20_000, log=lambda _: None, **SETTINGS)
        caches[cuda] = _files(cache)
    assert methods == ["fork", "spawn"]
    assert caches[False] == caches[True]


def _old_settings(**overrides) -> dict:
    # prepare_data's settings dict before stream_chunking existed (commit 3542d1d), at its defaults.
    settings = dict(format=1, tokenizer="train", vocab_size=8000, val_fraction=0.005, min_val_tokens=16_384,
                    max_doc_chars=50_000, split_seed=0, shard_tokens=1 << 27, max_train_tokens=None)
    settings.update(overrides)
    return settings


def _key(key_src: str) -> str:
    return hashlib.sha256(key_src.encode()).hexdigest()[:20]


def test_stream_caches_have_a_new_key_and_local_caches_keep_theirs(tmp_path, monkeypatch):
    _fake_stream(monkeypatch)
    cache = tmp_path / "stream"
    prepare_data("hf:fake/stream", cache_dir=cache, num_proc=1, tokenizer_chars=40_000,
                 max_train_tokens=20_000, log=lambda _: None, **SETTINGS)
    (stream_dir,) = [d.name for d in cache.iterdir()]
    sized = {k: v for k, v in SETTINGS.items() if k != "seq_len"}
    old = _old_settings(**sized, max_train_tokens=20_000, tokenizer_chars=40_000, hub={},
                        dataset="fake/stream")
    assert stream_dir != _key(json.dumps(old, sort_keys=True))  # 512-document chunks: another cache
    assert stream_dir == _key(json.dumps(dict(old, stream_chunking=2), sort_keys=True))

    lines = _lines()
    for d, domain in enumerate(["comedy", "history"]):
        (tmp_path / "corpus" / domain).mkdir(parents=True)
        for i in range(3):
            start = (d * 3 + i) * 200
            (tmp_path / "corpus" / domain / f"{i}.txt").write_text("\n".join(lines[start : start + 200]))
    cache = tmp_path / "local"
    prepare_data(str(tmp_path / "corpus"), cache_dir=cache, num_proc=1, log=lambda _: None, **SETTINGS)
    (local_dir,) = [d.name for d in cache.iterdir()]
    corpus = split_documents(load_corpus(str(tmp_path / "corpus")), 50_000)
    fingerprint = packed_mod._fingerprint_corpus(corpus)
    assert local_dir == _key(json.dumps(_old_settings(**sized), sort_keys=True) + fingerprint)
