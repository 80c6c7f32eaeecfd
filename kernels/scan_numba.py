"""Compiled CPU scans (numba): one pass over time, states in registers or small local arrays.

The selective-scan forward runs one job per (batch, block of ``LANES``
channels), in the accumulation dtype (float32, or float64 for float64
inputs), and streams over ``l`` once in chunks of ``CHUNK`` steps. Channels
sit in vector lanes, so the exp (``2**x`` of ``dt · A log2(e)``, a polynomial
for float32, see ``numba_math``), the update and ``y = C h`` run on whole
AVX-512 vectors with no reduction across lanes. Within a chunk the scan takes
``ROWS`` states at a time through all its steps, keeping those states and
their ``A`` rows in registers (stack buffers that LLVM promotes); the chunk's
step sizes, ``dt·u`` and outputs move between the channel-major inputs and
the lane-major tiles with 16 × 16 shuffle transposes. It keeps the state at
every chunk start; the backward (one job per batch and channel block, the
``n`` states in lanes) walks the chunks in reverse, recomputes each chunk's
states from its checkpoint and runs the reverse scan, so training memory
beyond inputs and outputs is ``b·d·n·l / CHUNK`` (plus the per-block partial
sums of ``dB``/``dC``) instead of ``b·d·n·l``.

The kernels take ``B``/``C`` time-major in one 4-d form ``(Bb, G, Bl, n)``:
shared ``(b, n, l)`` is ``(b, 1, l, n)``, grouped ``(b, g, n, l)`` is
``(b, g, l, n)`` and fixed ``(d, n)`` is ``(1, d, 1, n)``; batch and time
indices are multiplied by 0/1 strides.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.extending import overload
from torch import Tensor

from dynalens.kernels.numba_math import (
    BLOCK,
    exp,
    exp2,
    prefer_512_bit_vectors,
    prefetch,
    sigmoid,
    softplus,
    stack_buffer,
    transpose_block,
)

CHUNK = 64  # a multiple of LANES
LANES = BLOCK  # channels per forward job: one AVX-512 register of float32, one transposed block
ROWS = 4  # states per pass of the forward's inner loop, held in registers with their A rows
TILE, HELD, HELD_LANES = CHUNK * LANES, ROWS * LANES, CHUNK * ROWS * LANES  # stack buffer sizes
LOG2E = np.log2(np.e)
# Kernels may reassociate (vectorised reductions); the exp/log helpers keep their own flags.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
OPTIONS = dict(fastmath=FASTMATH, error_model="numpy", cache=True)


@njit(inline="always", **OPTIONS)
def _lane_groups(X, d, c0, lanes):
    """The ``B``/``C`` group of each lane's channel (the last real one for padding lanes)."""
    size = d // X.shape[1]
    groups = np.empty(LANES, np.int64)
    for c in range(LANES):
        groups[c] = (c0 + min(c, lanes - 1)) // size
    return groups


def _at(X, i, k, c):
    """``X[i, k]``, one value for every lane, or lane ``c``'s own ``X[i, k, c]``."""


@overload(_at, inline="always")
def _at_overload(X, i, k, c):
    if X.ndim == 2:
        return lambda X, i, k, c: X[i, k]
    return lambda X, i, k, c: X[i, k, c]


def _pass_rows(X, bX, groups, t0, m, k0, lane_rows):
    """``B``/``C`` for states ``k0 .. k0 + ROWS`` over a chunk's steps (one step when fixed in time).

    With ``lane_rows=None`` (the lanes share one group) a view of ``X``
    indexed ``[i, r]``; otherwise ``lane_rows``, a ``(CHUNK, ROWS, LANES)``
    buffer, filled with each lane's values ``[i, r, c]``. ``X`` is
    zero-padded to a multiple of ``ROWS`` states.
    """


@overload(_pass_rows, inline="always")
def _pass_rows_overload(X, bX, groups, t0, m, k0, lane_rows):
    if isinstance(lane_rows, types.NoneType):

        def view(X, bX, groups, t0, m, k0, lane_rows):
            return X[bX, groups[0], t0 * min(X.shape[2] - 1, 1) :, k0:]

        return view

    def fill(X, bX, groups, t0, m, k0, lane_rows):
        timed = min(X.shape[2] - 1, 1)  # a 0/1 time stride
        for i in range(1 + (m - 1) * timed):
            for r in range(ROWS):
                for c in range(LANES):
                    lane_rows[i, r, c] = X[bX, groups[c], (t0 + i) * timed, k0 + r]
        return lane_rows

    return fill


