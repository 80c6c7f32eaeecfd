"""How a checkout's top-level folders become the subpackages ``dynalens.<name>``.

``kernels/``, ``models/``, ``probes/`` and ``circuits/`` each hold a
subpackage's modules and, as ``_init.py``, its ``__init__``. None holds an
``__init__.py``, so none is a package of its own. In Python started in the
repository root (which puts that folder first on ``sys.path``), ``import
kernels`` finds HuggingFace's optional ``kernels`` package, or else an empty
namespace that transformers' probe for it reports as absent, never our code
(were the folder a package, that probe would run it, and it imports dynalens
and so transformers: a circular import).

``dashboard/`` keeps its ``__init__.py``: Dash names the modules of a pages
folder after their package only when that package's file is ``__init__.py``;
it imports nothing, so ``import dashboard`` in the repository root is harmless.

- A wheel (``pip install .``) holds ``dynalens/<name>/__init__.py``: the build
  (``setup.py``) installs each ``_init.py`` under that name, and nothing here
  is used.
- In a checkout (an editable install, or Python started in the repository
  root with dynalens installed either way), :func:`install` puts
  :class:`CheckoutFinder` first on ``sys.meta_path``; it imports
  ``dynalens.<name>`` from its folder's init file with the folder as its
  ``__path__``, so ``__file__``, ``importlib.resources`` and Dash's asset and
  page folders point into the folder, as in the wheel.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

SUBPACKAGES = {
    "kernels": "_init.py",
    "models": "_init.py",
    "probes": "_init.py",
    "circuits": "_init.py",
    "dashboard": "__init__.py",
}
"""Each top-level folder that is a subpackage of ``dynalens``, with its init file."""

ROOT = Path(__file__).resolve().parent.parent
"""The folder above ``dynalens/``: the repository root in a checkout."""


class CheckoutFinder:
    """Finds ``dynalens.<name>`` in the top-level folder ``<name>/`` of a checkout."""

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        """The spec of ``dynalens.<name>`` for a name in :data:`SUBPACKAGES`, else ``None``."""
        parent, _, name = fullname.rpartition(".")
        if parent != "dynalens" or name not in SUBPACKAGES:
            return None
        folder = ROOT / name
        return importlib.util.spec_from_file_location(
            fullname, folder / SUBPACKAGES[name], submodule_search_locations=[str(folder)]
        )


def is_checkout() -> bool:
    """Whether ``dynalens/`` sits in a checkout: ``pyproject.toml`` and the folders beside it."""
    folders = all((ROOT / name / init).is_file() for name, init in SUBPACKAGES.items())
    return folders and (ROOT / "pyproject.toml").is_file()


def install() -> None:
    """Put :class:`CheckoutFinder` first on ``sys.meta_path`` in a checkout (once); nothing in a wheel."""
    if is_checkout() and CheckoutFinder not in sys.meta_path:
        sys.meta_path.insert(0, CheckoutFinder)
