"""The SSD layer as an explicit matrix per head: ``y = M x`` (Mamba-2's "hidden attention").

``M[b, i, t, s] = (C_t · B_s) exp(sum_{s<r<=t} dt_r A_i) dt_s`` for ``s <= t``
(zero above the diagonal), ``B``/``C`` of head ``i``'s group, plus ``D_i``
on the diagonal: ``M = L ∘ (C Bᵀ)`` with the decay mask ``L`` and ``Δ`` folded in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels.autograd import accumulation_dtype
from dynalens.kernels.checks import check_tensor
from dynalens.kernels.ssd_checks import check_chunk_size, check_ssd_args
from dynalens.kernels.ssd_ref import discretise_dt

OP = "ssd_mixer_matrix"


def ssd_mixer_matrix(
    dt: Float[Tensor, "b l h"],
    A: Float[Tensor, " h"],
    B: Float[Tensor, "b l g n"],
    C: Float[Tensor, "b l g n"],
    D: Float[Tensor, " h"] | None = None,
    dt_bias: Float[Tensor, " h"] | None = None,
    dt_softplus: bool = False,
    *,
    heads: Sequence[int] | Tensor | None = None,
    chunk_size: int = 128,
) -> Float[Tensor, "b k l l"]:
    """Materialise the lower-triangular mixing matrix of each head of an SSD layer.

    With the arguments of :func:`~dynalens.kernels.ssd_scan` (zero initial
    state, no gate), ``y[b, :, i, q] = M[b, i] @ x[b, :, i, q]`` for every
    head-dim column ``q``: one ``(l, l)`` matrix per head, shared by its ``p``
    channels.

    Parameters
    ----------
    dt, A, B, C, dt_bias, dt_softplus
        As for :func:`~dynalens.kernels.ssd_scan`.
    D : Tensor, shape (h,), optional
        Per-head skip, added on the diagonal (a per-channel ``(h, p)`` ``D`` has
        no single matrix per head and is refused).
    heads : sequence of int or 1-d Tensor, optional
        Only these heads (all ``h`` when omitted); ``k = len(heads)``.
    chunk_size : int
        Query rows computed at a time.

    Returns
    -------
    Tensor, shape (b, k, l, l)
        ``M`` in float32 (float64 for float64 inputs).

    Notes
    -----
    Memory: the output holds ``b·k·l²`` floats; one chunk of rows needs about
    ``3·b·(k + g)·chunk_size·l`` more. Running sums of ``dt A`` are kept in
    float64 so that differences of long sums stay accurate.

    Examples
    --------
    >>> dt, A = torch.rand(1, 5, 4), -torch.rand(4)
    >>> B, C = torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 3)
    >>> ssd_mixer_matrix(dt, A, B, C, heads=[0, 3]).shape
    torch.Size([1, 2, 5, 5])
    """
    if not isinstance(dt, Tensor) or dt.dim() != 3:
        got = tuple(dt.shape) if isinstance(dt, Tensor) else type(dt).__name__
        raise ValueError(f"{OP}: dt must be a 3-d tensor of shape (b, l, h), got {got}")
    b, length, h = dt.shape
    check_tensor(OP, "dt", dt, (b, length, h), "(b, l, h)", dt.device)
    if D is not None:
        check_tensor(OP, "D", D, (h,), "(h,): one skip per head", dt.device)
    g = check_ssd_args(OP, dt[..., None], dt, A, B, C, None, None, dt_bias, None)[4]
    check_chunk_size(OP, chunk_size)
    idx = _head_index(heads, h, dt.device)

    acc = accumulation_dtype(dt)
    step = discretise_dt(dt.to(acc), dt_bias, dt_softplus)[:, :, idx]  # (b, l, k)
    S = torch.cumsum(step.double() * A.double()[idx], dim=1).transpose(1, 2)  # (b, k, l)
    group = idx // (h // g)
    Bg, Cg = B.to(acc).transpose(1, 2), C.to(acc).transpose(1, 2)  # (b, g, l, n)
    dtB = step.transpose(1, 2)  # (b, k, l): dt_s, folded into the columns
    M = dt.new_zeros(b, len(idx), length, length, dtype=acc)
    cols = torch.arange(length, device=dt.device)
    for t0 in range(0, length, chunk_size):
        t1 = min(length, t0 + chunk_size)
        causal = cols[None, :t1] <= torch.arange(t0, t1, device=dt.device)[:, None]  # (T, t1)
        scores = (Cg[:, :, t0:t1] @ Bg[:, :, :t1].transpose(-1, -2))[:, group]  # (b, k, T, t1)
        gap = (S[:, :, t0:t1, None] - S[:, :, None, :t1]).masked_fill_(~causal, -torch.inf)
        M[:, :, t0:t1, :t1] = scores * torch.exp(gap).to(acc) * dtB[:, :, None, :t1]
    if D is not None:
        M.diagonal(dim1=2, dim2=3).add_(D.to(acc)[idx][:, None])
    return M


def _head_index(heads: Sequence[int] | Tensor | None, h: int, device: torch.device) -> Tensor:
    """Validated head indices as a 1-d long tensor."""
    if heads is None:
        return torch.arange(h, device=device)
    idx = torch.as_tensor(heads, device=device)
    if idx.dim() != 1 or idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{OP}: heads must be a non-empty 1-d sequence of ints, got {heads!r}")
    if idx.min() < 0 or idx.max() >= h:
        raise ValueError(f"{OP}: heads must lie in [0, {h - 1}], got {idx.tolist()}")
    return idx.long()
