"""libmoe's tokenizers as transformers tokenizers, so that a model directory libmoe writes loads
with `transformers.AutoTokenizer.from_pretrained(DIR)` alone.

    from libmoe.data.hf_tokenizer import write_transformers_tokenizer
    ids = write_transformers_tokenizer("runs/tiny/tokenizer", "exported")  # tokenizer.json, ...
    ids   # {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 1}: for config.json

A SentencePiece model libmoe trained is converted by transformers' own SentencePiece conversion
(the one `AutoTokenizer` applies to a `tokenizer.model`: BPE with byte fallback, the model's
whitespace and dummy-prefix settings), then checked to encode and decode probe texts exactly as
libmoe does; EOS "</s>" also pads (on the right, transformers' default; batched generation wants
`tokenizer.padding_side = "left"`, which the model's attention mask handles).
A Hugging Face tokenizer (a directory with tokenizer_config.json, a Hub name, or libmoe's
HFTokenizer) is saved as it is. Needs transformers (`pip install 'libmoe[hub]'`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..files import read_json_object, write_bytes, write_json
from .tokenizer import SPM_FILE, HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
LOAD_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Texts on which the converted tokenizer must agree with libmoe's: leading, repeated and trailing
# spaces (the dummy prefix), newlines and tabs, digits, and characters only byte fallback encodes.
PROBES = ("Hello world", " leading space", "two  spaces and a trailing one ", "lines\n\nand\ttabs\n",
          "digits 1234567890 and 3.14", "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642", "", " ")


def transformers_tokenizer(tokenizer: Tokenizer, model_max_length: int | None = None) -> Any:
    """A transformers tokenizer that encodes and decodes as libmoe's `tokenizer` does (ValueError
    if this transformers version's conversion does not)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tok
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise ValueError(f"no transformers form of a {type(tokenizer).__name__}; libmoe converts its "
                         "SentencePiece tokenizers and saves Hugging Face ones.")
    from transformers import PreTrainedTokenizerFast

    eos = tokenizer.sp.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id >= 0 else None
    kwargs: dict[str, Any] = {"pad_token": eos} if eos is not None else {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    with tempfile.TemporaryDirectory(prefix="libmoe-spm-") as tmp:
        (Path(tmp) / SPM_FILE).write_bytes(tokenizer.proto)  # transformers reads it from a directory
        fast = PreTrainedTokenizerFast.from_pretrained(tmp, **kwargs)
    for text in PROBES:
        ids = tokenizer.encode(text)
        got = fast.encode(text, add_special_tokens=False)
        if got != ids or fast.decode(ids) != tokenizer.decode(ids):
            import transformers

            raise ValueError(f"transformers {transformers.__version__} converts this SentencePiece "
                             f"tokenizer inexactly ({text!r}: {got} instead of {ids}); upgrade "
                             "transformers (pip install -U transformers).")
    return fast


def is_libmoe_sentencepiece(directory: str | Path) -> bool:
    """Whether `directory` holds a SentencePiece tokenizer as libmoe saves it (tokenizer.model and
    libmoe's own tokenizer.json), not a Hugging Face tokenizer (tokenizer_config.json)."""
    directory = Path(directory)
    return (directory / SPM_FILE).is_file() and not (directory / CONFIG_FILE).is_file()


def token_ids(tok: Any) -> dict[str, int | None]:
    """The special token ids transformers' config.json records: bos, eos and pad."""
    return {f"{name}_token_id": getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}


def write_transformers_tokenizer(tokenizer: Tokenizer | str | Path, out: str | Path,
                                 model_max_length: int | None = None) -> dict[str, int | None]:
    """Write `tokenizer` (a libmoe Tokenizer or a directory `load_tokenizer` reads) to `out`'s top
    level in transformers' format: tokenizer.json, tokenizer_config.json, special_tokens_map.json
    (and any other file the tokenizer saves), each atomically. Returns the bos/eos/pad ids for
    config.json. ImportError without transformers; ValueError where no exact conversion exists."""
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        own = is_libmoe_sentencepiece(path) or (path.is_file() and path.suffix == ".model")
        tokenizer = load_tokenizer(path) if own else HFTokenizer(str(tokenizer))
    tok = transformers_tokenizer(tokenizer, model_max_length)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="libmoe-tok-") as tmp:
        tok.save_pretrained(tmp)
        saved = sorted(file for file in Path(tmp).iterdir() if file.is_file())
        for file in saved:
            if file.name == CONFIG_FILE:  # drop where it was loaded from: it describes no tokenizer
                config = {k: v for k, v in read_json_object(file).items() if k not in LOAD_KEYS}
                write_json(out / file.name, config)
            else:
                write_bytes(out / file.name, file.read_bytes())
    if SPECIAL_TOKENS_FILE not in {file.name for file in saved}:  # transformers 5 keeps them in
        specials = {name: str(getattr(tok, name)) for name in SPECIALS if getattr(tok, name, None)}
        write_json(out / SPECIAL_TOKENS_FILE, specials)  # tokenizer_config.json; older readers look here
    return token_ids(tok)
