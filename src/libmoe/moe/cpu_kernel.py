"""The fused CPU expert kernel (csrc/experts_cpu.cpp), built on first use with the machine's C++
compiler through torch.utils.cpp_extension and cached by torch (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR): about 25 s once per machine and torch version, milliseconds after.

Where it cannot be built (no compiler, no ninja, headers missing) or LIBMOE_CPU_KERNEL=0 is set,
`fused_kernel()` returns None after one line on stderr, and the `fused` dispatch backend runs the
Python `blocked` backend instead: the same computation, slower at many experts.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "experts_cpu.cpp"
NAME = "libmoe_experts_cpu"
ENV = "LIBMOE_CPU_KERNEL"  # "0": never build or use the kernel

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "kernel": the module or None; "reason": why it is None


def fused_kernel() -> ModuleType | None:
    """The compiled kernel module (forward, backward), or None where it cannot be had."""
    if "kernel" in _state:
        return _state["kernel"]
    with _lock:
        if "kernel" not in _state:
            _state["kernel"] = _load()
    return _state["kernel"]


def kernel_status() -> str:
    """'loaded', 'unavailable: REASON' or 'not loaded yet' (benchmarks print it)."""
    if "kernel" not in _state:
        return "not loaded yet"
    return "loaded" if _state["kernel"] is not None else f"unavailable: {_state.get('reason', '')}"


def _load() -> ModuleType | None:
    if os.environ.get(ENV, "1").strip() == "0":
        _state["reason"] = f"{ENV}=0"
        return None
    try:
        from torch.utils.cpp_extension import load

        name, flags = _build_flavour()
        # -fopenmp: ATen's parallel_for is OpenMP pragmas compiled into the caller; without the
        # flag they are ignored and every "parallel" loop runs on one thread. The library's
        # SONAME (libgomp.so.1) resolves to the copy torch has loaded already: one OpenMP runtime.
        return load(name=name, sources=[str(SOURCE)], extra_cflags=[*flags, "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, say it once
        reason = _reason(exc)
        _state["reason"] = reason
        print(f"libmoe: the fused CPU expert kernel could not be built ({reason}); using the Python "
              f"'blocked' dispatch instead (same results, slower with many experts; set {ENV}=0 "
              "to skip the build)", file=sys.stderr, flush=True)
        return None


def _build_flavour() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU: the vector width torch itself uses here
    (AVX-512, AVX2, else the compiler's default), in the name so that a cache shared between
    machines (a cluster's home directory) never hands one CPU another's instructions."""
    flags = ["-O3", "-fopenmp-simd", "-fno-math-errno"]
    capability = torch.backends.cpu.get_cpu_capability()
    arch = {"AVX512": "x86-64-v4", "AVX2": "x86-64-v3"}.get(capability)
    if arch is None:
        return f"{NAME}_default", flags
    return f"{NAME}_{capability.lower()}", [*flags, f"-march={arch}"]


def _reason(exc: Exception) -> str:
    """The compiler's first error line where there is one, else the exception, on one line."""
    text = str(exc)
    errors = [line for line in text.splitlines() if "error:" in line]
    line = errors[0] if errors else (text.splitlines() or [type(exc).__name__])[0]
    return " ".join(line.split())[:240]
