"""Corpora (embedded default, local files, Hugging Face datasets) with domain labels, and tokenizers."""

from .corpus import Corpus, Document, embedded_corpus, load_corpus, split_documents
from .hub import HUB_ALIASES, load_hub_corpus
from .tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "HUB_ALIASES",
    "Corpus",
    "Document",
    "SentencePieceTokenizer",
    "Tokenizer",
    "embedded_corpus",
    "load_corpus",
    "load_hub_corpus",
    "load_tokenizer",
    "split_documents",
    "train_tokenizer",
]
