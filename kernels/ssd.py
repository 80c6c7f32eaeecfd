"""The SSD scan of Mamba-2: one public function that dispatches to a path.

Per head (scalar decay ``A``, state ``(p, n)``), with heads sharing ``B``/``C``
in groups: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ``,
``y_t = h_t C_t + D x_t``, ``out = y * silu(z)``.
"""

from __future__ import annotations

import importlib.util
import os

from jaxtyping import Float
from torch import Tensor

from dynalens.kernels.autograd import accumulation_dtype
from dynalens.kernels.checks import check_states_out
from dynalens.kernels.ssd_checks import (
    Positions,
    SSDBackend,
    check_chunk_size,
    check_ssd_args,
    check_ssd_backend,
    state_index,
)
from dynalens.kernels.ssd_ref import pack, ssd_scan_ref
from dynalens.kernels.ssd_torch import CHUNK, ssd_scan_torch

OP = "ssd_scan"


def ssd_scan(
    x: Float[Tensor, "b l h p"],
    dt: Float[Tensor, "b l h"],
    A: Float[Tensor, " h"],
    B: Float[Tensor, "b l g n"],
    C: Float[Tensor, "b l g n"],
    D: Tensor | None = None,
    z: Float[Tensor, "b l h p"] | None = None,
    dt_bias: Float[Tensor, " h"] | None = None,
    dt_softplus: bool = False,
    initial_state: Float[Tensor, "b h p n"] | None = None,
    return_final_state: bool = False,
    state_positions: Positions | None = None,
    return_states: bool = False,
    *,
    chunk_size: int | None = None,
    backend: SSDBackend = "auto",
    states_out: Tensor | None = None,
):
    """Mamba-2's SSD scan, differentiable in every input.

    Parameters
    ----------
    x : Tensor, shape (b, l, h, p)
        Input per head (``p`` = head dim).
    dt : Tensor, shape (b, l, h)
        Step size per head, before ``dt_bias`` and the softplus. A step with
        ``dt = 0`` (after them) leaves the state exactly as it was, whatever ``x``:
        padding relies on it.
    A : Tensor, shape (h,)
        Scalar decay rate per head (negative for a stable scan).
    B, C : Tensor, shape (b, l, g, n)
        Input and output matrices in ``g`` groups, ``g`` dividing ``h``: head
        ``i`` reads group ``i // (h // g)``.
    D : Tensor, shape (h,) or (h, p), optional
        Skip connection, ``y += D x``.
    z : Tensor, shape (b, l, h, p), optional
        Gate, ``out = y * silu(z)`` (mamba_ssm's gate without the norm).
    dt_bias : Tensor, shape (h,), optional
        Added to ``dt`` before the softplus.
    dt_softplus : bool
        Apply softplus to ``dt + dt_bias``.
    initial_state : Tensor, shape (b, h, p, n), optional
        State before the first step (zero when omitted).
    return_final_state : bool
        Also return the state after the last step, ``(b, h, p, n)``.
    state_positions : sequence of int, or Tensor (k,) or (b, k), optional
        Also return the states after these steps only, ``(b, k, h, p, n)``
        (negative positions count from the end; a ``(b, k)`` tensor picks
        positions per row). The other states are never formed.
    return_states : bool
        Also return every state, ``(b, l, h, p, n)`` (exclusive with ``state_positions``).
    chunk_size : int, optional
        Steps per chunk of the chunked paths (a speed knob; the result does not
        depend on it beyond rounding). Default: the path's tuned size.
    backend : {"auto", "ref", "torch", "triton"}
        ``"auto"`` takes Triton for CUDA tensors and the chunked PyTorch path
        otherwise; ``"ref"`` is the sequential reference.
    states_out : Tensor, shape (b, l, h, p, n), optional
        With ``return_states``: the tensor the states are written into and
        returned as (the accumulation dtype, on ``x``'s device). The PyTorch
        path without autograd writes each state there directly, so that a
        caller can reuse one buffer and spare the memory's first touch.

    Returns
    -------
    y : Tensor, shape (b, l, h, p), dtype of ``x``
        Followed, when asked, by the final state and then the states (float32,
        or float64 for float64 inputs); a tuple whenever more than ``y``.

    Examples
    --------
    >>> b, l, h, p, g, n = 1, 6, 4, 3, 2, 5
    >>> x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h)
    >>> A, B, C = -torch.rand(h), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    >>> y, last, states = ssd_scan(x, dt, A, B, C, return_final_state=True, state_positions=[-1, 2])
    >>> y.shape, last.shape, states.shape
    (torch.Size([1, 6, 4, 3]), torch.Size([1, 4, 3, 5]), torch.Size([1, 2, 4, 3, 5]))
    """
    b, length = check_ssd_args(OP, x, dt, A, B, C, D, z, dt_bias, initial_state)[:2]
    check_ssd_backend(OP, backend)
    if chunk_size is not None:
        check_chunk_size(OP, chunk_size)
    if return_states and state_positions is not None:
        raise ValueError(f"{OP}: pass state_positions or return_states=True, not both")
    idx = None if state_positions is None else state_index(OP, state_positions, b, length, x.device)
    if states_out is not None:
        shape = (b, length, *x.shape[2:], B.shape[3])
        check_states_out(OP, states_out, return_states, shape, "(b, l, h, p, n)", accumulation_dtype(x), x.device, True)
    if backend == "auto":
        backend = "triton" if x.is_cuda and importlib.util.find_spec("triton") is not None else "torch"
    if backend == "ref" or (backend == "torch" and length == 1):  # one step is the recurrence itself
        out = ssd_scan_ref(
            x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state, idx, return_states
        )
        return out if states_out is None else (*out[:-1], states_out.copy_(out[-1]))
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, idx, return_states)
    if backend == "torch":
        acc = accumulation_dtype(x)
        y, final, states = ssd_scan_torch(*args, chunk_size or CHUNK, acc, states_out)
        y = y.to(x.dtype)
    else:
        y, final, states = _triton(*args, chunk_size)
    if states_out is not None and states is not states_out:
        states = states_out.copy_(states)
    keep = return_states or idx is not None
    return pack(y, final if return_final_state else None, states if keep else None)


def _triton(*args):
    """The Triton path, with the errors of a missing package or a CPU tensor outside the interpreter."""
    x = args[0]
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(f"{OP}: backend 'triton' needs the triton package; pass backend='torch'")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{OP}: backend 'triton' takes CUDA tensors, got {x.device}; on CPU use backend='torch', "
            "or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
        )
    from dynalens.kernels.ssd_triton import ssd_scan_triton

    return ssd_scan_triton(*args)
