"""The SSD scan in Triton for CUDA tensors (also run on CPU under ``TRITON_INTERPRET=1``).

The same chunked algorithm as ``ssd_torch`` in four launches, each program
owning one (batch row, head, chunk[, head-dim block]): (1) every chunk's end
state from zero, ``(x dt exp(S_end - S))ᵀ B`` as one ``tl.dot``; (2) a pass
over the chunks gives each chunk's entering state ``H`` and the final state;
(3) every chunk's output, ``((C Bᵀ) ∘ exp(S_t - S_s) dt_s) x + exp(S) C Hᵀ``
(three ``tl.dot``), with ``D`` and the gate; (4) only when asked, the states:
at chosen positions one ``tl.dot`` each from their chunk's ``H``, or at every
position by steps inside each chunk. ``S`` is the running sum of ``dt A``
inside a chunk. Dots on float32 run in IEEE precision (no TF32).

Gradients: the backward recomputes the forward on the chunked PyTorch path
(matmuls, on the same device) and differentiates it with autograd, so every
input gets its gradient; it holds that path's activations for one call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dynalens.kernels.ssd_ref import discretise_dt, skip_weight
from dynalens.kernels.ssd_torch import ssd_scan_torch

CHUNK = 64  # steps per chunk (a power of two, at least 16: tl.dot's smallest side)
MAX_BLOCK_P = 64  # head-dim columns per program
PASS_BLOCK = 256  # state elements per program of the pass between chunks


@triton.jit
def _steps(dt, A, bi, hi, c, L, H, CHUNK: tl.constexpr):
    """The chunk's steps: local index, global time, mask, ``dt`` (0 past the end) and the running sum ``S`` of ``dt A``."""
    j = tl.arange(0, CHUNK)
    t = c * CHUNK + j
    mt = t < L
    d = tl.load(dt + (bi * L + t) * H + hi, mask=mt, other=0.0)
    S = tl.cumsum(d * tl.load(A + hi), axis=0)
    return j, t, mt, d, S


@triton.jit
def _tile(X, bi, t, mt, L, K, k, W, offs):
    """Rows ``t`` of slot ``k`` of a ``(b, L, K, W)`` tensor, columns ``offs``: a ``(CHUNK, len(offs))`` tile."""
    ptr = X + ((bi * L + t[:, None]) * K + k) * W + offs[None, :]
    return tl.load(ptr, mask=mt[:, None] & (offs < W)[None, :], other=0.0)


