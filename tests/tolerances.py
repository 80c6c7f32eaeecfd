"""The one tolerance table: how close two different float computations of the same quantity must be.

Two computations that differ in operation order (batched or alone, fused or
not, another library's kernels, another CPU's vector width) agree to a few
units of round-off per operation, so they are compared with the tolerance of
the dtype they were computed in, never exactly::

    from tests.tolerances import assert_close
    assert_close(ours, reference)                  # tensors: the less precise of their dtypes
    assert_close(ours.double(), exact, dtype=torch.float32)   # computed in float32, compared in float64
    assert_close(scan, ref, scale=SCAN)            # a named, commented multiple of the table

Exact comparisons stay for a value and its round trip (saved and loaded), and
for the same computation run twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
"""``(rtol, atol)`` per dtype: ``|actual - expected| <= atol + rtol * |expected|`` elementwise."""

SCAN: dict[torch.dtype, float] = {torch.float64: 1, torch.float32: 200, torch.bfloat16: 5}
"""The multiple of the table for a scan kernel against its sequential reference (selective, linear, SSD).

A scan of a hundred steps or more carries each step's round-off into the
next; mamba_ssm's tests allow its kernels (6e-4, 2e-3) in float32 and
(3e-2, 5e-2) in bfloat16, which these multiples cover. float64 stays at the table.
"""

def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` of ``dtype``, both times ``scale``."""
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale


def assert_close(
    actual: Any,
    expected: Any,
    dtype: torch.dtype | None = None,
    *,
    scale: float = 1.0,
    equal_nan: bool = False,
    msg: str | None = None,
) -> None:
    """Assert ``actual`` is within the tolerance of ``dtype`` (times ``scale``) of ``expected``.

    Parameters
    ----------
    actual, expected
        Tensors (compared by ``torch.testing.assert_close``; integer and bool
        tensors must be equal) or anything ``numpy`` reads as floats (arrays,
        lists, pandas columns).
    dtype
        The dtype the values were computed in. Default: for tensors the less
        precise of the two dtypes; for anything else float32 (dynalens
        computes in float32, and frames and figures hold those values as
        float64). Pass it where values computed in float32 are compared as
        float64 tensors, or float64 computations as numpy values.
    scale
        A multiple of the table for a comparison with a principled looser
        bound (a long recurrence, a GPU kernel): name it and say why where it is used.
    equal_nan, msg
        NaN equal to NaN; what a failure message starts with.
    """
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        message = None if msg is None else (lambda m: f"{msg}: {m}")
        floating = [d for d in (actual.dtype, expected.dtype) if d.is_floating_point]
        if not floating:  # ids, masks: equal
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=message)
            return
        rtol, atol = tolerance(dtype or max(floating, key=lambda d: torch.finfo(d).eps), scale)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan, check_dtype=False,
                                   msg=message)
        return
    rtol, atol = tolerance(dtype or torch.float32, scale)
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), rtol=rtol,
                               atol=atol, equal_nan=equal_nan, err_msg=msg or "")


def assert_gradients_close(
    ours: torch.Tensor, reference: torch.Tensor, inputs: list[torch.Tensor], dtype: torch.dtype, msg: str
) -> None:
    """The gradients of one random weighting of ``ours`` and of ``reference`` with respect to ``inputs`` agree
    within the tolerance of ``dtype`` (the two are computed differently from the same inputs)."""
    w = torch.randn(reference.shape, generator=torch.Generator().manual_seed(2), dtype=reference.dtype)
    got, expected = (torch.autograd.grad((t.to(w.dtype) * w).sum(), inputs) for t in (ours, reference))
    for g, e in zip(got, expected):
        assert_close(g, e, dtype, msg=msg)
