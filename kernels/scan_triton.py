"""Triton scans for CUDA tensors (also run on CPU tensors under ``TRITON_INTERPRET=1``).

The selective scan runs chunk-parallel, so that ``b = 1`` still fills the GPU:
every program owns a ``(BLOCK_D channels, CHUNK steps)`` tile of one batch
row, loaded coalesced along time. Forward, three launches: (1) every chunk's
end state from zero, in closed form ``sum_t exp(A (S_end - S_t)) dt_t u_t B_t``
with ``S`` the running sum of the steps; (2) a short sequential pass over the
chunks gives each chunk's start state (``h <- exp(A S_end) h + end``); (3)
every tile again from its start state, one state ``k`` at a time, as an
associative scan of ``(exp(dt A_k), dt u B_k)`` along time, accumulating
``y = sum_k C_k h_k`` in registers. The start states are the backward's
checkpoints, so training memory beyond inputs and outputs is ``b·d·n·l/CHUNK``.

The backward mirrors it: (1) every chunk's adjoint from a zero end, in closed
form; (2) a reverse pass over the chunks gives the adjoint entering each chunk
(and the initial state's gradient); (3) every tile rescans its states forward
from its checkpoint and their adjoints ``G_t = w_t + a_{t+1} G_{t+1}`` in
reverse, and forms every gradient. ``dB``/``dC`` are accumulated with atomic
adds, ``dA``/``dD``/``dbias`` per tile and summed by the caller. ``B``/``C``
arrive in the 4-d form ``(Bb, G, n, Bl)``; broadcast dimensions get stride 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch parameters, the fastest of sweeps on an H100 (benchmarks/scan_gpu.py --sweep):
# 256-step chunks (forward and backward), channels and warps per program.
CHUNK = 256
BLOCK_D = 2
NUM_WARPS = 1
BLOCK_D_BWD = 1
NUM_WARPS_BWD = 2
LINEAR_BLOCK = 16  # rows per program of the linear scan


LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e): one multiply per channel, not per state


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _program_block(d, n, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch, channel and state offsets, masks, ``(b, d)`` rows and ``(b, d, n)`` offsets."""
    bi = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    md = offs_d < d
    m2 = md[:, None] & (offs_n < n)[None, :]
    row = bi * d + offs_d
    return bi, offs_d, offs_n, md, m2, row, row[:, None] * n + offs_n[None, :]


@triton.jit
def _combine(a1, x1, a2, x2):
    """Compose ``h -> a1 h + x1`` then ``h -> a2 h + x2``."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _step_tile(delta, bias, x, offs_d, md, m, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(raw, dt)`` on a tile of offsets ``x``: ``delta + bias`` and the step after the optional softplus (0 off ``m``)."""
    raw = tl.load(delta + x, mask=m, other=0.0)
    if HAS_BIAS:
        raw += tl.load(bias + offs_d, mask=md, other=0.0)[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, tl.where(m, dt, 0.0)


@triton.jit
def _chunk_tile(u, delta, bias, d, L, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):  # fmt: skip
    """This program's chunk as ``(BLOCK_D, CHUNK)`` tiles: offsets, mask, ``u``, ``delta + bias`` and the step ``dt``."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    md = offs_d < d
    m = md[:, None] & (offs_t < L)[None, :]
    x = (tl.program_id(0) * d + offs_d)[:, None] * L + offs_t[None, :]
    ut = tl.load(u + x, mask=m, other=0.0)
    raw, dt = _step_tile(delta, bias, x, offs_d, md, m, HAS_BIAS, SOFTPLUS)
    return offs_d, offs_t, md, m, x, ut, raw, dt


@triton.jit
def _bc_tile(X, k, offs_d, offs_t, m, L, sb, sg, sn, st, gs, SHARED: tl.constexpr):
    """State ``k`` of ``B``/``C`` on the tile: ``(1, CHUNK)`` when one row serves every channel, else ``(BLOCK_D, CHUNK)``."""
    X += tl.program_id(0) * sb + k * sn
    if SHARED:
        tile = tl.load(X + offs_t * st, mask=offs_t < L, other=0.0)[None, :]
    else:
        tile = tl.load(X + (offs_d // gs)[:, None] * sg + offs_t[None, :] * st, mask=m, other=0.0)
    return tile


@triton.jit
def _chunk_end_kernel(
    u, delta, A, B, bias, hloc, dtsum, d, L, n, sBb, sBg, sBn, sBt, gsB,
    SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, B_SHARED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 1: each chunk's end state from a zero start, ``sum_t exp(A (S_end - S_t)) dt_t u_t B_t``, and ``S_end``."""
    offs_d, offs_t, md, m, x, ut, _, dt = _chunk_tile(u, delta, bias, d, L, BLOCK_D, CHUNK, HAS_BIAS, SOFTPLUS)
    total = tl.sum(dt, axis=1)
    rest = total[:, None] - tl.cumsum(dt, axis=1)  # the steps after t within the chunk
    dtu = dt * ut
    ck = (tl.program_id(0) * d + offs_d) * tl.num_programs(2) + tl.program_id(2)
    for k in range(n):
        Ak = tl.load(A + offs_d * n + k, mask=md, other=0.0) * LOG2E
        Bk = _bc_tile(B, k, offs_d, offs_t, m, L, sBb, sBg, sBn, sBt, gsB, B_SHARED)
        tl.store(hloc + ck * n + k, tl.sum(tl.exp2(Ak[:, None] * rest) * dtu * Bk, axis=1), mask=md)
    tl.store(dtsum + ck, total, mask=md)


@triton.jit
def _chunk_out_kernel(
    u, delta, A, B, C, D, z, bias, start, out, last, states,
    d, L, n, sBb, sBg, sBn, sBt, gsB, sCb, sCg, sCn, sCt, gsC,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    B_SHARED: tl.constexpr, C_SHARED: tl.constexpr, KEEP_STATES: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 3: each chunk from its start state, one state at a time as a scan over the tile's time axis; writes ``out``."""
    offs_d, offs_t, md, m, x, ut, _, dt = _chunk_tile(u, delta, bias, d, L, BLOCK_D, CHUNK, HAS_BIAS, SOFTPLUS)
    dtu = dt * ut
    row = tl.program_id(0) * d + offs_d
    ck = row * tl.num_programs(2) + tl.program_id(2)
    final = tl.program_id(2) == tl.num_programs(2) - 1
    y = tl.zeros((BLOCK_D, CHUNK), dtype=out.dtype.element_ty)
    for k in range(n):
        Ak = tl.load(A + offs_d * n + k, mask=md, other=0.0) * LOG2E
        Bk = _bc_tile(B, k, offs_d, offs_t, m, L, sBb, sBg, sBn, sBt, gsB, B_SHARED)
        decay, h = tl.associative_scan((tl.exp2(dt * Ak[:, None]), dtu * Bk), axis=1, combine_fn=_combine)
        h += decay * tl.load(start + ck * n + k, mask=md, other=0.0)[:, None]
        y += h * _bc_tile(C, k, offs_d, offs_t, m, L, sCb, sCg, sCn, sCt, gsC, C_SHARED)
        if KEEP_STATES:
            tl.store(states + x * n + k, h, mask=m)
        if final:
            tl.store(last + row * n + k, tl.sum(tl.where(offs_t[None, :] == L - 1, h, 0.0), axis=1), mask=md)
    if HAS_D:
        y += tl.load(D + offs_d, mask=md, other=0.0)[:, None] * ut
    if HAS_Z:
        zt = tl.load(z + x, mask=m, other=0.0)
        y *= zt / (1.0 + tl.exp(-zt))
    tl.store(out + x, y, mask=m)


@triton.jit
def _chunk_carry_kernel(
    A, h0, hloc, dtsum, start, d, n, n_chunks,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Start state of every chunk: ``h <- exp(A sum(dt)) h + hloc`` over the chunks in order."""
    bi, offs_d, offs_n, md, m2, row, sn = _program_block(d, n, BLOCK_D, BLOCK_N)
    Av = tl.load(A + offs_d[:, None] * n + offs_n[None, :], mask=m2, other=0.0)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=start.dtype.element_ty)
    if HAS_H0:
        h += tl.load(h0 + sn, mask=m2, other=0.0)
    for c in range(n_chunks):
        ck = (row[:, None] * n_chunks + c) * n + offs_n[None, :]
        tl.store(start + ck, h, mask=m2)
        s = tl.load(dtsum + row * n_chunks + c, mask=md, other=0.0)
        h = tl.exp(s[:, None] * Av) * h + tl.load(hloc + ck, mask=m2, other=0.0)


@triton.jit
def _gate_grad(dout, z, x, m, HAS_Z: tl.constexpr):
    """``g = d out / d y`` on the tile: ``dout * silu(z)``, or ``dout`` without a gate."""
    g = tl.load(dout + x, mask=m, other=0.0)
    if HAS_Z:
        zt = tl.load(z + x, mask=m, other=0.0)
        g *= zt / (1.0 + tl.exp(-zt))
    return g


@triton.jit
def _chunk_adjoint_kernel(
    u, delta, A, C, z, bias, dout, dstates, qloc, dtsum, d, L, n, sCb, sCg, sCn, sCt, gsC,
    SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, HAS_DSTATES: tl.constexpr,
    C_SHARED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward pass 1: each chunk's adjoint leaving its first step from a zero end, ``sum_t exp(A S_t) w_t``.

    ``S_t`` sums the steps from the chunk's start through ``t`` and
    ``w_t = g_t C_t (+ d states_t)`` is the adjoint each state receives directly.
    """
    offs_d, offs_t, md, m, x, ut, _, dt = _chunk_tile(u, delta, bias, d, L, BLOCK_D, CHUNK, HAS_BIAS, SOFTPLUS)
    S = tl.cumsum(dt, axis=1)
    g = _gate_grad(dout, z, x, m, HAS_Z)
    ck = (tl.program_id(0) * d + offs_d) * tl.num_programs(2) + tl.program_id(2)
    for k in range(n):
        Ak = tl.load(A + offs_d * n + k, mask=md, other=0.0) * LOG2E
        w = g * _bc_tile(C, k, offs_d, offs_t, m, L, sCb, sCg, sCn, sCt, gsC, C_SHARED)
        if HAS_DSTATES:
            w += tl.load(dstates + x * n + k, mask=m, other=0.0)
        tl.store(qloc + ck * n + k, tl.sum(tl.exp2(Ak[:, None] * S) * w, axis=1), mask=md)
    tl.store(dtsum + ck, tl.sum(dt, axis=1), mask=md)


@triton.jit
def _chunk_adjoint_carry_kernel(
    A, dlast, qloc, dtsum, rin, dh0, d, n, n_chunks,
    HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The adjoint entering every chunk from the next, ``r <- qloc + exp(A sum(dt)) r`` over the chunks in reverse."""
    bi, offs_d, offs_n, md, m2, row, sn = _program_block(d, n, BLOCK_D, BLOCK_N)
    Av = tl.load(A + offs_d[:, None] * n + offs_n[None, :], mask=m2, other=0.0)
    r = tl.zeros((BLOCK_D, BLOCK_N), dtype=rin.dtype.element_ty)
    if HAS_DLAST:
        r += tl.load(dlast + sn, mask=m2, other=0.0)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        ck = (row[:, None] * n_chunks + c) * n + offs_n[None, :]
        tl.store(rin + ck, r, mask=m2)
        s = tl.load(dtsum + row * n_chunks + c, mask=md, other=0.0)
        r = tl.exp(s[:, None] * Av) * r + tl.load(qloc + ck, mask=m2, other=0.0)
    tl.store(dh0 + sn, r, mask=m2)


@triton.jit
def _chunk_grad_kernel(
    u, delta, A, B, C, D, z, bias, start, rin, dout, dstates,
    du, ddelta, dz, dA, dD, dbias, dB, dC,
    d, L, n, sBb, sBg, sBn, sBt, gsB, sCb, sCg, sCn, sCt, gsC,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DSTATES: tl.constexpr, B_STATIC: tl.constexpr, C_STATIC: tl.constexpr,
    B_SHARED: tl.constexpr, C_SHARED: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Backward pass 3: per chunk and state, the states by a forward scan from the chunk's start, their adjoints
    ``G_t = w_t + a_{t+1} G_{t+1}`` by a reverse scan from the adjoint entering the chunk, and every gradient."""
    offs_d, offs_t, md, m, x, ut, raw, dt = _chunk_tile(u, delta, bias, d, L, BLOCK_D, CHUNK, HAS_BIAS, SOFTPLUS)
    inner = (offs_t[None, :] + 1 < L) & (tl.arange(0, CHUNK)[None, :] < CHUNK - 1) & md[:, None]
    _, dt_next = _step_tile(delta, bias, x + 1, offs_d, md, inner, HAS_BIAS, SOFTPLUS)  # 0 at the chunk's end: a = 1
    dtu = dt * ut
    g = _gate_grad(dout, z, x, m, HAS_Z)
    ck = (tl.program_id(0) * d + offs_d) * tl.num_programs(2) + tl.program_id(2)
    zero = tl.zeros((BLOCK_D, CHUNK), dtype=u.dtype.element_ty)
    y, du_acc, ddt = zero, zero, zero
    boff = tl.program_id(0) * sBb + (offs_d // gsB)[:, None] * sBg + offs_t[None, :] * sBt
    coff = tl.program_id(0) * sCb + (offs_d // gsC)[:, None] * sCg + offs_t[None, :] * sCt
    for k in range(n):
        A_k = tl.load(A + offs_d * n + k, mask=md, other=0.0)
        Bk = _bc_tile(B, k, offs_d, offs_t, m, L, sBb, sBg, sBn, sBt, gsB, B_SHARED)
        Ck = _bc_tile(C, k, offs_d, offs_t, m, L, sCb, sCg, sCn, sCt, gsC, C_SHARED)
        xk = dtu * Bk
        decay, h = tl.associative_scan((tl.exp2(dt * (A_k * LOG2E)[:, None]), xk), axis=1, combine_fn=_combine)
        h += decay * tl.load(start + ck * n + k, mask=md, other=0.0)[:, None]
        w = g * Ck
        if HAS_DSTATES:
            w += tl.load(dstates + x * n + k, mask=m, other=0.0)
        a_next = tl.exp2(dt_next * (A_k * LOG2E)[:, None])
        back, G = tl.associative_scan((a_next, w), axis=1, combine_fn=_combine, reverse=True)
        G += back * tl.load(rin + ck * n + k, mask=md, other=0.0)[:, None]
        G = tl.where(m, G, 0.0)
        y += h * Ck
        du_acc += G * Bk
        decayed = h - xk  # a_t h_{t-1}
        ddt += G * (A_k[:, None] * decayed + Bk * ut)
        tl.store(dA + ck * n + k, tl.sum(G * dt * decayed, axis=1), mask=md)
        gB = G * dtu
        gC = tl.where(m, g * h, 0.0)
        if B_STATIC:
            tl.atomic_add(dB + tl.program_id(0) * sBb + (offs_d // gsB) * sBg + k * sBn, tl.sum(gB, axis=1), mask=md)
        else:
            tl.atomic_add(dB + boff + k * sBn, gB, mask=m)
        if C_STATIC:
            tl.atomic_add(dC + tl.program_id(0) * sCb + (offs_d // gsC) * sCg + k * sCn, tl.sum(gC, axis=1), mask=md)
        else:
            tl.atomic_add(dC + coff + k * sCn, gC, mask=m)
    du_acc *= dt
    if HAS_D:
        Dv = tl.load(D + offs_d, mask=md, other=0.0)[:, None]
        du_acc += g * Dv
        y += Dv * ut
        tl.store(dD + ck, tl.sum(tl.where(m, g * ut, 0.0), axis=1), mask=md)
    if HAS_Z:
        zt = tl.load(z + x, mask=m, other=0.0)
        sig = 1.0 / (1.0 + tl.exp(-zt))
        tl.store(dz + x, tl.load(dout + x, mask=m, other=0.0) * y * sig * (1.0 + zt * (1.0 - sig)), mask=m)
    if SOFTPLUS:
        ddt = ddt / (1.0 + tl.exp(-raw))
    ddt = tl.where(m, ddt, 0.0)
    tl.store(du + x, du_acc, mask=m)
    tl.store(ddelta + x, ddt, mask=m)
    tl.store(dbias + ck, tl.sum(ddt, axis=1), mask=md)


@triton.jit
def _linear_fwd_kernel(a, x, h0, out, BD, L, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < BD
    h = tl.zeros((BLOCK,), dtype=out.dtype.element_ty)
    if HAS_H0:
        h += tl.load(h0 + rows, mask=m, other=0.0)
    for t in range(L):
        h = tl.load(a + rows * L + t, mask=m, other=0.0) * h + tl.load(x + rows * L + t, mask=m, other=0.0)
        tl.store(out + rows * L + t, h, mask=m)


@triton.jit
def _linear_bwd_kernel(a, h0, out, dout, da, dx, dh0, BD, L, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = rows < BD
    dh = tl.zeros((BLOCK,), dtype=out.dtype.element_ty)
    for tt in range(L):
        t = L - 1 - tt
        g = tl.load(dout + rows * L + t, mask=m, other=0.0) + dh
        tl.store(dx + rows * L + t, g, mask=m)
        if t > 0:
            hp = tl.load(out + rows * L + t - 1, mask=m, other=0.0)
        else:
            hp = tl.zeros((BLOCK,), dtype=out.dtype.element_ty)
            if HAS_H0:
                hp += tl.load(h0 + rows, mask=m, other=0.0)
        tl.store(da + rows * L + t, g * hp, mask=m)
        dh = tl.load(a + rows * L + t, mask=m, other=0.0) * g
    tl.store(dh0 + rows, dh, mask=m)


def _bc_strides(X4: Tensor, d: int) -> tuple[int, int, int, int, int]:
    """Strides of a ``(Bb, G, n, Bl)`` tensor with 0 on broadcast dims, and the group size."""
    sb, sg, sn, st = X4.stride()
    return (sb if X4.shape[0] > 1 else 0), sg, sn, (st if X4.shape[3] > 1 else 0), d // X4.shape[1]


def selective_forward(u, delta, A, B4, C4, D, z, bias, h0, softplus, keep_states, keep_ckpt):
    """Launch the chunked forward on contiguous tensors of one dtype.

    Three launches: every chunk's end state from zero (in parallel), the chunks'
    start states (a short scan over chunks), then every chunk again from its
    start state, writing ``out``. The start states are the backward's checkpoints.
    """
    b, d, L = u.shape
    n = A.shape[1]
    n_chunks = triton.cdiv(L, CHUNK)
    out, last = torch.empty_like(u), u.new_empty(b, d, n)
    states = u.new_empty(b, d, L, n) if keep_states else None
    start = u.new_empty(b, d, n_chunks, n)
    grid = (b, triton.cdiv(d, BLOCK_D), n_chunks)
    meta = dict(CHUNK=CHUNK, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    bs, cs = _bc_strides(B4, d), _bc_strides(C4, d)
    step = dict(SOFTPLUS=softplus, HAS_BIAS=bias is not None)
    if n_chunks == 1:
        start.copy_(h0.unsqueeze(2) if h0 is not None else torch.zeros_like(start))
    else:
        hloc, dtsum = torch.empty_like(start), u.new_empty(b, d, n_chunks)
        _chunk_end_kernel[grid](
            u, delta, A, B4, _or(bias, u), hloc, dtsum, d, L, n, *bs, **step, B_SHARED=_shared(B4), **meta
        )
        _chunk_carry_kernel[grid[:2]](
            A, _or(h0, u), hloc, dtsum, start, d, n, n_chunks, HAS_H0=h0 is not None,
            BLOCK_D=BLOCK_D, BLOCK_N=triton.next_power_of_2(n), num_warps=NUM_WARPS,
        )  # fmt: skip
    _chunk_out_kernel[grid](
        u, delta, A, B4, C4, _or(D, u), _or(z, u), _or(bias, u), start, out, last, _or(states, u), d, L, n, *bs, *cs,
        **step, HAS_D=D is not None, HAS_Z=z is not None, B_SHARED=_shared(B4), C_SHARED=_shared(C4),
        KEEP_STATES=keep_states, **meta,
    )  # fmt: skip
    return out, last, states, start if keep_ckpt else None


def _shared(X4: Tensor) -> bool:
    """Whether one ``B``/``C`` row serves every channel (the shared ``(b, n, l)`` layout)."""
    return X4.shape[1] == 1 and X4.shape[3] > 1


def selective_backward(u, delta, A, B4, C4, D, z, bias, softplus, ckpt, dout, dlast, dstates):
    """Launch the chunked backward; return gradients reduced to the inputs' shapes (B/C in 4-d).

    Three launches mirroring the forward: every chunk's adjoint from a zero end
    (closed form), the adjoint entering each chunk (a reverse pass over the
    chunks, which also gives the initial state's gradient), then every chunk's
    gradients from its checkpointed start state and entering adjoint.
    """
    b, d, L = u.shape
    n = A.shape[1]
    n_chunks = ckpt.shape[2]
    grid = (b, triton.cdiv(d, BLOCK_D_BWD), n_chunks)
    meta = dict(CHUNK=CHUNK, BLOCK_D=BLOCK_D_BWD, num_warps=NUM_WARPS_BWD)
    step = dict(SOFTPLUS=softplus, HAS_BIAS=bias is not None)
    bs, cs = _bc_strides(B4, d), _bc_strides(C4, d)
    qloc, rin, dh0 = torch.empty_like(ckpt), torch.empty_like(ckpt), u.new_empty(b, d, n)
    dtsum = u.new_empty(b, d, n_chunks)
    _chunk_adjoint_kernel[grid](
        u, delta, A, C4, _or(z, u), _or(bias, u), dout, _or(dstates, u), qloc, dtsum, d, L, n, *cs, **step,
        HAS_Z=z is not None, HAS_DSTATES=dstates is not None, C_SHARED=_shared(C4), **meta,
    )  # fmt: skip
    _chunk_adjoint_carry_kernel[grid[:2]](
        A, _or(dlast, u), qloc, dtsum, rin, dh0, d, n, n_chunks, HAS_DLAST=dlast is not None,
        BLOCK_D=BLOCK_D_BWD, BLOCK_N=triton.next_power_of_2(n), num_warps=NUM_WARPS_BWD,
    )  # fmt: skip
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    dA, dD, dbias = torch.empty_like(ckpt), torch.zeros_like(dtsum), torch.empty_like(dtsum)
    dB, dC = torch.zeros_like(B4), torch.zeros_like(C4)
    _chunk_grad_kernel[grid](
        u, delta, A, B4, C4, _or(D, u), _or(z, u), _or(bias, u), ckpt, rin, dout, _or(dstates, u),
        du, ddelta, dz, dA, dD, dbias, dB, dC, d, L, n, *bs, *cs, **step,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DSTATES=dstates is not None,
        B_STATIC=B4.shape[3] == 1, C_STATIC=C4.shape[3] == 1, B_SHARED=_shared(B4), C_SHARED=_shared(C4), **meta,
    )  # fmt: skip
    return du, ddelta, dz, dA.sum((0, 2)), dD.sum((0, 2)), dbias.sum((0, 2)), dB, dC, dh0


def linear_forward(a: Tensor, x: Tensor, h0: Tensor | None) -> Tensor:
    """Launch the linear-scan forward kernel."""
    b, d, L = x.shape
    out = torch.empty_like(x)
    grid = (triton.cdiv(b * d, LINEAR_BLOCK),)
    _linear_fwd_kernel[grid](a, x, _or(h0, x), out, b * d, L, HAS_H0=h0 is not None, BLOCK=LINEAR_BLOCK)
    return out


def linear_backward(a: Tensor, h0: Tensor | None, out: Tensor, dout: Tensor):
    """Launch the linear-scan backward kernel; return ``(da, dx, dh0)``."""
    b, d, L = a.shape
    da, dx, dh0 = torch.empty_like(a), torch.empty_like(a), a.new_empty(b, d)
    grid = (triton.cdiv(b * d, LINEAR_BLOCK),)
    _linear_bwd_kernel[grid](a, _or(h0, a), out, dout, da, dx, dh0, b * d, L, HAS_H0=h0 is not None, BLOCK=LINEAR_BLOCK)
    return da, dx, dh0


def _or(x: Tensor | None, placeholder: Tensor) -> Tensor:
    """A tensor argument, or a placeholder the kernel never reads (its flag is off)."""
    return placeholder if x is None else x
