"""The numba kernels' float32 exp, exp2, log1p, softplus and sigmoid against PyTorch in float64; the codegen helpers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import carray, njit

from dynalens.kernels import numba_math

FUNCTIONS = {
    "exp": (numba_math.exp, torch.exp, (-87.0, 88.0)),
    "exp2": (numba_math.exp2, torch.exp2, (-125.0, 127.0)),
    "log1p": (numba_math.log1p, torch.log1p, (0.0, 1e30)),
    "softplus": (numba_math.softplus, F.softplus, (-80.0, 80.0)),
    "sigmoid": (numba_math.sigmoid, torch.sigmoid, (-80.0, 80.0)),
}


def _jit_map(fn):
    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    return apply


def _points(lo: float, hi: float, dtype) -> np.ndarray:
    """Evenly spaced points, plus log-spaced ones for positive ranges (tiny to huge arguments)."""
    x = np.linspace(lo, hi, 100_001)
    if lo >= 0:
        x = np.concatenate([x, np.logspace(-30, np.log10(hi), 10_001)])
    return x.astype(dtype)


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 3e-7), (np.float64, 1e-15)], ids=["float32", "float64"])
def test_matches_torch_in_float64(name, dtype, rtol):
    """float32 takes the polynomial (~1e-7 relative error); float64 keeps libm (exact to round-off)."""
    fn, ref, (lo, hi) = FUNCTIONS[name]
    x = _points(lo, hi, dtype)
    out = np.empty_like(x)
    _jit_map(fn)(x, out)
    expected = ref(torch.from_numpy(x).double()).numpy()
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=0)


def test_exp_clamps_outside_float32_range():
    """Below ~-87.3 the result stays a tiny normal number (never garbage exponent bits), above 88 large."""
    x = np.array([-1e4, -100.0, 100.0, 1e4], np.float32)
    out = np.empty_like(x)
    _jit_map(numba_math.exp)(x, out)
    assert np.all(out[:2] >= 0) and np.all(out[:2] < 1e-37)
    assert np.all(out[2:] > 1e38) and np.all(np.isfinite(out[2:]))


def test_exp2_clamps_below_and_overflows_above():
    """Below -125 the result stays a normal float (no slow subnormals) near 2**-125; from 128 on it is inf, as in torch."""
    x = np.array([-1e4, -126.0, 128.0, 1e4], np.float32)
    out = np.empty_like(x)
    _jit_map(numba_math.exp2)(x, out)
    np.testing.assert_allclose(out[:2], 2.0**-125, rtol=1e-6)
    assert np.all(np.isposinf(out[2:])) and np.all(torch.exp2(torch.from_numpy(x[2:])).isinf().numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_block_matches_numpy(dtype):
    """One 16 x 16 block moved between offsets; everything around it untouched."""

    @njit
    def move(src, dst):
        numba_math.transpose_block(src, 3, 17, dst, 16, 2)

    src = np.random.default_rng(0).standard_normal((20, 40)).astype(dtype)
    dst = np.zeros((33, 19), dtype)
    move(src, dst)
    expected = np.zeros_like(dst)
    expected[16:32, 2:18] = src[3:19, 17:33].T
    np.testing.assert_array_equal(dst, expected)


def test_stack_buffer_holds_values_within_the_function():
    SIZE = 12

    @njit
    def cumulative(x):
        buf = carray(numba_math.stack_buffer(SIZE, x.dtype), (3, 4))
        total = x.dtype.type(0)
        for i in range(3):
            for j in range(4):
                total += x[i * 4 + j]
                buf[i, j] = total
        return buf.copy()

    x = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(cumulative(x), np.cumsum(x).reshape(3, 4))
