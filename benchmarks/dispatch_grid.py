"""Which dispatch backend is fastest at which shape? The measurements behind `dispatch="auto"`.

For each shape (tokens T, d_model, experts E, expert width M, top-k K) times forward + backward of
an `smoe` layer with every backend, interleaving the backends round by round so that machine noise
hits them alike, and prints the median per backend and the winner.

    python benchmarks/dispatch_grid.py                 # default grid, all cores
    python benchmarks/dispatch_grid.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from libmoe.devices import tune_cpu_allocator
from libmoe.moe import DISPATCH_BACKENDS, build_moe

BACKENDS = DISPATCH_BACKENDS[1:]  # every concrete backend, "auto" excluded
# (T, d_model, E, M, K): micro/cpu-tiny style layers up to the paper-small layer.
GRID = [
    (512, 64, 8, 64, 2),
    (2048, 128, 16, 128, 4),
    (8192, 128, 16, 128, 4),
    (512, 512, 66, 128, 8),
    (1024, 512, 66, 128, 8),
    (2048, 512, 66, 128, 8),
    (4096, 512, 66, 128, 8),
    # fine-grained: cpu-tiny's --fine-grained layer, and 256 thin experts
    (4096, 128, 64, 32, 16),
    (4096, 512, 256, 32, 32),
]


def time_backends(T, D, E, M, K, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(T // 256 if T >= 256 else 1, min(T, 256), D, requires_grad=True)
    g = torch.randn_like(x)
    layers = {}
    for backend in BACKENDS:
        torch.manual_seed(1)
        layers[backend] = build_moe("smoe", D, E, M, K, dispatch=backend)
    times = {b: [] for b in BACKENDS}
    for r in range(rounds + 2):
        for backend, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            start = time.perf_counter()
            out = layer(x)
            ((out.output * g).sum() + out.aux_loss).backward()
            if r >= 2:
                times[backend].append((time.perf_counter() - start) * 1e3)
    return {b: statistics.median(t) for b, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as `libmoe train` does on the CPU
    print(f"threads={torch.get_num_threads()}, median of {args.rounds} interleaved rounds (ms)")
    print("| T | d | E | M | K | load/expert | " + " | ".join(BACKENDS) + " | fastest |")
    print("|" + "---|" * (7 + len(BACKENDS)))
    for T, D, E, M, K in GRID:
        ms = time_backends(T, D, E, M, K, args.rounds)
        best = min(ms, key=ms.get)
        cells = " | ".join(f"{ms[b]:.1f}" for b in BACKENDS)
        print(f"| {T} | {D} | {E} | {M} | {K} | {T * K // E} | {cells} | {best} |", flush=True)


if __name__ == "__main__":
    main()
