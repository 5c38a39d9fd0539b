"""Registers libmoe's model with lm-evaluation-harness when the harness loads its models.

lm-eval (0.4.x) has no plugin entry points for models, so ``libmoe-lm-eval.pth`` (installed beside
this module) imports it at interpreter start. It costs one tiny import: a finder on
``sys.meta_path`` waits for ``lm_eval.models`` and, once that module has run, adds the name
``libmoe`` to the harness's registry as the lazy target ``libmoe.eval.harness:LibMoELM``, so
neither libmoe nor torch is imported until the harness builds the model. Any failure here leaves
the harness as it was. `after_import(name, callback)` is the generic one-shot hook (libmoe also
uses it to register its transformers classes lazily).
"""

import importlib.abc
import importlib.util
import sys

TARGET = "libmoe.eval.harness:LibMoELM"


def _register() -> None:
    from lm_eval.api.registry import MODEL_REGISTRY

    if "libmoe" in MODEL_REGISTRY:
        return
    if hasattr(MODEL_REGISTRY, "register"):  # lm-eval >= 0.4.10: lazy "module:attr" targets
        MODEL_REGISTRY.register("libmoe", target=TARGET)
    else:  # older harnesses keep a dict of classes
        import libmoe.eval.harness  # noqa: F401  (registers itself)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, callback):
        self.inner, self.callback = inner, callback

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.callback()


class _Finder(importlib.abc.MetaPathFinder):
    """Runs `callback` once, right after module `name` has been imported (one shot)."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.callback)
        return spec


def after_import(name: str, callback) -> None:
    """Call `callback()` as soon as module `name` is imported (now, if it already is). Also used
    by libmoe to register its transformers classes without importing transformers itself."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _Finder) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name, callback))


def _register_safely() -> None:
    try:
        _register()
    except Exception as err:  # never break the harness over its optional plugin
        print(f"libmoe: could not register the 'libmoe' model with lm_eval: {err}", file=sys.stderr)


def install() -> None:
    after_import("lm_eval.models", _register_safely)


install()
