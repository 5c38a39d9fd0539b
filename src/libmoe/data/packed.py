"""Tokenised corpora packed into memory-mapped shards, cached, and sampled reproducibly.

`prepare_data` turns a corpus into a directory under the cache::

    <cache>/<key>/meta.json            sizes, dtype, domains, tokenizer fingerprint, sources
    <cache>/<key>/tokenizer/           the tokenizer (trained on the training split, or loaded)
    <cache>/<key>/train_<i>.bin        training tokens, documents joined by EOS, raw uint16/uint32
    <cache>/<key>/val.bin, val_domain.bin   validation tokens and each token's domain id

The key hashes the corpus content (for Hub streams: the dataset name and options), the tokenizer
spec and every setting that changes the tokens, so a changed file or setting gives a new directory
and an unchanged one is reused. The directory is written under a temporary name and renamed, so an
interrupted preparation leaves no half cache.

Local corpora: validation is split by document within each domain (val_fraction of its
characters, at least one document when the domain has two or more), grown proportionally until it
holds about min_val_tokens. Hub streams are read once; see `prepare_data`.

Tokenisation of a large input runs in `num_proc` worker processes (`data.num_proc`; default one
per CPU core, up to 32) over chunks of about a megabyte of text, written back in document order:
the packed bytes are the same for any num_proc, which is therefore not part of the key.
A worker that dies (killed for lack of memory, say) stops the preparation with an error that
says to lower data.num_proc, rather than a hang.

`SequenceSampler` draws training windows in a seeded random order; its state is two integers, so a
run can resume at exactly the next window.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import load_corpus, split_documents
from .documents import Corpus, Document
from .encode import Encoder, chunks, default_num_proc
from .hub import hub_name, iter_hub_documents
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
CHARS_PER_TOKEN = 3.0  # conservative estimate used only to size the validation split
PARALLEL_MIN_CHARS = 8 << 20  # with num_proc None, smaller local corpora are tokenised in-process
STREAM_CHUNKING = 2  # in a Hub stream's cache key; bump when stream chunking changes its bytes


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "libmoe" / "data"


def split_validation(
    docs: list[Document], fraction: float, min_chars: int, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, val) by document, stratified by domain; see the module docstring."""
    total = sum(len(d.text) for d in docs)
    share = max(fraction, min_chars / total) if total else fraction
    by_domain: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_domain.setdefault(doc.domain, []).append(i)
    rng = random.Random(seed)
    val: set[int] = set()
    for indices in by_domain.values():
        if len(indices) < 2:
            continue
        order = indices[:]
        rng.shuffle(order)
        target = share * sum(len(docs[i].text) for i in indices)
        got = 0
        for i in order[:-1]:  # always leave one document of the domain for training
            if got >= target:
                break
            val.add(i)
            got += len(docs[i].text)
    train = [d for i, d in enumerate(docs) if i not in val]
    return train, [d for i, d in enumerate(docs) if i in val]


def _fingerprint_corpus(corpus: Corpus) -> str:
    h = hashlib.sha256()
    for doc in corpus.documents:
        h.update(doc.domain.encode())
        h.update(b"\0")
        h.update(doc.text.encode("utf-8", "surrogatepass"))
        h.update(b"\1")
    return h.hexdigest()


