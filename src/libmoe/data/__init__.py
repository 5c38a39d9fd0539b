"""Corpora (embedded default, local files) with domain labels, and tokenizers."""

from .corpus import Corpus, Document, embedded_corpus, load_corpus, split_documents
from .tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "Corpus",
    "Document",
    "SentencePieceTokenizer",
    "Tokenizer",
    "embedded_corpus",
    "load_corpus",
    "load_tokenizer",
    "split_documents",
    "train_tokenizer",
]
