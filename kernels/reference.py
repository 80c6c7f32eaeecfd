"""Sequential reference scans: the oracles every fast path is tested against.

They follow the semantics of ``mamba_ssm.ops.selective_scan_interface.
selective_scan_ref`` (real ``A`` only) and are written for clarity, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def _expand_bc(X: Tensor, d: int) -> Tensor:
    """``(b, n, l)`` or grouped ``(b, g, n, l)`` → ``(b, d, n, l)``; fixed ``(d, n)`` kept."""
    if X.dim() == 3:
        return X.unsqueeze(1).expand(X.shape[0], d, X.shape[1], X.shape[2])
    if X.dim() == 4:
        return X.repeat_interleave(d // X.shape[1], dim=1)
    return X


def selective_scan_ref(
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
):
    """Selective scan as a plain loop over time, accumulating in float32 (or float64).

    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``,
    ``out = y * silu(z)``. Returns ``out`` and, on request, the last state
    ``(b, d, n)`` and all states ``(b, d, l, n)``, in that order.
    """
    dtype_in = u.dtype
    acc = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A = u.to(acc), delta.to(acc), A.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    Bx, Cx = _expand_bc(B.to(acc), d), _expand_bc(C.to(acc), d)
    h = (
        initial_state.to(acc)
        if initial_state is not None
        else u.new_zeros(b, d, A.shape[1])
    )
    # Per-step slices by unbind: indexing inside the loop would make the
    # backward allocate a full-length gradient at every step (quadratic in l).
    Bs = [Bx] * length if Bx.dim() == 2 else Bx.unbind(-1)
    Cs = [Cx] * length if Cx.dim() == 2 else Cx.unbind(-1)
    ys, states = [], []
    for dt, ut, Bt, Ct in zip(delta.unsqueeze(-1).unbind(2), u.unsqueeze(-1).unbind(2), Bs, Cs):
        h = torch.exp(dt * A) * h + dt * Bt * ut
        ys.append((h * Ct).sum(-1))
        if return_states:
            states.append(h)
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = [y.to(dtype_in)]
    if return_last_state:
        out.append(h)
    if return_states:
        out.append(torch.stack(states, dim=2))
    return out[0] if len(out) == 1 else tuple(out)


def linear_scan_ref(
    a: Float[Tensor, "b d l"],
    x: Float[Tensor, "b d l"],
    initial_state: Float[Tensor, "b d"] | None = None,
) -> Float[Tensor, "b d l"]:
    """All states of ``h_t = a_t * h_{t-1} + x_t`` as a plain loop over time.

    Accumulates in float32 (or float64) and returns the states in ``x``'s dtype;
    ``h_{-1}`` is ``initial_state`` or zero.
    """
    dtype_in = x.dtype
    acc = torch.float64 if dtype_in == torch.float64 else torch.float32
    a, x = a.to(acc), x.to(acc)
    h = initial_state.to(acc) if initial_state is not None else x.new_zeros(x.shape[:2])
    states = []
    for a_t, x_t in zip(a.unbind(2), x.unbind(2)):
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, dim=2).to(dtype_in)