@njit(inline="always", **OPTIONS)
def _scan_chunk(dts, dtus, ys, a2, h, B, C, bB, bC, gB, gC, B_lanes, C_lanes, t0, m, states, keep_states, bi, c0, lanes):
    """Steps ``0 .. m`` of a chunk, ``ROWS`` states at a time: ``h`` updated, ``ys += C h``.

    ``dts``/``dtus``/``ys`` are ``(CHUNK, LANES)`` tiles, ``a2`` and ``h``
    ``(n_pad, LANES)`` with ``n_pad`` a multiple of ``ROWS`` (zero past
    ``n``). ``B``/``C`` are read in place when the lanes share them, or
    each pass gathers them into the stack buffers ``B_lanes``/``C_lanes``
    (see :func:`_pass_rows`). Every store in the loop goes to the stack, so
    LLVM needs no overlap checks; the states, when kept, are copied out after
    each pass so the loop reads ``held`` only as whole rows and LLVM keeps it
    in registers.
    """
    held = carray(stack_buffer(HELD, dts.dtype), (ROWS, LANES))
    rates = carray(stack_buffer(HELD, dts.dtype), (ROWS, LANES))
    trail = carray(stack_buffer(HELD_LANES, dts.dtype), (CHUNK, ROWS, LANES))  # the held states at every step
    timed_B, timed_C = B.shape[2] > 1, C.shape[2] > 1
    n = states.shape[3]  # read only when the states are kept
    for k0 in range(0, a2.shape[0], ROWS):
        B_rows = _pass_rows(B, bB, gB, t0, m, k0, B_lanes)
        C_rows = _pass_rows(C, bC, gC, t0, m, k0, C_lanes)
        for r in range(ROWS):
            for c in range(LANES):
                held[r, c], rates[r, c] = h[k0 + r, c], a2[k0 + r, c]
        for i in range(m):
            iB, iC = i if timed_B else 0, i if timed_C else 0
            for r in range(ROWS):
                for c in range(LANES):
                    hk = exp2(dts[i, c] * rates[r, c]) * held[r, c] + dtus[i, c] * _at(B_rows, iB, r, c)
                    held[r, c] = hk
                    ys[i, c] += hk * _at(C_rows, iC, r, c)
            if keep_states:
                for r in range(ROWS):
                    for c in range(LANES):
                        trail[i, r, c] = held[r, c]
        if keep_states:
            for i in range(m):
                for c in range(lanes):
                    for r in range(min(ROWS, n - k0)):
                        states[bi, t0 + i, c0 + c, k0 + r] = trail[i, r, c]
        for r in range(ROWS):
            for c in range(LANES):
                h[k0 + r, c] = held[r, c]


@njit(inline="always", **OPTIONS)
def _prefetch_chunk(u, delta, z, out, has_z, bi, c0, lanes, t0):
    """Before a chunk's scan: fetch what its end reads and writes (``z``, ``out``) and what the next
    chunk's start reads (``u``, ``delta``); 16 rows a few cache lines long are too many streams for
    the hardware prefetcher."""
    L = u.shape[2]
    line = 64 // u.itemsize
    for c in range(lanes):
        z_c, out_c = z[bi, c0 + c, t0:] if has_z else z[0, 0], out[bi, c0 + c, t0:]
        for i in range(0, min(CHUNK, L - t0), line):
            if has_z:
                prefetch(z_c, i, False)
            prefetch(out_c, i, True)
        u_c, delta_c = u[bi, c0 + c, t0:], delta[bi, c0 + c, t0:]
        for i in range(CHUNK, min(2 * CHUNK, L - t0), line):
            prefetch(u_c, i, False)
            prefetch(delta_c, i, False)


