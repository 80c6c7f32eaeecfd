"""The selective SSM as an explicit matrix: ``y = M u`` (Mamba's "hidden attention").

``M[b, c, t, s] = sum_k C[t, k] exp(sum_{s<r<=t} delta_r A[c, k]) delta_s B[s, k]``
for ``s <= t`` (zero above the diagonal), plus ``D[c]`` on the diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels.autograd import accumulation_dtype
from dynalens.kernels.checks import check_input, check_ssm_params
from dynalens.kernels.scan_torch import bc_states_view, discretise

OP = "mixer_matrix"


def mixer_matrix(
    delta: Float[Tensor, "b d l"],
    A: Float[Tensor, "d n"],
    B: Tensor,
    C: Tensor,
    D: Float[Tensor, " d"] | None = None,
    delta_bias: Float[Tensor, " d"] | None = None,
    delta_softplus: bool = False,
    *,
    channels: Sequence[int] | Tensor | None = None,
    chunk_size: int = 128,
) -> Float[Tensor, "b c l l"]:
    """Materialise the lower-triangular mixing matrix of a selective scan.

    With the same arguments as :func:`~dynalens.kernels.selective_scan`, the
    scan's output before the ``z`` gate (zero initial state) is
    ``y[b, c] = M[b, c] @ u[b, c]``.

    Parameters
    ----------
    delta, A, B, C, D, delta_bias, delta_softplus
        As for :func:`~dynalens.kernels.selective_scan` (``B``/``C`` shared,
        grouped or fixed).
    channels : sequence of int or 1-d Tensor, optional
        Only these channels (all ``d`` when omitted); ``c = len(channels)``.
    chunk_size : int
        Query rows computed at a time.

    Returns
    -------
    Tensor, shape (b, c, l, l)
        ``M`` in float32 (float64 for float64 inputs).

    Notes
    -----
    Memory: the output holds ``b·c·l²`` floats (64 MiB per channel at
    ``l = 4096`` in float32); on top of it one chunk needs about
    ``3·b·c·chunk_size·l`` floats, whatever ``n``. Log-decays are summed in
    float64 so that differences of long cumulative sums stay accurate.

    Examples
    --------
    >>> delta, A = torch.rand(1, 8, 5), -torch.rand(8, 4)
    >>> B, C = torch.randn(1, 4, 5), torch.randn(1, 4, 5)
    >>> mixer_matrix(delta, A, B, C, channels=[0, 3]).shape
    torch.Size([1, 2, 5, 5])
    """
    b, d, length = check_input(OP, "delta", delta)
    dev = delta.device
    n = check_ssm_params(OP, A, B, C, D, delta_bias, b, d, length, dev)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be a positive int, got {chunk_size!r}")
    idx = _channel_index(channels, d, dev)

    acc = accumulation_dtype(delta)
    bias = None if delta_bias is None else delta_bias.to(acc)[idx]
    dt = discretise(delta.to(acc)[:, idx], bias, delta_softplus)  # (b, c, l)
    Bv, Cv = (_select(bc_states_view(X.to(acc), d), idx) for X in (B, C))  # (b|1, c|1, l|1, n)
    log_decay = torch.cumsum(dt.double()[..., None] * A.double()[idx][:, None, :], dim=2)  # (b, c, l, n)
    dtB = (dt[..., None] * Bv).expand(*dt.shape, n)
    Cv = Cv.expand(*dt.shape, n)

    M = delta.new_zeros(b, len(idx), length, length, dtype=acc)
    cols = torch.arange(length, device=dev)
    for t0 in range(0, length, chunk_size):
        t1 = min(length, t0 + chunk_size)
        causal = cols[None, :t1] <= torch.arange(t0, t1, device=dev)[:, None]  # (T, t1)
        tile = M[:, :, t0:t1, :t1]
        for k in range(n):
            gap = log_decay[:, :, t0:t1, None, k] - log_decay[:, :, None, :t1, k]
            decay = torch.exp(gap.masked_fill_(~causal, -torch.inf)).to(acc)
            tile += Cv[:, :, t0:t1, None, k] * decay * dtB[:, :, None, :t1, k]
    if D is not None:
        M.diagonal(dim1=2, dim2=3).add_(D.to(acc)[idx][:, None])
    return M


def _channel_index(channels: Sequence[int] | Tensor | None, d: int, device: torch.device) -> Tensor:
    """Validated channel indices as a 1-d long tensor."""
    if channels is None:
        return torch.arange(d, device=device)
    idx = torch.as_tensor(channels, device=device)
    if idx.dim() != 1 or idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{OP}: channels must be a non-empty 1-d sequence of ints, got {channels!r}")
    if idx.min() < 0 or idx.max() >= d:
        raise ValueError(f"{OP}: channels must lie in [0, {d - 1}], got {idx.tolist()}")
    return idx.long()


def _select(view: Tensor, idx: Tensor) -> Tensor:
    """The selected channels of a ``(b|1, d|1, l|1, n)`` view (broadcast dims kept)."""
    return view if view.shape[1] == 1 else view[:, idx]
