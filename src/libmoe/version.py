"""libmoe's version: one source of truth, pyproject.toml's version as installed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("libmoe")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"
