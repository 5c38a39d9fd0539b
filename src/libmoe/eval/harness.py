"""lm-evaluation-harness model ``libmoe``: any libmoe run, checkpoint or exported model directory.

    lm_eval --model libmoe --model_args pretrained=runs/tiny-smoe --tasks hellaswag,piqa

Installing the project registers the name (see ``_libmoe_lm_eval.py`` at the top of ``src/``: a
start-up hook that adds the name to the harness's model registry when ``lm_eval.models`` is
imported, without importing libmoe or torch until the harness builds the model). Importing this
module also registers it, for harness versions that the hook does not reach.

The three request types map onto `LMScorer`, so ``libmoe eval`` and the harness score a request
identically: loglikelihood (batched, length-sorted), loglikelihood_rolling and generate_until
(greedy). Model arguments: ``pretrained`` (required), ``batch_size`` (default 16; "auto" takes
the default), ``device`` and ``max_length`` (default: the model's window). Devices follow the
harness's own ``hf`` model: its CLI asks for ``cuda:0`` by default, and a CUDA device on a machine
without one means the CPU.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry first: it is filled lazily only when empty)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import MODEL_REGISTRY, register_model

from ..models import load_model
from .scoring import LMScorer


def _device(requested: str | None) -> str:
    if requested and not (requested.startswith("cuda") and not torch.cuda.is_available()):
        return requested
    if requested:
        print(f"libmoe: device {requested!r} is not available; using the CPU.", file=sys.stderr)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):
        return 16
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"batch_size {value!r} is not a number (or 'auto').") from err


class LibMoELM(LM):
    def __init__(self, pretrained: str, batch_size: Any = 16, device: str | None = None,
                 max_length: int | None = None, max_batch_size: Any = None, **unused: Any):
        super().__init__()
        # max_batch_size: the harness always passes it (for its "auto" batch search); unused here.
        if unused:
            raise ValueError(f"model_args {', '.join(sorted(unused))} are not understood by the libmoe "
                             "model; it takes pretrained, batch_size, device, max_length.")
        self.loaded = load_model(pretrained, device=_device(device))
        self.scorer = LMScorer(self.loaded.model, self.loaded.tokenizer, batch_size=_batch_size(batch_size),
                               max_length=int(max_length) if max_length else None)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([r.args for r in requests], desc="loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests], desc="rolling")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return self.scorer.generate_until([r.args for r in requests], desc="generate_until")


if "libmoe" not in MODEL_REGISTRY:  # else the start-up hook registered it, lazily, as this class
    register_model("libmoe")(LibMoELM)
