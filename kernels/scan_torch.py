"""Pure-PyTorch scans: the fallback when the compiled CPU path is unavailable.

Both scans use a Hillis–Steele doubling scan over time (``log2(l)`` vectorised
steps) inside chunks of ``CHUNK`` steps, carrying the state from one chunk to
the next. Gradients come from autograd, so training memory grows with
``b·d·l·n``; the numba and Triton paths are the ones to use for long inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 256


def doubling_scan(a: Tensor, x: Tensor, h0: Tensor | None, dim: int) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + x_t`` along ``dim``, from ``h0`` (or zero)."""
    if h0 is not None:
        first = x.narrow(dim, 0, 1) + a.narrow(dim, 0, 1) * h0.unsqueeze(dim)
        x = torch.cat([first, x.narrow(dim, 1, x.shape[dim] - 1)], dim)
    length, offset = x.shape[dim], 1
    while offset < length:
        a_hi, x_hi = a.narrow(dim, offset, length - offset), x.narrow(dim, offset, length - offset)
        a_lo, x_lo = a.narrow(dim, 0, length - offset), x.narrow(dim, 0, length - offset)
        x = torch.cat([x.narrow(dim, 0, offset), a_hi * x_lo + x_hi], dim)
        a = torch.cat([a.narrow(dim, 0, offset), a_hi * a_lo], dim)
        offset *= 2
    return x


def chunked_scan(a: Tensor, x: Tensor, h0: Tensor | None, dim: int) -> Tensor:
    """:func:`doubling_scan` in chunks of ``CHUNK`` steps along ``dim``."""
    states, h = [], h0
    for a_c, x_c in zip(a.split(CHUNK, dim), x.split(CHUNK, dim)):
        s = doubling_scan(a_c, x_c, h, dim)
        h = s.select(dim, s.shape[dim] - 1)
        states.append(s)
    return torch.cat(states, dim)


def bc_states_view(X: Tensor, d: int) -> Tensor:
    """A ``B``/``C`` layout as a tensor broadcastable to the states ``(b, d, l, n)``."""
    if X.dim() == 2:
        return X[None, :, None, :]
    if X.dim() == 3:
        return X.transpose(1, 2).unsqueeze(1)
    return X.repeat_interleave(d // X.shape[1], dim=1).transpose(2, 3)


def discretise(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """``delta + delta_bias``, through softplus when asked."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, acc):
    """Selective scan with the doubling scan; returns ``(y, last_state, states)``."""
    u, A = u.to(acc), A.to(acc)
    dt = discretise(delta.to(acc), None if delta_bias is None else delta_bias.to(acc), delta_softplus)
    d = u.shape[1]
    Bv, Cv = bc_states_view(B.to(acc), d), bc_states_view(C.to(acc), d)
    a = torch.exp(dt[..., None] * A[:, None, :])
    x = (dt * u)[..., None] * Bv
    h0 = None if initial_state is None else initial_state.to(acc)
    states = chunked_scan(a, x.expand(a.shape), h0, dim=2)
    y = (states * Cv).sum(-1)
    if D is not None:
        y = y + u * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y, states[:, :, -1], states


def linear_scan_torch(a: Tensor, x: Tensor, initial_state: Tensor | None, acc: torch.dtype) -> Tensor:
    """All states of the linear recurrence along the last dim, with the doubling scan."""
    h0 = None if initial_state is None else initial_state.to(acc)
    return chunked_scan(a.to(acc), x.to(acc), h0, dim=2)
