"""Compiled CPU scans (numba): one pass over time per channel, states in a local array.

The selective-scan forward runs one job per (batch, channel), in the
accumulation dtype (float32, or float64 for float64 inputs), and streams over
``l`` once in chunks of ``CHUNK`` steps: first the chunk's decays
``exp(delta_t A)`` (a vectorised exp over ``CHUNK·n`` values), then the
recurrence, whose inner loop over the ``n`` states vectorises. It keeps the
state at every chunk start; the backward walks the chunks in reverse,
recomputes the chunk's states from its checkpoint and runs the reverse scan,
so training memory beyond inputs and outputs is ``b·d·n·l / CHUNK`` (plus the
per-block partial sums of ``dB``/``dC``) instead of ``b·d·n·l``.

The kernels take ``B``/``C`` time-major in one 4-d form ``(Bb, G, Bl, n)``:
shared ``(b, n, l)`` is ``(b, 1, l, n)``, grouped ``(b, g, n, l)`` is
``(b, g, l, n)`` and fixed ``(d, n)`` is ``(1, d, 1, n)``; batch and time
indices are multiplied by 0/1 strides.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

CHUNK = 64


# Cephes' expf: Cody–Waite range reduction, a degree-5 polynomial and a scale
# by 2**k built from the exponent bits; max relative error ~1e-7 (float32
# rounding), and unlike a call to libm's expf it vectorises.
_LOG2E, _LN2_HI, _LN2_LO = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)
_P = [np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)]
_P0, _P1, _P2, _P3, _P4, _P5 = _P
_LO, _HI, _HALF, _ONE = np.float32(-87.33654), np.float32(88.72283), np.float32(0.5), np.float32(1.0)


@njit(cache=True, inline="always")
def _softplus(x):
    return np.log1p(np.exp(x)) if x <= 20 else x


@njit(cache=True, inline="always")
def _sum(x, zero):
    """Sum of a 1-d array with four interleaved accumulators (short dependency chains)."""
    s0, s1, s2, s3 = zero, zero, zero, zero
    m = x.shape[0] - x.shape[0] % 4
    for k in range(0, m, 4):
        s0 += x[k]
        s1 += x[k + 1]
        s2 += x[k + 2]
        s3 += x[k + 3]
    for k in range(m, x.shape[0]):
        s0 += x[k]
    return (s0 + s1) + (s2 + s3)


@njit(cache=True, inline="always")
def _exp_into(x, out, bits, scale, fast):
    """``out = exp(x)`` over 1-d arrays: vectorised float32 when ``fast``, libm otherwise."""
    if not fast:
        for k in range(x.shape[0]):
            out[k] = np.exp(x[k])
        return
    for k in range(x.shape[0]):
        v = min(max(x[k], _LO), _HI)
        e = np.floor(v * _LOG2E + _HALF)
        r = v - e * _LN2_HI - e * _LN2_LO
        p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
        out[k] = p * r * r + r + _ONE
        bits[k] = (np.int32(e) + np.int32(127)) << np.int32(23)
    for k in range(x.shape[0]):
        out[k] *= scale[k]


@njit(cache=True, inline="always")
def _chunk_decay(delta, bias, A, bi, di, t0, m, softplus, has_bias, fast, dts, x, decay, bits, scale):
    """Step sizes ``dts[:m]`` and decays ``exp(dt A)`` (flattened ``(m, n)``) of one chunk."""
    n = A.shape[1]
    for i in range(m):
        dt = delta[bi, di, t0 + i]
        if has_bias:
            dt += bias[di]
        if softplus:
            dt = _softplus(dt)
        dts[i] = dt
        for k in range(n):
            x[i * n + k] = dt * A[di, k]
    _exp_into(x[: m * n], decay[: m * n], bits[: m * n], scale[: m * n], fast)


@njit(parallel=True, fastmath=False, cache=True)
def selective_fwd(u, delta, A, B, C, D, z, bias, h0, flags, out, last, states, ckpt):
    """Forward scan; ``flags`` = (softplus, has_D, has_z, has_bias, has_h0, keep_states, keep_ckpt, fast)."""
    softplus, has_D, has_z, has_bias, has_h0, keep_states, keep_ckpt, fast = flags
    b, d, L = u.shape
    n = A.shape[1]
    sbB, sgB, stB = B.shape[0] > 1, d // B.shape[1], B.shape[2] > 1
    sbC, sgC, stC = C.shape[0] > 1, d // C.shape[1], C.shape[2] > 1
    for job in prange(b * d):
        bi = job // d
        di = job - bi * d
        bB, gB, bC, gC = bi * sbB, di // sgB, bi * sbC, di // sgC
        zero = np.zeros(1, u.dtype)[0]
        h, prod = np.zeros(n, u.dtype), np.empty(n, u.dtype)
        dts, x, decay = np.empty(CHUNK, u.dtype), np.empty(CHUNK * n, u.dtype), np.empty(CHUNK * n, u.dtype)
        bits = np.empty(CHUNK * n, np.int32)
        scale = bits.view(np.float32)
        if has_h0:
            h[:] = h0[bi, di]
        for t0 in range(0, L, CHUNK):
            m = min(CHUNK, L - t0)
            if keep_ckpt:
                ckpt[bi, di, t0 // CHUNK] = h
            _chunk_decay(delta, bias, A, bi, di, t0, m, softplus, has_bias, fast, dts, x, decay, bits, scale)
            for i in range(m):
                t = t0 + i
                ut = u[bi, di, t]
                dtu = dts[i] * ut
                for k in range(n):
                    hk = decay[i * n + k] * h[k] + dtu * B[bB, gB, t * stB, k]
                    h[k] = hk
                    prod[k] = hk * C[bC, gC, t * stC, k]
                y = _sum(prod, zero)
                if keep_states:
                    states[bi, di, t] = h
                if has_D:
                    y += D[di] * ut
                if has_z:
                    zt = z[bi, di, t]
                    y *= zt / (1 + np.exp(-zt))
                out[bi, di, t] = y
        last[bi, di] = h


@njit(parallel=True, fastmath=False, cache=True)
def selective_bwd(
    u, delta, A, B, C, D, z, bias, flags, ckpt, dout, dlast, dstates, bounds,
    du, ddelta, dz, dA, dD, dbias, dB, dC, dh0,
):  # fmt: skip
    """Reverse scan from checkpoints.

    ``flags`` = (softplus, has_D, has_z, has_bias, has_dlast, has_dstates, fast).
    Jobs run over (batch, channel block); ``bounds`` holds the block edges, and
    no block straddles a ``B``/``C`` group. ``dB``/``dC`` are per-block
    partial sums ``(b, n_blocks, Bl, n)``, or per channel ``(b, d, 1, n)`` for
    a fixed layout; ``dA``, ``dD``, ``dbias`` are per batch, summed by the caller.
    """
    softplus, has_D, has_z, has_bias, has_dlast, has_dstates, fast = flags
    b, d, L = u.shape
    n = A.shape[1]
    nblk = bounds.shape[0] - 1
    sbB, sgB, stB = B.shape[0] > 1, d // B.shape[1], B.shape[2] > 1
    sbC, sgC, stC = C.shape[0] > 1, d // C.shape[1], C.shape[2] > 1
    for job in prange(b * nblk):
        bi = job // nblk
        blk = job - bi * nblk
        bB, bC = bi * sbB, bi * sbC
        zero = np.zeros(1, u.dtype)[0]
        hs = np.empty((CHUNK + 1, n), u.dtype)
        dts, x, decay = np.empty(CHUNK, u.dtype), np.empty(CHUNK * n, u.dtype), np.empty(CHUNK * n, u.dtype)
        bits = np.empty(CHUNK * n, np.int32)
        scale = bits.view(np.float32)
        dh, dAi, t_ddt, t_du = np.empty(n, u.dtype), np.empty(n, u.dtype), np.empty(n, u.dtype), np.empty(n, u.dtype)
        for di in range(bounds[blk], bounds[blk + 1]):
            gB, gC = di // sgB, di // sgC
            pB = di if not stB and B.shape[1] == d else blk
            pC = di if not stC and C.shape[1] == d else blk
            if has_dlast:
                dh[:] = dlast[bi, di]
            else:
                dh[:] = zero
            dAi[:] = zero
            dDi, dbi = zero, zero
            for t0 in range(((L - 1) // CHUNK) * CHUNK, -1, -CHUNK):
                m = min(CHUNK, L - t0)
                _chunk_decay(delta, bias, A, bi, di, t0, m, softplus, has_bias, fast, dts, x, decay, bits, scale)
                hs[0] = ckpt[bi, di, t0 // CHUNK]
                for i in range(m):
                    dtu = dts[i] * u[bi, di, t0 + i]
                    for k in range(n):
                        hs[i + 1, k] = decay[i * n + k] * hs[i, k] + dtu * B[bB, gB, (t0 + i) * stB, k]
                for i in range(m - 1, -1, -1):
                    t = t0 + i
                    g = dout[bi, di, t]
                    ut = u[bi, di, t]
                    dt = dts[i]
                    if has_z:
                        for k in range(n):
                            t_du[k] = hs[i + 1, k] * C[bC, gC, t * stC, k]
                        y = _sum(t_du, zero)
                        if has_D:
                            y += D[di] * ut
                        zt = z[bi, di, t]
                        sig = 1 / (1 + np.exp(-zt))
                        dz[bi, di, t] = g * y * sig * (1 + zt * (1 - sig))
                        g = g * zt * sig
                    for k in range(n):
                        dh[k] += g * C[bC, gC, t * stC, k]
                    if has_dstates:
                        for k in range(n):
                            dh[k] += dstates[bi, di, t, k]
                    for k in range(n):
                        dC[bi, pC, t * stC, k] += g * hs[i + 1, k]
                    for k in range(n):
                        dB[bi, pB, t * stB, k] += dh[k] * dt * ut
                    for k in range(n):
                        a, hp, bk = decay[i * n + k], hs[i, k], B[bB, gB, t * stB, k]
                        t_ddt[k] = dh[k] * (A[di, k] * a * hp + bk * ut)
                        t_du[k] = dh[k] * bk
                        dAi[k] += dh[k] * dt * a * hp
                        dh[k] *= a
                    ddt, dut = _sum(t_ddt, zero), _sum(t_du, zero) * dt
                    if has_D:
                        dut += g * D[di]
                        dDi += g * ut
                    du[bi, di, t] = dut
                    if softplus:
                        raw = delta[bi, di, t]
                        if has_bias:
                            raw += bias[di]
                        ddt *= 1 / (1 + np.exp(-raw))
                    ddelta[bi, di, t] = ddt
                    dbi += ddt
            dA[bi, di] = dAi
            dD[bi, di] = dDi
            dbias[bi, di] = dbi
            dh0[bi, di] = dh


@njit(parallel=True, fastmath=False, cache=True)
def linear_fwd(a, x, h0, has_h0, out):
    """All states of ``h_t = a_t h_{t-1} + x_t`` for ``(b, d, l)`` inputs."""
    b, d, L = a.shape
    for job in prange(b * d):
        bi = job // d
        di = job - bi * d
        h = h0[bi, di] if has_h0 else np.zeros(1, a.dtype)[0]
        for t in range(L):
            h = a[bi, di, t] * h + x[bi, di, t]
            out[bi, di, t] = h


@njit(parallel=True, fastmath=False, cache=True)
def linear_bwd(a, h0, has_h0, out, dout, da, dx, dh0):
    """Reverse scan of :func:`linear_fwd`; reads the saved states ``out``."""
    b, d, L = a.shape
    for job in prange(b * d):
        bi = job // d
        di = job - bi * d
        zero = np.zeros(1, a.dtype)[0]
        dh = zero
        for t in range(L - 1, -1, -1):
            g = dout[bi, di, t] + dh
            dx[bi, di, t] = g
            hp = out[bi, di, t - 1] if t > 0 else (h0[bi, di] if has_h0 else zero)
            da[bi, di, t] = g * hp
            dh = a[bi, di, t] * g
        dh0[bi, di] = dh


def _np(x: Tensor | None, like: Tensor, ndim: int) -> np.ndarray:
    """A tensor as a numpy array, or a 1-element placeholder of rank ``ndim``."""
    if x is None:
        return np.zeros((1,) * ndim, dtype=like.numpy().dtype)
    return x.numpy()


def _time_major(X4: Tensor) -> np.ndarray:
    """``(Bb, G, n, Bl)`` → a contiguous ``(Bb, G, Bl, n)`` array, so the ``n`` states vectorise."""
    return X4.transpose(2, 3).contiguous().numpy()


def _block_bounds(d: int, B4: Tensor, C4: Tensor) -> np.ndarray:
    """Channel-block edges: enough blocks for every thread, none straddling a group."""
    edges = set(np.linspace(0, d, min(d, 4 * numba.get_num_threads()) + 1).astype(int).tolist())
    for X in (B4, C4):
        if X.shape[3] > 1 or X.shape[1] < d:
            edges |= set(range(0, d + 1, d // X.shape[1]))
    return np.array(sorted(edges), dtype=np.int64)


def _partial(X4: Tensor, b: int, d: int, nblk: int) -> Tensor:
    """Zeroed per-block (or per-channel, for a fixed layout) partial sums for ``dX``, time-major."""
    rows = d if X4.shape[3] == 1 and X4.shape[1] == d else nblk
    return X4.new_zeros(b, rows, X4.shape[3], X4.shape[2])


def _reduce(part: Tensor, X4: Tensor, bounds: np.ndarray, d: int) -> Tensor:
    """Partial sums → a gradient in the 4-d layout of ``X4``."""
    if part.shape[1] == d and X4.shape[3] == 1 and X4.shape[1] == d:
        group = torch.arange(d)
    else:
        group = torch.from_numpy(bounds[:-1] // (d // X4.shape[1]))
    grad = part.new_zeros(part.shape[0], X4.shape[1], X4.shape[3], X4.shape[2]).index_add_(1, group, part)
    grad = grad.transpose(2, 3)
    return grad.sum(0, keepdim=True) if X4.shape[0] == 1 else grad


def selective_forward(u, delta, A, B4, C4, D, z, bias, h0, softplus, keep_states, keep_ckpt):
    """Run :func:`selective_fwd` on contiguous CPU tensors of one dtype."""
    b, d, L = u.shape
    n = A.shape[1]
    out, last = torch.empty_like(u), u.new_empty(b, d, n)
    states = u.new_empty(b, d, L, n) if keep_states else None
    ckpt = u.new_empty(b, d, (L + CHUNK - 1) // CHUNK, n) if keep_ckpt else None
    fast = u.dtype == torch.float32
    flags = (softplus, D is not None, z is not None, bias is not None, h0 is not None, keep_states, keep_ckpt, fast)
    selective_fwd(
        u.numpy(), delta.numpy(), A.numpy(), _time_major(B4), _time_major(C4), _np(D, u, 1), _np(z, u, 3),
        _np(bias, u, 1), _np(h0, u, 3), flags, out.numpy(), last.numpy(), _np(states, u, 4), _np(ckpt, u, 4),
    )  # fmt: skip
    return out, last, states, ckpt


def selective_backward(u, delta, A, B4, C4, D, z, bias, softplus, ckpt, dout, dlast, dstates):
    """Run :func:`selective_bwd`; return gradients reduced to the inputs' shapes (B/C in 4-d)."""
    b, d, L = u.shape
    bounds = _block_bounds(d, B4, C4)
    nblk = len(bounds) - 1
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    dA, dD, dbias = torch.zeros(b, *A.shape, dtype=u.dtype), u.new_empty(b, d), u.new_empty(b, d)
    dBp, dCp = _partial(B4, b, d, nblk), _partial(C4, b, d, nblk)
    dh0 = u.new_empty(b, d, A.shape[1])
    fast = u.dtype == torch.float32
    flags = (softplus, D is not None, z is not None, bias is not None, dlast is not None, dstates is not None, fast)
    selective_bwd(
        u.numpy(), delta.numpy(), A.numpy(), _time_major(B4), _time_major(C4), _np(D, u, 1), _np(z, u, 3),
        _np(bias, u, 1), flags, ckpt.numpy(), dout.numpy(), _np(dlast, u, 3), _np(dstates, u, 4), bounds,
        du.numpy(), ddelta.numpy(), dz.numpy(), dA.numpy(), dD.numpy(), dbias.numpy(), dBp.numpy(),
        dCp.numpy(), dh0.numpy(),
    )  # fmt: skip
    dB, dC = _reduce(dBp, B4, bounds, d), _reduce(dCp, C4, bounds, d)
    return du, ddelta, dz, dA.sum(0), dD.sum(0), dbias.sum(0), dB, dC, dh0


def linear_forward(a: Tensor, x: Tensor, h0: Tensor | None) -> Tensor:
    """Run :func:`linear_fwd` on contiguous CPU tensors of one dtype."""
    out = torch.empty_like(x)
    linear_fwd(a.numpy(), x.numpy(), _np(h0, a, 2), h0 is not None, out.numpy())
    return out


def linear_backward(a: Tensor, h0: Tensor | None, out: Tensor, dout: Tensor):
    """Run :func:`linear_bwd`; return ``(da, dx, dh0)``."""
    da, dx, dh0 = torch.empty_like(a), torch.empty_like(a), a.new_empty(a.shape[:2])
    linear_bwd(a.numpy(), _np(h0, a, 2), h0 is not None, out.numpy(), dout.numpy(), da.numpy(), dx.numpy(), dh0.numpy())
    return da, dx, dh0
