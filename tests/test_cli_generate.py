"""`libmoe generate`: the printed continuation is libmoe.models.generation.generate's, greedy and
sampled (seeded), several prompts as one batch; bad arguments are refused before loading."""

import pytest
import torch

from libmoe.cli import main
from libmoe.data import load_corpus, train_tokenizer
from libmoe.models import build_model, load_model
from libmoe.models.generation import generate
from libmoe.models.loading import save_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    tok = train_tokenizer([d.text for d in load_corpus("embedded").documents[:30]], vocab_size=500)
    tok.save(tmp / "tok")
    torch.manual_seed(0)
    model = build_model("micro", "xmoe", vocab_size=500)
    return save_model_dir(tmp / "model", model, {"preset": "micro"}, tmp / "tok", log=lambda msg: None)


def test_prints_each_prompt_with_its_continuation(model_dir, capsys):
    loaded = load_model(model_dir)
    tok = loaded.tokenizer
    prompts = ["def main():", "The"]
    expected = generate(loaded.model, [tok.encode(p) for p in prompts], 12, eos_id=tok.eos_id)
    sampled = generate(loaded.model, [tok.encode(prompts[0])], 12, eos_id=tok.eos_id, do_sample=True,
                       top_k=20, seed=7)
    assert main(["generate", str(model_dir), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n\n".join(p + tok.decode(new) for p, new in zip(prompts, expected)) + "\n"
    assert "tokens/s" in err and "greedy" in err
    assert main(["generate", str(model_dir), "--prompt", prompts[0], "--max-new-tokens", "12",
                 "--sample", "--top-k", "20", "--seed", "7"]) == 0
    assert capsys.readouterr().out == prompts[0] + tok.decode(sampled[0]) + "\n"


def test_bad_arguments_are_refused_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    assert main(["generate", missing, "--prompt", "x", "--sample", "--temperature", "0"]) == 2
    assert "temperature=0.0 must be above 0" in capsys.readouterr().err
    assert main(["generate", missing, "--prompt", "x", "--max-new-tokens", "-1"]) == 2
    assert "max_new_tokens=-1" in capsys.readouterr().err
    assert main(["generate", missing, "--prompt", "x"]) == 2
    assert "nowhere" in capsys.readouterr().err
