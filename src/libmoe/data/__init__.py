"""Corpora (embedded default, local files), with a domain label per document."""

from .corpus import Corpus, Document, embedded_corpus, load_corpus, split_documents

__all__ = ["Corpus", "Document", "embedded_corpus", "load_corpus", "split_documents"]
