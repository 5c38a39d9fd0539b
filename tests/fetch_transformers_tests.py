"""Fetch transformers' own common model tests for the installed transformers version, which
tests/models/test_transformers_common.py runs against libmoe's transformers classes.

transformers' wheel ships no tests; its source distribution on PyPI ships the common ones
(tests/test_modeling_common.py with ModelTesterMixin, test_configuration_common.py with
ConfigTester, ...), but not tests/generation/test_utils.py (GenerationTesterMixin) nor
tests/causal_lm_tester.py (CausalLMModelTest). This script downloads that sdist (pip download,
from the same index pip installs from) and extracts its tests/*.py into
.transformers-tests/<version>/tests/ at the repository root (git-ignored). For the generation
tests too, point LIBMOE_TRANSFORMERS_TESTS at the tests/ folder of a transformers checkout of the
installed version instead (docs/transformers.md).

    python tests/fetch_transformers_tests.py            # part of the README's test line
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def destination(transformers_version: str) -> Path:
    return ROOT / ".transformers-tests" / transformers_version / "tests"


def main() -> int:
    try:
        installed = version("transformers")
    except Exception:  # noqa: BLE001  transformers is optional: nothing to fetch without it
        print("fetch_transformers_tests: transformers is not installed; nothing to fetch.")
        return 0
    dest = destination(installed)
    if (dest / "test_modeling_common.py").is_file():
        print(f"fetch_transformers_tests: transformers {installed}'s tests already in {dest}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--no-binary", ":all:", f"transformers=={installed}", "-d", tmp],
                              capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            print(f"fetch_transformers_tests: could not download the transformers {installed} sdist: "
                  f"{(done.stderr or done.stdout).strip()[-500:]}", file=sys.stderr)
            return 1
        staging = dest.parent / "tests.partial"
        staging.mkdir(parents=True, exist_ok=True)
        prefix = f"transformers-{installed}/tests/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.startswith(prefix) and member.name.endswith(".py"):
                    relative = member.name[len(prefix):]
                    if "/" in relative:  # only the top-level common files are in the sdist anyway
                        continue
                    (staging / relative).write_bytes(archive.extractfile(member).read())
        (staging / "__init__.py").touch()
        if not (staging / "test_modeling_common.py").is_file():
            print(f"fetch_transformers_tests: the transformers {installed} sdist has no "
                  "tests/test_modeling_common.py", file=sys.stderr)
            return 1
        staging.rename(dest)
    print(f"fetch_transformers_tests: transformers {installed}'s common tests -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
