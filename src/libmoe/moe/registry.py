"""The algorithm registry: every name `build_moe`, the configs, the CLI and the bench accept.

A name maps to its router class (None for dense) and its option defaults. The built-in algorithms
are registered at the bottom of this module. Routers from other packages join the same registry,
so they train, bench, analyse, upcycle and are refused by export exactly like a built-in one:

- entry points of group ``libmoe.algorithms`` in an installed package's metadata
  (``mine = "mypkg.routers:MyRouter"``: a Router subclass registered under the entry point's name,
  its docstring's first line as description; or ``mine = "mypkg.routers"``: a module whose import
  calls `register_algorithm("mine", ...)` itself);
- the modules named in the environment variable LIBMOE_PLUGINS (comma-separated), each importing
  and calling `register_algorithm`. `libmoe COMMAND --plugin MODULE` imports MODULE and adds it
  there, so every process the command starts (bench workers, torchrun ranks, Slurm jobs) sees it.

Both are loaded lazily, on the registry's first lookup, not at `import libmoe.moe`: the import stays
cheap, a plugin module may itself import libmoe.moe, and a process that never looks up an algorithm
never imports a plugin. A plugin that fails to load is a PluginError (a ValueError: the CLI prints
one line and exits 2) raised at every lookup until it is fixed, never a silently shorter registry.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any

from .routers import (
    CosineRouter,
    ExpertChoiceRouter,
    HyperRouter,
    PerturbedCosineRouter,
    Router,
    SigmaMoERouter,
    SigmoidTopKRouter,
    TopKRouter,
    XMoERouter,
)
from .slot_routers import MoEPlusPlusRouter, TCMoERouter

ENTRY_POINT_GROUP = "libmoe.algorithms"
"""The entry-point group of plugin routers (`[project.entry-points."libmoe.algorithms"]`)."""

PLUGINS_ENV = "LIBMOE_PLUGINS"
"""Environment variable: comma-separated modules to import before the first algorithm lookup."""

BUILTIN = "libmoe"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # no commas or spaces: --algorithms a,b splits


class PluginError(ValueError):
    """A plugin router could not be loaded or registered (the message names it and the fix)."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registered algorithm: its router class (None for dense) and its option defaults.
    `source` says who registered it: "libmoe" for the built-ins, else the plugin's module."""

    name: str
    router: type[Router] | None
    defaults: dict[str, Any]
    description: str
    source: str = BUILTIN


class AlgorithmRegistry(MutableMapping[str, AlgorithmSpec]):
    """name -> AlgorithmSpec, in registration order. Any lookup first loads the plugins (once per
    process; again after a failure, so a broken plugin keeps failing loudly)."""

    def __init__(self) -> None:
        self._specs: dict[str, AlgorithmSpec] = {}
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()

    def _load(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:  # a plugin looking names up while it registers
                return
            self._loading = True
            try:
                load_entry_points(self)
                for module in plugin_modules():
                    import_plugin(module, f"{PLUGINS_ENV}={os.environ.get(PLUGINS_ENV, '')}")
                self._loaded = True
            finally:
                self._loading = False

    def refresh(self) -> None:
        """Load the plugins again now: entry points installed and LIBMOE_PLUGINS modules named
        since the first lookup (a long-lived session, tests). Loaded ones stay as they are."""
        with self._lock:
            self._loaded = False
            self._load()

    def add(self, spec: AlgorithmSpec) -> None:
        """Register `spec` without loading the plugins first (register_algorithm's insertion)."""
        old = self._specs.get(spec.name)
        if old is not None:
            who = "built in" if old.source == BUILTIN else f"by {old.source}"
            raise ValueError(f"algorithm {spec.name!r} is already registered ({who}); give the new "
                             "one another name.")
        self._specs[spec.name] = spec

    def registered(self, name: str) -> AlgorithmSpec | None:
        """The spec registered under `name` so far, without loading the plugins."""
        return self._specs.get(name)

    def __getitem__(self, name: str) -> AlgorithmSpec:
        self._load()
        return self._specs[name]

    def __setitem__(self, name: str, spec: AlgorithmSpec) -> None:
        self._specs[name] = spec

    def __delitem__(self, name: str) -> None:
        del self._specs[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._specs))

    def __len__(self) -> int:
        self._load()
        return len(self._specs)

    def __repr__(self) -> str:
        return f"AlgorithmRegistry({list(self)})"


class AlgorithmNames(Sequence[str]):
    """A read-only, live tuple-like view of a registry's names: `in`, iteration, len, indexing
    and == a tuple all see algorithms registered after it was made."""

    def __init__(self, registry: Mapping[str, AlgorithmSpec]) -> None:
        self._registry = registry

    def _names(self) -> tuple[str, ...]:
        return tuple(self._registry)

    def __getitem__(self, index):  # an int gives a name, a slice a tuple
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AlgorithmNames):
            other = other._names()
        return self._names() == other if isinstance(other, tuple) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # live, so not hashable

    def __add__(self, other: tuple) -> tuple:
        return self._names() + tuple(other)

    def __repr__(self) -> str:
        return repr(self._names())


REGISTRY = AlgorithmRegistry()
"""Every registered algorithm, by name (built-ins first, then plugins); lookups load the plugins."""

ALGORITHMS = AlgorithmNames(REGISTRY)
"""Names of the registered algorithms (the paper's seven, the earlier routers, extras, dense, and
any plugin's): live, it sees later registrations; compares equal to the tuple of the names."""


