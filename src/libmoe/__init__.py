"""libmoe: a research library for sparse Mixture-of-Experts language models."""

from .moe import ALGORITHMS, build_moe

__version__ = "0.1.0"
__all__ = ["ALGORITHMS", "build_moe", "__version__"]