def tokenizer_fingerprint(directory: str | Path) -> str:
    """sha256 over a saved tokenizer directory's files (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class PackedData:
    """A prepared dataset: memory-mapped token arrays plus the tokenizer and metadata."""

    directory: Path
    meta: dict
    tokenizer: Tokenizer
    train: list[np.ndarray]
    val: np.ndarray
    val_domain: np.ndarray

    @property
    def domains(self) -> list[str]:
        return self.meta["domains"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.directory / "tokenizer"

    @property
    def tokenizer_hash(self) -> str:
        return self.meta["tokenizer_hash"]

    @classmethod
    def open(cls, directory: str | Path) -> PackedData:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])

        def mm(name: str, dt=dtype) -> np.ndarray:
            path = directory / name
            if path.stat().st_size == 0:
                return np.zeros(0, dtype=dt)
            return np.memmap(path, dtype=dt, mode="r")

        train = [mm(f"train_{i}.bin") for i in range(meta["n_train_shards"])]
        return cls(directory, meta, load_tokenizer(directory / "tokenizer"), train,
                   mm("val.bin"), mm("val_domain.bin", np.uint16))


def prepare_data(
    source: str = "embedded",
    *,
    tokenizer: str = "train",
    vocab_size: int = 8000,
    seq_len: int = 128,
    val_fraction: float = 0.005,
    min_val_tokens: int = 16_384,
    max_doc_chars: int = 50_000,
    split_seed: int = 0,
    shard_tokens: int = 1 << 27,
    max_train_tokens: int | None = None,
    tokenizer_chars: int = 50_000_000,
    hub: dict | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    num_proc: int | None = None,
) -> PackedData:
    """Load, split, tokenise and pack `source` (cached); see the module docstring.

    Local sources are read whole and split by document within each domain. Hub sources
    (``hf:NAME``, ``slimpajama``) are streamed: the tokenizer is trained on the first
    `tokenizer_chars` characters of training documents, validation takes the first documents until
    it holds min_val_tokens and then each document with probability val_fraction, and reading stops
    at `max_train_tokens` training tokens (or the end of the stream, or hub max_documents).

    num_proc: processes that tokenise (None: one per CPU core up to MAX_NUM_PROC, for streams and
    local corpora of PARALLEL_MIN_CHARS or more; smaller ones in this process). The cache is the
    same for any value and its key does not include it."""
    if num_proc is not None and (not isinstance(num_proc, int) or num_proc < 1):
        raise ValueError(f"num_proc={num_proc!r} must be a whole number of processes, at least 1 "
                         "(or None for one per CPU core).")
    settings = dict(format=FORMAT_VERSION, tokenizer=tokenizer,
                    vocab_size=vocab_size if tokenizer == "train" else None,
                    val_fraction=val_fraction, min_val_tokens=min_val_tokens,
                    max_doc_chars=max_doc_chars, split_seed=split_seed, shard_tokens=shard_tokens,
                    max_train_tokens=max_train_tokens)
    dataset = hub_name(str(source))
    if dataset is not None:
        # A stream is identified by its name and options; reading it to hash it would cost a pass.
        # stream_chunking 2: the stream is tokenised in chunks of up to CHUNK_CHARS characters or
        # 512 documents (1: always 512 documents), and the chunk the max_train_tokens cut-off falls
        # in decides which validation documents are written, so the same settings can give other
        # bytes than a version-1 cache: a new key, never changed content under an old one (bump it
        # whenever stream chunking changes again, CHUNK_CHARS included). Local corpora split
        # validation before tokenising, so chunking never changes their bytes or their keys.
        settings.update(tokenizer_chars=tokenizer_chars, hub=hub or {}, dataset=dataset,
                        stream_chunking=STREAM_CHUNKING)
        key_src = json.dumps(settings, sort_keys=True)
    else:
        corpus = load_corpus(source, hub_options=hub)
        if corpus.skipped:
            log(f"data: skipped {len(corpus.skipped)} files that are not UTF-8 "
                f"(first: {corpus.skipped[0]})")
        corpus = split_documents(corpus, max_doc_chars)
        key_src = json.dumps(settings, sort_keys=True) + _fingerprint_corpus(corpus)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / key
    if (target / "meta.json").is_file():
        log(f"data: using cached tokens in {target}")
    elif dataset is not None:
        _build_cache(target, settings, source, log,
                     lambda tmp: _build_stream(dataset, hub or {}, settings, tmp, log, num_proc))
    else:
        _build_cache(target, settings, source, log,
                     lambda tmp: _build_corpus(corpus, source, settings, tmp, seq_len, log, num_proc))
    data = PackedData.open(target)
    n_train = data.meta["n_train_tokens"]
    if n_train < seq_len + 1 or len(data.val) < seq_len + 1:
        raise ValueError(
            f"data source {source!r} is too short: {n_train} training and {len(data.val)} "
            f"validation tokens, but one sequence needs {seq_len + 1}; use more text or a shorter "
            "train.seq_len."
        )
    return data


def _build_cache(target: Path, settings: dict, source: str, log, build: Callable[[Path], dict]) -> None:
    """Build cache directory `target` under a temporary name (`build(tmp)` writes the tokens and
    returns their sizes), add meta.json, then rename it into place: an interrupted build leaves
    no half cache."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = dict(settings, **build(tmp), source=str(source),
                    tokenizer_hash=tokenizer_fingerprint(tmp / "tokenizer"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"data: {meta['n_train_tokens']:,} training and {meta['n_val_tokens']:,} validation "
        f"tokens in {target}")


