"""Autograd wrappers shared by the compiled paths (numba on CPU, Triton on CUDA).

A path is a module with ``selective_forward``, ``selective_backward``,
``linear_forward`` and ``linear_backward`` working on contiguous tensors of
the accumulation dtype; these wrappers convert dtypes and layouts, save what
the backward needs (checkpoints, not all states) and map gradients back.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def bc_4d(X: Tensor, d: int) -> Tensor:
    """``B``/``C`` in the kernels' one form ``(Bb, G, n, Bl)``."""
    if X.dim() == 2:
        return X.reshape(1, d, X.shape[1], 1)
    if X.dim() == 3:
        return X.unsqueeze(1)
    return X


def _prep(x: Tensor | None, acc: torch.dtype) -> Tensor | None:
    return None if x is None else x.detach().to(acc).contiguous()


def _grad(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if g is None or like is None else g.to(like.dtype).reshape(like.shape)


class SelectiveScanFn(torch.autograd.Function):
    """Selective scan on a compiled path; outputs ``(out, last_state[, states])``."""

    @staticmethod
    def forward(
        ctx, path: ModuleType, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, return_states, into=None
    ):
        acc = accumulation_dtype(u)
        d = u.shape[1]
        prepped = [_prep(x, acc) for x in (u, delta, A, bc_4d(B, d), bc_4d(C, d), D, z, delta_bias, initial_state)]
        keep_ckpt = any(ctx.needs_input_grad[1:10])
        where = {} if into is None else {"states": into}  # given only to the numba path, which writes there
        out, last, states, ckpt = path.selective_forward(*prepped, softplus, return_states, keep_ckpt, **where)
        ctx.set_materialize_grads(False)
        ctx.path, ctx.softplus = path, softplus
        ctx.save_for_backward(*prepped[:8], ckpt, u, delta, A, B, C, D, z, delta_bias, initial_state)
        return (out.to(u.dtype), last) + ((states,) if return_states else ())

    @staticmethod
    def backward(ctx, dout, dlast, dstates=None):
        *prepped, ckpt = ctx.saved_tensors[:9]
        inputs = ctx.saved_tensors[9:]
        acc = prepped[0].dtype
        dout = torch.zeros_like(prepped[0]) if dout is None else dout.to(acc).contiguous()
        grads = ctx.path.selective_backward(*prepped, ctx.softplus, ckpt, dout, _prep(dlast, acc), _prep(dstates, acc))
        du, ddelta, dz, dA, dD, dbias, dB, dC, dh0 = grads
        u, delta, A, B, C, D, z, delta_bias, h0 = inputs
        return (
            None, _grad(du, u), _grad(ddelta, delta), _grad(dA, A), _grad(dB, B), _grad(dC, C),
            _grad(dD, D), _grad(dz, z), _grad(dbias, delta_bias), _grad(dh0, h0), None, None, None,
        )  # fmt: skip


class LinearScanFn(torch.autograd.Function):
    """All states of ``h_t = a_t h_{t-1} + x_t`` on a compiled path."""

    @staticmethod
    def forward(ctx, path: ModuleType, a, x, initial_state):
        acc = accumulation_dtype(x)
        a_, x_, h0_ = (_prep(t, acc) for t in (a, x, initial_state))
        out = path.linear_forward(a_, x_, h0_)
        ctx.path = path
        ctx.save_for_backward(a_, h0_, out, a, x, initial_state)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        a_, h0_, out, a, x, h0 = ctx.saved_tensors
        da, dx, dh0 = ctx.path.linear_backward(a_, h0_, out, dout.to(a_.dtype).contiguous())
        return None, _grad(da, a), _grad(dx, x), _grad(dh0, h0)
