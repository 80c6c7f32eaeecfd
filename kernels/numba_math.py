"""Vectorisable float32 math for the numba kernels (exp, exp2, log1p, softplus, sigmoid) and codegen helpers.

LLVM vectorises a loop only when every call in it has a vector form, and
numba without Intel's SVML has none for ``exp``/``log``: a call to libm keeps
a scan's inner loop scalar. The float32 versions here are plain arithmetic:
Cephes' ``expf`` and ``logf`` (range reduction, a minimax polynomial, the
power of two built from exponent bits), ``exp2`` as rounding, a degree-5
polynomial and ``ldexp``, softplus as ``max(x, 0) + log1p(exp(-|x|))`` with
the log a polynomial on ``[0, 1]``; 1e-7 to 2e-7 relative error. float64
keeps libm's exact functions: the dtype picks the version when numba
compiles the caller.

``exp``, ``exp2`` and ``log1p`` are compiled on their own with FMA
contraction only and LLVM inlines them into the kernel with those flags, so a
kernel may allow reassociation for its reductions without letting LLVM fold
away the rounding steps here; ``softplus`` and ``sigmoid`` are inlined by
numba.

The codegen helpers give a kernel what numba does not expose: 512-bit vectors,
arrays on the stack (which LLVM can prove alias nothing, so it keeps them in
registers and needs no runtime overlap checks), a 16 × 16 transpose done with
vector shuffles instead of gathers, and cache prefetches. What they take
from numba's and llvmlite's internals comes through ``kernels/compat_numba.py``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from dynalens.kernels.compat_numba import (
    add_string_attribute,
    alloca_once,
    get_item_pointer2,
    get_or_insert_function,
    unpack_tuple,
)

MATH_FASTMATH = {"contract"}

_f = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _f(1.4426950408889634), _f(0.693359375), _f(-2.12194440e-4)
_EXP_P = tuple(_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1))
_E0, _E1, _E2, _E3, _E4 = _EXP_P
_E5, _ONE, _HALF = _f(5.0000001201e-1), _f(1.0), _f(0.5)
_EXP_LO, _EXP_HI = _f(-87.33654), _f(88.0)
# 2**r ~ 1 + r P(r) on [-0.5, 0.5], P of degree 4 fitted for relative error (~2e-7 in float32).
# Clamping below at -125 keeps every result a normal float; ldexp overflows to inf above 127.
_EXP2_P = tuple(_f(c) for c in (1.326472731307149e-3, 9.671512991189957e-3, 5.550733581185341e-2, 0.2402224242687225))
_X0, _X1, _X2, _X3 = _EXP2_P
_X4 = _f(0.6931470036506653)
_EXP2_LO = _f(-125.0)
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
# log1p(y) ~ y P(y) on [0, 1], P of degree 8 fitted for relative error (~2e-7 in float32).
_SOFTPLUS_P = tuple(
    _f(c)
    for c in (
        5.232693161815405e-3, -2.9505236074328423e-2, 7.822595536708832e-2, -0.13663245737552643,
        0.19106006622314453, -0.2484298199415207, 0.3331909775733948, -0.4999949336051941, 0.9999999403953552,
    )
)  # fmt: skip
_S0, _S1, _S2, _S3, _S4, _S5, _S6, _S7, _S8 = _SOFTPLUS_P


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
def _rint(typingctx, x):
    """``x`` rounded to the nearest integer (ties to even), as a float32."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
        return builder.call(get_or_insert_function(builder.module, fnty, "llvm.rint.f32"), args)

    return types.float32(types.float32), codegen


