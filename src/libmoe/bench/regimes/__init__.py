"""Training regimes of `libmoe bench`: how the runs of a study start and what its tables show.

- `pretrain` (the default): every algorithm trains from a random init (the paper's Table 2).
- `upcycle`: one dense LM is pretrained, upcycled into every algorithm, and every model (the dense
  source too) trains on with the same data, data order and budget.
- `vlm`: the vision-language comparison (Table 1): PT and PFT once, then VIT of every algorithm
  from the same PFT checkpoint.

A regime is one module with one class implementing `Regime` (`base.py`: plan the stages, train and
evaluate a run, lay out the tables and report) and one line in REGIMES below. A regime's options
come from the bench preset's `regime_options` when the preset is of that regime (`regime: upcycle`),
else from the regime's defaults.
"""

from ...overrides import did_you_mean
from .base import PlanContext, Regime
from .pretrain import PretrainRegime
from .upcycle import UpcycleRegime
from .vlm import VLMRegime

REGIMES: dict[str, Regime] = {r.name: r for r in (PretrainRegime(), UpcycleRegime(), VLMRegime())}


def get_regime(name: str) -> Regime:
    """The registered regime `name` (ValueError with the nearest names otherwise)."""
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r}.{did_you_mean(name, list(REGIMES))} "
                         f"Valid: {', '.join(REGIMES)}.")
    return REGIMES[name]


__all__ = ["REGIMES", "PlanContext", "PretrainRegime", "Regime", "UpcycleRegime", "VLMRegime", "get_regime"]
