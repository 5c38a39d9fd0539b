"""Registers libmoe's transformers classes with the Auto classes once transformers loads them.

`import libmoe` must not import transformers (seconds), yet `AutoModelForCausalLM.from_pretrained`
of a libmoe directory must work afterwards. So a one-shot import hook
(``_libmoe_lm_eval.after_import``, from the start-up hook module installed with libmoe) waits for
``transformers.models.auto.modeling_auto`` and, once it has run, calls
``libmoe.models.hf.register_auto``. If transformers is already imported, that happens at once.
"""

from __future__ import annotations

import sys

WATCHED = "transformers.models.auto.modeling_auto"


def _register() -> None:
    try:  # each module registers its classes when imported
        if "libmoe.models.hf" not in sys.modules:
            from .models import hf  # noqa: F401
        if "libmoe.upcycle.hf_saving" not in sys.modules:
            from .upcycle import hf_saving  # noqa: F401
    except Exception as err:  # never break transformers over libmoe's classes
        print(f"libmoe: could not register its model with transformers' Auto classes: {err}",
              file=sys.stderr)


def install() -> None:
    try:
        from _libmoe_lm_eval import after_import  # the start-up hook module installed with libmoe
    except ImportError:  # a source tree used without installing: register if transformers is here
        if WATCHED in sys.modules:
            _register()
        return
    after_import(WATCHED, _register)
