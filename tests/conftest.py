"""Fixtures shared across test packages."""

import pytest


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
