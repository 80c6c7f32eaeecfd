"""The start-up check of the ``compat_<library>`` modules: the internals dynalens relies on are still there.

Where dynalens reaches into another library's internals (private methods,
instance attributes, codegen helpers), the code doing it lives in one module
per library (``models/compat_transformer_lens.py``, ``models/compat_torch.py``,
``kernels/compat_numba.py``), ``pyproject.toml`` pins that library exactly,
and the module calls :func:`require` once when it is imported (it loads with
the library, so ``import dynalens`` pays nothing). A missing internal then
fails at once with :class:`PinnedInternalsError`, naming it and the pin,
instead of deep inside a forward pass.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Mapping


class PinnedInternalsError(ImportError):
    """An installed library lacks an internal dynalens relies on (it is not the pinned version)."""


def has(owner: object, dotted: str) -> bool:
    """Whether ``owner.a.b...`` exists for ``dotted = "a.b..."``."""
    for part in dotted.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


def names_attribute(cls: type, attribute: str) -> bool:
    """Whether a method of ``cls`` (its MRO included) reads or sets ``attribute`` (from the bytecode, no instance)."""
    return any(
        attribute in function.__code__.co_names
        for klass in inspect.getmro(cls)
        for function in vars(klass).values()
        if inspect.isfunction(function)
    )


def require(pin: str, internals: Mapping[str, bool]) -> None:
    """Raise :class:`PinnedInternalsError` unless every internal is present.

    Parameters
    ----------
    pin
        The requirement in ``pyproject.toml``, e.g. ``"transformer-lens==4.3.0"``.
    internals
        What dynalens relies on, by the name a reader finds in the library
        (``"transformer_lens.model_bridge.TransformerBridge._register_aliases"``),
        mapped to whether it is there.
    """
    missing = [name for name, present in internals.items() if not present]
    if not missing:
        return
    distribution = pin.split("==")[0]
    try:
        installed = f"{distribution} {importlib.metadata.version(distribution)} is installed"
    except importlib.metadata.PackageNotFoundError:
        installed = f"{distribution} is not installed as a distribution"
    raise PinnedInternalsError(
        f"dynalens relies on {', '.join(missing)}; pinned {pin} in pyproject.toml, but {installed}: "
        f"pip install '{pin}'"
    )
