"""SentencePiece BPE tokenizer: round trip, byte fallback, split digits, save/load, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libmoe.data import load_corpus, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [d.text for d in load_corpus("embedded").documents[:40]]
    return train_tokenizer(texts, vocab_size=600)


def test_vocab_and_specials(tokenizer):
    assert tokenizer.vocab_size == 600
    assert tokenizer.eos_id == 1
    assert tokenizer.sp.id_to_piece(0) == "<unk>"


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_any_text_round_trips_through_byte_fallback(tokenizer, text):
    ids = tokenizer.encode(text)
    assert 0 not in ids  # never <unk>: unseen characters fall back to bytes
    assert tokenizer.decode(ids) == text


def test_digits_are_split_one_by_one(tokenizer):
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("x = 31415 + 27")]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits and all(len(p.lstrip("▁")) == 1 for p in digits)


def test_training_is_deterministic_and_learns_merges(tokenizer):
    texts = [d.text for d in load_corpus("embedded").documents[:40]]
    assert train_tokenizer(texts, vocab_size=600).proto == tokenizer.proto
    text = "the function returns the value"
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2  # merges compress common words


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode("def main():\n    return 0\n") == tokenizer.encode("def main():\n    return 0\n")
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.model").vocab_size == 600


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises((FileNotFoundError, ValueError), match="tokenizer"):
        load_tokenizer(tmp_path / "nothing-here")


def test_hugging_face_tokenizer_by_path_round_trips_and_saves(tmp_path, hf_tokenizer_dir):
    text = "First Citizen:\nBefore we proceed any further, hear me speak. 1234\n"
    path = hf_tokenizer_dir(tmp_path, [text * 20])
    tok = load_tokenizer(path)
    assert type(tok).__name__ == "HFTokenizer"
    assert tok.vocab_size == len(tok.tok) and tok.eos_id == tok.tok.convert_tokens_to_ids("</s>")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "speak"]) == [ids, tok.encode("speak")]
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode(text) == ids


def test_too_little_text_for_the_vocabulary_says_so():
    with pytest.raises(ValueError, match=r"too small for a 400-piece tokenizer \(at most \d+ here\)"):
        train_tokenizer(["hello world foo bar"] * 3, vocab_size=400)
