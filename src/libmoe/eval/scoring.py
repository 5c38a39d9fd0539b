"""Log-likelihood scoring of a causal LM, with lm-evaluation-harness's request semantics.

`LMScorer.loglikelihood([(context, continuation), ...])` returns, per request, the summed
log-probability of the continuation's tokens given the context and whether greedy decoding would
have produced exactly those tokens. Tokenisation follows the harness's Hugging Face model
(`HFLM._encode_pair`): trailing whitespace of the context moves to the continuation, the pair is
encoded whole and the continuation's tokens are those after the context's own encoding; an empty
context becomes the EOS token. Inputs longer than the model's window keep their last
max_length + 1 tokens. Requests are scored in batches sorted by length (longest first), so a batch
pads little, and results come back in request order.

`loglikelihood_rolling(texts)` is the summed log-probability of every token of each text after an
EOS token, in disjoint windows of max_length predictions, each window's input filled with the
preceding tokens (the harness's `get_rolling_token_windows` with context_len 1): the basis of
word and byte perplexity.

`generate_until([(context, {"until": [...], "max_gen_toks": N}), ...])` decodes greedily, one
request at a time, with a KV cache (libmoe.models.generation; generation tasks are not part of the
paper's evaluation), and cuts the text at the first stop string, as the harness does.

A progress bar (tqdm, on stderr) shows the requests scored when stderr is a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..models import generate, model_window, supports_cache


class LMScorer:
    """Scores requests with `model` (a libmoe MoETransformer or any module whose output has
    `.logits`) and `tokenizer` (encode/decode/eos_id)."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 16,
                 max_length: int | None = None, device: str | torch.device | None = None,
                 progress: bool | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = max_length or model_window(model, default=2048)
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.progress = sys.stderr.isatty() if progress is None else progress
        if tokenizer.eos_id is None or tokenizer.eos_id < 0:
            raise ValueError("the tokenizer has no EOS token, which scoring needs as the empty context.")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1.")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the harness computes them."""
        if not context:
            return [self.tokenizer.eos_id], self.tokenizer.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        n_context = len(self.tokenizer.encode(context))
        return whole[:n_context], whole[n_context:]

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]],
                     desc: str | None = None) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy) for pre-tokenised (context, continuation)."""
        # A continuation longer than the window is scored in chunks of max_length tokens, each
        # conditioned on everything before it (the harness refuses such requests).
        chunks: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation; nothing to score.")
            for start in range(0, len(cont), self.max_length):
                chunks.append((ctx + cont[:start], cont[start : start + self.max_length]))
                owner.append(i)
        totals = [0.0] * len(pairs)
        greedy = [True] * len(pairs)
        for i, (lp, g) in zip(owner, self._score_chunks(chunks, desc)):
            totals[i] += lp
            greedy[i] = greedy[i] and g
        return list(zip(totals, greedy))

    def _score_chunks(self, pairs: Sequence[tuple[list[int], list[int]]],
                      desc: str | None) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []  # (request, inputs + the last target, continuation length)
        for i, (ctx, cont) in enumerate(pairs):
            rows.append((i, (ctx + cont)[-(self.max_length + 1):], len(cont)))
        rows.sort(key=lambda r: -len(r[1]))
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(rows), desc=desc, unit="req", disable=not self.progress, leave=False,
                   dynamic_ncols=True)
        try:
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                width = len(batch[0][1]) - 1
                tokens = torch.zeros(len(batch), width + 1, dtype=torch.long)
                scored = torch.zeros(len(batch), width, dtype=torch.bool)  # continuation positions
                for b, (_, row, n_cont) in enumerate(batch):
                    tokens[b, : len(row)] = torch.tensor(row)
                    scored[b, len(row) - 1 - n_cont : len(row) - 1] = True
                tokens, scored = tokens.to(self.device), scored.to(self.device)
                logits = self.model(tokens[:, :-1]).logits.float()
                targets = tokens[:, 1:]
                # log p(target) = logit(target) - logsumexp(logits), without a [B, S, V] log_softmax.
                lp = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
                sums = torch.where(scored, lp, 0.0).sum(1).tolist()
                greedy = ((logits.argmax(-1) == targets) | ~scored).all(1).tolist()
                for b, (i, _, _) in enumerate(batch):
                    results[i] = (sums[b], greedy[b])
                bar.update(len(batch))
        finally:
            bar.close()
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: Sequence[tuple[str, str]],
                      desc: str | None = None) -> list[tuple[float, bool]]:
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests], desc)

    def loglikelihood_rolling(self, texts: Sequence[str], desc: str | None = None) -> list[float]:
        pairs, owner = [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text)
            prefixed = [self.tokenizer.eos_id] + ids
            for start in range(0, len(ids), self.max_length):
                # All preceding tokens as context; score_tokens keeps the last max_length inputs,
                # so a full window sees one token of context and the last, shorter one more.
                pairs.append((prefixed[: start + 1], ids[start : start + self.max_length]))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self.score_tokens(pairs, desc)):
            totals[i] += lp
        return totals

    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]],
                       desc: str | None = None) -> list[str]:
        """Greedy continuations of each context, cut at the first of `until` (see the module
        docstring); `max_gen_toks` (default 256) bounds the new tokens."""
        outputs = []
        for context, kwargs in tqdm(requests, desc=desc, unit="req", disable=not self.progress,
                                    leave=False, dynamic_ncols=True):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_new = int(kwargs.get("max_gen_toks", 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
                raise ValueError("libmoe generates greedily only; the request asked for sampling "
                                 f"({kwargs}).")
            ids = self.tokenizer.encode(context) if context else [self.tokenizer.eos_id]

            def stop(row: int, new: list[int], until=until) -> bool:
                return bool(until) and any(u in self.tokenizer.decode(new) for u in until)

            [new] = generate(self.model, [ids], max_new, eos_id=self.tokenizer.eos_id, stop=stop,
                             window=self.max_length, use_cache=supports_cache(self.model))
            text = self.tokenizer.decode(new)
            for u in until:
                text = text.split(u)[0]
            outputs.append(text)
        return outputs
