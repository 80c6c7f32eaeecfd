"""Argument checks and the state-position index shared by the SSD kernels.

Errors name the argument, the accepted shape and what was passed, as for
the selective scan (``kernels/checks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from dynalens.kernels.checks import check_tensor

SSDBackend = Literal["auto", "ref", "torch", "triton"]
SSD_BACKENDS = ("auto", "ref", "torch", "triton")

Positions = Sequence[int] | Tensor


def check_ssd_args(op: str, x, dt, A, B, C, D, z, dt_bias, initial_state) -> tuple[int, int, int, int, int, int]:
    """Check every input of an SSD scan; return ``(b, l, h, p, g, n)``."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a 4-d tensor of shape (b, l, h, p), got {got}")
    if x.numel() == 0:
        raise ValueError(f"{op}: x is empty (shape {tuple(x.shape)}); b, l, h and p must be positive")
    b, length, h, p = x.shape
    dev = x.device
    check_tensor(op, "x", x, tuple(x.shape), "(b, l, h, p)", dev)
    check_tensor(op, "dt", dt, (b, length, h), "(b, l, h)", dev)
    check_tensor(op, "A", A, (h,), "(h,)", dev)
    g, n = _check_groups(op, B, b, length, h)
    check_tensor(op, "B", B, (b, length, g, n), "(b, l, g, n)", dev)
    check_tensor(op, "C", C, (b, length, g, n), "(b, l, g, n) like B", dev)
    if D is not None:
        shape = (h,) if isinstance(D, Tensor) and D.dim() == 1 else (h, p)
        check_tensor(op, "D", D, shape, "(h,) or (h, p)", dev)
    if z is not None:
        check_tensor(op, "z", z, (b, length, h, p), "(b, l, h, p)", dev)
    if dt_bias is not None:
        check_tensor(op, "dt_bias", dt_bias, (h,), "(h,)", dev)
    if initial_state is not None:
        check_tensor(op, "initial_state", initial_state, (b, h, p, n), "(b, h, p, n)", dev)
    return b, length, h, p, g, n


def _check_groups(op: str, B: object, b: int, length: int, h: int) -> tuple[int, int]:
    if not isinstance(B, Tensor) or B.dim() != 4 or B.shape[:2] != (b, length):
        got = tuple(B.shape) if isinstance(B, Tensor) else type(B).__name__
        raise ValueError(f"{op}: B must have shape (b, l, g, n) = ({b}, {length}, g, n), got {got}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or n < 1 or h % g != 0:
        raise ValueError(f"{op}: B's group count g = {g} must divide the head count h = {h} (and n = {n} be positive)")
    return g, n


def check_ssd_backend(op: str, backend: str) -> None:
    """Reject an unknown backend name."""
    if backend not in SSD_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {SSD_BACKENDS}, got {backend!r}")


def check_chunk_size(op: str, chunk_size: object) -> int:
    """A positive int chunk size."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def state_index(op: str, positions: Positions, b: int, length: int, device: torch.device) -> Tensor:
    """``state_positions`` as a ``(b, k)`` long tensor of columns in ``[0, l)``.

    Accepts a sequence of ints or a 1-d tensor (the same columns for every
    row) or a ``(b, k)`` tensor (columns per row); negative entries count
    from the end, as in Python indexing.
    """
    accepted = f"a non-empty sequence of ints or 1-d tensor, or a (b, k) = ({b}, k) integer tensor, in [-{length}, {length})"
    try:
        idx = torch.as_tensor(positions, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{op}: state_positions must be {accepted}; got {positions!r}") from err
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{op}: state_positions must be {accepted}; got dtype {idx.dtype}")
    if idx.dim() == 1:
        idx = idx.unsqueeze(0).expand(b, -1)
    if idx.dim() != 2 or idx.shape[0] != b or idx.shape[1] == 0:
        raise ValueError(f"{op}: state_positions must be {accepted}; got shape {tuple(idx.shape)}")
    if bool(((idx < -length) | (idx >= length)).any()):
        raise ValueError(f"{op}: state_positions must lie in [-{length}, {length}) for l = {length}; got {idx.tolist()}")
    return torch.where(idx < 0, idx + length, idx).long().contiguous()

