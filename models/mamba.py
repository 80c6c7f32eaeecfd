"""HookedMamba: a Mamba-1 (S6) language model with every intermediate hooked.

The forward pass follows HuggingFace's ``MambaForCausalLM`` step for step and
reads and writes its checkpoint format, so any ``state-spaces/mamba-*-hf``
folder loads here and anything saved here loads in HF. The selective scan is
``dynalens.kernels.selective_scan``; the per-step states ``h_t`` are only
materialised when something hooks or caches ``mixer.hook_ssm_state``, and
then the scan writes them time-major (``[batch, pos, d_inner, d_state]``,
contiguous), into the caller's tensor under
``models/state_buffer.py::states_into``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from dynalens.kernels import selective_scan
from dynalens.kernels.autograd import accumulation_dtype
from dynalens.models.base import HookedSequenceModel, SequenceConfig, TextOrTokens, as_batch
from dynalens.models.io import read_json, read_model_folder, write_model_folder
from dynalens.models.building import on_meta
from dynalens.models.state_buffer import run_state_hook, states_buffer

# Our parameter names ↔ HF ``MambaForCausalLM`` names: only the prefixes differ.
_HF_PREFIXES = (
    ("embed.", "backbone.embeddings."),
    ("blocks.", "backbone.layers."),
    ("ln_final.", "backbone.norm_f."),
    ("unembed.", "lm_head."),
)
# MambaConfig fields ↔ HF ``MambaConfig`` fields.
_HF_FIELDS = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "d_vocab": "vocab_size",
    "d_state": "state_size",
    "expand": "expand",
    "dt_rank": "time_step_rank",
    "d_conv": "conv_kernel",
    "use_bias": "use_bias",
    "use_conv_bias": "use_conv_bias",
    "eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "residual_in_fp32": "residual_in_fp32",
}


@dataclass
class MambaConfig(SequenceConfig):
    """Sizes of a Mamba-1 model; HF ``MambaConfig`` names in brackets.

    ``d_model`` [hidden_size], ``n_layers`` [num_hidden_layers], ``d_vocab``
    [vocab_size], ``d_state`` [state_size], ``expand``, ``dt_rank``
    [time_step_rank, ``ceil(d_model / 16)`` when None], ``d_conv``
    [conv_kernel], ``use_bias``, ``use_conv_bias``, ``eps``
    [layer_norm_epsilon], ``tie_embeddings`` [tie_word_embeddings],
    ``residual_in_fp32``. ``d_inner = expand * d_model`` [intermediate_size].

    ``bcdt_norm`` (Falcon-Mamba, Jamba's Mamba layers): the mixer RMS-normalises
    the low-rank ``dt`` input of ``dt_proj`` and ``B``, ``C`` before the scan
    (``eps = bcdt_eps`` [mixer_rms_eps]); an HF ``FalconMambaConfig`` sets it.
    """

    architecture: ClassVar[str] = "mamba"

    d_state: int = 16
    expand: int = 2
    dt_rank: int | None = None
    d_conv: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    eps: float = 1e-5
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    bcdt_norm: bool = False
    bcdt_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        for name in ("d_model", "n_layers", "d_vocab", "d_state", "expand", "dt_rank", "d_conv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")

    @property
    def d_inner(self) -> int:
        """Width of the mixer, ``expand * d_model``."""
        return self.expand * self.d_model

    @classmethod
    def from_hf(cls, hf_config: Any) -> MambaConfig:
        """Build from a ``transformers.MambaConfig`` (or its ``to_dict()``)."""
        d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
        if d.get("model_type") not in ("mamba", "falcon_mamba"):
            raise ValueError(
                f"expected an HF config with model_type 'mamba' or 'falcon_mamba', got {d.get('model_type')!r}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"HookedMamba supports hidden_act 'silu' only, got {d['hidden_act']!r}")
        kwargs = {ours: d[hf] for ours, hf in _HF_FIELDS.items() if hf in d}
        if kwargs.get("dt_rank") == "auto":
            kwargs["dt_rank"] = None
        if d["model_type"] == "falcon_mamba":
            kwargs.update(bcdt_norm=True, bcdt_eps=d.get("mixer_rms_eps", 1e-6))
        return cls(**kwargs)

    def to_hf(self) -> Any:
        """The equivalent ``transformers.MambaConfig`` (``FalconMambaConfig`` with ``bcdt_norm``)."""
        from transformers import FalconMambaConfig
        from transformers import MambaConfig as HFMambaConfig

        fields = {hf: getattr(self, ours) for ours, hf in _HF_FIELDS.items()}
        if self.bcdt_norm:
            return FalconMambaConfig(**fields, mixer_rms_eps=self.bcdt_eps)
        return HFMambaConfig(**fields)


@dataclass
class MambaState:
    """What one call hands the next to continue a sequence.

    ``conv[l]`` ``[batch, d_inner, d_conv - 1]``: the last mixer inputs of
    layer ``l`` before its convolution; ``ssm[l]`` ``[batch, d_inner,
    d_state]``: its SSM state ``h``; ``pos``: tokens seen so far.
    """

    conv: list[Tensor]
    ssm: list[Tensor]
    pos: int


class RMSNorm(nn.Module):
    """RMSNorm as HF Mamba computes it; ``hook_normalized`` is ``x / rms`` before the weight."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        dtype = x.dtype
        x = x.float()
        scale = self.hook_scale(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        return self.weight * self.hook_normalized(x / scale).to(dtype)


class MambaMixer(nn.Module):
    """The selective SSM of one layer (Mamba-1), parameters named as in HF."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_inner, cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * d, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(d, d, cfg.d_conv, groups=d, padding=cfg.d_conv - 1, bias=cfg.use_conv_bias)
        self.x_proj = nn.Linear(d, cfg.dt_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, d, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
        self.D = nn.Parameter(torch.ones(d))
        self.out_proj = nn.Linear(d, cfg.d_model, bias=cfg.use_bias)
        self._init_dt()
        if cfg.bcdt_norm:  # Falcon-Mamba / Jamba: RMS norms on dt (before dt_proj), B and C
            self.dt_layernorm = RMSNorm(cfg.dt_rank, cfg.bcdt_eps)
            self.b_layernorm = RMSNorm(n, cfg.bcdt_eps)
            self.c_layernorm = RMSNorm(n, cfg.bcdt_eps)

        self.hook_in_proj = HookPoint()  # [batch, pos, 2 * d_inner]
        self.hook_conv = HookPoint()  # [batch, pos, d_inner]
        self.hook_x_proj = HookPoint()  # [batch, pos, dt_rank + 2 * d_state]
        self.hook_delta = HookPoint()  # [batch, pos, d_inner]
        self.hook_B = HookPoint()  # [batch, pos, d_state]
        self.hook_C = HookPoint()  # [batch, pos, d_state]
        self.hook_ssm_state = HookPoint()  # [batch, pos, d_inner, d_state]
        self.hook_y = HookPoint()  # [batch, pos, d_inner]
        self.hook_gate = HookPoint()  # [batch, pos, d_inner]
        self.hook_ssm_out = HookPoint()  # [batch, pos, d_model]

    @torch.no_grad()
    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
        """mamba_ssm's initialisation of ``dt_proj``: softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.cfg.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(self.cfg.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    @property
    def A(self) -> Float[Tensor, "d_inner d_state"]:
        """The real state matrix ``A = -exp(A_log)`` (diagonal per channel), at least float32."""
        return -torch.exp(_at_least_fp32(self.A_log))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        conv_state: Float[Tensor, "batch d_inner k"] | None = None,
        ssm_state: Float[Tensor, "batch d_inner d_state"] | None = None,
        mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor, Tensor]:
        """Mix ``x`` over positions; return the output and the new conv and SSM states.

        ``mask`` (True = real, left padding) makes pad positions leave both
        states exactly as they were: the convolution reads zeros there and skips
        them (each row's window runs from its previous inputs straight into its
        real tokens), and ``Δ = 0`` there, so the scan keeps ``h``.
        """
        cfg = self.cfg
        xs, z = self.hook_in_proj(self.in_proj(x)).chunk(2, dim=-1)

        # Causal depthwise convolution, continuing from the previous inputs when given.
        xs = xs.transpose(1, 2)
        if conv_state is None:
            conv_state = xs.new_zeros(xs.shape[0], cfg.d_inner, cfg.d_conv - 1)
        padded = torch.cat([conv_state.to(xs.dtype), xs], dim=-1)
        if mask is not None:
            padded = _skip_pads(padded, mask, cfg.d_conv - 1)
        conv = _causal_conv1d(padded, self.conv1d.weight, self.conv1d.bias)
        new_conv_state = padded[..., padded.shape[-1] - (cfg.d_conv - 1) :].clone()
        u = self.hook_conv(F.silu(conv).transpose(1, 2))

        dt, B, C = self.hook_x_proj(self.x_proj(u)).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        if cfg.bcdt_norm:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        delta = F.softplus(self.dt_proj(dt))
        if mask is not None:  # Δ = 0 at pads: exp(ΔA) = 1 and ΔBu = 0 keep the state exactly
            delta = delta * mask[..., None].to(delta.dtype)
        delta = self.hook_delta(delta)
        B, C = self.hook_B(B.contiguous()), self.hook_C(C.contiguous())  # copies: never views of x_proj

        want_states = self.hook_ssm_state.has_hooks()
        into = None
        if want_states and not torch.is_grad_enabled():  # time-major, where the scan writes them directly
            shape = (*u.shape[:2], cfg.d_inner, cfg.d_state)
            into = states_buffer(shape, accumulation_dtype(u), u.device, self.hook_ssm_state.name)
        scan = selective_scan(
            u.transpose(1, 2),
            delta.transpose(1, 2),
            self.A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=_at_least_fp32(self.D),
            initial_state=ssm_state,
            return_last_state=True,
            return_states=want_states,
            states_out=None if into is None else into.transpose(1, 2),
        )
        y, new_ssm_state = scan[0].transpose(1, 2), scan[1]
        if want_states:
            states = scan[2].transpose(1, 2)
            # edited states are read out (y = C h + D u) and carried on; otherwise the scan's y and last state stand
            hooked, edited = run_state_hook(self.hook_ssm_state, states)
            if edited:
                y = torch.einsum("bldn,bln->bld", hooked, C.to(hooked.dtype)) + u * self.D
                y, new_ssm_state = y.to(u.dtype), hooked[:, -1]
        y = self.hook_y(y)
        gate = self.hook_gate(F.silu(z))
        return self.hook_ssm_out(self.out_proj(y * gate)), new_conv_state, new_ssm_state


class MambaBlock(nn.Module):
    """``resid_post = resid_pre + mixer(norm(resid_pre))``."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.eps)
        self.mixer = MambaMixer(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        conv_state: Tensor | None,
        ssm_state: Tensor | None,
        mask: Tensor | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Tensor, Tensor]:
        resid = self.hook_resid_pre(_own_copy(resid, self.hook_resid_pre))  # not the last block's resid_post
        mixed, conv_state, ssm_state = self.mixer(
            self.norm(resid.to(self.norm.weight.dtype)), conv_state, ssm_state, mask
        )
        if self.cfg.residual_in_fp32:
            resid = resid.float()
        resid = self.hook_resid_post(resid + self.hook_mixer_out(_own_copy(mixed, self.hook_mixer_out)))
        return resid, conv_state, ssm_state


class HookedMamba(HookedSequenceModel):
    """Mamba-1 language model with TransformerLens hooks on every intermediate.

    Hooks (``l`` a layer; all ``[batch, pos, ...]``; ``d_inner = expand * d_model``):

    =====================================  ======================================  =========================================
    name                                   shape                                   value
    =====================================  ======================================  =========================================
    ``hook_embed``                         ``[batch, pos, d_model]``               token embeddings
    ``blocks.{l}.hook_resid_pre``          ``[batch, pos, d_model]``               residual stream into the block
    ``blocks.{l}.norm.hook_scale``         ``[batch, pos, 1]``                     RMS of the residual
    ``blocks.{l}.norm.hook_normalized``    ``[batch, pos, d_model]``               residual / RMS, before the norm weight
    ``blocks.{l}.mixer.hook_in_proj``      ``[batch, pos, 2 * d_inner]``           in_proj output: ``[x, z]``
    ``blocks.{l}.mixer.hook_conv``         ``[batch, pos, d_inner]``               ``u = silu(conv1d(x))``, the scan input
    ``blocks.{l}.mixer.hook_x_proj``       ``[batch, pos, dt_rank + 2 d_state]``   x_proj output: ``[dt, B, C]``
    ``blocks.{l}.mixer.hook_delta``        ``[batch, pos, d_inner]``               ``Δ = softplus(dt_proj(dt))`` (bias included)
    ``blocks.{l}.mixer.hook_B``            ``[batch, pos, d_state]``               input matrix ``B_t``
    ``blocks.{l}.mixer.hook_C``            ``[batch, pos, d_state]``               output matrix ``C_t``
    ``blocks.{l}.mixer.hook_ssm_state``    ``[batch, pos, d_inner, d_state]``      states ``h_t`` (only when hooked/cached)
    ``blocks.{l}.mixer.hook_y``            ``[batch, pos, d_inner]``               ``y = C h + D u``, before gating
    ``blocks.{l}.mixer.hook_gate``         ``[batch, pos, d_inner]``               gate ``silu(z)``; out_proj reads ``y * gate``
    ``blocks.{l}.mixer.hook_ssm_out``      ``[batch, pos, d_model]``               out_proj output (the mixer's output)
    ``blocks.{l}.hook_mixer_out``          ``[batch, pos, d_model]``               what the mixer adds to the residual
    ``blocks.{l}.hook_resid_post``         ``[batch, pos, d_model]``               residual stream out of the block
    ``ln_final.hook_scale``                ``[batch, pos, 1]``                     RMS before the unembedding
    ``ln_final.hook_normalized``           ``[batch, pos, d_model]``               normalised final residual
    =====================================  ======================================  =========================================

    With ``cfg.bcdt_norm`` (Falcon-Mamba) the mixer also has RMS norms, each with
    ``hook_scale`` ``[batch, pos, 1]`` and ``hook_normalized``:
    ``mixer.dt_layernorm`` on ``dt`` ``[batch, pos, dt_rank]`` before ``dt_proj``,
    ``mixer.b_layernorm`` and ``mixer.c_layernorm`` on ``B``, ``C`` ``[batch, pos, d_state]``;
    ``hook_B``/``hook_C`` then hold the normalised matrices the scan reads.

    ``hook_in_proj``, ``hook_x_proj``, ``hook_ssm_out`` and the shared names
    agree with TransformerBridge's Mamba aliases (the Bridge's
    ``hook_conv`` is the raw conv1d output; ours is the scan input after SiLU).

    Every hook sits on the path of the computation: an edit changes everything
    downstream (an edit of ``hook_delta``, ``hook_B``, ``hook_C`` or
    ``hook_conv`` changes the scan). ``hook_ssm_state`` is filled only when
    something hooks it; its (possibly edited) states are then the ones read
    out into ``y`` and carried on to the next call, so an edit of ``h_t``
    changes ``y_t`` and, at the last position, every later token of
    ``generate``; it does not re-run the recurrence at positions after ``t``
    of the same call (edit ``hook_delta``/``hook_B``/``hook_conv`` for that).

    ``forward(input, attention_mask=None, state=None, return_state=False)``
    continues from a :class:`MambaState`; one new token costs O(1) in the
    sequence length, and hooks see it as a ``pos = 1`` tensor. Ragged batches
    are left-padded (a ``Prompts``, a list of prompts, or ids with
    ``attention_mask``): at a pad position ``Δ = 0`` (``hook_delta`` shows 0)
    and the convolution reads a zero input and skips it, so the conv and SSM
    states stay exactly what they were and a padded row equals its unpadded
    run at every real position.

    Examples
    --------
    >>> model = HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=50))
    >>> tokens = torch.tensor([[1, 2, 3]])
    >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "ssm_state" in n)
    >>> tuple(cache["blocks.1.mixer.hook_ssm_state"].shape)
    (1, 3, 32, 16)
    """

    architecture: ClassVar[str] = "mamba"
    cfg: MambaConfig

    def __init__(self, cfg: MambaConfig, tokenizer: Any = None):
        super().__init__(cfg, tokenizer)
        add_ssm_stack(self, cfg, MambaBlock)

    def forward(
        self,
        input: TextOrTokens,
        *,
        attention_mask: Tensor | None = None,
        state: MambaState | None = None,
        return_state: bool = False,
    ) -> Float[Tensor, "batch pos d_vocab"] | tuple[Float[Tensor, "batch pos d_vocab"], MambaState]:
        """Logits ``[batch, pos, d_vocab]`` for ``input``, continuing from ``state`` when given.

        Parameters
        ----------
        input : str, list of str, LongTensor ``[batch, pos]``, ragged id lists or Prompts
            Lists become a left-padded ``Prompts``; a ``Prompts`` brings its mask.
        attention_mask : Tensor ``[batch, pos]``, optional
            With a token tensor: True/1 at real tokens, pads on the left.
        state : MambaState, optional
            What a previous call returned with ``return_state=True``.
        return_state : bool
            Also return the :class:`MambaState` after the last position.
        """
        tokens, mask = as_batch(self, input, attention_mask)
        check_state_batch(state, tokens)
        resid = self.hook_embed(self.embed(tokens))
        conv_states, ssm_states = [], []
        for i, block in enumerate(self.blocks):
            resid, conv, ssm = block(
                resid,
                None if state is None else state.conv[i],
                None if state is None else state.ssm[i],
                mask,
            )
            conv_states.append(conv)
            ssm_states.append(ssm)
        logits = final_logits(self, resid)
        if not return_state:
            return logits
        pos = tokens.shape[1] + (0 if state is None else state.pos)
        return logits, MambaState(conv_states, ssm_states, pos)

    # ------------------------------------------------------------ loading/saving
    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: Any = None, *, dtype: torch.dtype = torch.float32) -> HookedMamba:
        """Copy an in-memory HF ``MambaForCausalLM`` into ``dtype`` (weights copied, never shared)."""
        cfg = MambaConfig.from_hf(hf_model.config)
        sd = {k: v.detach().to(dtype=dtype, copy=True) for k, v in hf_model.state_dict().items()}
        return cls._from_hf_state_dict(cfg, sd, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> HookedMamba:
        """Load an HF-format Mamba folder (``config.json`` with ``model_type: "mamba"`` + safetensors).

        The tokenizer is loaded too when the folder has one. Weights are read
        from safetensors only (one file or an index of shards), never unpickled.
        """
        sd, tokenizer = read_model_folder(folder, "Mamba")
        cfg = MambaConfig.from_hf(read_json(Path(folder) / "config.json"))
        sd = {k: v.to(dtype) for k, v in sd.items()}
        return cls._from_hf_state_dict(cfg, sd, tokenizer).to(device)

    @classmethod
    def _from_hf_state_dict(cls, cfg: MambaConfig, sd: dict[str, Tensor], tokenizer: Any) -> HookedMamba:
        sd = {hf_key(k.replace("backbone.embedding.", "backbone.embeddings."), to_hf=False): v for k, v in sd.items()}
        if cfg.tie_embeddings:
            sd["unembed.weight"] = sd["embed.weight"]
        if cfg.bcdt_norm:  # Falcon-Mamba's B, C, dt norms have no weights: ones
            for i in range(cfg.n_layers):
                for name, size in _bcdt_norms(cfg):
                    sd.setdefault(f"blocks.{i}.mixer.{name}.weight", torch.ones(size, dtype=sd["embed.weight"].dtype))
        with on_meta():  # no initialisation: every parameter comes from sd
            model = cls(cfg, tokenizer)
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_embeddings:
            model.unembed.weight = model.embed.weight
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write an HF ``MambaForCausalLM`` (``FalconMambaForCausalLM``) folder: config, safetensors, tokenizer."""
        sd = {hf_key(k, to_hf=True): v for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            del sd["lm_head.weight"]
        if self.cfg.bcdt_norm:  # weightless in Falcon-Mamba
            norms = tuple(f"{name}.weight" for name, _ in _bcdt_norms(self.cfg))
            sd = {k: v for k, v in sd.items() if not k.endswith(norms)}
        hf_config = self.cfg.to_hf()
        hf_config.architectures = ["FalconMambaForCausalLM" if self.cfg.bcdt_norm else "MambaForCausalLM"]
        hf_config.dtype = str(self.embed.weight.dtype).removeprefix("torch.")
        write_model_folder(folder, hf_config.to_dict(), sd, self.tokenizer)


def _bcdt_norms(cfg: MambaConfig) -> tuple[tuple[str, int], ...]:
    """The mixer's ``bcdt_norm`` modules and their widths."""
    return (("dt_layernorm", cfg.dt_rank), ("b_layernorm", cfg.d_state), ("c_layernorm", cfg.d_state))


def _causal_conv1d(
    padded: Float[Tensor, "batch d k_1_plus_pos"], weight: Float[Tensor, "d 1 k"], bias: Tensor | None
) -> Float[Tensor, "batch d pos"]:
    """Depthwise convolution of inputs already left-padded by ``k - 1`` positions.

    Short inputs (decode steps) take a direct weighted sum: ``F.conv1d`` has a
    fixed cost there that dwarfs the arithmetic.
    """
    if padded.shape[-1] - weight.shape[-1] + 1 > 16:
        return F.conv1d(padded, weight, bias, groups=weight.shape[0])
    out = torch.einsum("bdlk,dk->bdl", padded.unfold(-1, weight.shape[-1], 1), weight[:, 0])
    return out if bias is None else out + bias[:, None]


def _skip_pads(padded: Float[Tensor, "batch d k_1_plus_pos"], mask: Bool[Tensor, "batch pos"], k_1: int) -> Tensor:
    """``[previous inputs, inputs]`` with each row's leading pads moved before its previous inputs.

    ``padded`` is ``[conv_state (k_1 columns), xs]`` with ``xs`` zero at pads; a
    left-padded row ``[s, 0 .. 0, x]`` becomes ``[0 .. 0, s, x]``, so the
    convolution at each real token reads what an unpadded run reads, and the
    last ``k_1`` columns are the row's state after the call.
    """
    offsets = (~mask).sum(-1, keepdim=True)  # [batch, 1] pads per row
    j = torch.arange(padded.shape[-1], device=padded.device)[None, :]
    index = torch.where(j < offsets, j + k_1, torch.where(j < offsets + k_1, j - offsets, j))
    return padded.gather(-1, index[:, None, :].expand(-1, padded.shape[1], -1))


def _own_copy(x: Tensor, hook_point: HookPoint) -> Tensor:
    """``x``, copied when ``hook_point`` has hooks: ``x`` is also the value of the hook before it,
    and an in-place edit at ``hook_point`` must not reach what that hook saw."""
    return x.clone() if hook_point.has_hooks() else x


def add_ssm_stack(model: nn.Module, cfg: Any, block: Callable[[Any], nn.Module]) -> None:
    """Give a Mamba-style LM its modules: ``embed``, ``hook_embed``, ``blocks`` of ``block(cfg)``,
    ``ln_final`` (RMSNorm), ``unembed`` (tied to ``embed`` with ``cfg.tie_embeddings``); then ``setup()``."""
    model.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
    model.hook_embed = HookPoint()  # [batch, pos, d_model]
    model.blocks = nn.ModuleList([block(cfg) for _ in range(cfg.n_layers)])
    model.ln_final = RMSNorm(cfg.d_model, cfg.eps)
    model.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
    if cfg.tie_embeddings:
        model.unembed.weight = model.embed.weight
    model.setup()


def check_state_batch(state: Any, tokens: Tensor) -> None:
    """A recurrent state continues only the batch it was returned for."""
    if state is not None and state.ssm[0].shape[0] != tokens.shape[0]:
        raise ValueError(
            f"state holds a batch of {state.ssm[0].shape[0]} sequences but the input has "
            f"{tokens.shape[0]}; pass the state returned for the same batch"
        )


def final_logits(model: nn.Module, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
    """The final norm and the unembedding, in the weights' dtypes; logits at least float32."""
    normed = model.ln_final(resid.to(model.ln_final.weight.dtype))
    return _at_least_fp32(model.unembed(normed.to(model.unembed.weight.dtype)))


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (HF keeps A and D in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def hf_key(key: str, to_hf: bool) -> str:
    """A parameter name of HookedMamba / HookedMamba2 as HF's ``Mamba*ForCausalLM`` spells it, or back."""
    for ours, hf in _HF_PREFIXES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"unexpected Mamba parameter {key!r}; expected names under {[p[not to_hf] for p in _HF_PREFIXES]}")
