"""The architecture rules that import-linter cannot state (docs/architecture.md):

- no package takes a private (`_name`) function, class or module from another package;
- a function-level import is only for an optional heavy dependency, each with its reason below,
  never to break an import cycle (the layers contract in pyproject.toml keeps out the cycles);
- what one package takes from another is that package's public API: every name imported from
  another package (from its `__init__` or from one of its modules, at module or function level)
  is in that package's `__all__`. The importer may keep the module path (`from ..eval.table
  import x`); the rule is that `x` is declared public. Exempt: names taken from a heavy module
  (one that imports transformers & co at its top, e.g. `libmoe.models.hf`): a light `__init__`
  cannot re-export them. The root modules (`libmoe.files`, `errors`, ...) are single modules:
  their public names are their API (also when a package's module passes one on);
- every function and class a package exports has a docstring.

Plus the layers and the light-import contracts themselves, checked by running `lint-imports`.
The source is read with Python's ast; nothing is imported.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "libmoe"

# What may be imported inside a function, and why: each is optional or slow to import, and only
# some commands need it. A libmoe module that imports one of these at its top counts as heavy too.
HEAVY = {
    "transformers": "seconds to import; optional ([hub], [bench], [vlm]); only HF models and export need it",
    "tokenizers": "comes with transformers (optional); only Hub tokenizers need it",
    "huggingface_hub": "comes with transformers/datasets (optional); only Hub downloads need it",
    "datasets": "seconds to import; optional ([hub]); only Hub corpora and task files need it",
    "lm_eval": "optional ([harness]); only the lm-evaluation-harness bridge needs it",
    "lmms_eval": "optional ([lmms]); only the lmms-eval bridge needs it",
    "matplotlib": "a third of a second to import; only figures need it",
    "PIL": "optional ([vlm]); only image data needs it",
    "sklearn": "optional ([vlm]); only the VLM's synthetic data needs it",
    "skimage": "optional ([vlm]); only the VLM's synthetic data needs it",
    "submitit": "optional ([slurm]); only `--launcher slurm` needs it",
    "resource": "POSIX only; peak-memory readings fall back without it",
    "torch.utils.tensorboard": "half a second to import (tensorboard); only a training run's logger needs it",
    "torch.distributed.fsdp": "0.4 s to import (DTensor); only `train.parallel=fsdp` runs need it",
    "torch.distributed.checkpoint": "0.4 s to import (DTensor); only saving and resuming checkpoints need it",
    "torch.utils.cpp_extension": "0.15 s to import (setuptools); only building the fused CPU kernel needs it",
}


def is_heavy(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HEAVY)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def imported_modules(path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement loads (`from pkg import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = resolve(path, node)
    subs = [f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}")]
    return subs or [base]


def with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return list({id(n): n for n in found}.values())


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (not inside functions or `if TYPE_CHECKING`)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    visit(block)
            elif isinstance(node, (ast.With, ast.ClassDef)):
                visit(node.body)

    visit(tree.body)
    return found


def heavy_modules(modules: dict[str, tuple[Path, ast.Module]]) -> set[str]:
    """libmoe modules whose import (at their top, transitively) loads a HEAVY dependency."""
    deps = {name: {m for node in top_level_imports(tree) for mod in imported_modules(path, node)
                   for m in with_parents(mod)}
            for name, (path, tree) in modules.items()}
    heavy = {name for name, d in deps.items() if any(is_heavy(m) for m in d)}
    changed = True
    while changed:
        changed = False
        for name, d in deps.items():
            if name not in heavy and d & heavy:
                heavy.add(name)
                changed = True
    return heavy


def package_of(module: str) -> str:
    """`libmoe.train.trainer` -> "train"; `libmoe.files` -> "files"; `libmoe` -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_imports_across_packages():
    offences = []
    for name, (path, tree) in sources().items():
        mine = package_of(name)
        if not mine:  # the root package installs its own private helpers
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported_modules(path, node)
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for target in targets:
                if not target.startswith("libmoe") or package_of(target) == mine:
                    continue
                bad = [p for p in target.split(".") if private(p)] + [n for n in names if private(n)]
                if bad:
                    offences.append(f"{path.relative_to(SRC)}:{node.lineno} takes {', '.join(bad)} "
                                    f"from {target}")
    assert not offences, "private names used across packages (make them public there):\n" + \
        "\n".join(offences)


