"""LMScorer against a one-request-at-a-time reference written from the harness's definitions."""

import pytest
import torch
import torch.nn.functional as F

from libmoe.data import load_corpus, train_tokenizer
from libmoe.eval.scoring import LMScorer
from libmoe.models import build_model


@pytest.fixture(scope="module")
def tokenizer():
    texts = [d.text for d in load_corpus("embedded").documents[:30]]
    return train_tokenizer(texts, vocab_size=500)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("micro", "smoe").eval()  # max_seq_len 64


def reference(model, context_ids, continuation_ids, max_length=64):
    """log p(continuation | context) from one unpadded forward; greedy match."""
    tokens = (context_ids + continuation_ids)[-(max_length + 1):]
    inp = torch.tensor([tokens[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(inp).logits[0].float(), -1)
    n = len(continuation_ids)
    rows = logp[-n:]
    target = torch.tensor(continuation_ids)
    return float(rows[torch.arange(n), target].sum()), bool((rows.argmax(-1) == target).all())


def harness_pair(tok, context, continuation):
    """lm-evaluation-harness HFLM._encode_pair, restated."""
    if context == "":
        return [tok.eos_id], tok.encode(continuation)
    stripped = context.rstrip()
    spaces = context[len(stripped):]
    whole = tok.encode(stripped + spaces + continuation)
    n = len(tok.encode(stripped))
    return whole[:n], whole[n:]


REQUESTS = [
    ("Question: What does the def statement do?\nAnswer:", " It defines a function."),
    ("The list is ", "sorted."),  # trailing space moves to the continuation
    ("", "import os"),  # empty context: EOS
    ("x = 1\n" * 40, "y = 2"),  # longer than the window: left-truncated
    ("for i in range(10):", "\n    print(i)"),
]


def test_batched_scores_equal_the_reference(model, tokenizer):
    scorer = LMScorer(model, tokenizer, batch_size=2)
    got = scorer.loglikelihood(REQUESTS)
    for (context, continuation), (lp, greedy) in zip(REQUESTS, got):
        ctx, cont = harness_pair(tokenizer, context, continuation)
        ref_lp, ref_greedy = reference(model, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy
        assert lp < 0


def test_pair_encoding_follows_the_harness(tokenizer):
    scorer = LMScorer(build_model("micro", "dense"), tokenizer)
    assert scorer.encode_pair("The list is ", "sorted.") == scorer.encode_pair("The list is", " sorted.")
    assert scorer.encode_pair("", "abc") == ([tokenizer.eos_id], tokenizer.encode("abc"))
    for context, continuation in REQUESTS:
        assert scorer.encode_pair(context, continuation) == harness_pair(tokenizer, context, continuation)


def test_greedy_flag(model, tokenizer):
    scorer = LMScorer(model, tokenizer)
    context = tokenizer.encode("def main():")
    tokens = list(context)
    with torch.no_grad():
        for _ in range(3):  # greedy decoding, one token at a time
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    greedy = tokens[len(context):]
    other = greedy[:-1] + [(greedy[-1] + 1) % 500]
    (lp_g, is_g), (lp_o, is_o) = scorer.score_tokens([(context, greedy), (context, other)])
    assert is_g and not is_o and lp_g > lp_o


def test_rolling_loglikelihood_uses_disjoint_windows(model, tokenizer):
    text = "".join(f"value_{i} = compute({i}, {i * 7})\n" for i in range(25))
    ids = tokenizer.encode(text)
    assert len(ids) > 2 * 64 + 5  # three windows, the last one partial
    prefixed = [tokenizer.eos_id] + ids
    expected = 0.0
    for start in range(0, len(ids), 64):
        end = min(start + 64, len(ids))
        inp = prefixed[max(0, end - 64) : end]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([inp])).logits[0], -1)
        n = end - start
        expected += float(logp[-n:][torch.arange(n), torch.tensor(ids[start:end])].sum())
    (got,) = LMScorer(model, tokenizer, batch_size=2).loglikelihood_rolling([text])
    assert got == pytest.approx(expected, abs=1e-3)
    short = "print('hello')"
    (lp_short,) = LMScorer(model, tokenizer).loglikelihood_rolling([short])
    assert lp_short == pytest.approx(reference(model, [tokenizer.eos_id], tokenizer.encode(short))[0],
                                     abs=1e-4)


def test_empty_continuation_is_an_error(model, tokenizer):
    with pytest.raises(ValueError, match="empty continuation"):
        LMScorer(model, tokenizer).score_tokens([([1, 2], [])])


def reference_greedy(model, tokenizer, context, n):
    tokens = tokenizer.encode(context)
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([(tokens + new)[-64:]])).logits[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_generate_until_is_greedy_and_stops_at_the_first_stop_string(model, tokenizer):
    scorer = LMScorer(model, tokenizer)
    context = "def main():\n    return"
    full = reference_greedy(model, tokenizer, context, 12)
    assert scorer.generate_until([(context, {"max_gen_toks": 12})]) == [full]
    assert len(full) > 2
    stop = full[len(full) // 2 : len(full) // 2 + 1]  # a character the greedy text contains
    (cut,) = scorer.generate_until([(context, {"until": [stop], "max_gen_toks": 12})])
    assert cut == full.split(stop)[0] and len(cut) < len(full)
    with pytest.raises(ValueError, match="greedily only"):
        scorer.generate_until([(context, {"do_sample": True, "temperature": 0.7})])


def test_generate_until_feeds_one_token_a_step_with_the_cache_and_slides_past_the_window(model, tokenizer):
    widths = []
    hook = model.embed.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    try:
        context = "def main():\n    return"
        (text,) = LMScorer(model, tokenizer).generate_until([(context, {"max_gen_toks": 12})])
        n = len(tokenizer.encode(context))
        assert widths[0] == n and set(widths[1:]) == {1}  # the prompt once, then one token a step
        long_context = " ".join(["return x"] * 40)  # beyond the 64-position window
        widths.clear()
        (long_text,) = LMScorer(model, tokenizer).generate_until([(long_context, {"max_gen_toks": 6})])
        assert set(widths) == {64}  # past the window: the last 64 tokens each step, no cache
    finally:
        hook.remove()
    assert text == reference_greedy(model, tokenizer, context, 12)
    assert long_text == reference_greedy(model, tokenizer, long_context, 6)


def test_progress_bar_on_request(model, tokenizer, capsys):
    LMScorer(model, tokenizer, progress=True).loglikelihood(REQUESTS, desc="piqa")
    assert "piqa" in capsys.readouterr().err
    LMScorer(model, tokenizer, progress=False).loglikelihood(REQUESTS, desc="piqa")
    assert capsys.readouterr().err == ""
