"""The numba and llvmlite internals the numba kernels rely on, in one place (both pinned exactly).

``kernels/numba_math.py`` writes LLVM IR inside numba intrinsics, beyond
numba's public ``@njit``/``@overload`` surface:

- numba's code-generation helpers (``numba.core.cgutils``: declaring an LLVM
  function, stack slots, array element pointers) and its target context's
  methods (``get_value_type``, ``get_abi_sizeof``, ``make_array``,
  ``get_dummy_value``), and ``types.Number.cast_python_value``;
- llvmlite's ``FunctionAttributes``, a ``set`` whose ``add`` accepts only
  LLVM's enum attributes, given a string attribute through ``set.add``
  (:func:`add_string_attribute`);
- LLVM intrinsics by name, which exist only in the LLVM that llvmlite
  bundles: ``llvm.ldexp`` (LLVM 17 on) and ``llvm.prefetch.p0`` (opaque
  pointers), hence :data:`MIN_LLVM`.

:func:`check` runs once on import, before the helpers are bound, and fails
naming the pins when one of them is gone.
"""

from __future__ import annotations

from llvmlite import binding, ir
from numba.core import base, cgutils, types

from dynalens._pins import has, require

PINS = "numba==0.68.1 and llvmlite==0.50.0"
MIN_LLVM = (17,)
CGUTILS = ("get_or_insert_function", "alloca_once", "unpack_tuple", "get_item_pointer2")
CONTEXT = ("get_value_type", "get_abi_sizeof", "make_array", "get_dummy_value")


def check() -> None:
    """Raise ``PinnedInternalsError`` naming :data:`PINS` if an internal used by the kernels is missing."""
    require(PINS, {
        **{f"numba.core.cgutils.{name}": has(cgutils, name) for name in CGUTILS},
        **{f"numba.core.base.BaseContext.{name}": has(base, f"BaseContext.{name}") for name in CONTEXT},
        "numba.types.Number.cast_python_value": has(types, "Number.cast_python_value"),
        "llvmlite.ir.FunctionAttributes being a set": issubclass(getattr(ir, "FunctionAttributes", object), set),
        f"llvmlite's LLVM {'.'.join(map(str, MIN_LLVM))} or later": tuple(binding.llvm_version_info) >= MIN_LLVM,
    })  # fmt: skip


check()

get_or_insert_function = cgutils.get_or_insert_function
alloca_once = cgutils.alloca_once
unpack_tuple = cgutils.unpack_tuple
get_item_pointer2 = cgutils.get_item_pointer2


def add_string_attribute(function: ir.Function, attribute: str) -> None:
    """Add a string attribute (``'"prefer-vector-width"="512"'``) to an LLVM function.

    llvmlite's ``FunctionAttributes.add`` accepts only enum attributes; the
    set underneath keeps any string, and llvmlite writes it into the IR as it is.
    """
    set.add(function.attributes, attribute)