def test_function_level_imports_are_only_for_heavy_dependencies():
    modules = sources()
    heavy = heavy_modules(modules)
    offences = []
    for path, tree in modules.values():
        for node in function_imports(tree):
            for target in imported_modules(path, node):
                if is_heavy(target) or target in heavy:
                    continue
                offences.append(f"{path.relative_to(SRC)}:{node.lineno} imports {target} inside a function")
    assert not offences, ("function-level imports of light modules (move them to the module's top; "
                          "heavy ones are listed in HEAVY with their reason):\n" + "\n".join(offences))


def declared_all(init: Path) -> set[str] | None:
    """The names a package's `__init__` lists in `__all__` (read with ast; None when it has none)."""
    names: set[str] | None = None
    for node in ast.parse(init.read_text(), str(init)).body:
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
            names = (names or set()) | {e.value for e in ast.walk(node.value)
                                        if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return names


def origin(modules: dict[str, tuple[Path, ast.Module]], module: str, name: str) -> tuple[str, str]:
    """(module, name) where `module`'s `name` comes from: a module that passes on (imports at its top)
    a name from another package leads there, and so on."""
    seen = set()
    while module in modules and module not in seen:
        seen.add(module)
        path, tree = modules[module]
        found = [(resolve(path, node), alias.name) for node in top_level_imports(tree)
                 if isinstance(node, ast.ImportFrom)
                 for alias in node.names if (alias.asname or alias.name) == name]
        if not found or package_of(found[0][0]) == package_of(module):
            break
        module, name = found[0]
    return module, name


def unexported_imports(modules: dict[str, tuple[Path, ast.Module]], heavy: set[str],
                       exports: dict[str, set[str]] | None = None) -> list[str]:
    """`file:line takes NAME from MODULE` for each name a module imports from another libmoe package
    that the package's `__all__` does not list. A name passed on by another package's module is its
    home package's; names from heavy modules and root modules are not checked. `exports`: the
    packages' `__all__` (read from their `__init__` when not given)."""
    exports = {} if exports is None else exports
    offences = []
    for module, (path, tree) in modules.items():
        mine = package_of(module)
        if not mine:  # the root package assembles the public API from the packages
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not resolve(path, node).startswith("libmoe."):
                continue
            target = resolve(path, node)
            for alias in node.names:
                source, name = origin(modules, target, alias.name)
                home = package_of(source)
                init = PACKAGE / home / "__init__.py"
                if home == mine or not init.exists() or source in heavy or f"{source}.{name}" in heavy:
                    continue
                if home not in exports:
                    exports[home] = declared_all(init) or set()
                if name not in exports[home]:
                    passed = f" (from {source})" if source != target else ""
                    offences.append(f"{path.relative_to(SRC)}:{node.lineno} takes {name} from "
                                    f"{target}{passed}")
    return offences


def test_what_packages_take_from_each_other_is_exported():
    modules = sources()
    offences = unexported_imports(modules, heavy_modules(modules))
    assert not offences, ("names taken from another package that its __init__ does not export (add "
                          "them to its imports and __all__, with a docstring):\n" + "\n".join(offences))


def definition(modules: dict[str, tuple[Path, ast.Module]], module: str,
               name: str) -> ast.FunctionDef | ast.ClassDef | None:
    """The `def` or `class` statement of `module`'s `name`, following imports; None for anything else."""
    seen = set()
    while module in modules and (module, name) not in seen:
        seen.add((module, name))
        path, tree = modules[module]
        step = None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return node
            if isinstance(node, ast.ImportFrom):
                step = next(((resolve(path, node), a.name) for a in node.names
                             if (a.asname or a.name) == name), step)
        if step is None:
            return None
        module, name = step
    return None


def test_exported_functions_and_classes_have_docstrings():
    modules = sources()
    missing = []
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        package = module_name(init)
        for name in sorted(declared_all(init) or ()):
            node = definition(modules, package, name)
            if node is not None and not ast.get_docstring(node):
                missing.append(f"{package}.{name} (defined at line {node.lineno} of its module)")
    assert not missing, "exported without a docstring:\n" + "\n".join(missing)


def test_heavy_reasons_are_stated():
    assert all(len(reason) > 20 for reason in HEAVY.values())


def test_the_rule_checkers_see_what_they_should():
    """The checkers above on a known sample: a light import inside a function is caught; a heavy
    one (and a libmoe module that imports a heavy one at its top) is not."""
    code = ast.parse("import json\ndef f():\n    import matplotlib\n    import json as j\n")
    found = function_imports(code)
    assert [ast.unparse(n) for n in found] == ["import matplotlib", "import json as j"]
    assert [ast.unparse(n) for n in top_level_imports(code)] == ["import json"]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import transformers\n")
    assert [ast.unparse(n) for n in top_level_imports(tree)] == ["from typing import TYPE_CHECKING"]
    assert is_heavy("torch.utils.tensorboard") and is_heavy("transformers.models") and not is_heavy("torch")
    assert private("_cell") and not private("__version__") and not private("cell")
    assert package_of("libmoe.bench.runner") == "bench" and package_of("libmoe") == ""
    init = PACKAGE / "bench" / "__init__.py"
    assert resolve(init, ast.parse("from ..files import x").body[0]) == "libmoe.files"
    assert resolve(PACKAGE / "bench" / "runner.py", ast.parse("from .tables import x").body[0]) == \
        "libmoe.bench.tables"


def test_the_export_checker_sees_what_it_should(tmp_path):
    """On a known sample: a name from another package's module that its `__all__` lacks is caught;
    an exported one, one from the importer's own package and one from a heavy module are not."""
    init = tmp_path / "__init__.py"
    init.write_text('from .a import x\n__all__ = ["x"]\n__all__ += ["y"]\n')
    assert declared_all(init) == {"x", "y"}
    init.write_text("x = 1\n")
    assert declared_all(init) is None
    path = PACKAGE / "cli" / "sample.py"
    code = ("from ..eval.evaluator import evaluate_model, not_exported\n"
            "from ..moe.options import did_you_mean\n"
            "from ..upcycle.hf import find_mlps\n"
            "from .common import OVERRIDES\n"
            "from ..files import atomic_write\n"
            "def f():\n    from ..models.hf import LibMoEForCausalLM\n    from ..eval import hidden\n")
    modules = {"libmoe.cli.sample": (path, ast.parse(code)),
               "libmoe.moe.options": (PACKAGE / "moe" / "options.py",
                                      ast.parse("from ..overrides import did_you_mean\n")),
               "libmoe.upcycle.hf": (PACKAGE / "upcycle" / "hf.py",
                                     ast.parse("from ..models.upcycled import find_mlps\n"))}
    exports = {"eval": {"evaluate_model"}, "upcycle": set(), "models": set(), "moe": set(), "cli": set()}
    heavy = {"libmoe.models.hf"}
    passed_on = "libmoe/cli/sample.py:3 takes find_mlps from libmoe.upcycle.hf (from libmoe.models.upcycled)"
    assert unexported_imports(modules, heavy, exports) == [
        "libmoe/cli/sample.py:1 takes not_exported from libmoe.eval.evaluator", passed_on,
        "libmoe/cli/sample.py:8 takes hidden from libmoe.eval",
        "libmoe/upcycle/hf.py:1 takes find_mlps from libmoe.models.upcycled"]
    exports["models"] = {"find_mlps"}  # passed on by upcycle.hf: exported by its home package
    assert unexported_imports(modules, heavy, exports) == [
        "libmoe/cli/sample.py:1 takes not_exported from libmoe.eval.evaluator",
        "libmoe/cli/sample.py:8 takes hidden from libmoe.eval"]


def test_the_docstring_checker_finds_definitions():
    """An exported name is followed through re-exports to its def; a constant has none."""
    init = ast.parse("from .a import f, C as D\nK = 1\n")
    module = ast.parse("def f():\n    'Doc.'\nclass C:\n    pass\n")
    modules = {"libmoe.x": (PACKAGE / "x" / "__init__.py", init),
               "libmoe.x.a": (PACKAGE / "x" / "a.py", module)}
    assert ast.get_docstring(definition(modules, "libmoe.x", "f")) == "Doc."
    assert definition(modules, "libmoe.x", "D").name == "C"
    assert definition(modules, "libmoe.x", "K") is None and definition(modules, "libmoe.x", "nope") is None


def test_import_linter_contracts_are_kept():
    """The layers and light-import contracts of pyproject.toml (also in the README's test line)."""
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is part of the [test] extra: pip install -e '.[test]'"
    result = subprocess.run([lint], cwd=SRC.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


if __name__ == "__main__":  # a quick listing while refactoring: python tests/test_architecture.py
    sys.exit(pytest.main([__file__, "-q"]))
