"""Tokenizers: a SentencePiece BPE trained on the corpus (the paper's setting: 8,000 pieces, byte
fallback so that any text round-trips, digits split one by one), or any Hugging Face tokenizer
loaded by path or Hub name. Both sit behind the same small interface."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from ..files import CorruptFileError, write_bytes, write_json

SPM_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
DAMAGED_FIX = ("restore it from the run's data cache (data.cache_dir; `libmoe prepare` with the run's "
               "config rebuilds it) or write the model directory again")


class Tokenizer(Protocol):
    """What libmoe needs of a tokenizer: encode, decode, save, vocab_size and eos_id."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> None: ...


class SentencePieceTokenizer:
    """A trained SentencePiece model (`tokenizer.model`); ids in [0, vocab_size)."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Each text's ids, encoded on `num_threads` threads (default: one per CPU core)."""
        return self.sp.encode(texts, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes(directory / SPM_FILE, self.proto)
        write_json(directory / META_FILE, {"kind": "sentencepiece", "vocab_size": self.vocab_size})


class HFTokenizer:
    """Any Hugging Face tokenizer (`transformers.AutoTokenizer`), by local path or Hub name."""

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        self.name_or_path = name_or_path
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else -1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Each text's ids (the fast tokenizer picks its own threads; `num_threads` is ignored)."""
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        self.tok.save_pretrained(str(directory))


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    max_sentence_length: int = 16384,
    seed: int = 0,
) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE model on `texts` (one training sentence per line of each text).

    byte_fallback: unseen characters become their UTF-8 bytes, so decode(encode(t)) == t for any
    text; split_digits: numbers are spelled digit by digit. Deterministic for a given input.
    """
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 pieces plus "
            "specials; use at least 300."
        )
    spm.set_random_generator_seed(seed)
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.9995,
            max_sentence_length=max_sentence_length,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            unk_id=0, bos_id=-1, eos_id=1, pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as err:
        limit = re.search(r"Vocabulary size too high.*<= (\d+)", str(err))
        if limit:
            raise ValueError(
                f"the training text is too small for a {vocab_size}-piece tokenizer (at most "
                f"{limit.group(1)} here); add text or lower the vocabulary size (model.vocab_size)."
            ) from None
        raise ValueError(f"tokenizer training failed: {err}") from err
    return SentencePieceTokenizer(model.getvalue())


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """A tokenizer saved by libmoe (a directory with `tokenizer.model`), a `.model` file, or any
    Hugging Face tokenizer directory / Hub name."""
    path = Path(name_or_path)
    spm_file = path / SPM_FILE if path.is_dir() else path
    if spm_file.is_file() and spm_file.suffix == ".model":
        try:
            return SentencePieceTokenizer(spm_file.read_bytes())
        except (RuntimeError, OSError):  # sentencepiece: "INTERNAL: ... ParseFromArray" on a torn file
            raise CorruptFileError(spm_file, "truncated or not a SentencePiece model", DAMAGED_FIX) from None
    try:
        return HFTokenizer(str(name_or_path))
    except ImportError as err:
        if not path.exists():
            raise FileNotFoundError(
                f"no tokenizer at {str(name_or_path)!r} (and Hub names need transformers: "
                "pip install 'libmoe[bench]')."
            ) from err
        raise ValueError(
            f"{str(name_or_path)!r} is not a libmoe tokenizer; loading Hugging Face tokenizers needs "
            "transformers: pip install 'libmoe[bench]'."
        ) from err
    except Exception as err:  # noqa: BLE001  OSError, JSON and tokenizers errors on damaged files
        if path.is_dir() and any(path.iterdir()):
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                try:  # name the damaged file where one of transformers' JSON files is
                    if (path / name).is_file():
                        json.loads((path / name).read_text(encoding="utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise CorruptFileError(path / name, "not valid JSON", DAMAGED_FIX) from None
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CorruptFileError(path, f"no tokenizer loads from it: {first}", DAMAGED_FIX) from None
        if isinstance(err, OSError) or not path.exists():
            raise FileNotFoundError(
                f"no tokenizer at {str(name_or_path)!r}: give a run/tokenizer directory, a .model "
                "file or a Hugging Face tokenizer path or name."
            ) from None
        raise
