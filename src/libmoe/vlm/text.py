"""Tokenizers and chat templates of the VLM stages.

`words`: a word-level tokenizer (lowercased, words and punctuation) built from the dataset's own
text, for the CPU presets (no download, a vocabulary of a few hundred words). Any other name is a
transformers tokenizer (Hub name or directory); `<image>` is added as a special token if missing.

Templates turn a LLaVA conversation into (ids, labels): the loss is on the assistant turns only.
`plain` (the PT stage, as LLaVA's pretraining): the image then the caption. `simple`:
"user: Q assistant: A<eos>" per turn. `phi3`: Phi-3.5's "<|user|>\\nQ<|end|>\\n<|assistant|>\\nA<|end|>\\n".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from .model import IMAGE_TOKEN

TEMPLATES = {
    "simple": ("user: {q} assistant:", " {a}"),
    "phi3": ("<|user|>\n{q}<|end|>\n<|assistant|>\n", "{a}<|end|>\n"),
}
SPECIAL = ["<pad>", "<unk>", "<eos>", IMAGE_TOKEN]
_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenizer(texts: Iterable[str]):
    """A PreTrainedTokenizerFast over every word of `texts` (lowercased) plus <pad>, <unk>, <eos>
    and <image>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    texts = [*texts, *(part for pair in TEMPLATES.values() for part in pair)]  # the template's words
    words = sorted({w for text in texts for w in _WORD.findall(text.replace(IMAGE_TOKEN, " ").lower())
                    if w not in "{}"})
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", additional_special_tokens=[IMAGE_TOKEN])


def load_tokenizer(name: str | Path):
    """A transformers tokenizer with the <image> special token and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name))
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def conversation_texts(records: Iterable[dict]) -> list[str]:
    return [turn["value"] for r in records for turn in r.get("conversations", [])]


def _ids(tokenizer, text: str, n_image_tokens: int) -> list[int]:
    """Token ids of `text` with every <image> expanded to n_image_tokens image-token ids."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out: list[int] = []
    for i, part in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            out += [image_id] * n_image_tokens
        if part.strip():
            out += tokenizer(part, add_special_tokens=False)["input_ids"]
    return out


def encode_conversation(tokenizer, conversations: list[dict], template: str, n_image_tokens: int,
                        max_length: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of a LLaVA conversation; labels are -100 outside the assistant answers.
    Truncated to `max_length`, never inside the image tokens (a record whose image would not fit
    raises ValueError)."""
    ids: list[int] = []
    labels: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template == "plain":  # LLaVA pretraining: <image> then the caption, the loss on the caption
        human, gpt = conversations[0]["value"], conversations[1]["value"]
        prompt = _ids(tokenizer, IMAGE_TOKEN if IMAGE_TOKEN in human else "", n_image_tokens)
        answer = _ids(tokenizer, gpt, n_image_tokens) + eos
        ids, labels = prompt + answer, [-100] * len(prompt) + answer
    else:
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose plain, {', '.join(TEMPLATES)}.")
        ask, reply = TEMPLATES[template]
        for human, gpt in zip(conversations[::2], conversations[1::2]):
            q = _ids(tokenizer, ask.format(q=human["value"]), n_image_tokens)
            a = _ids(tokenizer, reply.format(a=gpt["value"]), n_image_tokens)
            if template == "simple":
                a += eos
            ids += q + a
            labels += [-100] * len(q) + a
    if len(ids) > max_length:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id in ids[max_length:]:
            raise ValueError(f"the image does not fit in max_length={max_length} tokens "
                             f"({n_image_tokens} image tokens); raise max_length.")
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def prompt_ids(tokenizer, question: str, template: str, n_image_tokens: int) -> list[int]:
    """Ids of a single-turn prompt (image and question) up to where the answer starts."""
    if template == "plain":
        return _ids(tokenizer, IMAGE_TOKEN, n_image_tokens)
    if IMAGE_TOKEN not in question:  # held-out (MME style) questions have no image token: LLaVA puts it first
        question = f"{IMAGE_TOKEN}\n{question}"
    ask, _ = TEMPLATES[template]
    return _ids(tokenizer, ask.format(q=question), n_image_tokens)


def answer_ids(tokenizer, answer: str, template: str) -> list[int]:
    _, reply = TEMPLATES.get(template, ("", " {a}"))
    return _ids(tokenizer, reply.format(a=answer).removesuffix("<|end|>\n"), 0)


def pad_right(seqs: list[list[int]], value: int):
    """(ids [B, L] long, attention mask [B, L] long) of `seqs` padded on the right with `value`."""
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask
