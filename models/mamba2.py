"""HookedMamba2: a Mamba-2 (SSD) language model with every intermediate hooked.

The forward pass follows HuggingFace's ``Mamba2ForCausalLM`` (its PyTorch
path) step for step and reads and writes its checkpoint format. The scan is
``dynalens.kernels.ssd_scan``; the per-step states ``h_t`` ``[h, p, n]`` are
only formed when something hooks or caches ``mixer.hook_ssm_state``, and
only at the positions asked for when ``state_positions`` is given.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from dynalens.kernels import ssd_scan
from dynalens.kernels.autograd import accumulation_dtype
from dynalens.models.base import HookedSequenceModel, SequenceConfig, TextOrTokens, as_batch
from dynalens.models.io import read_json, read_model_folder, write_model_folder
from dynalens.models.mamba import (
    RMSNorm,
    _at_least_fp32,
    _causal_conv1d,
    _own_copy,
    _skip_pads,
    add_ssm_stack,
    check_state_batch,
    final_logits,
    hf_key,
)
from dynalens.models.building import on_meta
from dynalens.models.state_buffer import holders, offer, run_state_hook, sharing_states, states_buffer

# Mamba2Config fields ↔ HF ``Mamba2Config`` fields.
_HF_FIELDS = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "d_vocab": "vocab_size",
    "n_heads": "num_heads",
    "d_head": "head_dim",
    "d_state": "state_size",
    "n_groups": "n_groups",
    "expand": "expand",
    "d_conv": "conv_kernel",
    "chunk_size": "chunk_size",
    "use_bias": "use_bias",
    "use_conv_bias": "use_conv_bias",
    "eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "residual_in_fp32": "residual_in_fp32",
    "time_step_limit": "time_step_limit",
}


@dataclass
class Mamba2Config(SequenceConfig):
    """Sizes of a Mamba-2 model; HF ``Mamba2Config`` names in brackets.

    ``d_model`` [hidden_size], ``n_layers`` [num_hidden_layers], ``d_vocab``
    [vocab_size], ``n_heads`` [num_heads], ``d_head`` [head_dim], ``d_state``
    [state_size], ``n_groups`` (heads share ``B``/``C`` in groups), ``expand``
    (``n_heads * d_head == expand * d_model``), ``d_conv`` [conv_kernel],
    ``chunk_size`` (kept for the checkpoint; our scan picks its own),
    ``use_bias``, ``use_conv_bias``, ``eps`` [layer_norm_epsilon],
    ``tie_embeddings`` [tie_word_embeddings], ``residual_in_fp32``,
    ``time_step_limit`` (``dt`` is clamped to it).

    The gated norm's options (mamba_ssm's ``Mamba2`` arguments; HF's Mamba-2
    has the defaults): ``rmsnorm`` (False: ``out_proj`` reads ``y * silu(z)``,
    no norm) and ``norm_before_gate`` (True: ``norm(y) * silu(z)``; False:
    ``norm(y * silu(z))``). The norm is an RMSNorm over ``d_inner / n_groups``
    channels at a time.
    """

    architecture: ClassVar[str] = "mamba2"

    n_heads: int = 8
    d_head: int = 8
    d_state: int = 16
    n_groups: int = 1
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    eps: float = 1e-5
    tie_embeddings: bool = False
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    rmsnorm: bool = True
    norm_before_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "d_vocab", "n_heads", "d_head", "d_state", "n_groups", "expand", "d_conv",
                     "chunk_size"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.n_heads * self.d_head != self.expand * self.d_model:
            raise ValueError(
                f"Mamba2Config: n_heads * d_head ({self.n_heads} * {self.d_head}) must equal "
                f"expand * d_model ({self.expand} * {self.d_model})"
            )
        if self.n_heads % self.n_groups:
            raise ValueError(f"Mamba2Config.n_groups ({self.n_groups}) must divide n_heads ({self.n_heads})")
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)

    @property
    def d_inner(self) -> int:
        """Width of the mixer, ``n_heads * d_head``."""
        return self.n_heads * self.d_head

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: ``x``, then ``B`` and ``C`` of every group."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    @classmethod
    def from_hf(cls, hf_config: Any) -> Mamba2Config:
        """Build from a ``transformers.Mamba2Config`` (or its ``to_dict()``)."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type") != "mamba2":
            raise ValueError(f"expected an HF config with model_type 'mamba2', got {d.get('model_type')!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"HookedMamba2 supports hidden_act 'silu' only, got {d['hidden_act']!r}")
        return cls(**{ours: d[hf] for ours, hf in _HF_FIELDS.items() if hf in d})

    def to_hf(self) -> Any:
        """The equivalent ``transformers.Mamba2Config`` (HF's gated norm has the default options only)."""
        from transformers import Mamba2Config as HFMamba2Config

        if not self.rmsnorm or self.norm_before_gate:
            raise ValueError(
                "HF's Mamba2 has one gated norm, rmsnorm=True with norm_before_gate=False; this model has "
                f"rmsnorm={self.rmsnorm}, norm_before_gate={self.norm_before_gate} and cannot be written in its format"
            )
        return HFMamba2Config(**{hf: getattr(self, ours) for ours, hf in _HF_FIELDS.items()})


@dataclass
class Mamba2State:
    """What one call hands the next to continue a sequence.

    ``conv[l]`` ``[batch, conv_dim, d_conv - 1]``: the last inputs of layer
    ``l``'s convolution; ``ssm[l]`` ``[batch, n_heads, d_head, d_state]``: its
    SSM state; ``pos``: tokens seen so far (pads included).
    """

    conv: list[Tensor]
    ssm: list[Tensor]
    pos: int


class GatedRMSNorm(nn.Module):
    """The mixer's norm, as HF's ``MambaRMSNormGated`` (and mamba_ssm's options)."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(cfg.d_inner))
        self.eps, self.groups = cfg.eps, cfg.n_groups
        self.rmsnorm, self.norm_before_gate = cfg.rmsnorm, cfg.norm_before_gate

    def forward(self, y: Float[Tensor, "batch pos d_inner"], gate: Float[Tensor, "batch pos d_inner"]) -> Tensor:
        dtype = y.dtype
        if not self.rmsnorm:
            return y * gate
        y = y.float()
        if not self.norm_before_gate:
            y = y * gate.float()
        grouped = y.view(*y.shape[:-1], self.groups, -1)
        y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)).view(y.shape)
        y = self.weight * y.to(dtype)
        return y * gate if self.norm_before_gate else y


class Mamba2Mixer(nn.Module):
    """The SSD mixer of one layer, parameters named as in HF."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        h = cfg.n_heads
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + cfg.conv_dim + h, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(
            cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, padding=cfg.d_conv - 1, bias=cfg.use_conv_bias
        )
        self.dt_bias = nn.Parameter(_dt_bias_init(h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(cfg)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.use_bias)

        self.hook_in_proj = HookPoint()  # [batch, pos, d_inner + conv_dim + n_heads]: [z, xBC, dt]
        self.hook_conv = HookPoint()  # [batch, pos, conv_dim]: x, B, C after conv and SiLU
        self.hook_x = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_B = HookPoint()  # [batch, pos, n_groups, d_state]
        self.hook_C = HookPoint()  # [batch, pos, n_groups, d_state]
        self.hook_dt = HookPoint()  # [batch, pos, n_heads]
        self.hook_ssm_state = HookPoint()  # [batch, pos | k, n_heads, d_head, d_state]
        self.hook_y = HookPoint()  # [batch, pos, n_heads, d_head]
        self.hook_gate = HookPoint()  # [batch, pos, d_inner]
        self.hook_norm = HookPoint()  # [batch, pos, d_inner]
        self.hook_ssm_out = HookPoint()  # [batch, pos, d_model]

    @property
    def A(self) -> Float[Tensor, " n_heads"]:
        """The per-head decay rate ``A = -exp(A_log)``, at least float32."""
        return -torch.exp(_at_least_fp32(self.A_log))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Bool[Tensor, "batch pos"] | None = None,
        conv_state: Float[Tensor, "batch conv_dim k"] | None = None,
        ssm_state: Float[Tensor, "batch n_heads d_head d_state"] | None = None,
        positions: Int[Tensor, "batch k"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor, Tensor]:
        """Mix ``x`` over positions; return the output and the new conv and SSM states.

        Pad positions (``mask`` False, left padding) leave both states exactly
        as they were: the convolution reads a zero input there and skips it
        (each row's window runs from its previous inputs straight into its real
        tokens), ``x``, ``B``, ``C`` are zero there and ``dt = 0``.
        """
        cfg = self.cfg
        b, length = x.shape[:2]
        z, xBC, dt = self.hook_in_proj(self.in_proj(x)).split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
        keep = None if mask is None else mask[..., None].to(xBC.dtype)

        xBC = xBC if keep is None else xBC * keep
        xBC = xBC.transpose(1, 2)
        if conv_state is None:
            conv_state = xBC.new_zeros(b, cfg.conv_dim, cfg.d_conv - 1)
        padded = torch.cat([conv_state.to(xBC.dtype), xBC], dim=-1)
        if mask is not None:
            padded = _skip_pads(padded, mask, cfg.d_conv - 1)
        new_conv_state = padded[..., padded.shape[-1] - (cfg.d_conv - 1) :].clone()
        conv = F.silu(_causal_conv1d(padded, self.conv1d.weight, self.conv1d.bias)).transpose(1, 2)
        conv = self.hook_conv(conv if keep is None else conv * keep)

        xs, B, C = conv.split([cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state], dim=-1)
        xs = self.hook_x(xs.reshape(b, length, cfg.n_heads, cfg.d_head))
        B = self.hook_B(B.reshape(b, length, cfg.n_groups, cfg.d_state))
        C = self.hook_C(C.reshape(b, length, cfg.n_groups, cfg.d_state))
        dt = F.softplus(dt + self.dt_bias).clamp(*cfg.time_step_limit)
        dt = self.hook_dt(dt if mask is None else dt * mask[..., None])

        y, new_ssm_state = self._scan(xs, dt, B, C, ssm_state, positions)
        y = self.hook_y(y.to(xs.dtype))
        gate = self.hook_gate(F.silu(z))
        normed = self.hook_norm(self.norm(y.reshape(b, length, cfg.d_inner), gate))
        return self.hook_ssm_out(self.out_proj(normed.to(x.dtype))), new_conv_state, new_ssm_state

    def _scan(self, xs, dt, B, C, ssm_state, positions):
        """``(y, final state)``; with ``hook_ssm_state`` hooked, the hooked states are read out.

        All states (or those at ``positions``) pass the hook. If it edited them
        (returned another tensor, or changed them in place: their version
        counter moved), ``y_t = C_t h_t + D x_t`` is taken from them where they
        exist, and the final state is the hooked one at the last position when
        it is among them; otherwise the scan's own ``y`` and final state stand
        (states at chosen positions made in inference mode have no version
        counter, so they are always read out: there are few of them).
        Without autograd, all states are written into the forward's shared
        buffer (``models/state_buffer.py``) and handed back to it when the
        hook kept nothing that reaches them, or into the caller's tensor
        for this hook under ``states_into``.
        """
        D = _at_least_fp32(self.D)
        want = self.hook_ssm_state.has_hooks()
        every = want and positions is None
        out = None
        if every and not torch.is_grad_enabled():
            shape = (*xs.shape, self.cfg.d_state)
            out = states_buffer(shape, accumulation_dtype(xs), xs.device, self.hook_ssm_state.name)
        scan = ssd_scan(
            xs, dt, self.A, B, C, D, initial_state=ssm_state, return_final_state=True,
            state_positions=positions if want else None, return_states=every, states_out=out,
        )  # fmt: skip
        if not want:
            return scan
        y, final, states = scan
        del out, scan
        before = holders(states) if every else None
        hooked, edited = run_state_hook(self.hook_ssm_state, states)
        if edited:
            y, final = self._read_out(y, final, hooked, xs, C, D, positions)
        del hooked
        if before is not None and holders(states) == before:
            offer(states)
        return y, final

    def _read_out(self, y, final, states, xs, C, D, positions):
        """``y`` at the states' positions from ``y_t = C_t h_t + D x_t``, and the last position's state as final."""
        r = self.cfg.n_heads // self.cfg.n_groups
        b, length = xs.shape[:2]
        rows = torch.arange(b, device=xs.device)[:, None]
        cols = torch.arange(length, device=xs.device).expand(b, -1) if positions is None else positions
        Ch = C[rows, cols].repeat_interleave(r, dim=2).to(states.dtype)  # (b, k, h, n)
        read = torch.einsum("bkhpn,bkhn->bkhp", states, Ch) + xs[rows, cols] * D[:, None]
        y = y.to(read.dtype).index_put((rows.expand_as(cols), cols), read)
        at_end = cols == length - 1  # (b, k): in a row that has it, the last such state is the final one
        last = (at_end * torch.arange(1, cols.shape[1] + 1, device=xs.device)).argmax(-1)
        final = torch.where(at_end.any(-1)[:, None, None, None], states[rows[:, 0], last], final)
        return y, final


class Mamba2Block(nn.Module):
    """``resid_post = resid_pre + mixer(norm(resid_pre))``."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.eps)
        self.mixer = Mamba2Mixer(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, resid: Tensor, mask: Tensor | None, conv_state, ssm_state, positions):
        resid = self.hook_resid_pre(_own_copy(resid, self.hook_resid_pre))
        normed = self.norm(resid.to(self.norm.weight.dtype))
        mixed, conv_state, ssm_state = self.mixer(normed, mask, conv_state, ssm_state, positions)
        if self.cfg.residual_in_fp32:
            resid = resid.float()
        resid = self.hook_resid_post(resid + self.hook_mixer_out(_own_copy(mixed, self.hook_mixer_out)))
        return resid, conv_state, ssm_state


class HookedMamba2(HookedSequenceModel):
    """Mamba-2 language model with TransformerLens hooks on every intermediate.

    Hooks (``l`` a layer; ``h`` heads of ``p = d_head``, ``g`` groups, ``n = d_state``,
    ``d_inner = h p``, ``conv_dim = d_inner + 2 g n``):

    =====================================  ==================================  ==========================================
    name                                   shape                               value
    =====================================  ==================================  ==========================================
    ``hook_embed``                         ``[batch, pos, d_model]``           token embeddings
    ``blocks.{l}.hook_resid_pre``          ``[batch, pos, d_model]``           residual stream into the block
    ``blocks.{l}.norm.hook_scale``         ``[batch, pos, 1]``                 RMS of the residual
    ``blocks.{l}.norm.hook_normalized``    ``[batch, pos, d_model]``           residual / RMS, before the norm weight
    ``blocks.{l}.mixer.hook_in_proj``      ``[batch, pos, d_inner+conv_dim+h]``  in_proj output: ``[z, xBC, dt]``
    ``blocks.{l}.mixer.hook_conv``         ``[batch, pos, conv_dim]``          ``[x, B, C]`` after conv1d and SiLU
    ``blocks.{l}.mixer.hook_x``            ``[batch, pos, h, p]``              the scan input per head
    ``blocks.{l}.mixer.hook_B``            ``[batch, pos, g, n]``              input matrices ``B_t``
    ``blocks.{l}.mixer.hook_C``            ``[batch, pos, g, n]``              output matrices ``C_t``
    ``blocks.{l}.mixer.hook_dt``           ``[batch, pos, h]``                 ``Δ``: softplus(dt + dt_bias), clamped
    ``blocks.{l}.mixer.hook_ssm_state``    ``[batch, pos, h, p, n]``           states ``h_t`` (only when hooked/cached)
    ``blocks.{l}.mixer.hook_y``            ``[batch, pos, h, p]``              ``y = C h + D x``
    ``blocks.{l}.mixer.hook_gate``         ``[batch, pos, d_inner]``           gate ``silu(z)``
    ``blocks.{l}.mixer.hook_norm``         ``[batch, pos, d_inner]``           gated norm output; out_proj reads it
    ``blocks.{l}.mixer.hook_ssm_out``      ``[batch, pos, d_model]``           out_proj output (the mixer's output)
    ``blocks.{l}.hook_mixer_out``          ``[batch, pos, d_model]``           what the mixer adds to the residual
    ``blocks.{l}.hook_resid_post``         ``[batch, pos, d_model]``           residual stream out of the block
    ``ln_final.hook_scale``                ``[batch, pos, 1]``                 RMS before the unembedding
    ``ln_final.hook_normalized``           ``[batch, pos, d_model]``           normalised final residual
    =====================================  ==================================  ==========================================

    ``forward(..., state_positions=[...])`` (and so ``run_with_cache(...,
    state_positions=[...])``) forms ``hook_ssm_state`` only after the steps at
    these positions, ``[batch, k, h, p, n]``: each prompt's real positions
    (negative from its end), mapped through the padding. Every hook sits on the
    path of the computation, so an edit changes everything downstream; an edit
    of ``hook_ssm_state`` changes ``y`` at its positions and, at the last
    position, the state carried to the next call (it does not re-run the
    recurrence at later positions of the same call: edit ``hook_x``,
    ``hook_B``, ``hook_dt`` for that). An edit is a returned tensor or an
    in-place change through torch (seen by the version counter; one through
    ``.data`` or ``.numpy()`` is not). Without autograd, the layers of a
    forward share one buffer for every state, reused only when nothing a hook
    kept reaches it: states a hook or the cache holds are never overwritten.

    ``forward(input, attention_mask=None, state=None, return_state=False)``
    continues from a :class:`Mamba2State`; one new token costs O(1) in the
    sequence length. Ragged batches are left-padded (a ``Prompts``, a list of
    prompts, or ids with ``attention_mask``): at a pad position ``Δ = 0``
    (``hook_dt`` shows 0), ``x``, ``B``, ``C`` are 0 and the convolution reads a
    zero input and skips it, so the conv and SSM states stay exactly what they
    were and a padded row equals its unpadded run at every real position.

    Examples
    --------
    >>> model = HookedMamba2(Mamba2Config(d_model=16, n_layers=2, d_vocab=50, n_heads=4, d_head=8))
    >>> tokens = torch.tensor([[1, 2, 3, 4]])
    >>> _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("ssm_state"), state_positions=[-1])
    >>> tuple(cache["blocks.1.mixer.hook_ssm_state"].shape)
    (1, 1, 4, 8, 16)
    """

    architecture: ClassVar[str] = "mamba2"
    cfg: Mamba2Config

    def __init__(self, cfg: Mamba2Config, tokenizer: Any = None):
        super().__init__(cfg, tokenizer)
        add_ssm_stack(self, cfg, Mamba2Block)

    def forward(
        self,
        input: TextOrTokens,
        *,
        attention_mask: Tensor | None = None,
        state: Mamba2State | None = None,
        return_state: bool = False,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | tuple[Float[Tensor, "batch pos d_vocab"], Mamba2State]:
        """Logits ``[batch, pos, d_vocab]`` for ``input``, continuing from ``state`` when given.

        Parameters
        ----------
        input : str, list of str, LongTensor ``[batch, pos]``, ragged id lists or Prompts
            Lists become a left-padded ``Prompts``; a ``Prompts`` brings its mask.
        attention_mask : Tensor ``[batch, pos]``, optional
            With a token tensor: True/1 at real tokens, pads on the left.
        state : Mamba2State, optional
            What a previous call returned with ``return_state=True``.
        return_state : bool
            Also return the :class:`Mamba2State` after the last position.
        state_positions : sequence of int, optional
            Form ``hook_ssm_state`` only after these positions of each prompt.
        """
        tokens, mask = as_batch(self, input, attention_mask)
        check_state_batch(state, tokens)
        positions = None
        if state_positions is not None:
            positions = _state_columns(state_positions, mask, tokens.shape).to(tokens.device)
        resid = self.hook_embed(self.embed(tokens))
        conv_states, ssm_states = [], []
        with sharing_states():
            for i, block in enumerate(self.blocks):
                conv, ssm = (None, None) if state is None else (state.conv[i], state.ssm[i])
                resid, conv, ssm = block(resid, mask, conv, ssm, positions)
                conv_states.append(conv)
                ssm_states.append(ssm)
        logits = final_logits(self, resid)
        if not return_state:
            return logits
        pos = tokens.shape[1] + (0 if state is None else state.pos)
        return logits, Mamba2State(conv_states, ssm_states, pos)

    # ------------------------------------------------------------ loading/saving
    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: Any = None, *, dtype: torch.dtype = torch.float32) -> HookedMamba2:
        """Copy an in-memory HF ``Mamba2ForCausalLM`` into ``dtype`` (weights copied, never shared)."""
        cfg = Mamba2Config.from_hf(hf_model.config)
        sd = {k: v.detach().to(dtype=dtype, copy=True) for k, v in hf_model.state_dict().items()}
        return cls._from_hf_state_dict(cfg, sd, tokenizer)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> HookedMamba2:
        """Load an HF-format Mamba-2 folder (``config.json`` with ``model_type: "mamba2"`` + safetensors).

        The tokenizer is loaded too when the folder has one; weights are read
        from safetensors only, never unpickled.
        """
        sd, tokenizer = read_model_folder(folder, "Mamba-2")
        cfg = Mamba2Config.from_hf(_read_hf_config(Path(folder) / "config.json"))
        return cls._from_hf_state_dict(cfg, {k: v.to(dtype) for k, v in sd.items()}, tokenizer).to(device)

    @classmethod
    def _from_hf_state_dict(cls, cfg: Mamba2Config, sd: dict[str, Tensor], tokenizer: Any) -> HookedMamba2:
        sd = {hf_key(k.replace("backbone.embedding.", "backbone.embeddings."), to_hf=False): v for k, v in sd.items()}
        if cfg.tie_embeddings:
            sd["unembed.weight"] = sd["embed.weight"]
        with on_meta():  # no initialisation: every parameter comes from sd
            model = cls(cfg, tokenizer)
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.unembed.weight = model.embed.weight
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write an HF ``Mamba2ForCausalLM`` folder: ``config.json``, ``model.safetensors``, tokenizer."""
        hf_config = self.cfg.to_hf()
        hf_config.architectures = ["Mamba2ForCausalLM"]
        hf_config.dtype = str(self.embed.weight.dtype).removeprefix("torch.")
        sd = {hf_key(k, to_hf=True): v for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            del sd["lm_head.weight"]
        write_model_folder(folder, json.loads(hf_config.to_json_string()), sd, self.tokenizer)  # HF's encoding of inf


def _dt_bias_init(h: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """mamba_ssm's (and HF's) initial ``dt_bias``: softplus(dt_bias) log-uniform in ``[dt_min, dt_max]``."""
    dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # the inverse of softplus


def _read_hf_config(path: Path) -> dict[str, Any]:
    """An HF Mamba-2 ``config.json`` as a dict, through HF's reader (it decodes ``time_step_limit``'s inf)."""
    raw = read_json(path)
    if raw.get("model_type") != "mamba2":
        raise ValueError(f"{path} is not a Mamba-2 config: model_type is {raw.get('model_type')!r}, expected 'mamba2'")
    from transformers import Mamba2Config as HFMamba2Config

    return HFMamba2Config.from_pretrained(str(path.parent)).to_dict()


def _state_columns(positions: Sequence[int], mask: Tensor | None, shape: torch.Size) -> Tensor:
    """Real positions of each prompt (negative from its end) → padded columns ``[batch, k]``."""
    b, length = shape
    pos = torch.as_tensor(positions)
    if pos.dim() != 1 or pos.numel() == 0 or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise ValueError(f"state_positions must be a non-empty sequence of ints, got {positions!r}")
    lengths = torch.full((b,), length) if mask is None else mask.sum(-1).cpu()
    bad = (pos[None, :] < -lengths[:, None]) | (pos[None, :] >= lengths[:, None])
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        n = int(lengths[row])
        raise ValueError(
            f"state_positions {pos.tolist()} are out of range for prompt {row}: its positions are "
            f"0 to {n - 1} (or -{n} to -1 from the end)"
        )
    offsets = length - lengths
    cols = torch.where(pos[None, :] < 0, length + pos[None, :], offsets[:, None] + pos[None, :])
    return cols
