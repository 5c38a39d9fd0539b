"""Text corpora with a domain label per document: the embedded default, local files, the Hub.

Sources (`load_corpus(source)`):
- ``"embedded"``: text that ships with Python itself, so nothing is downloaded and no third-party
  text is in the repository: the documentation topics of `pydoc_data.topics` (prose, domain
  ``python_docs``) and the top-level standard-library modules' source (domain ``python_code``).
- a directory: every ``*.txt`` below it, one document per file, the domain being the first
  sub-folder's name (files directly inside the directory get the directory's own name); the layout
  of ``../shared/data/corpus``.
- a ``.jsonl`` file: one document per line from its ``text`` field, the domain from a ``domain``
  field when present, else the file's stem.
- any other file: one plain-text document whose domain is the file's stem.
- ``"hf:NAME"``: a Hugging Face `datasets` dataset (a Hub id or a local dataset path), streamed by
  `libmoe.data.hub.load_hub_corpus`; a bare alias of `hub.HUB_ALIASES` such as ``"slimpajama"``
  does the same when no file or directory of that name exists.

Files that are not valid UTF-8 are skipped and counted in `Corpus.skipped`, never half-read.

`corpus_hash(corpus)` is a corpus's content hash (its documents' text and domain, in sorted order,
not their paths), and `corpus_record(source)` what a results file records about the text a source
gives: that hash, the document and character counts, and for the embedded corpus the Python it
came from. The embedded corpus is the installed Python's own text, so it differs between Python
versions (3.11 and 3.12 ship other documentation and modules) and so does its hash; it cannot be
made identical without shipping text, so the bench shows the hash wherever its numbers are.
"""

from __future__ import annotations

import hashlib
import json
import platform
import pydoc_data.topics
import sysconfig
from pathlib import Path

from .documents import Corpus, Document
from .hub import HUB_ALIASES, hub_name, load_hub_corpus

__all__ = ["Corpus", "Document", "corpus_hash", "corpus_record", "embedded_corpus", "load_corpus",
           "split_documents"]


def embedded_corpus() -> Corpus:
    """Python's documentation topics (prose) and standard-library sources (code); see module doc."""
    docs = [
        Document(text, "python_docs", f"pydoc_data.topics:{name}")
        for name, text in sorted(pydoc_data.topics.topics.items())
        if text.strip()
    ]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = Corpus(docs)
    for path in sorted(stdlib.glob("*.py")):
        _add_text_file(corpus, path, "python_code")
    if not corpus.documents:
        raise FileNotFoundError("the embedded corpus found no Python documentation or sources.")
    return corpus


def _add_text_file(corpus: Corpus, path: Path, domain: str) -> None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        corpus.skipped.append(str(path))
        return
    if text.strip():
        corpus.documents.append(Document(text, domain, str(path)))


def _load_jsonl(path: Path) -> Corpus:
    corpus = Corpus([])
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(
                    f"{path}:{n} is not a UTF-8 JSON line ({err}); fix or remove it."
                ) from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n} has no string 'text' field; each line needs one.")
            if record["text"].strip():
                domain = str(record.get("domain") or path.stem)
                corpus.documents.append(Document(record["text"], domain, f"{path}:{n}"))
    return corpus


def load_corpus(source: str | Path = "embedded", *, hub_options: dict | None = None) -> Corpus:
    """Load documents with domain labels from `source` (see the module docstring). `hub_options`
    are keyword arguments for `load_hub_corpus` (``split``, ``max_documents``, ...) and apply only
    to ``"hf:NAME"`` and alias sources."""
    name = str(source)
    path = Path(source)
    dataset = hub_name(name)
    if dataset is not None:
        return load_hub_corpus(dataset, **(hub_options or {}))
    if hub_options:
        raise ValueError(
            f"hub_options apply only to 'hf:NAME' or {sorted(HUB_ALIASES)} sources, not {name!r}."
        )
    if name == "embedded":
        return embedded_corpus()
    if not path.exists():
        raise FileNotFoundError(
            f"data source {name!r} does not exist; give a directory of .txt files, a text "
            f"or .jsonl file, 'embedded', 'hf:NAME' or one of {sorted(HUB_ALIASES)}."
        )
    if path.is_dir():
        corpus = Corpus([])
        for file in sorted(path.rglob("*.txt")):
            parts = file.relative_to(path).parts
            _add_text_file(corpus, file, parts[0] if len(parts) > 1 else path.name)
    elif path.suffix == ".jsonl":
        corpus = _load_jsonl(path)
    else:
        corpus = Corpus([])
        _add_text_file(corpus, path, path.stem)
    if not corpus.documents:
        n = len(corpus.skipped)
        why = (f" ({n} file{'s' * (n > 1)} skipped as not UTF-8, e.g. {corpus.skipped[0]})"
               if n else "")
        raise ValueError(f"data source {str(source)!r} holds no text{why}.")
    return corpus


def split_documents(corpus: Corpus, max_chars: int = 50_000) -> Corpus:
    """Cut documents longer than `max_chars` at line breaks into pieces of at most about that size
    (a single long file such as tinyshakespeare.txt becomes many documents, which a by-document
    validation split needs). Labels and sources are kept; pieces get a ``#k`` suffix."""
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be at least 1.")
    out = []
    for doc in corpus.documents:
        if len(doc.text) <= max_chars:
            out.append(doc)
            continue
        piece, pieces = [], []
        size = 0
        for line in doc.text.splitlines(keepends=True):
            if size + len(line) > max_chars and piece:
                pieces.append("".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            pieces.append("".join(piece))
        out.extend(Document(p, doc.domain, f"{doc.source}#{k}") for k, p in enumerate(pieces))
    return Corpus(out, list(corpus.skipped))


def corpus_hash(corpus: Corpus) -> str:
    """SHA-256 (hex) of a corpus's content: each document's domain and text, documents in sorted
    order, so the same text gives the same hash on every machine whatever the files' paths or the
    order they were listed in; a changed, added or removed document (or a changed domain) gives
    another hash."""
    h = hashlib.sha256()
    for domain, text in sorted((d.domain, d.text) for d in corpus.documents):
        for part in (domain, text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no two corpora collide by framing
            h.update(data)
    return h.hexdigest()


def corpus_record(source: str | Path = "embedded", hub_options: dict | None = None) -> dict:
    """What a results file records about the text `source` gives (see `load_corpus`):
    {"source", "hash" (`corpus_hash`), "documents", "chars"}, plus "python" (the version whose
    documentation and standard library it is) for the embedded corpus. A Hub stream is not read
    to hash it (that is a pass over the whole stream): its record has "hash" None and "stream",
    the dataset and its options (a revision among them when one is given)."""
    name = str(source)
    dataset = hub_name(name)
    if dataset is not None:
        return {"source": name, "hash": None, "stream": {"dataset": dataset, **(hub_options or {})}}
    corpus = load_corpus(source, hub_options=hub_options)
    record = {"source": name, "hash": corpus_hash(corpus), "documents": len(corpus.documents),
              "chars": sum(len(d.text) for d in corpus.documents)}
    if name == "embedded":
        record["python"] = platform.python_version()
    return record
