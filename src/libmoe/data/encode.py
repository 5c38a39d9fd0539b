"""Tokenising documents into packed token arrays, in this process or in worker processes.

`Encoder.map` turns chunks of documents (`chunks`: about CHUNK_CHARS characters each) into each
document's token ids followed by EOS, in order, in this process or in `num_proc` worker processes
(`data.num_proc`; `default_num_proc`: one per CPU core up to MAX_NUM_PROC). The result is the
same for any number of processes; `libmoe.data.packed` writes it into the cache.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from ..errors import WorkFailed
from .tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = ["CHUNK_CHARS", "MAX_NUM_PROC", "Encoder", "chunks", "default_num_proc"]

MAX_NUM_PROC = 32  # the default worker count's cap (data.num_proc None: one per core up to this)
CHUNK_CHARS = 1 << 20  # text per worker task: large enough to amortise the transfer, small to balance


def _encode_all(tokenizer: Tokenizer, texts: list[str], threads: int | None = None) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is None:
        return [tokenizer.encode(t) for t in texts]
    if isinstance(tokenizer, SentencePieceTokenizer):
        return batch(texts, num_threads=threads)
    return batch(texts)


def _encode_packed(tok: Tokenizer, texts: list[str], dtype: np.dtype, eos: list[int],
                   threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The texts' ids, each followed by `eos`, as one flat array of `dtype` and each text's length
    (one array crosses a process boundary far faster than lists of Python ints)."""
    ids = _encode_all(tok, texts, threads)
    lengths = np.fromiter((len(i) + len(eos) for i in ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(i + eos for i in ids), dtype, int(lengths.sum()))
    return flat, lengths


_WORKER: dict = {}  # a tokenising worker process's tokenizer, dtype and EOS (set by _init_worker)


def _init_worker(tokenizer_dir: str, dtype: str, eos: list[int]) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _WORKER.update(tok=load_tokenizer(tokenizer_dir), dtype=np.dtype(dtype), eos=eos)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_packed(_WORKER["tok"], texts, _WORKER["dtype"], _WORKER["eos"], threads=1)


def default_num_proc() -> int:
    """Tokenising processes when data.num_proc is None: one per CPU core this process may use,
    at most MAX_NUM_PROC."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_NUM_PROC))


class Encoder:
    """Turns chunks of documents into their packed token arrays, in order: in this process, or in
    `num_proc` worker processes (at most 2 x num_proc chunks in flight, so a stream is never read
    far ahead of what is written). `threads`: SentencePiece threads in this process (None: one
    per core). A worker that dies (killed for lack of memory, a crash) raises `WorkFailed` naming
    data.num_proc rather than hanging; the pool is shut down on every path."""

    def __init__(self, tok: Tokenizer, tokenizer_dir: Path, dtype: np.dtype, eos: list[int],
                 num_proc: int, threads: int | None = None):
        self.tok, self.dtype, self.eos, self.threads = tok, dtype, eos, threads
        self.num_proc = num_proc
        self.pool: ProcessPoolExecutor | None = None
        if num_proc > 1:
            # fork is cheap (no re-import of torch) and the workers never touch a GPU; but a process
            # with CUDA initialised (or a torchrun rank with gloo/NCCL threads running) must not
            # fork, since the child inherits a CUDA context and locks it cannot use: spawn there,
            # and wherever fork does not exist.
            methods = multiprocessing.get_all_start_methods()
            fork = "fork" in methods and not torch.cuda.is_initialized()
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            # concurrent.futures, not multiprocessing.Pool: Pool silently replaces a dead worker
            # and loses its task (get() then blocks forever); the executor fails every pending
            # future with BrokenProcessPool instead.
            self.pool = ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                                            initargs=(str(tokenizer_dir), np.dtype(dtype).name, eos))
        self.ahead = 2 * num_proc

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the chunks not yet started and stop the workers (each finishes at most the chunk
        it is on); safe to call twice."""
        if self.pool is not None:
            pool, self.pool = self.pool, None
            pool.shutdown(wait=True, cancel_futures=True)

    def _died(self, err: BrokenProcessPool) -> WorkFailed:
        return WorkFailed(
            f"a tokenising worker process died ({err}), most likely killed for lack of memory; "
            f"lower data.num_proc (now {self.num_proc}) or give the job more memory.")

    def map(self, chunks: Iterable[list]) -> Iterator[tuple[list, list[np.ndarray]]]:
        """(chunk, each document's token array) for each chunk of Documents or (Document, flag)
        pairs, in order."""
        def texts(chunk: list) -> list[str]:
            return [(c[0] if isinstance(c, tuple) else c).text for c in chunk]

        def split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
            return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []

        if self.pool is None:
            for chunk in chunks:
                flat, lengths = _encode_packed(self.tok, texts(chunk), self.dtype, self.eos, self.threads)
                yield chunk, split(flat, lengths)
            return
        pool = self.pool
        pending: collections.deque = collections.deque()
        try:
            for chunk in chunks:
                pending.append((chunk, pool.submit(_encode_in_worker, texts(chunk))))
                if len(pending) >= self.ahead:
                    done, work = pending.popleft()
                    yield done, split(*work.result())
            while pending:
                done, work = pending.popleft()
                yield done, split(*work.result())
        except BrokenProcessPool as err:
            raise self._died(err) from err
        finally:
            for _, work in pending:  # left early (an error, or the caller stopped reading)
                work.cancel()


def chunks(items: Iterable, limit_docs: int = 512) -> Iterator[list]:
    """Consecutive runs of Documents (or (Document, flag) pairs) of about CHUNK_CHARS characters
    or `limit_docs` documents."""
    limit_chars = CHUNK_CHARS
    chunk: list = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len((item[0] if isinstance(item, tuple) else item).text)
        if chars >= limit_chars or len(chunk) >= limit_docs:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk
