"""The SSD scan in chunks on PyTorch: matmuls inside a chunk, a short pass between chunks.

With ``S_t`` the running sum of ``dt A`` inside a chunk (``S_{-1} = 0`` at its
start) and ``H`` the state entering the chunk, the state after step ``t`` is

``h_t = exp(S_t) H + sum_{s <= t} exp(S_t - S_s) dt_s x_s B_sᵀ``

so that, per chunk of ``T`` steps: the output is the masked ``(T, T)``
matrix ``(C Bᵀ) ∘ exp(S_t - S_s) dt_s`` times ``x`` (one ``C Bᵀ`` per group,
one product per head) plus ``exp(S_t) C H``; the chunk's own end state is
``Bᵀ (x dt exp(S_end - S))``; and ``H`` follows from one pass over the
chunks, ``H <- exp(S_end) H + end``, which also forms ``C H`` chunk by chunk
(so the entering states are never all held at once). States are held
state-major, ``(n, r·p)`` per group (its ``r`` heads side by side), so that
``C H`` and ``Bᵀ x`` are one wide matmul per group and chunk rather than one
small one per head. Every step is differentiable by autograd. States are formed only when asked: at
chosen positions from their chunk's ``H`` (one ``(n, T) @ (T, r·p)`` product
each), or at every position by a step-by-step pass inside each chunk from its ``H``. Decays below ``exp(-80)`` are taken as exactly 0, so that
large steps never drive the arithmetic into float32's (slow) subnormal range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dynalens.kernels.ssd_ref import discretise_dt, skip_weight

CHUNK = 32  # the fastest of {16, 32, 64, 128} at the Mamba-2-130m shape on the 2-core CPU (benchmarks/ssd.py)
# Decays exp(x) below exp(UNDERFLOW) are taken as 0: their products with the states would otherwise pass
# through float32's subnormal range, where CPU arithmetic is many times slower, for a change below 1e-34.
UNDERFLOW = -80.0


def _decay(x: Tensor) -> Tensor:
    """``exp(x)``, exactly 0 where ``x < UNDERFLOW``."""
    return torch.exp(x.masked_fill(x < UNDERFLOW, -torch.inf))


def ssd_chunks(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> dict[str, Tensor]:
    """The chunked operands (views where possible), padded to whole chunks with ``dt = 0`` (which changes nothing).

    Keys: ``x`` ``(b, c, T, g, r, p)`` already times ``dt``; ``a`` ``(b, c, T, g, r)``
    the steps' ``dt A``, ``S`` their running sums and ``decay`` ``exp(S)``;
    ``B``, ``C`` ``(b, c, g, T, n)``.
    """
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = math.ceil(length / chunk)
    pad = nc * chunk - length
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    a = (dt * A).view(b, nc, chunk, g, h // g)
    S = torch.cumsum(a, dim=2)
    return dict(
        x=(x * dt[..., None]).view(b, nc, chunk, g, h // g, p),
        a=a,
        S=S,
        decay=_decay(S),
        # contiguous: B and C may be strided views (a model's conv output), slow to step through along n
        B=B.contiguous().view(b, nc, chunk, g, n).transpose(2, 3),
        C=C.contiguous().view(b, nc, chunk, g, n).transpose(2, 3),
    )


def state_major(h: Tensor, g: int) -> Tensor:
    """States ``(..., h, p, n)`` → ``(..., g, n, r·p)``."""
    *lead, heads, p, n = h.shape
    return h.reshape(*lead, g, heads // g, p, n).movedim(-1, -3).reshape(*lead, g, n, heads // g * p)


def head_major(h: Tensor, p: int) -> Tensor:
    """States ``(..., g, n, r·p)`` → ``(..., h, p, n)``."""
    *lead, g, n, rp = h.shape
    return h.reshape(*lead, g, n, rp // p, p).movedim(-3, -1).reshape(*lead, g * (rp // p), p, n)


def _wide(x: Tensor) -> Tensor:
    """``(b, c, T, g, r, p)`` → ``(b, c, g, T, r·p)``."""
    return x.flatten(-2).transpose(2, 3)


def _causal(T: int, device: torch.device) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def chunk_end_states(ch: dict[str, Tensor]) -> Tensor:
    """Each chunk's end state from a zero start, ``(b, c, g, n, r·p)``."""
    S = ch["S"]
    w = _decay(S[:, :, -1:] - S)  # (b, c, T, g, r)
    return ch["B"].transpose(-1, -2) @ _wide(ch["x"] * w[..., None])


def chunk_pass(
    ch: dict[str, Tensor], end: Tensor, h0: Tensor | None, keep: set[int] | None = None
) -> tuple[Tensor, dict[int, Tensor], Tensor]:
    """The pass over the chunks, ``H <- exp(S_end) H + end``, from ``h0`` (state-major, or zero).

    Returns ``C H`` of every chunk ``(b, c, g, T, r·p)`` (formed as ``H`` goes by),
    the entering states of the chunks in ``keep`` (all when None) and the final state.
    """
    p = ch["x"].shape[-1]
    decay = ch["decay"][:, :, -1].repeat_interleave(p, dim=-1)[:, :, :, None, :]  # (b, c, g, 1, r·p)
    state = torch.zeros_like(end[:, 0]) if h0 is None else h0
    read, kept = [], {}
    for c in range(end.shape[1]):
        if keep is None or c in keep:
            kept[c] = state
        read.append(ch["C"][:, c] @ state)
        state = torch.addcmul(end[:, c], decay[:, c], state)
    return torch.stack(read, dim=1), kept, state


