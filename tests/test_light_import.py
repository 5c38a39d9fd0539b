"""`import libmoe` and `import libmoe.moe` stay light, at run time (import-linter follows import
statements; this also sees what a package's `__init__` runs): torch and the MoE layer, nothing of
training, evaluation or the model classes, and none of the heavy optional dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("transformers", "lm_eval", "lmms_eval", "datasets", "matplotlib", "tensorboard")


def loaded_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("statement", ["import libmoe", "import libmoe.moe"])
def test_import_is_light(statement):
    modules = loaded_after(statement)
    libmoe = {m.split(".")[1] for m in modules if m.startswith("libmoe.")}
    assert libmoe <= {"moe", "auto", "version", "overrides", "files"}, sorted(libmoe)
    assert "libmoe.moe.layer" in modules  # the check sees what it should
    heavy = [m for m in modules if m.split(".")[0] in HEAVY]
    assert not heavy, heavy
