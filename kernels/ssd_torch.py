"""The SSD scan in chunks on PyTorch: matmuls inside a chunk, a short pass between chunks.

With ``S_t`` the running sum of ``dt A`` inside a chunk (``S_{-1} = 0`` at its
start) and ``H`` the state entering the chunk, the state after step ``t`` is

``h_t = exp(S_t) H + sum_{s <= t} exp(S_t - S_s) dt_s x_s B_sᵀ``

so that, per chunk of ``T`` steps and head: the output is the masked
``(T, T)`` matrix ``(C Bᵀ) ∘ exp(S_t - S_s) dt_s`` times ``x`` (one matmul
per group's ``C Bᵀ``, one per head) plus ``exp(S_t) C Hᵀ``; the chunk's own
end state is ``(x dt exp(S_end - S))ᵀ B``; and ``H`` follows from one pass
over the chunks, ``H <- exp(S_end) H + end``. Every step is differentiable
by autograd. States are formed only when asked: at chosen positions from
their chunk's ``H`` (a ``(p, T) @ (T, n)`` product each), or at every
position by a step-by-step pass inside the chunks, all chunks at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dynalens.kernels.ssd_ref import discretise_dt, skip_weight

CHUNK = 64  # the fastest of {32, 64, 128, 256} on the 2-core CPU (benchmarks/ssd.py)


def ssd_chunks(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> dict[str, Tensor]:
    """The chunked operands, padded to whole chunks with ``dt = 0`` (which changes nothing).

    Keys: ``x`` ``(b, c, g, r, T, p)`` already times ``dt``; ``a`` ``(b, c, h, T)``
    the steps' ``dt A``; ``S`` their running sums; ``B``, ``C`` ``(b, c, g, T, n)``.
    """
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = math.ceil(length / chunk)
    pad = nc * chunk - length
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    a = (dt * A).view(b, nc, chunk, h).transpose(2, 3)  # (b, c, h, T)
    xdt = (x * dt[..., None]).view(b, nc, chunk, h, p).permute(0, 1, 3, 2, 4)
    return dict(
        x=xdt.reshape(b, nc, g, h // g, chunk, p),
        a=a,
        S=torch.cumsum(a, dim=-1),
        B=B.view(b, nc, chunk, g, n).transpose(2, 3),
        C=C.view(b, nc, chunk, g, n).transpose(2, 3),
    )


def _heads(t: Tensor, g: int) -> Tensor:
    """``(b, c, h, ...)`` → ``(b, c, g, r, ...)`` (head ``i`` in group ``i // r``)."""
    return t.view(*t.shape[:2], g, t.shape[2] // g, *t.shape[3:])


def _causal(T: int, device: torch.device) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def chunk_outputs(ch: dict[str, Tensor], H: Tensor) -> Tensor:
    """``y`` per chunk ``(b, c, g, r, T, p)`` from the chunked operands and entering states ``H``."""
    g = ch["B"].shape[2]
    S = _heads(ch["S"], g)  # (b, c, g, r, T)
    T = S.shape[-1]
    gap = (S[..., :, None] - S[..., None, :]).masked_fill(~_causal(T, S.device), -torch.inf)
    scores = ch["C"] @ ch["B"].transpose(-1, -2)  # (b, c, g, T, T): C_t · B_s, per group
    y = (scores[:, :, :, None] * torch.exp(gap)) @ ch["x"]
    Ht = _heads(H, g).transpose(-1, -2)  # (b, c, g, r, n, p)
    return y + torch.exp(S)[..., None] * (ch["C"][:, :, :, None] @ Ht)


def chunk_end_states(ch: dict[str, Tensor]) -> Tensor:
    """Each chunk's end state from a zero start, ``(b, c, h, p, n)``."""
    g = ch["B"].shape[2]
    S = _heads(ch["S"], g)
    w = torch.exp(S[..., -1:] - S)  # (b, c, g, r, T)
    end = (ch["x"] * w[..., None]).transpose(-1, -2) @ ch["B"][:, :, :, None]  # (b, c, g, r, p, n)
    return end.flatten(2, 3)


def entering_states(decay: Tensor, end: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """States entering each chunk ``(b, c, h, p, n)`` and the final state, from
    the chunk decays ``exp(S_end)`` ``(b, c, h)`` and end states ``(b, c, h, p, n)``."""
    state = torch.zeros_like(end[:, 0]) if h0 is None else h0
    starts = []
    for c in range(end.shape[1]):
        starts.append(state)
        state = decay[:, c, :, None, None] * state + end[:, c]
    return torch.stack(starts, dim=1), state


def states_at(ch: dict[str, Tensor], H: Tensor, idx: Tensor) -> Tensor:
    """States after the steps at columns ``idx`` ``(b, k)``: ``(b, k, h, p, n)``."""
    b, k = idx.shape
    g = ch["B"].shape[2]
    T = ch["S"].shape[-1]
    c, j = idx // T, idx % T
    rows = torch.arange(b, device=idx.device)[:, None]
    S = ch["S"][rows, c]  # (b, k, h, T)
    Sj = S.gather(-1, j[:, :, None, None].expand(b, k, S.shape[2], 1))  # (b, k, h, 1)
    later = torch.arange(T, device=idx.device) > j[:, :, None, None]
    w = _heads(torch.exp((Sj - S).masked_fill(later, -torch.inf)), g)  # (b, k, g, r, T)
    local = (ch["x"][rows, c] * w[..., None]).transpose(-1, -2) @ ch["B"][rows, c][:, :, :, None]
    return torch.exp(Sj)[..., None] * H[rows, c] + local.flatten(2, 3)


def all_states(ch: dict[str, Tensor], h0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Every state ``(b, c·T, h, p, n)``, the entering states and the final state.

    Each chunk runs ``local <- exp(dt A) local + dt x Bᵀ`` from zero, all chunks
    at once; the entering states follow from the local end states, and the state
    after step ``t`` is ``exp(S_t) H + local_t``: the same expression as the pass
    between chunks, so a step with ``dt = 0`` repeats the state exactly.
    """
    g = ch["B"].shape[2]
    xs, Bs = ch["x"], ch["B"][:, :, :, None]
    decay = _heads(torch.exp(ch["S"]), g)  # (b, c, g, r, T): exp(S_t)
    step = _heads(torch.exp(ch["a"]), g)
    local, locals_ = None, []
    for t in range(xs.shape[-2]):
        new = xs[..., t, :, None] * Bs[..., t, None, :]  # (b, c, g, r, p, n)
        local = new if local is None else step[..., t, None, None] * local + new
        locals_.append(local)
    H, final = entering_states(decay[..., -1].flatten(2, 3), locals_[-1].flatten(2, 3), h0)
    Hg = _heads(H, g)
    states = torch.stack([decay[..., t, None, None] * Hg + loc for t, loc in enumerate(locals_)], dim=2)
    b, nc, T = states.shape[:3]
    return states.reshape(b, nc * T, -1, *states.shape[-2:]), H, final


def ssd_scan_torch(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, idx, want_all, chunk, acc):
    """The chunked scan; returns ``(y, final_state, states or None)`` (``y`` in ``acc``)."""
    b, length, h, p = x.shape
    x_, A_ = x.to(acc), A.to(acc)
    dt_ = discretise_dt(dt.to(acc), dt_bias, dt_softplus)
    h0_ = None if h0 is None else h0.to(acc)
    ch = ssd_chunks(x_, dt_, A_, B.to(acc), C.to(acc), min(chunk, length))
    kept = None
    if want_all:
        kept, H, final = all_states(ch, h0_)
        kept = kept[:, :length]
    else:
        H, final = entering_states(torch.exp(ch["S"][..., -1]), chunk_end_states(ch), h0_)
        if idx is not None:
            kept = states_at(ch, H, idx)
    y = chunk_outputs(ch, H)  # (b, c, g, r, T, p)
    y = y.flatten(2, 3).transpose(2, 3).reshape(b, -1, h, p)[:, :length]
    if D is not None:
        y = y + x_ * skip_weight(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y, final, kept
