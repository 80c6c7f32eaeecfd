"""Triton scans for CUDA tensors (also run on CPU tensors under ``TRITON_INTERPRET=1``).

Selective-scan forward, chunk-parallel in three launches so that ``b = 1``
still fills the GPU: (1) every ``(batch, BLOCK_D channels, CHUNK steps)`` tile
computes its chunk's end state from zero in closed form,
``sum_t exp(A (S_end - S_t)) dt_t u_t B_t`` with ``S`` the running sum of the
steps; (2) a short sequential pass over the chunks turns these into every
chunk's start state (``h <- exp(A S_end) h + end``); (3) every tile runs again
from its start state, one state ``k`` at a time, as an associative scan of
``(exp(dt A_k), dt u B_k)`` along the tile's time axis, accumulating
``y = sum_k C_k h_k`` in registers. Tiles are loaded coalesced along time.
The start states double as the backward's checkpoints.

The backward runs one program per (batch, ``BLOCK_D_BWD`` channels), walks the
chunks in reverse, recomputes a chunk's states into a scratch buffer
``(b, d, CHUNK + 1, n)`` and runs the reverse scan sequentially. ``dB``/``dC``
are accumulated with atomic adds (in registers for a time-invariant layout),
``dA``/``dD``/``dbias`` per batch and summed by the caller. ``B``/``C`` arrive
in the 4-d form ``(Bb, G, n, Bl)``; broadcast dimensions get stride 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch parameters, the fastest of a sweep on an H100 (benchmarks/scan_gpu.py --sweep):
# 256-step chunks, 2 channels and 1 warp per program.
CHUNK = 256
BLOCK_D = 2
NUM_WARPS = 1
BLOCK_D_BWD = 2
NUM_WARPS_BWD = 1


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
def _step_size(delta, bias, row, offs_d, md, L, t, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(raw, dt)``: ``delta + bias`` at step ``t`` and the step after the optional softplus."""
    raw = tl.load(delta + row * L + t, mask=md, other=0.0)
    if HAS_BIAS:
        raw += tl.load(bias + offs_d, mask=md, other=0.0)
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, dt


