"""Count the operations that make the host wait for the GPU, on any device (a CPU stand-in).

On a GPU, a kernel launch returns at once and the host runs ahead; an op whose *result size or
value* the host needs (``nonzero``, ``.item()``, ``bincount``, a boolean-mask index, ...) blocks it
until the device has caught up, which starves the GPU of queued work. Those ops are the same on
every device, so counting them during a CPU run finds every sync a GPU run would have:

    from libmoe.syncs import HostSyncCounter

    with HostSyncCounter() as syncs:
        model(tokens, targets).loss.backward()
    assert syncs.count == 0, syncs.summary()

`HostSyncCounter` is a ``TorchDispatchMode`` (it sees every aten op, forward and backward) that
also wraps ``Tensor.tolist`` and ``Tensor.numpy``, which read a tensor's memory without an aten op,
and ``torch.cuda.synchronize``. On CUDA tensors it also flags ``torch._grouped_mm`` where torch
takes its per-group fallback (anything but bf16 on sm90/sm100), which reads the offsets on the host;
a CPU run cannot see that one (the CPU kernel has no device to wait for).
Imports only torch: every layer may use it.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SYNCING_OPS"]

aten = torch.ops.aten

# Ops that always wait for the device: the host reads a value or a data-dependent size.
SYNCING_OPS = {
    "aten::_local_scalar_dense": ".item() / float() / int() / bool() of a tensor",
    "aten::is_nonzero": "bool() of a one-element tensor",
    "aten::equal": "torch.equal",
    "aten::nonzero": "torch.nonzero / argwhere (output size depends on the data)",
    "aten::nonzero_numpy": "torch.nonzero(as_tuple=True)",
    "aten::masked_select": "masked_select (output size depends on the data)",
    "aten::bincount": "bincount (output size depends on the largest value)",
    "aten::unique_dim": "unique",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_consecutive": "unique_consecutive",
    "aten::unique_dim_consecutive": "unique_consecutive",
}


def _name(func) -> str:
    return func._schema.name


def _has_bool_index(indices: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
               for t in (indices or ()))


def _syncs(func, args: tuple, kwargs: dict) -> str | None:
    """Why `func(*args, **kwargs)` makes the host wait, or None when it does not."""
    name = _name(func)
    if name in SYNCING_OPS:
        return SYNCING_OPS[name]
    if name in ("aten::index", "aten::_unsafe_index") and _has_bool_index(args[1] if len(args) > 1 else None):
        return "boolean-mask indexing x[mask] (output size depends on the data)"
    puts = ("aten::index_put", "aten::index_put_", "aten::_index_put_impl_", "aten::_unsafe_index_put")
    if name in puts and _has_bool_index(args[1] if len(args) > 1 else None):
        return "boolean-mask assignment x[mask] = v"
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor) \
            and kwargs.get("output_size") is None:
        return "repeat_interleave(repeats tensor) without output_size"
    if name == "aten::histc" and _histc_auto_range(args, kwargs):
        return "histc with min == max (range read from the data)"
    if name == "aten::_grouped_mm" and _grouped_mm_falls_back(args, kwargs):
        return "torch._grouped_mm outside bf16 on CUDA sm90/sm100: its fallback reads offs on the host"
    if name in ("aten::_to_copy", "aten::copy_"):
        src = args[1] if name == "aten::copy_" else args[0]
        dst_cpu = (kwargs.get("device") == torch.device("cpu")) if name == "aten::_to_copy" \
            else args[0].device.type == "cpu"
        if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst_cpu:
            return "copy from the device to the host (.cpu(), .to('cpu'))"
    return None


def _grouped_mm_falls_back(args: tuple, kwargs: dict) -> bool:
    """Whether a CUDA torch._grouped_mm takes torch's per-group fallback, which copies the group
    offsets to the host (aten/src/ATen/native/GroupedMMUtils.h); the fused kernel needs bf16
    inputs and output on compute capability 9.x or 10.x. CPU runs never sync (no device)."""
    a = args[0] if args else kwargs.get("mat_a")
    b = args[1] if len(args) > 1 else kwargs.get("mat_b")
    if not isinstance(a, torch.Tensor) or a.device.type != "cuda":
        return False
    out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
    bf16 = a.dtype == b.dtype == torch.bfloat16 and out_dtype in (None, torch.bfloat16)
    return not (bf16 and torch.cuda.get_device_capability(a.device)[0] in (9, 10))


def _histc_auto_range(args: tuple, kwargs: dict) -> bool:
    lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
    hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
    return lo == hi


# Frames that are the counter's or torch's dispatch machinery, never the code that asked for a value.
_MACHINERY = (os.path.join("torch", "utils", "_python_dispatch.py"), os.path.join("torch", "_ops.py"),
              os.path.join("torch", "_tensor.py"), os.path.join("torch", "overrides.py"),
              os.path.join("torch", "_prims_common", "wrappers.py"), os.path.join("torch", "_compile.py"),
              os.path.join("torch", "utils", "_contextlib.py"),
              os.path.join("torch", "_dynamo", "eval_frame.py"),
              os.path.join("torch", "autograd", "__init__.py"),
              os.path.join("torch", "autograd", "graph.py"))


def _caller() -> str:
    """'path:line in function' of the innermost frame outside this module and torch's dispatch."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.endswith(_MACHINERY)):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for root in ("site-packages" + os.sep, "src" + os.sep):
        if root in path:
            path = path.rsplit(root, 1)[1]
            break
    return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


