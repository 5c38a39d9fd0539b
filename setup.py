"""Everything is in pyproject.toml except one step: installing ``libmoe-lm-eval.pth``, which
registers the ``libmoe`` model with lm-evaluation-harness (see src/_libmoe_lm_eval.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "libmoe-lm-eval.pth"


class BuildPyWithPth(build_py):
    """Puts the .pth file at the top of site-packages, in wheels and in editable installs."""

    def run(self):
        super().run()
        root = self.build_lib
        if getattr(self, "editable_mode", False):  # editable wheels are assembled from install_lib
            root = self.get_finalized_command("install").install_lib
        self.copy_file(os.path.join("src", PTH), os.path.join(root, PTH))


setup(cmdclass={"build_py": BuildPyWithPth})