@njit(**OPTIONS)
def _selective_fwd_block(u, delta, A, B, C, D, z, bias, h0, flags, out, last, states, ckpt, bi, c0):
    """Forward scan of channels ``c0 .. c0 + LANES`` of batch ``bi``, one channel per vector lane.

    Per chunk: step sizes and ``dt·u`` are computed channel-major (vectorised
    over time) and transposed into lane-major tiles; :func:`_scan_chunk` runs
    the steps; ``C h`` is transposed back and finished with ``D`` and the gate.
    When all lanes read the same ``B``/``C`` group (shared layout, or a group
    spanning the block), ``B``/``C`` are scalars broadcast to the lanes;
    otherwise each lane's values are gathered into per-lane rows.
    """
    prefer_512_bit_vectors()
    softplus_, has_D, has_z, has_bias, has_h0, keep_states, keep_ckpt = flags
    d, L = u.shape[1], u.shape[2]
    n = A.shape[1]
    n_pad = B.shape[3]  # B and C come zero-padded to a multiple of ROWS states
    lanes = min(LANES, d - c0)
    dtype = u.dtype
    zero = dtype.type(0)
    dts = carray(stack_buffer(TILE, dtype), (CHUNK, LANES))
    dtus = carray(stack_buffer(TILE, dtype), (CHUNK, LANES))
    ys = carray(stack_buffer(TILE, dtype), (CHUNK, LANES))
    by_channel = carray(stack_buffer(TILE, dtype), (LANES, CHUNK))  # dt, then C h, channel-major
    dtu_by_channel = carray(stack_buffer(TILE, dtype), (LANES, CHUNK))
    by_channel[:], dtu_by_channel[:] = zero, zero  # padding lanes stay zero
    a2, h = np.zeros((n_pad, LANES), dtype), np.zeros((n_pad, LANES), dtype)
    for c in range(lanes):
        for k in range(n):
            a2[k, c] = A[c0 + c, k] * LOG2E
            if has_h0:
                h[k, c] = h0[bi, c0 + c, k]
    gB, gC = _lane_groups(B, d, c0, lanes), _lane_groups(C, d, c0, lanes)
    shared = gB[0] == gB[LANES - 1] and gC[0] == gC[LANES - 1]
    bB, bC = bi if B.shape[0] > 1 else 0, bi if C.shape[0] > 1 else 0
    B_lanes = carray(stack_buffer(HELD_LANES, dtype), (CHUNK, ROWS, LANES))
    C_lanes = carray(stack_buffer(HELD_LANES, dtype), (CHUNK, ROWS, LANES))
    for t0 in range(0, L, CHUNK):
        m = min(CHUNK, L - t0)
        if keep_ckpt:
            for c in range(lanes):
                ckpt[bi, c0 + c, t0 // CHUNK] = h[:n, c]
        for c in range(lanes):
            # Views from t0: the loops index them from 0, so LLVM sees no negative index to wrap around.
            u_c, delta_c = u[bi, c0 + c, t0:], delta[bi, c0 + c, t0:]
            b_c = bias[c0 + c] if has_bias else zero
            for i in range(m):
                dt = delta_c[i] + b_c
                dt = softplus(dt) if softplus_ else dt
                by_channel[c, i] = dt
                dtu_by_channel[c, i] = dt * u_c[i]
        for i0 in range(0, m, LANES):
            transpose_block(by_channel, 0, i0, dts, i0, 0)
            transpose_block(dtu_by_channel, 0, i0, dtus, i0, 0)
        ys[:m] = zero
        _prefetch_chunk(u, delta, z, out, has_z, bi, c0, lanes, t0)
        if shared:
            _scan_chunk(dts, dtus, ys, a2, h, B, C, bB, bC, gB, gC, None, None, t0, m, states, keep_states, bi, c0, lanes)
        else:
            _scan_chunk(dts, dtus, ys, a2, h, B, C, bB, bC, gB, gC, B_lanes, C_lanes, t0, m, states, keep_states, bi, c0, lanes)
        for i0 in range(0, m, LANES):
            transpose_block(ys, i0, 0, by_channel, 0, i0)
        for c in range(lanes):
            u_c, out_c = u[bi, c0 + c, t0:], out[bi, c0 + c, t0:]
            z_c = z[bi, c0 + c, t0:] if has_z else z[0, 0]
            D_c = D[c0 + c] if has_D else zero
            for i in range(m):
                y = by_channel[c, i] + D_c * u_c[i]
                if has_z:
                    y *= z_c[i] * sigmoid(z_c[i])
                out_c[i] = y
    for c in range(lanes):
        last[bi, c0 + c] = h[:n, c]


@njit(parallel=True, cache=True)
def selective_fwd(u, delta, A, B, C, D, z, bias, h0, flags, out, last, states, ckpt):
    """Forward scan; ``flags`` = (softplus, has_D, has_z, has_bias, has_h0, keep_states, keep_ckpt).

    One job per (batch, block of ``LANES`` channels).
    """
    b, d = u.shape[0], u.shape[1]
    nblk = (d + LANES - 1) // LANES
    for job in prange(b * nblk):
        bi = job // nblk
        _selective_fwd_block(u, delta, A, B, C, D, z, bias, h0, flags, out, last, states, ckpt, bi, (job - bi * nblk) * LANES)


@njit(**OPTIONS)
def _selective_bwd_block(
    u, delta, A, B, C, D, z, bias, flags, ckpt, dout, dlast, dstates,
    du, ddelta, dz, dA, dD, dbias, dB, dC, dh0, bi, blk, c_lo, c_hi,
):  # fmt: skip
    """Reverse scan of channels ``c_lo .. c_hi`` of batch ``bi``, the ``n`` states in vector lanes.

    Per chunk (in reverse): the step sizes, the decays and states (from the
    chunk's checkpoint) and the gate's gradients are computed first, vectorised
    over time or states; the reverse scan then runs step by step with only the
    work that needs the running ``dh``, leaving per-step sums for a last
    vectorised pass (``du``, the softplus derivative).
    """
    prefer_512_bit_vectors()
    softplus_, has_D, has_z, has_bias, has_dlast, has_dstates = flags
    d, L = u.shape[1], u.shape[2]
    n = A.shape[1]
    stB, stC = B.shape[2] > 1, C.shape[2] > 1
    bB, bC = bi if B.shape[0] > 1 else 0, bi if C.shape[0] > 1 else 0
    sgB, sgC = d // B.shape[1], d // C.shape[1]
    dtype = u.dtype
    zero = dtype.type(0)
    hs, decay = np.empty((CHUNK + 1, n), dtype), np.empty((CHUNK, n), dtype)
    raw, dts, ys, gs = np.empty(CHUNK, dtype), np.empty(CHUNK, dtype), np.zeros(CHUNK, dtype), np.empty(CHUNK, dtype)
    ddts, duts = np.empty(CHUNK, dtype), np.empty(CHUNK, dtype)
    dh, dAi = np.empty(n, dtype), np.empty(n, dtype)
    for di in range(c_lo, c_hi):
        gB, gC = di // sgB, di // sgC
        pB = di if not stB and B.shape[1] == d else blk
        pC = di if not stC and C.shape[1] == d else blk
        if has_dlast:
            dh[:] = dlast[bi, di]
        else:
            dh[:] = zero
        dAi[:] = zero
        dDi, dbi = zero, zero
        b_d = bias[di] if has_bias else zero
        D_d = D[di] if has_D else zero
        for t0 in range(((L - 1) // CHUNK) * CHUNK, -1, -CHUNK):
            m = min(CHUNK, L - t0)
            for i in range(m):
                raw[i] = delta[bi, di, t0 + i] + b_d
            for i in range(m):
                dts[i] = softplus(raw[i]) if softplus_ else raw[i]
            hs[0] = ckpt[bi, di, t0 // CHUNK]
            for i in range(m):
                dt = dts[i]
                dtu = dt * u[bi, di, t0 + i]
                B_t = B[bB, gB, (t0 + i) * stB]
                for k in range(n):
                    a = exp(dt * A[di, k])
                    decay[i, k] = a
                    hs[i + 1, k] = a * hs[i, k] + dtu * B_t[k]
                if has_z:
                    C_t = C[bC, gC, (t0 + i) * stC]
                    y = zero
                    for k in range(n):
                        y += hs[i + 1, k] * C_t[k]
                    ys[i] = y
            for i in range(m):
                g = dout[bi, di, t0 + i]
                if has_z:
                    zt = z[bi, di, t0 + i]
                    sig = sigmoid(zt)
                    dz[bi, di, t0 + i] = g * (ys[i] + D_d * u[bi, di, t0 + i]) * sig * (1 + zt * (1 - sig))
                    g = g * zt * sig
                gs[i] = g
            for i in range(m - 1, -1, -1):
                t = t0 + i
                g = gs[i]
                C_t, B_t = C[bC, gC, t * stC], B[bB, gB, t * stB]
                for k in range(n):
                    dh[k] += g * C_t[k]
                if has_dstates:
                    for k in range(n):
                        dh[k] += dstates[bi, di, t, k]
                dC_t, dB_t = dC[bi, pC, t * stC], dB[bi, pB, t * stB]
                for k in range(n):
                    dC_t[k] += g * hs[i + 1, k]
                dt, ut = dts[i], u[bi, di, t]
                dtu = dt * ut
                for k in range(n):
                    dB_t[k] += dh[k] * dtu
                ddt, dut = zero, zero
                for k in range(n):
                    ddt += dh[k] * (A[di, k] * decay[i, k] * hs[i, k] + B_t[k] * ut)
                    dut += dh[k] * B_t[k]
                ddts[i], duts[i] = ddt, dut
                for k in range(n):
                    dAi[k] += dh[k] * dt * decay[i, k] * hs[i, k]
                    dh[k] *= decay[i, k]
            for i in range(m):
                ut = u[bi, di, t0 + i]
                du[bi, di, t0 + i] = duts[i] * dts[i] + gs[i] * D_d
                dDi += gs[i] * ut
                ddt = ddts[i] * sigmoid(raw[i]) if softplus_ else ddts[i]
                ddelta[bi, di, t0 + i] = ddt
                dbi += ddt
        dA[bi, di] = dAi
        dD[bi, di] = dDi
        dbias[bi, di] = dbi
        dh0[bi, di] = dh


@njit(parallel=True, cache=True)
def selective_bwd(
    u, delta, A, B, C, D, z, bias, flags, ckpt, dout, dlast, dstates, bounds,
    du, ddelta, dz, dA, dD, dbias, dB, dC, dh0,
):  # fmt: skip
    """Reverse scan from checkpoints.

    ``flags`` = (softplus, has_D, has_z, has_bias, has_dlast, has_dstates).
    Jobs run over (batch, channel block); ``bounds`` holds the block edges, and
    no block straddles a ``B``/``C`` group. ``dB``/``dC`` are per-block
    partial sums ``(b, n_blocks, Bl, n)``, or per channel ``(b, d, 1, n)`` for
    a fixed layout; ``dA``, ``dD``, ``dbias`` are per batch, summed by the caller.
    """
    b = u.shape[0]
    nblk = bounds.shape[0] - 1
    for job in prange(b * nblk):
        bi = job // nblk
        blk = job - bi * nblk
        _selective_bwd_block(
            u, delta, A, B, C, D, z, bias, flags, ckpt, dout, dlast, dstates,
            du, ddelta, dz, dA, dD, dbias, dB, dC, dh0, bi, blk, bounds[blk], bounds[blk + 1],
        )  # fmt: skip


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


def _time_major(X4: Tensor, width: int | None = None) -> np.ndarray:
    """``(Bb, G, n, Bl)`` → a contiguous ``(Bb, G, Bl, n)`` array, so the ``n`` states vectorise.

    ``width`` zero-pads the states to that many.
    """
    X = X4.transpose(2, 3)
    if width is not None:
        X = torch.nn.functional.pad(X, (0, width - X.shape[3]))
    return X.contiguous().numpy()


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


def selective_forward(u, delta, A, B4, C4, D, z, bias, h0, softplus, keep_states, keep_ckpt, states=None):
    """Run :func:`selective_fwd` on contiguous CPU tensors of one dtype.

    The states are written time-major, into ``states`` (a contiguous ``(b, l, d, n)`` tensor) when
    given, and returned as ``(b, d, l, n)`` with that memory (a tensor of its own, not a view, when
    not given: autograd lets a hook edit it in place).
    """
    b, d, L = u.shape
    n = A.shape[1]
    out, last = torch.empty_like(u), u.new_empty(b, d, n)
    result = None if states is None else states.transpose(1, 2)
    if keep_states and states is None:
        result = torch.empty_strided((b, d, L, n), (L * d * n, n, d * n, 1), dtype=u.dtype)
        states = result.transpose(1, 2)
    ckpt = u.new_empty(b, d, (L + CHUNK - 1) // CHUNK, n) if keep_ckpt else None
    flags = (softplus, D is not None, z is not None, bias is not None, h0 is not None, keep_states, keep_ckpt)
    n_pad = -(-n // ROWS) * ROWS
    selective_fwd(
        u.numpy(), delta.numpy(), A.numpy(), _time_major(B4, n_pad), _time_major(C4, n_pad), _np(D, u, 1), _np(z, u, 3),
        _np(bias, u, 1), _np(h0, u, 3), flags, out.numpy(), last.numpy(), _np(states, u, 4), _np(ckpt, u, 4),
    )  # fmt: skip
    return out, last, result, ckpt


def selective_backward(u, delta, A, B4, C4, D, z, bias, softplus, ckpt, dout, dlast, dstates):
    """Run :func:`selective_bwd`; return gradients reduced to the inputs' shapes (B/C in 4-d)."""
    b, d, L = u.shape
    bounds = _block_bounds(d, B4, C4)
    nblk = len(bounds) - 1
    du, ddelta, dz = torch.empty_like(u), torch.empty_like(u), torch.zeros_like(u)
    dA, dD, dbias = torch.zeros(b, *A.shape, dtype=u.dtype), u.new_empty(b, d), u.new_empty(b, d)
    dBp, dCp = _partial(B4, b, d, nblk), _partial(C4, b, d, nblk)
    dh0 = u.new_empty(b, d, A.shape[1])
    flags = (softplus, D is not None, z is not None, bias is not None, dlast is not None, dstates is not None)
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