class HostSyncCounter(TorchDispatchMode):
    """Count host-synchronising ops while active (see the module docstring).

    `count`: how many; `ops`: Counter of op name -> count; `events`: (op name, why) in order;
    `locations`: for each event, where in Python it came from ("path:line in function", the
    innermost frame outside torch's dispatch machinery; a backward op names its .backward() call);
    `summary()`: one readable line per op. `only_device` ("cuda", ...) restricts counting to ops
    whose tensors live on that device type (default: every device, so CPU runs count too). In a
    CPU stand-in run, `locations` tells a device sync from a read of a tensor that stays on the
    host in a GPU run too (a data sampler's indices, a non-fused optimizer's step counters).
    """

    def __init__(self, only_device: str | None = None):
        super().__init__()
        self.only_device = only_device
        self.events: list[tuple[str, str]] = []
        self.locations: list[str] = []
        self._saved: dict[str, Any] = {}

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def ops(self) -> Counter:
        return Counter(name for name, _ in self.events)

    def summary(self) -> str:
        if not self.events:
            return "no host-synchronising ops"
        why = dict(self.events)
        return "; ".join(f"{name} x{n} ({why[name]})" for name, n in self.ops.most_common())

    def _record(self, name: str, why: str, tensors: Any = (), device: str | None = None) -> None:
        if self.only_device is not None:
            devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
            if self.only_device not in devices | {device}:
                return
        self.events.append((name, why))
        self.locations.append(_caller())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _syncs(func, args, kwargs)
        if why is not None:
            self._record(_name(func), why, [*args, *kwargs.values()])
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(t, *a, _original=original, _method=method, **k):
                counter._record(f"Tensor.{_method}", f"Tensor.{_method}() reads the tensor on the host", [t])
                return _original(t, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        # An explicit device-wide wait is no aten op either (timing code calls it).
        original_sync = self._saved["cuda.synchronize"] = torch.cuda.synchronize

        def synchronize(*a, **k):
            counter._record("torch.cuda.synchronize", "waits for every queued kernel", device="cuda")
            return original_sync(*a, **k)

        torch.cuda.synchronize = synchronize
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            if method == "cuda.synchronize":
                torch.cuda.synchronize = original
            else:
                setattr(torch.Tensor, method, original)
        self._saved.clear()
        return super().__exit__(*exc)
