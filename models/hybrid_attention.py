"""The attention of a hybrid model, computed in the open with TransformerLens' hook names.

:class:`HookedAttention` runs an HF attention module's own projections
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, shared or not) and computes
grouped-query attention itself, so that every intermediate is a hook point
named as TransformerBridge names them: ``hook_q``, ``hook_k``, ``hook_v``
``[batch, pos, heads, d_head]`` (before rotary), ``hook_rot_q``, ``hook_rot_k``
(after it, when the model has rotary), ``hook_attn_scores`` and
``hook_pattern`` ``[batch, head, q_pos, k_pos]``, ``hook_z``
``[batch, pos, head, d_head]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


@dataclass
class AttentionContext:
    """What every attention layer of one forward call shares.

    ``key_mask`` ``[batch, n_past + pos]``: True at real tokens, the cached
    positions first; ``n_past``: cached positions; ``cos``, ``sin``
    ``[batch, pos, rotary_dim]``: the rotary angles of the new positions
    (``None`` without rotary).
    """

    key_mask: Bool[Tensor, "batch keys"]
    n_past: int
    cos: Tensor | None = None
    sin: Tensor | None = None


def rotate(x: Float[Tensor, "batch pos heads d_head"], cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotary (``rotate_half`` form) on the first ``cos.shape[-1]`` channels of each head."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    half = rot.shape[-1] // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + turned * sin, rest], dim=-1)


class HookedAttention(nn.Module):
    """Causal grouped-query attention over an HF module's projections, every step hooked.

    Parameters
    ----------
    q_proj, k_proj, v_proj, o_proj : nn.Module
        The HF projections (the modules themselves: shared weights stay shared).
    n_heads, n_kv_heads, d_head : int
        Query heads, key/value heads (``n_heads`` a multiple), head width.
    scale : float
        Scores are ``q · k * scale``.
    rotary : bool
        Whether queries and keys are rotated (angles from :class:`AttentionContext`).
    key_scale : float
        Keys are multiplied by it before rotary (Falcon-H1's ``key_multiplier``).
    adapters : tuple of three modules, optional
        Low-rank adapters whose outputs add to q, k, v (Zamba2's per-layer adapters).
    """

    def __init__(
        self,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        o_proj: nn.Module,
        *,
        n_heads: int,
        n_kv_heads: int,
        d_head: int,
        scale: float,
        rotary: bool,
        key_scale: float = 1.0,
        adapters: tuple[nn.Module, nn.Module, nn.Module] | None = None,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.adapters = None if adapters is None else nn.ModuleList(adapters)
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head
        self.scale, self.key_scale, self.rotary = scale, key_scale, rotary
        self.hook_q = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_k = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        self.hook_v = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        if rotary:
            self.hook_rot_q = HookPoint()  # [batch, pos, n_heads, d_head]
            self.hook_rot_k = HookPoint()  # [batch, pos, n_kv_heads, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, n_heads, q_pos, k_pos]
        self.hook_pattern = HookPoint()  # [batch, n_heads, q_pos, k_pos]
        self.hook_z = HookPoint()  # [batch, pos, n_heads, d_head]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_in"],
        ctx: AttentionContext,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], tuple[Tensor, Tensor]]:
        """Attend from the new positions to the cached and new ones.

        Returns the output and the keys and values of all positions so far
        (``[batch, n_past + pos, n_kv_heads, d_head]``, after rotary), what the
        next call takes as ``past``. A query with no real key before it (a pad)
        gets an all-zero pattern row.
        """
        b, length = x.shape[:2]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.adapters is not None:
            q, k, v = q + self.adapters[0](x), k + self.adapters[1](x), v + self.adapters[2](x)
        q = self.hook_q(q.view(b, length, self.n_heads, self.d_head))
        k = self.hook_k(k.view(b, length, self.n_kv_heads, self.d_head) * self.key_scale)
        v = self.hook_v(v.view(b, length, self.n_kv_heads, self.d_head))
        if self.rotary:
            q = self.hook_rot_q(rotate(q, ctx.cos, ctx.sin))
            k = self.hook_rot_k(rotate(k, ctx.cos, ctx.sin))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        group = self.n_heads // self.n_kv_heads
        keys, values = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) * self.scale
        allowed = self._allowed(ctx, length, keys.shape[1], x.device)  # [batch, 1, q, k]
        scores = self.hook_attn_scores(scores.masked_fill(~allowed, float("-inf")))
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern = self.hook_pattern(torch.where(allowed.any(-1, keepdim=True), pattern, 0.0))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, values))
        return self.o_proj(z.reshape(b, length, self.n_heads * self.d_head)), (k, v)

    @staticmethod
    def _allowed(ctx: AttentionContext, length: int, n_keys: int, device: torch.device) -> Tensor:
        """Causal and real: query ``i`` (absolute ``n_past + i``) sees real keys ``j <= n_past + i``."""
        query = torch.arange(length, device=device)[:, None] + ctx.n_past
        causal = torch.arange(n_keys, device=device)[None, :] <= query
        return (causal[None] & ctx.key_mask[:, None, :].to(device))[:, None]