@intrinsic
def _ldexp(typingctx, x, e):
    """``x * 2**e``, float32 ``x`` and int32 ``e``."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.IntType(32)])
        return builder.call(get_or_insert_function(builder.module, fnty, "llvm.ldexp.f32.i32"), args)

    return types.float32(types.float32, types.int32), codegen


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
        add_string_attribute(builder.function, '"prefer-vector-width"="512"')
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


def exp2(x):
    """``2**x``; in numba code, a vectorisable polynomial for float32.

    The float32 version clamps ``x`` below at -125 (no slow subnormal results)
    and overflows to inf from 128 on, as ``exp2f`` does, up to ``x`` = 2**31.
    """
    return np.exp2(x)


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


def _exp2_32(x):
    _inline_into_callers()
    v = max(x, _EXP2_LO)
    e = _rint(v)
    r = v - e
    p = ((((_X0 * r + _X1) * r + _X2) * r + _X3) * r + _X4) * r + _ONE
    return _ldexp(p, np.int32(e))  # vscalefps on AVX-512


def _softplus32(x):
    # max(x, 0) + log1p(exp(-|x|)): the log's argument lies in [0, 1], where one polynomial is enough.
    y = exp(-abs(x))
    p = (((((((_S0 * y + _S1) * y + _S2) * y + _S3) * y + _S4) * y + _S5) * y + _S6) * y + _S7) * y + _S8
    return max(x, _f(0)) + y * p


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


@overload(exp2, **_OPTIONS)
def _exp2_overload(x):
    return _exp2_32 if x == types.float32 else (lambda x: np.exp2(x))


@overload(log1p, **_OPTIONS)
def _log1p_overload(x):
    return _log1p32 if x == types.float32 else (lambda x: np.log1p(x))


@overload(softplus, inline="always", **_OPTIONS)
def _softplus_overload(x):
    return _softplus32 if x == types.float32 else (lambda x: x if x > _SOFTPLUS_THRESHOLD else log1p(exp(x)))


@overload(sigmoid, inline="always", **_OPTIONS)
def _sigmoid_overload(x):
    one = x.cast_python_value(1)  # float32 math stays in float32
    return lambda x: one / (one + exp(-x))


@intrinsic
def stack_buffer(typingctx, size, dtype):
    """A pointer to ``size`` uninitialised elements on the caller's stack; wrap it with ``numba.carray``.

    ``size`` must be a compile-time constant (a module-level int). The buffer
    lives until the calling function returns: use it only in functions numba
    inlines (``inline="always"``) or in the function itself.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        elem = context.get_value_type(dtype.dtype)
        buf = alloca_once(builder, ir.ArrayType(elem, size.literal_value))
        return builder.bitcast(buf, elem.as_pointer())

    return types.CPointer(dtype.dtype)(size, dtype), codegen


BLOCK = 16  # side of the square transposed by ``transpose_block``


def _shuffle_mask(indices: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(ir.IntType(32), BLOCK), indices)


def _transpose_vectors(builder: ir.IRBuilder, rows: list) -> list:
    """The transpose of a ``BLOCK × BLOCK`` block held as row vectors: log2(BLOCK) rounds of two-row shuffles."""
    rows = list(rows)
    k = BLOCK // 2
    while k:
        # Rows r and r + k swap their off-diagonal k × k sub-blocks.
        first = _shuffle_mask([c if not c & k else BLOCK + c - k for c in range(BLOCK)])
        second = _shuffle_mask([c + k if not c & k else BLOCK + c for c in range(BLOCK)])
        for r in range(BLOCK):
            if not r & k:
                a, b = rows[r], rows[r + k]
                rows[r], rows[r + k] = builder.shuffle_vector(a, b, first), builder.shuffle_vector(a, b, second)
        k //= 2
    return rows


@intrinsic
def transpose_block(typingctx, src, src_row, src_col, dst, dst_row, dst_col):
    """``dst[dst_row + j, dst_col + i] = src[src_row + i, src_col + j]`` for ``i, j < BLOCK``.

    Both arrays 2-d, C-contiguous and of one dtype; no bounds checks. Rows are
    loaded as vectors and transposed with shuffles (``vpermt2ps`` on
    AVX-512), where a loop would gather or scatter one element at a time.
    """
    arrays = (src, dst)
    if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays) or src.dtype != dst.dtype:
        return None

    def codegen(context, builder, signature, args):
        elem = context.get_value_type(src.dtype)
        vec_ptr = ir.VectorType(elem, BLOCK).as_pointer()
        align = context.get_abi_sizeof(elem)

        def row_pointers(ary_type, value, row, col):
            ary = context.make_array(ary_type)(context, builder, value)
            shape, strides = (unpack_tuple(builder, x, 2) for x in (ary.shape, ary.strides))
            return [
                builder.bitcast(
                    get_item_pointer2(context, builder, ary.data, shape, strides, "C", [builder.add(row, row.type(r)), col]),
                    vec_ptr,
                )
                for r in range(BLOCK)
            ]

        rows = [builder.load(p, align=align) for p in row_pointers(src, args[0], args[1], args[2])]
        for p, v in zip(row_pointers(dst, args[3], args[4], args[5]), _transpose_vectors(builder, rows)):
            builder.store(v, p, align=align)
        return context.get_dummy_value()

    return types.none(src, types.intp, types.intp, dst, types.intp, types.intp), codegen


@intrinsic(prefer_literal=True)
def prefetch(typingctx, ary, i, write):
    """Ask the CPU to fetch the cache line of ``ary[i]`` (a 1-d array), to read or, if ``write``, to write.

    ``write`` must be a constant. A hint only: it never faults.
    """
    if not (isinstance(ary, types.Array) and ary.ndim == 1 and isinstance(write, types.BooleanLiteral)):
        return None
    rw = ir.IntType(32)(int(write.literal_value))

    def codegen(context, builder, signature, args):
        a = context.make_array(ary)(context, builder, args[0])
        shape, strides = (unpack_tuple(builder, x, 1) for x in (a.shape, a.strides))
        ptr = get_item_pointer2(context, builder, a.data, shape, strides, ary.layout, [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, rw, i32(3), i32(1)])  # keep in all cache levels; a data access
        return context.get_dummy_value()

    return types.none(ary, types.intp, write), codegen
