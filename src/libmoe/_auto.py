"""Registers libmoe's transformers classes with the Auto classes once transformers loads them.

`import libmoe` must not import transformers (seconds), yet `AutoModelForCausalLM.from_pretrained`
of a libmoe directory must work afterwards. So a one-shot finder on ``sys.meta_path`` waits for
``transformers.models.auto.modeling_auto`` and, once it has run, calls
``libmoe.models.hf.register_auto``. If transformers is already imported, registration is immediate.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

WATCHED = "transformers.models.auto.modeling_auto"


def _register() -> None:
    if "libmoe.models.hf" in sys.modules:  # being imported: it registers itself when done
        return
    try:
        from .models.hf import register_auto

        register_auto()
    except Exception as err:  # never break transformers over libmoe's classes
        print(f"libmoe: could not register its model with transformers' Auto classes: {err}",
              file=sys.stderr)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if WATCHED in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
