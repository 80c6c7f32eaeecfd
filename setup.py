"""Build step that pyproject.toml cannot express: a subpackage's ``__init__``.

``kernels/``, ``models/``, ``probes/`` and ``circuits/`` keep their
subpackage's ``__init__`` as ``_init.py`` (why: ``dynalens/_layout.py``); the
wheel installs it as ``dynalens/<name>/__init__.py``.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

INIT = "_init"


class BuildPy(build_py):
    """``build_py`` that installs ``<folder>/_init.py`` of a ``dynalens.<name>`` package as its ``__init__.py``."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package.count(".") != 1:
            return modules
        return [(pkg, "__init__" if module == INIT else module, file) for pkg, module, file in modules]


setup(cmdclass={"build_py": BuildPy})
