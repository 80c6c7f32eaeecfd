"""The SSD recurrence of Mamba-2 as a plain loop over time: the oracle of every fast path.

Per head ``i`` (group ``i // (h // g)``), with ``dt`` after bias and softplus:
``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_tᵀ`` (a ``(p, n)`` state),
``y_t = h_t C_t + D x_t``, ``out = y * silu(z)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels.autograd import accumulation_dtype
from dynalens.kernels.ssd_checks import Positions, state_index


def discretise_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool) -> Tensor:
    """``dt + dt_bias`` (per head, the last dim), through softplus when asked."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def skip_weight(D: Tensor, p: int) -> Tensor:
    """``D`` as ``(h, p)``, from a per-head ``(h,)`` or per-channel ``(h, p)``."""
    return D[:, None].expand(-1, p) if D.dim() == 1 else D


def pack(y: Tensor, final: Tensor | None, states: Tensor | None):
    """``y`` alone, or ``(y, final_state?, states?)`` in that order."""
    extra = [t for t in (final, states) if t is not None]
    return (y, *extra) if extra else y


def ssd_scan_ref(
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
):
    """SSD scan as a loop over time, accumulating in float32 (float64 for float64 inputs).

    Same arguments and outputs as :func:`~dynalens.kernels.ssd_scan` (without
    ``chunk_size`` and ``backend``): ``y`` in ``x``'s dtype, then on request the
    final state ``(b, h, p, n)`` and the states ``(b, l, h, p, n)`` (or
    ``(b, k, h, p, n)`` at ``state_positions``), in the accumulation dtype.
    """
    b, length, h, p = x.shape
    acc = accumulation_dtype(x)
    x_, A_ = x.to(acc), A.to(acc)
    dt_ = discretise_dt(dt.to(acc), dt_bias, dt_softplus)
    r = h // B.shape[2]
    Bh = B.to(acc).repeat_interleave(r, dim=2)  # (b, l, h, n)
    Ch = C.to(acc).repeat_interleave(r, dim=2)
    state = initial_state.to(acc) if initial_state is not None else x_.new_zeros(b, h, p, B.shape[3])
    keep = return_states or state_positions is not None
    ys, states = [], []
    # Per-step slices by unbind: indexing inside the loop would make the backward
    # allocate a full-length gradient at every step (quadratic in l).
    for xt, dtt, Bt, Ct in zip(x_.unbind(1), dt_.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        decay = torch.exp(dtt * A_)[..., None, None]
        state = decay * state + (dtt[..., None] * xt)[..., None] * Bt[:, :, None, :]
        ys.append((state * Ct[:, :, None, :]).sum(-1))
        if keep:
            states.append(state)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x_ * skip_weight(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    kept = None
    if keep:
        kept = torch.stack(states, dim=1)
        if state_positions is not None:
            idx = state_index("ssd_scan_ref", state_positions, b, length, x.device)
            kept = kept[torch.arange(b, device=x.device)[:, None], idx]
    return pack(y.to(x.dtype), state if return_final_state else None, kept)
