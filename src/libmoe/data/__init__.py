"""Corpora (embedded default, local files, Hugging Face datasets) with domain labels, tokenizers,
and tokenised data packed into cached memory-mapped shards."""

from .corpus import (
    Corpus,
    Document,
    corpus_hash,
    corpus_record,
    embedded_corpus,
    load_corpus,
    split_documents,
)
from .hf_tokenizer import is_libmoe_sentencepiece, write_transformers_tokenizer
from .hub import HUB_ALIASES, iter_hub_documents, load_hub_corpus
from .packed import (
    PackedData,
    SequenceSampler,
    prepare_data,
    probe_set,
    tokenizer_fingerprint,
    validation_windows,
)
from .tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "HUB_ALIASES",
    "Corpus",
    "Document",
    "PackedData",
    "SentencePieceTokenizer",
    "SequenceSampler",
    "Tokenizer",
    "corpus_hash",
    "corpus_record",
    "embedded_corpus",
    "is_libmoe_sentencepiece",
    "iter_hub_documents",
    "load_corpus",
    "load_hub_corpus",
    "load_tokenizer",
    "prepare_data",
    "probe_set",
    "split_documents",
    "tokenizer_fingerprint",
    "train_tokenizer",
    "validation_windows",
    "write_transformers_tokenizer",
]
