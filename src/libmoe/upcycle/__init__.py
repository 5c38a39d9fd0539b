"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model's FFNs become MoE layers of any
registered algorithm, each expert an exact copy of the dense FFN, routers freshly initialised.

    from libmoe.upcycle import upcycle_model, upcycle_checkpoint
    moe = upcycle_model(dense_model, "smoe", n_experts=8, top_k=2)   # same outputs at init
    upcycle_checkpoint("runs/tiny-dense", "runs/tiny-dense-upcycled", "smoe", 8, 2)
    # then: libmoe train --init runs/tiny-dense-upcycled --out runs/upcycled-smoe

`libmoe upcycle SRC --algorithm A --n-experts E --top-k K --out DIR` is the command line.
"""

from .core import (
    EXACT_AT_INIT,
    NOT_EXACT_AT_INIT,
    SHARED_ALGORITHMS,
    UPCYCLE_FILE,
    copy_into_experts,
    shared_upcycle,
    upcycle_checkpoint,
    upcycle_model,
)
from .export import export_model

__all__ = [
    "EXACT_AT_INIT",
    "NOT_EXACT_AT_INIT",
    "SHARED_ALGORITHMS",
    "UPCYCLE_FILE",
    "copy_into_experts",
    "export_model",
    "shared_upcycle",
    "upcycle_checkpoint",
    "upcycle_model",
]