class _TokenWriter:
    """Appends tokenised documents to training shards (up to max_train_tokens) and to the
    validation arrays with each token's domain id."""

    def __init__(self, directory: Path, tok: Tokenizer, settings: dict):
        self.directory, self.tok = directory, tok
        self.dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
        self.eos = [tok.eos_id] if tok.eos_id >= 0 else []
        self.shard_tokens = settings["shard_tokens"]
        self.max_train = settings["max_train_tokens"]
        self.domains: list[str] = []
        self.n_shards, self.in_shard, self.n_train = 0, 0, 0
        self.n_train_docs, self.n_val_docs = 0, 0
        self.file = None
        self.val = (directory / "val.bin").open("wb")
        self.val_domain = (directory / "val_domain.bin").open("wb")
        self.n_val = 0

    @property
    def full(self) -> bool:
        return self.max_train is not None and self.n_train >= self.max_train

    def domain_id(self, domain: str) -> int:
        if domain not in self.domains:
            self.domains.append(domain)
        return self.domains.index(domain)

    def add(self, docs: list[Document], arrays: list[np.ndarray], val: bool) -> None:
        """Append documents with their token arrays (ids and EOS, from `Encoder`)."""
        for doc, arr in zip(docs, arrays):
            if val:
                arr.tofile(self.val)
                np.full(len(arr), self.domain_id(doc.domain), np.uint16).tofile(self.val_domain)
                self.n_val += len(arr)
                self.n_val_docs += 1
                continue
            self.domain_id(doc.domain)
            if self.full:
                continue
            if self.max_train is not None:
                arr = arr[: self.max_train - self.n_train]
            self.n_train_docs += 1
            while len(arr):
                if self.file is None or self.in_shard >= self.shard_tokens:
                    if self.file is not None:
                        self.file.close()
                    self.file = (self.directory / f"train_{self.n_shards}.bin").open("wb")
                    self.n_shards, self.in_shard = self.n_shards + 1, 0
                take = min(len(arr), self.shard_tokens - self.in_shard)
                arr[:take].tofile(self.file)
                arr, self.in_shard, self.n_train = arr[take:], self.in_shard + take, self.n_train + take

    def close(self) -> dict:
        for f in (self.file, self.val, self.val_domain):
            if f is not None:
                f.close()
        return dict(dtype=np.dtype(self.dtype).name, domains=self.domains,
                    n_train_shards=self.n_shards, n_train_tokens=self.n_train,
                    n_val_tokens=self.n_val, n_train_documents=self.n_train_docs,
                    n_val_documents=self.n_val_docs, vocab_size=self.tok.vocab_size,
                    eos_id=self.tok.eos_id)


def _tokenizer_for(settings: dict, texts, n_docs: int, directory: Path, log) -> Tokenizer:
    if settings["tokenizer"] == "train":
        log(f"data: training a {settings['vocab_size']}-piece BPE tokenizer on {n_docs} training "
            "documents")
        tok = train_tokenizer(texts, settings["vocab_size"], seed=settings["split_seed"])
    else:
        tok = load_tokenizer(settings["tokenizer"])
    tok.save(directory / "tokenizer")
    return tok


def _build_corpus(corpus: Corpus, source: str, settings: dict, tmp: Path, seq_len: int, log,
                  num_proc: int | None = None) -> dict:
    min_val_chars = int(settings["min_val_tokens"] * CHARS_PER_TOKEN)
    train_docs, val_docs = split_validation(
        corpus.documents, settings["val_fraction"], min_val_chars, settings["split_seed"]
    )
    if not train_docs or not val_docs:
        chars = sum(len(d.text) for d in corpus.documents)
        raise ValueError(
            f"data source {source!r} is too small: {len(corpus.documents)} document(s) of "
            f"{chars:,} characters in all, but training needs a validation split by document and "
            f"at least one sequence of {seq_len + 1} tokens in each split; add text (long files "
            f"are cut into documents of data.max_doc_chars={settings['max_doc_chars']} characters)."
        )
    tok = _tokenizer_for(settings, (d.text for d in train_docs), len(train_docs), tmp, log)
    chars = sum(len(d.text) for d in corpus.documents)
    procs = num_proc or (default_num_proc() if chars >= PARALLEL_MIN_CHARS else 1)
    log(f"data: tokenising {len(train_docs)} training and {len(val_docs)} validation documents"
        + (f" in {procs} processes" if procs > 1 else ""))
    writer = _TokenWriter(tmp, tok, settings)
    for doc in corpus.documents:  # domain ids in first-seen order of the whole corpus
        writer.domain_id(doc.domain)
    # num_proc None on a small corpus: this process, SentencePiece's threads on every core.
    with Encoder(tok, tmp / "tokenizer", writer.dtype, writer.eos, procs,
                  threads=None if num_proc is None else 1) as encoder:
        for docs, arrays in encoder.map(chunks(train_docs)):
            writer.add(docs, arrays, val=False)
            if writer.full:
                break
        for docs, arrays in encoder.map(chunks(val_docs)):
            writer.add(docs, arrays, val=True)
    return dict(writer.close(), skipped_files=len(corpus.skipped))


