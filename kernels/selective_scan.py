"""The selective scan of Mamba: one public function that dispatches to a path.

``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``,
``out = y * silu(z)``, with mamba_ssm's shapes and argument order.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels.autograd import SelectiveScanFn, accumulation_dtype
from dynalens.kernels.checks import (
    Backend,
    check_backend,
    check_input,
    check_ssm_params,
    check_states_out,
    check_tensor,
)
from dynalens.kernels.paths import auto_backend, compiled_path
from dynalens.kernels.reference import selective_scan_ref
from dynalens.kernels.scan_torch import selective_scan_torch

OP = "selective_scan"


def selective_scan(
    u: Float[Tensor, "b d l"],
    delta: Float[Tensor, "b d l"],
    A: Float[Tensor, "d n"],
    B: Tensor,
    C: Tensor,
    D: Float[Tensor, " d"] | None = None,
    z: Float[Tensor, "b d l"] | None = None,
    delta_bias: Float[Tensor, " d"] | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Float[Tensor, "b d n"] | None = None,
    return_states: bool = False,
    *,
    backend: Backend = "auto",
    states_out: Float[Tensor, "b d l n"] | None = None,
):
    """Selective scan with mamba_ssm's signature, differentiable in every input.

    Parameters
    ----------
    u, delta : Tensor, shape (b, d, l)
        Input and (pre-bias, pre-softplus) step size.
    A : Tensor, shape (d, n)
        Real state matrix (diagonal per channel; negative for a stable scan).
    B, C : Tensor
        Shared ``(b, n, l)``, grouped ``(b, g, n, l)`` with ``g`` dividing ``d``
        (channel ``i`` uses group ``i // (d // g)``), or fixed ``(d, n)``.
    D : Tensor, shape (d,), optional
        Skip connection, ``y += D u``.
    z : Tensor, shape (b, d, l), optional
        Gate, ``out = y * silu(z)``.
    delta_bias : Tensor, shape (d,), optional
        Added to ``delta`` before the softplus.
    delta_softplus : bool
        Apply softplus to ``delta + delta_bias``.
    return_last_state : bool
        Also return the state after the last step, ``(b, d, n)``.
    initial_state : Tensor, shape (b, d, n), optional
        State before the first step (zero when omitted).
    return_states : bool
        Also return every state ``h_t``, ``(b, d, l, n)``.
    backend : {"auto", "ref", "torch", "numba", "triton"}
        ``"auto"`` takes Triton for CUDA tensors and numba otherwise (the
        pure-PyTorch path when numba is missing).
    states_out : Tensor, shape (b, d, l, n), optional
        With ``return_states``: the tensor the states are written into and
        returned as (the states' dtype, on ``u``'s device, any strides). The
        numba path without autograd writes each state there directly when
        its memory is time-major (``states_out.transpose(1, 2)`` contiguous,
        the layout that path writes): a caller can hand it a ``(b, l, d, n)``
        buffer it reuses, or the place the states are kept, and spare the
        memory's first touch and a copy. Other paths copy into it.

    Returns
    -------
    out : Tensor, shape (b, d, l), dtype of ``u``
        Followed, when asked, by ``last_state`` and then ``states`` (float32,
        or float64 for float64 inputs); a tuple whenever more than ``out``.
        The numba path's states are time-major in memory (a ``(b, d, l, n)``
        view of a contiguous ``(b, l, d, n)`` tensor).

    Examples
    --------
    >>> b, d, n, l = 1, 4, 3, 5
    >>> u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
    >>> A, B, C = -torch.rand(d, n), torch.randn(b, n, l), torch.randn(b, n, l)
    >>> out, last = selective_scan(u, delta, A, B, C, return_last_state=True)
    >>> out.shape, last.shape
    (torch.Size([1, 4, 5]), torch.Size([1, 4, 3]))
    """
    b, d, length = _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_backend(OP, backend)
    if states_out is not None:
        shape = (b, d, length, A.shape[1])
        check_states_out(OP, states_out, return_states, shape, "(b, d, l, n)", accumulation_dtype(u), u.device, False)
    if backend == "auto":
        backend = auto_backend(u)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if backend == "ref":
        y, last, *rest = selective_scan_ref(*inputs[:8], delta_softplus, True, initial_state, return_states)
        states = rest[0] if rest else None
    elif backend == "torch":
        acc = accumulation_dtype(u)
        y, last, states = selective_scan_torch(*inputs[:8], delta_softplus, initial_state, acc)
        y = y.to(u.dtype)
    else:
        path = compiled_path(OP, backend, u)
        into = _time_major_target(states_out, backend, inputs)
        y, last, *rest = SelectiveScanFn.apply(path, *inputs, delta_softplus, return_states, into)
        states = rest[0] if rest else None
        if into is not None:
            states = states_out
    if states_out is not None and states is not states_out:
        states = states_out.copy_(states)
    return _pack(y, last if return_last_state else None, states if return_states else None)


def _time_major_target(states_out: Tensor | None, backend: str, inputs: tuple) -> Tensor | None:
    """``states_out`` as the contiguous ``(b, l, d, n)`` tensor the numba path writes into, when it can."""
    if states_out is None or backend != "numba" or not states_out.transpose(1, 2).is_contiguous():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return None  # under autograd the states are the Function's own output
    return states_out.transpose(1, 2)


def _pack(out: Tensor, last: Tensor | None, states: Tensor | None):
    extra = [t for t in (last, states) if t is not None]
    return (out, *extra) if extra else out


def _check_args(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[int, int, int]:
    b, d, length = check_input(OP, "u", u)
    check_tensor(OP, "delta", delta, (b, d, length), "(b, d, l)", u.device)
    n = check_ssm_params(OP, A, B, C, D, delta_bias, b, d, length, u.device)
    if z is not None:
        check_tensor(OP, "z", z, (b, d, length), "(b, d, l)", u.device)
    if initial_state is not None:
        check_tensor(OP, "initial_state", initial_state, (b, d, n), "(b, d, n)", u.device)
    return b, d, length
