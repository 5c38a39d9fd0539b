"""Fixtures shared across test packages."""

from pathlib import Path

import pytest

from libmoe.train import resolve_config


@pytest.fixture
def hf_tokenizer_dir():
    """make(directory, texts): a Hugging Face fast tokenizer (byte-level BPE, 400 pieces, EOS
    "</s>") trained on texts and saved in the Hub's format under directory/"hf-tok"."""

    def make(tmp_path, texts):
        tokenizers = pytest.importorskip("tokenizers")
        transformers = pytest.importorskip("transformers")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<unk>", "</s>"],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                                    unk_token="<unk>")
        fast.save_pretrained(tmp_path / "hf-tok")
        return tmp_path / "hf-tok"

    return make


SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data cache for the session: the tokenizer is trained once."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def micro_config(data_cache):
    """micro preset on tinyshakespeare, logging every step; keyword overrides as dotted keys."""
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")

    def make(*overrides: str, algorithm: str = "smoe", steps: int = 8):
        base = [f"data.source={SHAKESPEARE}", f"data.cache_dir={data_cache}",
                f"model.algorithm={algorithm}", f"train.max_steps={steps}", "train.log_every=1",
                "train.eval_every=4", "train.checkpoint_every=4", "train.eval_tokens=2048",
                "train.tensorboard=false"]
        return resolve_config(overrides=base + list(overrides), preset="micro")

    return make