def chunk_outputs(ch: dict[str, Tensor], read: Tensor) -> Tensor:
    """``y`` ``(b, c, T, g, r, p)`` from the chunked operands and ``C H`` of every chunk."""
    x, S = ch["x"], ch["S"]
    b, nc, T, g, r, p = x.shape
    Sh = S.permute(0, 1, 3, 4, 2)  # (b, c, g, r, T)
    gap = Sh[..., :, None] - Sh[..., None, :]
    gap = gap.masked_fill(~_causal(T, S.device) | (gap < UNDERFLOW), -torch.inf)
    scores = ch["C"] @ ch["B"].transpose(-1, -2)  # (b, c, g, T, T): C_t · B_s, per group
    y_diag = (scores[:, :, :, None] * torch.exp(gap)) @ x.permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, T, p)
    y_off = read.view(b, nc, g, T, r, p) * ch["decay"].transpose(2, 3)[..., None]
    return y_diag.permute(0, 1, 4, 2, 3, 5) + y_off.transpose(2, 3)


def states_at(ch: dict[str, Tensor], H: dict[int, Tensor], idx: Tensor) -> Tensor:
    """States after the steps at columns ``idx`` ``(b, k)`` from their chunks' entering states: ``(b, k, h, p, n)``."""
    b, k = idx.shape
    T, g, r, p = ch["x"].shape[2:]
    c, j = idx // T, idx % T
    rows = torch.arange(b, device=idx.device)[:, None]
    S = ch["S"][rows, c]  # (b, k, T, g, r)
    Sj = S.gather(2, j[:, :, None, None, None].expand(b, k, 1, g, r))  # (b, k, 1, g, r)
    later = (torch.arange(T, device=idx.device) > j[..., None])[..., None, None]  # (b, k, T, 1, 1)
    w = _decay((Sj - S).masked_fill(later, -torch.inf))
    states = ch["B"][rows, c].transpose(-1, -2) @ _wide(ch["x"][rows, c] * w[..., None])  # (b, k, g, n, r·p)
    start = _decay(Sj[:, :, 0]).repeat_interleave(p, dim=-1)[:, :, :, None, :]  # (b, k, g, 1, r·p)
    entering = torch.stack([H[chunk][row] for row, chunks in enumerate(c.tolist()) for chunk in chunks])
    return head_major(states.addcmul_(start, entering.view(states.shape)), p)


def all_states(
    ch: dict[str, Tensor], h0: Tensor | None, length: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The states after the first ``length`` steps ``(b, length, h, p, n)``, ``C H`` of every chunk and the final state.

    ``C H`` comes from the pass between chunks on the chunks' end states (as
    for the plain forward); the states from stepping ``h <- exp(dt A) h + dt x Bᵀ``
    through every position from ``h0``, so that the state being stepped stays
    in cache, each state is written once, a step with ``dt = 0`` repeats the
    state exactly and the final state is the last one (the padding that fills
    the last chunk is such steps, so it is not stepped through). Without
    autograd the state is stepped in place and copied into ``out`` (a new
    tensor when None) at each step, laid out ``(b, length, g, r, p, n)``,
    i.e. already ``(b, length, h, p, n)``: one pass over the output memory.
    """
    x = ch["x"][..., None].flatten(1, 2)  # (b, c·T, g, r, p, 1)
    b, _, g, r, p, _ = x.shape
    B = ch["B"].transpose(2, 3).flatten(1, 2)[:, :, :, None, None, :]  # (b, c·T, g, 1, 1, n)
    n = B.shape[-1]
    step = _decay(ch["a"]).flatten(1, 2)[..., None, None]  # (b, c·T, g, r, 1, 1)
    read = chunk_pass(ch, chunk_end_states(ch), None if h0 is None else state_major(h0, g), keep=set())[0]
    in_place = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, B, step, h0)))
    state = x.new_zeros(b, g, r, p, n) if h0 is None else h0.reshape(b, g, r, p, n)
    steps = zip(x.unbind(1)[:length], B.unbind(1), step.unbind(1))
    if in_place:
        out = x.new_empty(b, length, g * r, p, n) if out is None else out
        state = state.clone()
        for (xt, Bt, st), ot in zip(steps, out.view(b, length, g, r, p, n).unbind(1)):
            ot.copy_(state.mul_(st).addcmul_(xt, Bt))
        return out, read, state.view(b, g * r, p, n)
    states = []
    for xt, Bt, st in steps:
        state = torch.addcmul(state * st, xt, Bt)
        states.append(state)
    return torch.stack(states, dim=1).view(b, length, g * r, p, n), read, state.reshape(b, g * r, p, n)


def ssd_scan_torch(x, dt, A, B, C, D, z, dt_bias, dt_softplus, h0, idx, want_all, chunk, acc, states_out=None):
    """The chunked scan; returns ``(y, final_state, states or None)`` (``y`` in ``acc``).

    With ``want_all`` and no autograd, every state is written into ``states_out``
    ``(b, l, h, p, n)`` when given.
    """
    b, length, h, p = x.shape
    g = B.shape[2]
    x_, A_ = x.to(acc), A.to(acc)
    dt_ = discretise_dt(dt.to(acc), dt_bias, dt_softplus)
    h0_ = None if h0 is None else h0.to(acc)
    T = min(chunk, length)
    ch = ssd_chunks(x_, dt_, A_, B.to(acc), C.to(acc), T)
    kept = None
    if want_all:
        kept, read, final = all_states(ch, h0_, length, states_out)
    else:
        keep = set() if idx is None else set((idx // T).unique().tolist())
        read, H, final = chunk_pass(ch, chunk_end_states(ch), None if h0_ is None else state_major(h0_, g), keep)
        final = head_major(final, p)
        if idx is not None:
            kept = states_at(ch, H, idx)
    y = chunk_outputs(ch, read).reshape(b, -1, h, p)[:, :length]
    if D is not None:
        y = y + x_ * skip_weight(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y, final, kept
