"""libmoe: a research library for sparse Mixture-of-Experts language models."""

from . import auto
from .moe import ALGORITHMS, build_moe
from .version import __version__

auto.install()  # AutoModelForCausalLM loads libmoe directories once transformers is imported

__all__ = ["ALGORITHMS", "build_moe", "__version__"]