@triton.jit
def _combine(a1, x1, a2, x2):
    """Compose ``h -> a1 h + x1`` then ``h -> a2 h + x2``."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _chunk_tile(u, delta, bias, d, L, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr):  # fmt: skip
    """This program's chunk as ``(BLOCK_D, CHUNK)`` tiles: offsets, mask, ``u`` and the step ``dt`` (0 past ``l``)."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    md = offs_d < d
    m = md[:, None] & (offs_t < L)[None, :]
    x = (tl.program_id(0) * d + offs_d)[:, None] * L + offs_t[None, :]
    ut = tl.load(u + x, mask=m, other=0.0)
    dt = tl.load(delta + x, mask=m, other=0.0)
    if HAS_BIAS:
        dt += tl.load(bias + offs_d, mask=md, other=0.0)[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    return offs_d, offs_t, md, m, x, ut, tl.where(m, dt, 0.0)


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
    offs_d, offs_t, md, m, x, ut, dt = _chunk_tile(u, delta, bias, d, L, BLOCK_D, CHUNK, HAS_BIAS, SOFTPLUS)
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
    offs_d, offs_t, md, m, x, ut, dt = _chunk_tile(u, delta, bias, d, L, BLOCK_D, CHUNK, HAS_BIAS, SOFTPLUS)
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
def _selective_bwd_kernel(
    u, delta, A, B, C, D, z, bias, ckpt, dout, dlast, dstates, scratch,
    du, ddelta, dz, dA, dD, dbias, dB, dC, dh0,
    d, L, n, sBb, sBg, sBn, sBt, gsB, sCb, sCg, sCn, sCt, gsC,
    SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DLAST: tl.constexpr, HAS_DSTATES: tl.constexpr, B_STATIC: tl.constexpr, C_STATIC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    bi, offs_d, offs_n, md, m2, row, sn = _program_block(d, n, BLOCK_D, BLOCK_N)
    Av = tl.load(A + offs_d[:, None] * n + offs_n[None, :], mask=m2, other=0.0)
    boff = (offs_d // gsB)[:, None] * sBg + offs_n[None, :] * sBn
    coff = (offs_d // gsC)[:, None] * sCg + offs_n[None, :] * sCn
    Bp, dBp = B + bi * sBb + boff, dB + bi * sBb + boff
    Cp, dCp = C + bi * sCb + coff, dC + bi * sCb + coff
    sc = scratch + row[:, None] * (CHUNK + 1) * n + offs_n[None, :]
    zero2 = tl.zeros((BLOCK_D, BLOCK_N), dtype=u.dtype.element_ty)
    zero1 = tl.zeros((BLOCK_D,), dtype=u.dtype.element_ty)
    dh, dA_acc, dB_acc, dC_acc = zero2, zero2, zero2, zero2
    dD_acc, dbias_acc = zero1, zero1
    if HAS_DLAST:
        dh += tl.load(dlast + sn, mask=m2, other=0.0)
    if HAS_D:
        Dv = tl.load(D + offs_d, mask=md, other=0.0)
    n_chunks = tl.cdiv(L, CHUNK)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK
        h = tl.load(ckpt + (row[:, None] * n_chunks + c) * n + offs_n[None, :], mask=m2, other=0.0)
        tl.store(sc, h, mask=m2)
        for i in range(CHUNK):
            t = t0 + i
            if t < L:
                _, dt = _step_size(delta, bias, row, offs_d, md, L, t, HAS_BIAS, SOFTPLUS)
                ut = tl.load(u + row * L + t, mask=md, other=0.0)
                h = tl.exp(dt[:, None] * Av) * h + (dt * ut)[:, None] * tl.load(Bp + t * sBt, mask=m2, other=0.0)
                tl.store(sc + (i + 1) * n, h, mask=m2)
        tl.debug_barrier()
        for ii in range(CHUNK):
            i = CHUNK - 1 - ii
            t = t0 + i
            if t < L:
                raw, dt = _step_size(delta, bias, row, offs_d, md, L, t, HAS_BIAS, SOFTPLUS)
                ut = tl.load(u + row * L + t, mask=md, other=0.0)
                Bt = tl.load(Bp + t * sBt, mask=m2, other=0.0)
                Ct = tl.load(Cp + t * sCt, mask=m2, other=0.0)
                ht = tl.load(sc + (i + 1) * n, mask=m2, other=0.0)
                hp = tl.load(sc + i * n, mask=m2, other=0.0)
                a = tl.exp(dt[:, None] * Av)
                g = tl.load(dout + row * L + t, mask=md, other=0.0)
                if HAS_Z:
                    y = tl.sum(ht * Ct, axis=1)
                    if HAS_D:
                        y += Dv * ut
                    zt = tl.load(z + row * L + t, mask=md, other=0.0)
                    sig = 1.0 / (1.0 + tl.exp(-zt))
                    tl.store(dz + row * L + t, g * y * sig * (1.0 + zt * (1.0 - sig)), mask=md)
                    g = g * zt * sig
                dut = zero1
                if HAS_D:
                    dut = g * Dv
                    dD_acc += g * ut
                dh += g[:, None] * Ct
                if HAS_DSTATES:
                    dh += tl.load(dstates + (row[:, None] * L + t) * n + offs_n[None, :], mask=m2, other=0.0)
                gC = g[:, None] * ht
                gB = dh * (dt * ut)[:, None]
                if C_STATIC:
                    dC_acc += gC
                else:
                    tl.atomic_add(dCp + t * sCt, gC, mask=m2)
                if B_STATIC:
                    dB_acc += gB
                else:
                    tl.atomic_add(dBp + t * sBt, gB, mask=m2)
                ddt = tl.sum(dh * (Av * a * hp + Bt * ut[:, None]), axis=1)
                dut += tl.sum(dh * Bt, axis=1) * dt
                dA_acc += dh * dt[:, None] * a * hp
                dh = dh * a
                if SOFTPLUS:
                    ddt = ddt / (1.0 + tl.exp(-raw))
                tl.store(du + row * L + t, dut, mask=md)
                tl.store(ddelta + row * L + t, ddt, mask=md)
                dbias_acc += ddt
        tl.debug_barrier()
    if B_STATIC:
        tl.atomic_add(dBp, dB_acc, mask=m2)
    if C_STATIC:
        tl.atomic_add(dCp, dC_acc, mask=m2)
    tl.store(dA + sn, dA_acc, mask=m2)
    tl.store(dD + row, dD_acc, mask=md)
    tl.store(dbias + row, dbias_acc, mask=md)
    tl.store(dh0 + sn, dh, mask=m2)


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
    """Launch the backward kernel; return gradients reduced to the inputs' shapes (B/C in 4-d)."""
    b, d, L = u.shape
    n = A.shape[1]
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    dA, dD, dbias, dh0 = u.new_empty(b, d, n), u.new_empty(b, d), u.new_empty(b, d), u.new_empty(b, d, n)
    dB, dC = torch.zeros_like(B4), torch.zeros_like(C4)
    scratch = u.new_empty(b, d, CHUNK + 1, n)
    _selective_bwd_kernel[(b, triton.cdiv(d, BLOCK_D_BWD))](
        u, delta, A, B4, C4, _or(D, u), _or(z, u), _or(bias, u), ckpt, dout, _or(dlast, u), _or(dstates, u),
        scratch, du, ddelta, dz, dA, dD, dbias, dB, dC, dh0, d, L, n, *_bc_strides(B4, d), *_bc_strides(C4, d),
        SOFTPLUS=softplus, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
        HAS_DLAST=dlast is not None, HAS_DSTATES=dstates is not None,
        B_STATIC=B4.shape[3] == 1, C_STATIC=C4.shape[3] == 1,
        CHUNK=CHUNK, BLOCK_D=BLOCK_D_BWD, BLOCK_N=triton.next_power_of_2(n), num_warps=NUM_WARPS_BWD,
    )  # fmt: skip
    return du, ddelta, dz, dA.sum(0), dD.sum(0), dbias.sum(0), dB, dC, dh0


def linear_forward(a: Tensor, x: Tensor, h0: Tensor | None) -> Tensor:
    """Launch the linear-scan forward kernel."""
    b, d, L = x.shape
    out = torch.empty_like(x)
    grid = (triton.cdiv(b * d, BLOCK_D),)
    _linear_fwd_kernel[grid](a, x, _or(h0, x), out, b * d, L, HAS_H0=h0 is not None, BLOCK=BLOCK_D)
    return out


def linear_backward(a: Tensor, h0: Tensor | None, out: Tensor, dout: Tensor):
    """Launch the linear-scan backward kernel; return ``(da, dx, dh0)``."""
    b, d, L = a.shape
    da, dx, dh0 = torch.empty_like(a), torch.empty_like(a), a.new_empty(b, d)
    grid = (triton.cdiv(b * d, BLOCK_D),)
    _linear_bwd_kernel[grid](a, _or(h0, a), out, dout, da, dx, dh0, b * d, L, HAS_H0=h0 is not None, BLOCK=BLOCK_D)
    return da, dx, dh0


def _or(x: Tensor | None, placeholder: Tensor) -> Tensor:
    """A tensor argument, or a placeholder the kernel never reads (its flag is off)."""
    return placeholder if x is None else x
