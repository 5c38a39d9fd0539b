"""Registers libmoe's transformers classes with the Auto classes once transformers loads them.

`import libmoe` must not import transformers (seconds), yet `AutoModelForCausalLM.from_pretrained`
of a libmoe directory must work afterwards. This module sits at the bottom layer and imports no
other libmoe module, so `import libmoe` loads only itself, `libmoe.moe` and torch. `install()`
(called by ``libmoe/__init__``) sets a one-shot import hook (``_libmoe_lm_eval.after_import``,
from the start-up hook module installed with libmoe) that waits for
``transformers.models.auto.modeling_auto`` and, once it has run, imports `HF_MODULES`, each of
which registers its classes with the Auto classes when imported (`libmoe.models.hf.register_auto`,
`libmoe.models.hf_upcycled.register_auto`). If transformers is already imported, that happens at once.
"""

from __future__ import annotations

import importlib
import sys

try:
    from _libmoe_lm_eval import after_import  # the start-up hook module installed with libmoe
except ImportError:  # a source tree used without installing
    after_import = None

WATCHED = "transformers.models.auto.modeling_auto"

# Imported by name (importlib), not by an import statement: these modules import transformers at
# their top, and this module is imported by `import libmoe`, which must stay light (the
# import-linter contract "import libmoe stays light" follows import statements only).
HF_MODULES = ("libmoe.models.hf", "libmoe.models.hf_upcycled")


def register() -> None:
    """Import `HF_MODULES` (each registers its classes); a failure is one line on stderr, never an
    error in the caller's transformers import."""
    try:
        for name in HF_MODULES:
            importlib.import_module(name)
    except Exception as err:  # never break transformers over libmoe's classes
        print(f"libmoe: could not register its model with transformers' Auto classes: {err}",
              file=sys.stderr)


def install() -> None:
    """Register libmoe's classes as soon as transformers' Auto classes are imported (now, if they are)."""
    if after_import is None:  # without the hook module: register if transformers is here already
        if WATCHED in sys.modules:
            register()
        return
    after_import(WATCHED, register)
