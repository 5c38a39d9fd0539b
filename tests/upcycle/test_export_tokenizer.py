"""`libmoe export` writes a directory that transformers alone uses: AutoTokenizer encodes real text
as libmoe's own tokenizer does, and AutoModelForCausalLM.generate continues a prompt as libmoe's
model does greedily, in a fresh interpreter (with `import libmoe`, as the README documents)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from libmoe.data.hf_tokenizer import PROBES, write_transformers_tokenizer  # noqa: E402
from libmoe.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from libmoe.models import load_model  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
NEW_TOKENS = 8


def _lines() -> list[str]:
    lines = SHAKESPEARE.read_text().splitlines()
    return lines[:300] + ["\n".join(lines[300:340]), "  Two  spaces, digits 1599, caf\u00e9 \U0001f642 "]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libmoe.cli", *args], capture_output=True, text=True)


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    tokens = torch.tensor([ids])
    for _ in range(n):
        nxt = model(tokens).logits[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0, len(ids):].tolist()


FRESH = """
import json, sys
import libmoe  # registers libmoe's model with the Auto classes (README: after `import libmoe`)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, lines, prompt, n = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory)
ids = [tok(line)["input_ids"] for line in lines]
decoded = [tok.decode(i) for i in ids]
batch = tok(prompt, return_tensors="pt")
out = model.generate(**batch, max_new_tokens=n, do_sample=False)
new = out[0, batch["input_ids"].shape[1]:].tolist()
print(json.dumps({"ids": ids, "decoded": decoded, "new": new, "text": tok.decode(new),
                  "eos": tok.eos_token_id, "pad": tok.pad_token_id}))
"""


def test_exported_run_loads_with_auto_tokenizer_and_generates_like_libmoe(micro_config, tmp_path):
    from libmoe.train import train

    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not present")
    train(micro_config(steps=2), tmp_path / "run", progress=False)
    out = tmp_path / "exported"
    done = _cli("export", str(tmp_path / "run"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "AutoTokenizer" in done.stdout
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                 "generation_config.json", "tokenizer/tokenizer.model"):  # libmoe reads tokenizer/
        assert (out / name).is_file(), name

    run = load_model(tmp_path / "run")
    lines = _lines()
    expected = [run.tokenizer.encode(line) for line in lines]
    prompt = lines[0] + "\n" + lines[1]
    continuation = _greedy(run.model, run.tokenizer.encode(prompt), NEW_TOKENS)
    (tmp_path / "lines.json").write_text(json.dumps(lines))
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "lines.json"), prompt,
                            str(NEW_TOKENS)], capture_output=True, text=True, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert got["ids"] == expected  # the same ids as libmoe's tokenizer, line by line
    assert got["decoded"] == lines  # and decoding round-trips the text
    assert got["new"] == continuation and isinstance(got["text"], str)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == got["eos"] == run.tokenizer.eos_id
    assert config["pad_token_id"] == got["pad"] and config.get("bos_token_id") is None
    assert "is_local" not in json.loads((out / "tokenizer_config.json").read_text())

    again = load_model(out)  # libmoe still reads the directory as its own model
    assert type(again.tokenizer).__name__ == "SentencePieceTokenizer"
    assert again.tokenizer.encode(prompt) == run.tokenizer.encode(prompt)


def test_a_hugging_face_tokenizer_is_saved_as_it_is(hf_tokenizer_dir, tmp_path):
    texts = [SHAKESPEARE.read_text()[:20000]] if SHAKESPEARE.is_file() else ["some text " * 200]
    source = hf_tokenizer_dir(tmp_path, texts)
    ids = write_transformers_tokenizer(source, tmp_path / "out")
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    ours = load_tokenizer(source)
    assert back.encode(texts[0][:500], add_special_tokens=False) == ours.encode(texts[0][:500])
    assert ids["eos_token_id"] == back.eos_token_id == ours.eos_id


def test_the_sentencepiece_conversion_is_checked_and_matches_on_probes(tmp_path):
    tok = train_tokenizer(["To be, or not to be: that is the question.\n" * 50,
                           "Whether 'tis nobler in the mind to suffer 1234\n" * 50], vocab_size=300)
    ids = write_transformers_tokenizer(tok, tmp_path, model_max_length=32)
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in PROBES:
        assert back.encode(text, add_special_tokens=False) == tok.encode(text)
    assert back.model_max_length == 32 and ids == {"bos_token_id": None, "eos_token_id": 1,
                                                   "pad_token_id": 1}


def test_export_without_transformers_writes_libmoe_files_and_says_what_it_skipped(micro_config, tmp_path):
    from libmoe.train import train

    train(micro_config(steps=2), tmp_path / "run", progress=False)
    # a fresh interpreter in which transformers cannot be imported
    script = ("import sys; sys.modules['transformers'] = None\n"
              "from libmoe.cli import main\n"
              f"sys.exit(main(['export', {str(tmp_path / 'run')!r}, '--out', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    skipped = [line for line in done.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "pip install transformers" in skipped[0]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "config.json").exists()
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert load_model(tmp_path / "out").model.config == load_model(tmp_path / "run").model.config


def test_exports_to_transformers_architectures_convert_a_libmoe_tokenizer(tmp_path):
    """`libmoe export --to mixtral|...` copies the source's tokenizer; one libmoe trained (whose
    tokenizer.json is libmoe's own file) is converted instead, so AutoTokenizer loads the export."""
    from transformers import AutoTokenizer

    from libmoe.upcycle.export import _copy_tokenizer

    tok = train_tokenizer(["To be, or not to be: that is the question.\n" * 50], vocab_size=300)
    tok.save(tmp_path / "tok")
    assert _copy_tokenizer(tmp_path / "tok", tmp_path / "out")
    back = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert back.encode(" To be, or not", add_special_tokens=False) == tok.encode(" To be, or not")
