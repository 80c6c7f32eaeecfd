"""Vectorisable float32 math for the numba kernels: exp, log1p, softplus, sigmoid.

LLVM vectorises a loop only when every call in it has a vector form, and
numba without Intel's SVML has none for ``exp``/``log``: a call to libm keeps
a scan's inner loop scalar. The float32 versions here are Cephes' ``expf`` and
``logf`` written as plain arithmetic (Cody–Waite range reduction, a minimax
polynomial, the power of two built from exponent bits), ~1e-7 relative error.
float64 keeps libm's exact functions: the dtype picks the version when numba
compiles the caller.

``exp`` and ``log1p`` are compiled on their own with FMA contraction only
and LLVM inlines them into the kernel with those flags, so a kernel may allow
reassociation for its reductions without letting LLVM fold away the
rounding steps here; ``softplus`` and ``sigmoid`` are inlined by numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

MATH_FASTMATH = {"contract"}

_f = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _f(1.4426950408889634), _f(0.693359375), _f(-2.12194440e-4)
_EXP_P = tuple(_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1))
_E0, _E1, _E2, _E3, _E4 = _EXP_P
_E5, _ONE, _HALF = _f(5.0000001201e-1), _f(1.0), _f(0.5)
_EXP_LO, _EXP_HI = _f(-87.33654), _f(88.0)
# Adding 1.5 * 2**23 rounds to an integer held in the low mantissa bits; the +127 is the exponent bias.
_ROUND = _f(12582912.0 + 127.0)
_LOG_P = tuple(
    _f(c)
    for c in (
        7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
        -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1,
    )
)  # fmt: skip
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = _LOG_P
_SQRT_HALF, _SOFTPLUS_THRESHOLD = _f(0.70710678118654752), _f(20.0)


@intrinsic
def _as_int32(typingctx, x):
    """The bits of a float32 as an int32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _as_float32(typingctx, x):
    """An int32's bits as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def prefer_512_bit_vectors(typingctx):
    """Let LLVM vectorise the calling function with 512-bit registers where the CPU has them.

    LLVM tunes server Xeons (Skylake-SP onwards) to prefer 256-bit vectors,
    but the scans' inner loops are FMA-bound and run ~1.6× faster with
    AVX-512. Harmless on CPUs without it. Call it from a function numba
    compiles on its own, not from a ``prange`` body (which numba outlines and
    inlines into a wrapper without the attribute).
    """

    def codegen(context, builder, signature, args):
        # A string attribute: llvmlite's FunctionAttributes.add accepts only enum attributes.
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _inline_into_callers(typingctx):
    """Mark the calling function ``alwaysinline`` for LLVM, which keeps its instructions' own fast-math flags."""

    def codegen(context, builder, signature, args):
        builder.function.attributes.add("alwaysinline")
        return context.get_dummy_value()

    return types.none(), codegen


def exp(x):
    """``exp(x)``; in numba code, a vectorisable polynomial for float32."""
    return np.exp(x)


def log1p(x):
    """``log(1 + x)`` for ``x >= 0``; in numba code, a vectorisable polynomial for float32."""
    return np.log1p(x)


def softplus(x):
    """``log(1 + exp(x))``, and ``x`` itself above 20 (PyTorch's threshold)."""
    return x if x > _SOFTPLUS_THRESHOLD else np.log1p(np.exp(x))


def sigmoid(x):
    """``1 / (1 + exp(-x))``."""
    return 1 / (1 + np.exp(-x))


def _exp32(x):
    _inline_into_callers()
    v = min(max(x, _EXP_LO), _EXP_HI)
    t = v * _LOG2E + _ROUND
    e = t - _ROUND
    r = (v - e * _LN2_HI) - e * _LN2_LO
    p = ((((((_E0 * r + _E1) * r + _E2) * r + _E3) * r + _E4) * r + _E5) * r + _ONE) * r + _ONE
    return p * _as_float32(_as_int32(t) << np.int32(23))


def _log1p32(x):
    _inline_into_callers()
    w = x + _ONE
    bits = _as_int32(w)
    e = _f((bits >> np.int32(23)) - np.int32(126))
    m = _as_float32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000))  # w = m 2**e, m in [0.5, 1)
    if m < _SQRT_HALF:
        e -= _ONE
        m = m + m - _ONE
    else:
        m = m - _ONE
    z = m * m
    p = (((((((_L0 * m + _L1) * m + _L2) * m + _L3) * m + _L4) * m + _L5) * m + _L6) * m + _L7) * m + _L8
    log_w = (m + (p * m * z + e * _LN2_LO - _HALF * z)) + e * _LN2_HI
    # log(w) * x / (w - 1) corrects the rounding of 1 + x (Goldberg's log1p), and is x when 1 + x == 1.
    return x if w == _ONE else log_w * (x / (w - _ONE))


_OPTIONS = dict(jit_options={"fastmath": MATH_FASTMATH, "error_model": "numpy", "cache": True})


@overload(exp, **_OPTIONS)
def _exp_overload(x):
    return _exp32 if x == types.float32 else (lambda x: np.exp(x))


@overload(log1p, **_OPTIONS)
def _log1p_overload(x):
    return _log1p32 if x == types.float32 else (lambda x: np.log1p(x))


@overload(softplus, inline="always", **_OPTIONS)
def _softplus_overload(x):
    return lambda x: x if x > _SOFTPLUS_THRESHOLD else log1p(exp(x))


@overload(sigmoid, inline="always", **_OPTIONS)
def _sigmoid_overload(x):
    one = x.cast_python_value(1)  # float32 math stays in float32
    return lambda x: one / (one + exp(-x))
