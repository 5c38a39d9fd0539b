"""tune_cpu_allocator: glibc keeps freed memory for reuse, only when asked, and can be turned off."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys, torch
from libmoe.devices import tune_cpu_allocator
libc = ctypes.CDLL("libc.so.6")

def faults():  # minor page faults of this process so far
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

applied = tune_cpu_allocator() if sys.argv[1] == "tune" else False
def step():  # like a training step: large activations, all freed at its end
    kept = [torch.ones(16 << 20) for i in range(3)]  # 64 MB each
    return sum(float(t[0]) for t in kept)

for _ in range(3):  # warm up: the heap grows to its working size once
    step()
before = faults()
for _ in range(10):
    step()
print(applied, faults() - before)
"""


def run(mode: str, **env) -> tuple[bool, int]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **env), timeout=120)
    assert proc.returncode == 0, proc.stderr
    applied, faults = proc.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_tuned_malloc_stops_large_tensors_from_page_faulting_each_time():
    applied, tuned = run("tune")
    _, default = run("default")
    assert applied
    # By default glibc gives every allocation above 32 MB its own mmap and unmaps it on free, so
    # each step faults its 192 MB (49k pages) in again; tuned, the heap's pages are reused.
    assert default > 200_000 and tuned < default / 10, (tuned, default)


def test_the_switch_turns_it_off():
    applied, _ = run("tune", LIBMOE_MALLOC_TUNING="0")
    assert not applied