def _build_stream(dataset: str, hub: dict, settings: dict, tmp: Path, log,
                  num_proc: int | None = None) -> dict:
    """One pass over a Hub stream; see prepare_data."""
    docs = (piece for doc in iter_hub_documents(dataset, **hub)
            for piece in split_documents(Corpus([doc]), settings["max_doc_chars"]).documents)
    rng = random.Random(settings["split_seed"])
    min_val_chars = settings["min_val_tokens"] * CHARS_PER_TOKEN
    val_chars = 0

    def is_val(doc: Document) -> bool:
        nonlocal val_chars
        if val_chars < min_val_chars or rng.random() < settings["val_fraction"]:
            val_chars += len(doc.text)
            return True
        return False

    # The first training documents (up to tokenizer_chars) train the tokenizer, then are written.
    head: list[tuple[Document, bool]] = []
    chars = 0
    for doc in docs:
        flag = is_val(doc)
        head.append((doc, flag))
        chars += 0 if flag else len(doc.text)
        if chars >= settings["tokenizer_chars"]:
            break
    train_head = [d for d, v in head if not v]
    if not train_head or len(train_head) == len(head):
        raise ValueError(f"dataset {dataset!r} is too small for a validation split by document "
                         f"({len(head)} documents read).")
    tok = _tokenizer_for(settings, (d.text for d in train_head), len(train_head), tmp, log)
    writer = _TokenWriter(tmp, tok, settings)
    limit = settings["max_train_tokens"]
    procs = num_proc or default_num_proc()
    log(f"data: tokenising the stream of {dataset!r}"
        + (f" up to {limit:,} training tokens" if limit else "")
        + (f" in {procs} processes" if procs > 1 else ""))
    report = 1 << 24
    # The head, then the rest of the stream with each document's split drawn in stream order (the
    # encoder reads at most a few chunks ahead of what is written).
    stream = itertools.chain(head, ((d, is_val(d)) for d in docs))
    with Encoder(tok, tmp / "tokenizer", writer.dtype, writer.eos, procs,
                  threads=None if num_proc is None else 1) as encoder:
        for pending, arrays in encoder.map(chunks(stream)):
            for d, _ in pending:  # domain ids in stream order
                writer.domain_id(d.domain)
            for val in (False, True):
                pairs = [(d, a) for (d, v), a in zip(pending, arrays) if v == val]
                writer.add([d for d, _ in pairs], [a for _, a in pairs], val=val)
            if writer.n_train >= report:
                log(f"data: {writer.n_train:,} training tokens so far")
                report *= 2
            if writer.full:
                break
    return dict(writer.close(), skipped_files=0)


class SequenceSampler:
    """Training windows of seq_len + 1 tokens (stride seq_len, within shards), in a random order
    drawn from `seed` for each epoch. State: (epoch, index into that epoch's order)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, seed: int = 0):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.offsets = np.cumsum([0] + self.counts)
        self.n_windows = int(self.offsets[-1])
        if self.n_windows == 0:
            raise ValueError(f"the training data holds no window of {seq_len + 1} tokens.")
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_windows, generator=g)

    def window(self, w: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, w, side="right")) - 1
        start = (w - int(self.offsets[shard])) * self.seq_len
        return self.shards[shard][start : start + self.seq_len + 1]

    def next_batch(self, n: int) -> torch.Tensor:
        """The next n windows as an int64 tensor [n, seq_len + 1]."""
        rows = []
        for _ in range(n):
            if self.index == self.n_windows:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            rows.append(self.window(int(self._order[self.index])))
            self.index += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


def validation_windows(val: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len + 1] (stride seq_len) of the validation tokens, the
    first ceil(max_tokens / seq_len) of them when max_tokens is given."""
    n = (len(val) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, math.ceil(max_tokens / seq_len))
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    return torch.from_numpy(np.asarray(val[: n * seq_len + 1]).astype(np.int64))[idx]


def probe_set(
    val: np.ndarray, val_domain: np.ndarray, n_tokens: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of about n_tokens validation tokens spread evenly over the domains present:
    (tokens [n, L], domain ids [n, L]) with L = min(seq_len, n_tokens / domains, the largest
    domain's validation tokens)."""
    domain_ids = np.asarray(val_domain)
    domains = [int(d) for d in np.unique(domain_ids)]
    if not domains:
        raise ValueError("the validation split is empty; no probe set can be drawn from it.")
    per_domain = max(1, n_tokens // len(domains))
    largest = max(int((domain_ids == d).sum()) for d in domains)
    # Rows of one length for all; domains with fewer tokens than a row are left out.
    length = min(seq_len, per_domain, largest)
    tok_rows, dom_rows = [], []
    for d in domains:
        positions = np.flatnonzero(domain_ids == d)[:per_domain]
        n = len(positions) // length
        if n == 0:
            continue
        picked = positions[: n * length]
        tok_rows.append(np.asarray(val)[picked].astype(np.int64).reshape(n, length))
        dom_rows.append(np.full((n, length), d, np.int64))
    return torch.from_numpy(np.concatenate(tok_rows)), torch.from_numpy(np.concatenate(dom_rows))
