"""Write a small, randomly initialised transformers causal LM (Qwen2 or Llama architecture) with a
byte-level BPE tokenizer trained on a local corpus: a stand-in for a Hub checkpoint where the Hub
is out of reach, so the upcycling regime (`libmoe train --init`, `libmoe upcycle`, `libmoe eval`)
can be run end to end on a laptop. Pretrain it first (`libmoe train --init DIR`), then upcycle it.

    python examples/tiny_transformers_model.py --arch qwen2 --out runs/tiny-qwen2
"""

from __future__ import annotations

import argparse
from pathlib import Path


def corpus_texts(path: Path, max_chars: int):
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    used = 0
    for file in files:
        text = file.read_text(errors="replace")
        yield text[: max_chars - used]
        used += len(text)
        if used >= max_chars:
            return


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument("--corpus", default="../shared/data/corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--positions", type=int, default=512)
    p.add_argument("--tokenizer-chars", type=int, default=20_000_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import tokenizers
    import torch
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<unk>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts(Path(args.corpus), args.tokenizer_chars), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                                unk_token="<unk>")

    # Room for the special tokens an architecture's tokenizer class adds on loading (Qwen2's
    # <|endoftext|>), padded to a multiple of 64 as Hub models are.
    vocab = -(-(len(fast) + 16) // 64) * 64
    shape = dict(vocab_size=vocab, hidden_size=args.d_model, intermediate_size=args.ffn,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.heads, max_position_embeddings=args.positions,
                 tie_word_embeddings=True, eos_token_id=fast.eos_token_id)
    config = (transformers.Qwen2Config if args.arch == "qwen2" else transformers.LlamaConfig)(**shape)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(args.out)
    fast.save_pretrained(args.out)
    loaded = len(transformers.AutoTokenizer.from_pretrained(args.out))  # as every reader sees it
    if loaded > vocab:
        raise SystemExit(f"the saved tokenizer has {loaded} pieces, more than the model's {vocab}")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {type(model).__name__}, {n / 1e6:.2f}M parameters, {loaded}-piece tokenizer")


if __name__ == "__main__":
    main()