def register_algorithm(
    name: str, router: type[Router] | None, description: str, *, source: str | None = None,
    **defaults: Any,
) -> None:
    """Add an algorithm to the registry; names are unique (a clash with a built-in is refused).

    `router` is a Router subclass (None only for libmoe's dense baseline); `defaults` are option
    defaults of the algorithm (e.g. n_shared=2). `source` names who registers it (default: the
    router's module).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"algorithm name {name!r}: use letters, digits, '_', '-' or '.' (it appears "
                         "in --algorithms lists and run directory names).")
    if router is not None and not (isinstance(router, type) and issubclass(router, Router)):
        raise TypeError(f"algorithm {name!r}: {router!r} is not a libmoe.moe.Router subclass.")
    if source is None:
        source = router.__module__ if router is not None else BUILTIN
    REGISTRY.add(AlgorithmSpec(name, router, defaults, description, source))


def plugin_modules() -> list[str]:
    """The modules named in LIBMOE_PLUGINS, in order."""
    return [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]


def import_plugin(module: str, where: str) -> ModuleType:
    """Import a plugin module (which registers its algorithms); PluginError, one line, if it fails.
    `where` says where the module was named (--plugin, LIBMOE_PLUGINS)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        missing = err.name is not None and (module == err.name or module.startswith(err.name + "."))
        if missing:  # the plugin module itself (or its package), not something it imports
            raise PluginError(f"plugin {module!r} ({where}): no module named {err.name!r}; install its "
                              "package (pip install -e DIR) or put its directory on PYTHONPATH.") from err
        raise PluginError(f"plugin {module!r} ({where}) failed to import: {err}") from err
    except Exception as err:  # the plugin's own code raised: name it, on one line
        raise PluginError(f"plugin {module!r} ({where}) failed to import: "
                          f"{type(err).__name__}: {err}") from err


def load_plugins(modules: Sequence[str]) -> None:
    """Import plugin modules now (`--plugin MODULE`) and add them to LIBMOE_PLUGINS, so the
    processes this one starts (bench workers, torchrun, Slurm jobs) import them too."""
    known = plugin_modules()
    for module in modules:
        module = module.strip()
        if not module or "," in module:
            raise PluginError(f"--plugin {module!r}: give one importable module name, e.g. mypkg.routers.")
        import_plugin(module, "--plugin")
        if module not in known:
            known.append(module)
    if modules:
        os.environ[PLUGINS_ENV] = ",".join(known)


def load_entry_points(registry: AlgorithmRegistry) -> None:
    """Register the routers of every installed package's `libmoe.algorithms` entry points."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        _register_entry_point(registry, ep)


def _register_entry_point(registry: AlgorithmRegistry, ep: EntryPoint) -> None:
    dist = getattr(ep, "dist", None)
    where = f"entry point {ep.name} = {ep.value!r}" + (f" of {dist.name}" if dist is not None else "")
    try:
        target = ep.load()
    except Exception as err:
        raise PluginError(f"plugin algorithm {ep.name!r} ({where}) failed to load: "
                          f"{type(err).__name__}: {err}") from err
    old = registry.registered(ep.name)
    if isinstance(target, ModuleType):  # the module registered its algorithms when imported
        if old is None:
            raise PluginError(f"plugin algorithm {ep.name!r} ({where}): importing the module registered "
                              f"no algorithm {ep.name!r}; call register_algorithm({ep.name!r}, ...) in "
                              "it, or point the entry point at the router class (module:Class).")
        return
    if not (isinstance(target, type) and issubclass(target, Router)):
        raise PluginError(f"plugin algorithm {ep.name!r} ({where}): {target!r} is not a "
                          "libmoe.moe.Router subclass.")
    if old is not None:
        if old.router is target:  # the module registered it itself, or a second copy of the metadata
            return
        who = "a built-in" if old.source == BUILTIN else f"registered by {old.source}"
        raise PluginError(f"plugin algorithm {ep.name!r} ({where}) clashes with {who} algorithm of "
                          "that name; rename the entry point.")
    doc = (target.__doc__ or "").strip()
    description = doc.splitlines()[0] if doc else f"plugin router {target.__module__}.{target.__name__}"
    registry.add(AlgorithmSpec(ep.name, target, {}, description, target.__module__))


def _builtin(name: str, router: type[Router] | None, description: str, **defaults: Any) -> None:
    register_algorithm(name, router, description, source=BUILTIN, **defaults)


_builtin("smoe", TopKRouter, "softmax router, renormalised top-k (Shazeer 2017, Switch)")
_builtin("sigma_moe", SigmaMoERouter, "sigmoid router, top-k renormalised as LibMoE (Csordas 2023: "
         "sigma_renormalize=false, entropy, expert dropout)")
_builtin("xmoe", XMoERouter, "low-dim cosine router with expert embeddings (Chi 2022)")
_builtin("sharede_v2", TopKRouter, "softmax router + always-on shared experts (DeepSeek-V2)", n_shared=2)
_builtin("sharede_v3", SigmoidTopKRouter, "sigmoid router with selection bias + shared experts (DeepSeek-V3)",
         n_shared=2)
_builtin("moe_plus_plus", MoEPlusPlusRouter, "zero/copy/constant experts + gating residual")
_builtin("tc_moe", TCMoERouter, "ternary choice: +expert, -expert, null (Yan 2025)")
_builtin("cosine", CosineRouter, "cosine-similarity router (LibMoE v1 Cosine-R)")
_builtin("perturbed_cosine", PerturbedCosineRouter, "cosine router with norm perturbation")
_builtin("hyper", HyperRouter, "frozen hypernetwork router with growing k (HyperRouter)")
_builtin("expert_choice", ExpertChoiceRouter, "experts choose their top tokens (Zhou 2022)",
         capacity_factor=1.0)
_builtin("dense", None, "compute-matched dense FFN of width top_k * expert_dim")
