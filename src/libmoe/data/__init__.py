"""Corpora (embedded default, local files, Hugging Face datasets) with domain labels, tokenizers,
and tokenised data packed into cached memory-mapped shards."""

from .corpus import Corpus, Document, embedded_corpus, load_corpus, split_documents
from .hub import HUB_ALIASES, iter_hub_documents, load_hub_corpus
from .packed import PackedData, SequenceSampler, prepare_data, probe_set, validation_windows
from .tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "HUB_ALIASES",
    "Corpus",
    "Document",
    "PackedData",
    "SentencePieceTokenizer",
    "SequenceSampler",
    "Tokenizer",
    "embedded_corpus",
    "iter_hub_documents",
    "load_corpus",
    "load_hub_corpus",
    "load_tokenizer",
    "prepare_data",
    "probe_set",
    "split_documents",
    "train_tokenizer",
    "validation_windows",
]
