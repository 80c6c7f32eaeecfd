"""Argument checks shared by the scan kernels.

Every error names the argument, the shape, dtype or device that is accepted,
and what was passed, so a wrong layout never turns into a silent broadcast.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Backend = Literal["auto", "ref", "torch", "numba", "triton"]
BACKENDS = ("auto", "ref", "torch", "numba", "triton")


def check_tensor(
    op: str, name: str, x: object, shape: tuple[int, ...], shape_doc: str, device: torch.device
) -> Tensor:
    """Check that ``x`` is a floating tensor of ``shape`` on ``device``; return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{op}: {name} must be real (one of {_dtypes()}), got complex dtype {x.dtype}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must have a floating dtype (one of {_dtypes()}), got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape_doc} = {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on the same device as the input ({device}), got {x.device}")
    return x


def check_input(op: str, name: str, x: object) -> tuple[int, int, int]:
    """Check the main ``(b, d, l)`` input and return its shape."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: {name} must be a 3-d tensor of shape (b, d, l), got {got}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(x.shape)}); b, d and l must be positive")
    check_tensor(op, name, x, tuple(x.shape), "(b, d, l)", x.device)
    return tuple(x.shape)


def check_bc(op: str, name: str, X: object, b: int, d: int, n: int, length: int, device: torch.device) -> Tensor:
    """Check a ``B`` or ``C`` in one of its three layouts: shared, grouped or fixed."""
    accepted = (
        f"shared (b, n, l) = {(b, n, length)}, grouped (b, g, n, l) = ({b}, g, {n}, {length}) "
        f"with g dividing d = {d}, or fixed (d, n) = {(d, n)}"
    )
    if not isinstance(X, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, {accepted}; got {type(X).__name__}")
    shape = tuple(X.shape)
    ok = (
        shape == (d, n)
        or shape == (b, n, length)
        or (X.dim() == 4 and shape[0] == b and shape[2:] == (n, length) and shape[1] > 0 and d % shape[1] == 0)
    )
    if not ok:
        raise ValueError(f"{op}: {name} must be {accepted}; got {shape}")
    return check_tensor(op, name, X, shape, "", device)


def check_ssm_params(op, A, B, C, D, delta_bias, b: int, d: int, length: int, device: torch.device) -> int:
    """Check ``A (d, n)``, ``B``/``C`` in any layout, ``D`` and ``delta_bias`` ``(d,)``; return ``n``."""
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != d:
        got = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"{op}: A must have shape (d, n) with d = {d}, got {got}")
    n = A.shape[1]
    check_tensor(op, "A", A, (d, n), "(d, n)", device)
    check_bc(op, "B", B, b, d, n, length, device)
    check_bc(op, "C", C, b, d, n, length, device)
    if D is not None:
        check_tensor(op, "D", D, (d,), "(d,)", device)
    if delta_bias is not None:
        check_tensor(op, "delta_bias", delta_bias, (d,), "(d,)", device)
    return n


def check_states_out(
    op: str,
    out: object,
    return_states: bool,
    shape: tuple[int, ...],
    shape_doc: str,
    dtype: torch.dtype,
    device: torch.device,
    contiguous: bool,
) -> None:
    """``states_out`` is only for ``return_states``: a tensor of ``shape`` and the states' dtype (contiguous if asked)."""
    if not return_states:
        raise ValueError(f"{op}: states_out is written only with return_states=True")
    check_tensor(op, "states_out", out, shape, shape_doc, device)
    if out.dtype != dtype or (contiguous and not out.is_contiguous()):
        what = "a contiguous tensor" if contiguous else "a tensor"
        layout = ", not contiguous" if contiguous and not out.is_contiguous() else ""
        raise ValueError(f"{op}: states_out must be {what} of the states' dtype {dtype}, got {out.dtype}{layout}")


def check_backend(op: str, backend: str) -> None:
    """Reject an unknown backend name."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def _dtypes() -> str:
    return ", ".join(str(t).removeprefix("torch.") for t in FLOAT_DTYPES)
