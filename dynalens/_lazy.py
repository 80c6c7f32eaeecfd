"""Names of a package imported on first use (PEP 562), listed once in its ``if TYPE_CHECKING:`` block.

A package's init file writes its public names as ordinary imports under
``if TYPE_CHECKING:`` (read by type checkers, editors and the API pages'
static reader) and ends with::

    __getattr__, __dir__ = attach(__name__, __file__)

:func:`attach` reads those imports from the file itself, so the names are
listed once: ``dl.probes.LogitLens`` imports ``dynalens.probes.logit_lens`` the
first time it is read, ``dl.models.names`` the submodule ``names``, and
``dir(dl.probes)`` (tab completion) lists every name before any is imported.
``import dynalens`` therefore costs no torch, transformers or plotly.
"""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Callable
from pathlib import Path


def type_checking_imports(source: str) -> dict[str, tuple[str, str]]:
    """Each name bound by a ``from X import Y [as Z]`` under ``if TYPE_CHECKING:``: ``Z -> (X, Y)``."""
    found: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for stmt in node.body:
                if not isinstance(stmt, ast.ImportFrom) or stmt.level or stmt.module is None:
                    raise ImportError(f"lazy exports are `from package.module import name`: {ast.unparse(stmt)}")
                found.update({alias.asname or alias.name: (stmt.module, alias.name) for alias in stmt.names})
    return found


def submodules(paths: list[str]) -> set[str]:
    """The public modules and packages in a package's folders (``names`` for ``models/names.py``)."""
    found = set()
    for folder in map(Path, paths):
        found |= {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    return found


def import_submodules(name: str) -> None:
    """Import the package ``name`` and every public module in its folders (what a registry of classes needs)."""
    package = importlib.import_module(name)
    for module in sorted(submodules(getattr(package, "__path__", []))):
        importlib.import_module(f"{name}.{module}")


def attach(name: str, file: str) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package ``name`` whose init file is ``file``.

    Parameters
    ----------
    name, file
        The package's ``__name__`` and ``__file__``.

    Returns
    -------
    tuple
        ``__getattr__(attr)`` imports a name of the ``TYPE_CHECKING`` block, or a
        submodule, once (the value is then stored on the package);
        ``__dir__()`` lists the package's attributes, those names and the submodules.
    """
    exports = type_checking_imports(Path(file).read_text())

    def __getattr__(attr: str) -> object:
        package = sys.modules[name]
        if attr in exports:
            module, source = exports[attr]
            if module == name:  # `from dynalens import probes`: a subpackage
                value = importlib.import_module(f"{name}.{source}")
            else:
                value = getattr(importlib.import_module(module), source)
        elif not attr.startswith("_") and attr in submodules(getattr(package, "__path__", [])):
            value = importlib.import_module(f"{name}.{attr}")
        else:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        setattr(package, attr, value)
        return value

    def __dir__() -> list[str]:
        package = sys.modules[name]
        return sorted(set(vars(package)) | set(exports) | submodules(getattr(package, "__path__", [])))

    return __getattr__, __dir__
