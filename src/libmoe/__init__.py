"""libmoe: a research library for sparse Mixture-of-Experts language models."""

from importlib.metadata import PackageNotFoundError, version

from . import _auto
from .moe import ALGORITHMS, build_moe

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("libmoe")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_auto.install()  # AutoModelForCausalLM loads libmoe directories once transformers is imported

__all__ = ["ALGORITHMS", "build_moe", "__version__"]