@triton.jit
def _chunk_end_kernel(
    x, dt, A, B, end, S_end, L, H, G, P, N,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Launch 1: each chunk's end state from zero, ``(x dt exp(S_end - S))ᵀ B``, and ``S_end``."""
    bh, c, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    j, t, mt, d, S = _steps(dt, A, bi, hi, c, L, H, CHUNK)
    total = tl.sum(tl.where(j == CHUNK - 1, S, 0.0), axis=0)
    offs_p, offs_n = pb * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    xt = _tile(x, bi, t, mt, L, H, hi, P, offs_p) * (tl.exp(total - S) * d)[:, None]
    Bt = _tile(B, bi, t, mt, L, G, hi // (H // G), N, offs_n)
    e = tl.dot(tl.trans(xt), Bt, input_precision="ieee")  # (BLOCK_P, BLOCK_N)
    row = (bi * tl.num_programs(1) + c) * H + hi
    m = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    tl.store(end + (row * P + offs_p[:, None]) * N + offs_n[None, :], e, mask=m)
    if pb == 0:
        tl.store(S_end + row, total)


@triton.jit
def _pass_kernel(end, S_end, h0, start, final, n_chunks, H, PN, HAS_H0: tl.constexpr, BLOCK: tl.constexpr):
    """Launch 2: ``H <- exp(S_end) H + end`` over the chunks in order; stores every entering state and the final one."""
    bh, blk = tl.program_id(0), tl.program_id(1)
    bi, hi = bh // H, bh % H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    h = tl.zeros((BLOCK,), dtype=start.dtype.element_ty)
    if HAS_H0:
        h += tl.load(h0 + bh * PN + offs, mask=m, other=0.0)
    for c in range(n_chunks):
        row = (bi * n_chunks + c) * H + hi
        tl.store(start + row * PN + offs, h, mask=m)
        h = tl.exp(tl.load(S_end + row)) * h + tl.load(end + row * PN + offs, mask=m, other=0.0)
    tl.store(final + bh * PN + offs, h, mask=m)


@triton.jit
def _chunk_out_kernel(
    x, dt, A, B, C, D, z, start, y, L, H, G, P, N,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Launch 3: each chunk's output ``((C Bᵀ) ∘ exp(S_t - S_s) dt_s) x + exp(S) C Hᵀ (+ D x) (· silu(z))``."""
    bh, c, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    gi = hi // (H // G)
    j, t, mt, d, S = _steps(dt, A, bi, hi, c, L, H, CHUNK)
    offs_p, offs_n = pb * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    xt = _tile(x, bi, t, mt, L, H, hi, P, offs_p)
    Bt = _tile(B, bi, t, mt, L, G, gi, N, offs_n)
    Ct = _tile(C, bi, t, mt, L, G, gi, N, offs_n)
    causal = j[:, None] >= j[None, :]
    decay = tl.exp(tl.where(causal, S[:, None] - S[None, :], 0.0))
    scores = tl.dot(Ct, tl.trans(Bt), input_precision="ieee")  # (CHUNK, CHUNK)
    mix = tl.where(causal, scores * decay * d[None, :], 0.0)
    out = tl.dot(mix, xt, input_precision="ieee")
    row = (bi * tl.num_programs(1) + c) * H + hi
    m2 = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    Hc = tl.load(start + (row * P + offs_p[:, None]) * N + offs_n[None, :], mask=m2, other=0.0)  # (BLOCK_P, BLOCK_N)
    out += tl.exp(S)[:, None] * tl.dot(Ct, tl.trans(Hc), input_precision="ieee")
    if HAS_D:
        out += tl.load(D + hi * P + offs_p, mask=offs_p < P, other=0.0)[None, :] * xt
    if HAS_Z:
        zt = _tile(z, bi, t, mt, L, H, hi, P, offs_p)
        out *= zt / (1.0 + tl.exp(-zt))
    mo = mt[:, None] & (offs_p < P)[None, :]
    tl.store(y + ((bi * L + t[:, None]) * H + hi) * P + offs_p[None, :], out, mask=mo)


@triton.jit
def _states_at_kernel(
    x, dt, A, B, start, idx, states, L, H, G, P, N, K, n_chunks,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Launch 4a: the state after step ``idx[b, k]``: ``exp(S_j) H + (x dt exp(S_j - S) [s <= j])ᵀ B``."""
    bk, hi, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi = bk // K
    pos = tl.load(idx + bk)
    c, jpos = pos // CHUNK, pos % CHUNK
    j, t, mt, d, S = _steps(dt, A, bi, hi, c, L, H, CHUNK)
    Sj = tl.sum(tl.where(j == jpos, S, 0.0), axis=0)
    before = j <= jpos
    w = tl.where(before, tl.exp(tl.where(before, Sj - S, 0.0)) * d, 0.0)
    offs_p, offs_n = pb * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    xt = _tile(x, bi, t, mt, L, H, hi, P, offs_p) * w[:, None]
    Bt = _tile(B, bi, t, mt, L, G, hi // (H // G), N, offs_n)
    local = tl.dot(tl.trans(xt), Bt, input_precision="ieee")
    m2 = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    Hc = tl.load(start + ((bi * n_chunks + c) * H + hi) * P * N + pn, mask=m2, other=0.0)
    tl.store(states + (bk * H + hi) * P * N + pn, tl.exp(Sj) * Hc + local, mask=m2)


@triton.jit
def _all_states_kernel(
    x, dt, A, B, start, states, L, H, G, P, N,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Launch 4b: every state of a chunk, ``exp(S_t) H + local_t`` with ``local <- exp(dt A) local + dt x Bᵀ`` from zero."""
    bh, c, pb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bi, hi = bh // H, bh % H
    gi = hi // (H // G)
    Ah = tl.load(A + hi)
    offs_p, offs_n = pb * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    mp, mn = offs_p < P, offs_n < N
    m2 = mp[:, None] & mn[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    Hc = tl.load(start + ((bi * tl.num_programs(1) + c) * H + hi) * P * N + pn, mask=m2, other=0.0)
    local = tl.zeros((BLOCK_P, BLOCK_N), dtype=Hc.dtype)
    S = tl.sum(tl.zeros((1,), dtype=Hc.dtype), axis=0)
    for j in range(CHUNK):
        t = c * CHUNK + j
        if t < L:
            dj = tl.load(dt + (bi * L + t) * H + hi)
            S += dj * Ah
            xj = tl.load(x + ((bi * L + t) * H + hi) * P + offs_p, mask=mp, other=0.0) * dj
            Bj = tl.load(B + ((bi * L + t) * G + gi) * N + offs_n, mask=mn, other=0.0)
            local = tl.exp(dj * Ah) * local + xj[:, None] * Bj[None, :]
            tl.store(states + ((bi * L + t) * H + hi) * P * N + pn, tl.exp(S) * Hc + local, mask=m2)


def _blocks(P: int, N: int) -> tuple[int, int]:
    """Head-dim and state blocks: powers of two, at least 16 (``tl.dot``'s smallest side)."""
    return min(max(16, triton.next_power_of_2(P)), MAX_BLOCK_P), max(16, triton.next_power_of_2(N))


def ssd_forward(x, dt, A, B, C, D2, z, h0, idx, want_all, chunk):
    """Launch the forward on contiguous tensors of one float dtype (``dt`` after bias and softplus).

    Returns ``(y, final_state, states or None)``; ``D2`` is ``(h, p)`` or None.
    """
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    n_chunks = triton.cdiv(L, chunk)
    BLOCK_P, BLOCK_N = _blocks(P, N)
    meta = dict(CHUNK=chunk, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N)
    grid = (b * H, n_chunks, triton.cdiv(P, BLOCK_P))
    end, S_end = x.new_empty(b, n_chunks, H, P, N), x.new_empty(b, n_chunks, H)
    _chunk_end_kernel[grid](x, dt, A, B, end, S_end, L, H, G, P, N, **meta)
    start, final = torch.empty_like(end), x.new_empty(b, H, P, N)
    PN = P * N
    _pass_kernel[(b * H, triton.cdiv(PN, PASS_BLOCK))](
        end, S_end, x if h0 is None else h0, start, final, n_chunks, H, PN, HAS_H0=h0 is not None, BLOCK=PASS_BLOCK
    )
    y = torch.empty_like(x)
    _chunk_out_kernel[grid](
        x, dt, A, B, C, x if D2 is None else D2, x if z is None else z, start, y, L, H, G, P, N,
        HAS_D=D2 is not None, HAS_Z=z is not None, **meta,
    )  # fmt: skip
    states = None
    if idx is not None:
        K = idx.shape[1]
        states = x.new_empty(b, K, H, P, N)
        _states_at_kernel[(b * K, H, triton.cdiv(P, BLOCK_P))](
            x, dt, A, B, start, idx, states, L, H, G, P, N, K, n_chunks, **meta
        )
    elif want_all:
        states = x.new_empty(b, L, H, P, N)
        _all_states_kernel[grid](x, dt, A, B, start, states, L, H, G, P, N, **meta)
    return y, final, states


class SSDScanTriton(torch.autograd.Function):
    """Forward in Triton; backward by autograd through the chunked PyTorch path, recomputed."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, softplus, idx, want_all, chunk):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        p = x.shape[3]

        def prep(t):
            return None if t is None else t.detach().to(acc).contiguous()

        dt_ = discretise_dt(dt.detach().to(acc), prep(dt_bias), softplus).contiguous()
        D2 = None if D is None else prep(skip_weight(D.detach(), p))
        y, final, states = ssd_forward(prep(x), dt_, prep(A), prep(B), prep(C), D2, prep(z), prep(h0), idx, want_all, chunk)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, idx)
        ctx.options = (softplus, want_all, chunk)
        return y.to(x.dtype), final, states

    @staticmethod
    def backward(ctx, dy, dfinal, dstates):
        *inputs, idx = ctx.saved_tensors
        softplus, want_all, chunk = ctx.options
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(inputs, ctx.needs_input_grad)]
        acc = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            outs = ssd_scan_torch(*leaves[:8], softplus, leaves[8], idx, want_all, chunk, acc)
            outs = (outs[0].to(inputs[0].dtype), *outs[1:])
            pairs = [(o, g) for o, g in zip(outs, (dy, dfinal, dstates)) if o is not None and g is not None]
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return (*out, None, None, None, None)


def ssd_scan_triton(x, dt, A, B, C, D, z, dt_bias, softplus, h0, idx, want_all, chunk):
    """The Triton path behind :func:`~dynalens.kernels.ssd_scan`: ``(y, final_state, states or None)``."""
    chunk = CHUNK if chunk is None else max(16, triton.next_power_of_2(chunk))
    return SSDScanTriton.apply(x, dt, A, B, C, D, z, dt_bias, h0, softplus, idx, want_all, chunk)
