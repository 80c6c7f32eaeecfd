"""HookedHybrid: SSM/attention hybrids (Bamba, Nemotron-H, Granite-4-H, Zamba2, Falcon-H1, Jamba) opened up.

One class covers the six: ``models/hybrid_archs.py`` reads a HuggingFace
model of each into :class:`HybridBlock` s (a small table per architecture:
which layer is which, where the norms, mixers and MLPs sit, the
multipliers). In every block

- the Mamba-2 mixers are :class:`~dynalens.models.mamba2.Mamba2Mixer` on our
  SSD kernel with HookedMamba2's hooks (Jamba's Mamba-1 mixers are
  :class:`~dynalens.models.mamba.MambaMixer` with HookedMamba's), their weights
  mapped from HF;
- attention is :class:`~dynalens.models.hybrid_attention.HookedAttention` over
  HF's own projections, with TransformerBridge's names (``attn.hook_q`` ...
  ``attn.hook_pattern``, ``attn.hook_z``);
- MLPs and mixtures of experts stay HF modules (opaque inside; ``hook_mlp_out``
  on their output); norms are our RMSNorm with HF's weights.

A config whose layers dynalens cannot open up loads through the Bridge
instead (:func:`load_hybrid`), with a warning that names those layers.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from dynalens.models.base import HookedSequenceModel, SequenceConfig, TextOrTokens, as_batch
from dynalens.models.compat_transformer_lens import alias_block_hooks
from dynalens.models.hybrid_attention import AttentionContext, HookedAttention
from dynalens.models.io import write_pretrained, write_tokenizer
from dynalens.models.mamba import MambaMixer, RMSNorm, _at_least_fp32, _own_copy
from dynalens.models.mamba2 import Mamba2Mixer, _state_columns
from dynalens.models.state_buffer import sharing_states
from dynalens.models.transformer import HookedTransformerBridge

#: HF ``model_type`` values HookedHybrid opens.
HYBRID_MODEL_TYPES = ("bamba", "nemotron_h", "granitemoehybrid", "zamba2", "falcon_h1", "jamba")
#: What ``model.layer_types`` may hold: the sequence mixer of each layer.
LAYER_TYPES = ("attention", "mamba2", "mamba", "attention+mamba2", "mlp", "moe")


class OpaqueLayersError(ValueError):
    """A hybrid config has layers dynalens cannot open up; ``layers`` lists them."""

    def __init__(self, message: str, layers: Sequence[int]):
        super().__init__(message)
        self.layers = list(layers)


@dataclass
class HybridConfig(SequenceConfig):
    """What a hybrid model is made of.

    ``model_type``: the HF model type; ``layer_types[l]``: layer ``l``'s
    sequence mixer, one of :data:`LAYER_TYPES` (``"attention+mamba2"``: both,
    Falcon-H1's parallel mixers or Zamba2's shared attention block feeding the
    Mamba-2 mixer; ``"mlp"``, ``"moe"``: Nemotron-H's layers whose only mixer
    is a (mixture of) MLP); ``n_heads``, ``n_key_value_heads``, ``d_head``: of
    the attention layers (``None`` without any); ``embed_scale``,
    ``logits_scale``: multipliers on the embedding and the logits (Granite,
    Falcon-H1).
    """

    architecture: ClassVar[str] = "hybrid"

    model_type: str = ""
    layer_types: list[str] = field(default_factory=list)
    n_heads: int | None = None
    n_key_value_heads: int | None = None
    d_head: int | None = None
    embed_scale: float = 1.0
    logits_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"HybridConfig: {len(self.layer_types)} layer_types for n_layers = {self.n_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"HybridConfig.layer_types has {unknown}; accepted: {', '.join(LAYER_TYPES)}")


@dataclass
class LayerState:
    """One layer's carried state: ``conv``, ``ssm`` (SSM layers), ``kv`` (attention: keys and values so far)."""

    conv: Tensor | None = None
    ssm: Tensor | None = None
    kv: tuple[Tensor, Tensor] | None = None


@dataclass
class HybridState:
    """What one call hands the next: each layer's :class:`LayerState`; ``mask`` ``[batch, pos so far]``
    (True at real tokens, what later queries may attend to); ``pos``: positions so far, pads included."""

    layers: list[LayerState]
    mask: Tensor
    pos: int


class HybridBlock(nn.Module):
    """One layer of a hybrid, whatever its type.

    ``resid_mid = resid_pre + mixer_out`` where ``mixer_out = residual_scale *
    (ssm_out * ssm(x) + attn_out * attn(attn_in * x) + mlp(x))`` over the parts the
    layer has, ``x = ln1(resid_pre)``; then, with an MLP,
    ``resid_post = resid_mid + residual_scale * mlp(ln2(resid_mid))``.
    With ``shared`` (Zamba2) the attention block runs first on
    ``[resid_pre, embeddings]``: ``shared_out = linear(mlp(ln_mlp(attn(ln_attn(.)))))``,
    and the SSM reads ``ln1(resid_pre + shared_out)``.
    """

    def __init__(
        self,
        kind: str,
        ln1: RMSNorm,
        *,
        ssm: Mamba2Mixer | MambaMixer | None = None,
        attn: HookedAttention | None = None,
        mixer_mlp: nn.Module | None = None,
        ln2: RMSNorm | None = None,
        mlp: nn.Module | None = None,
        shared: dict[str, nn.Module] | None = None,
        attn_in: float = 1.0,
        attn_out: float = 1.0,
        ssm_out: float = 1.0,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        if kind not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {kind!r}; accepted: {', '.join(LAYER_TYPES)}")
        self.kind = kind
        self.attn_in, self.attn_out, self.ssm_out, self.residual_scale = attn_in, attn_out, ssm_out, residual_scale
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        if shared is not None:  # Zamba2: ln_attn, ln_mlp, mlp, linear
            self.ln_attn, self.ln_mlp = shared["ln_attn"], shared["ln_mlp"]
            self.mlp, self.linear = shared["mlp"], shared["linear"]
            self.hook_shared_out = HookPoint()  # [batch, pos, d_model]: added to the SSM's input
        self.shared = shared is not None
        self.ln1 = ln1
        self.ssm_kind = None if ssm is None else ("mamba2" if isinstance(ssm, Mamba2Mixer) else "mamba")
        if ssm is not None:
            self.mixer = ssm
        self.parallel_attn = attn is not None and shared is None  # attention beside the SSM, not feeding it
        if attn is not None:
            self.attn = attn
            self.hook_attn_out = HookPoint()  # [batch, pos, d_model]: o_proj's output
        if mixer_mlp is not None or mlp is not None or shared is not None:
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        if mixer_mlp is not None:
            self.mlp = mixer_mlp
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.has_mlp = mlp is not None and shared is None
        if self.has_mlp:
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
            self.ln2, self.mlp = ln2, mlp
        self.mixer_mlp = mixer_mlp is not None
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        mask: Tensor | None,
        ctx: AttentionContext,
        state: LayerState,
        positions: Tensor | None,
        embeddings: Tensor,
    ) -> tuple[Float[Tensor, "batch pos d_model"], LayerState]:
        new = LayerState()
        resid = self.hook_resid_pre(_own_copy(resid, self.hook_resid_pre))
        ssm_in = resid
        if self.shared:
            h = self.ln_attn(torch.cat([resid, embeddings], dim=-1))
            attended, new.kv = self.attn(h, ctx, state.kv)
            h = self.mlp(self.ln_mlp(self.hook_attn_out(attended)))
            ssm_in = resid + self.hook_shared_out(self.linear(self.hook_mlp_out(h)))
        x = self.ln1(ssm_in)
        parts = []
        if self.ssm_kind == "mamba2":
            out, new.conv, new.ssm = self.mixer(x, mask, state.conv, state.ssm, positions)
            parts.append(out * self.ssm_out if self.ssm_out != 1.0 else out)
        elif self.ssm_kind == "mamba":
            out, new.conv, new.ssm = self.mixer(x, state.conv, state.ssm, mask)
            parts.append(out)
        if self.parallel_attn:
            attended, new.kv = self.attn(x * self.attn_in if self.attn_in != 1.0 else x, ctx, state.kv)
            attended = self.hook_attn_out(attended)
            parts.append(attended * self.attn_out if self.attn_out != 1.0 else attended)
        if self.mixer_mlp:
            parts.append(self.hook_mlp_out(self.mlp(x)))
        mixed = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if self.residual_scale != 1.0:
            mixed = mixed * self.residual_scale
        resid = resid + self.hook_mixer_out(_own_copy(mixed, self.hook_mixer_out))
        if self.has_mlp:
            resid = self.hook_resid_mid(resid)
            out = self.mlp(self.ln2(resid))
            out = self.hook_mlp_out(out * self.residual_scale if self.residual_scale != 1.0 else out)
            resid = resid + out
        return self.hook_resid_post(resid), new


class HookedHybrid(HookedSequenceModel):
    """An SSM/attention hybrid with every SSM and attention intermediate hooked.

    Build one with ``dl.load(folder)``, :meth:`from_pretrained` or
    :meth:`from_hf` (Bamba, Nemotron-H, GraniteMoeHybrid, Zamba2, Falcon-H1,
    Jamba). ``model.layer_types[l]`` says what layer ``l`` mixes with (see
    :data:`LAYER_TYPES`). Hooks (``l`` a layer):

    - every layer: ``blocks.{l}.hook_resid_pre``, ``ln1.hook_scale``,
      ``ln1.hook_normalized``, ``hook_mixer_out`` (what the layer's mixers add
      to the residual stream, multipliers included), ``hook_resid_post``; with
      an MLP after the mixer: ``hook_resid_mid``, ``ln2.*``, ``hook_mlp_out``
      (what the MLP adds, Granite's residual multiplier included), so
      ``resid_post = resid_pre + mixer_out (+ mlp_out)``;
    - SSM layers: ``blocks.{l}.mixer.hook_*``, exactly HookedMamba2's (Mamba-2:
      ``hook_in_proj``, ``hook_conv``, ``hook_x``, ``hook_B``, ``hook_C``,
      ``hook_dt``, ``hook_ssm_state``, ``hook_y``, ``hook_gate``, ``hook_norm``,
      ``hook_ssm_out``) or HookedMamba's (Jamba's Mamba-1 layers, with the
      ``dt_layernorm``, ``b_layernorm``, ``c_layernorm`` norms);
    - attention layers: ``blocks.{l}.attn.hook_q``, ``hook_k``, ``hook_v``
      ``[batch, pos, heads, d_head]``, ``hook_rot_q``, ``hook_rot_k`` (with
      rotary), ``hook_attn_scores``, ``hook_pattern`` ``[batch, head, q, k]``,
      ``hook_z``, and ``blocks.{l}.hook_attn_out`` (o_proj's output, before
      Falcon-H1's and Granite's multipliers);
    - Zamba2's hybrid layers also ``ln_attn.*``, ``ln_mlp.*``, ``hook_mlp_out``
      and ``hook_shared_out`` (the shared block's output, added to the Mamba
      layer's input);
    - ``hook_embed`` (after the embedding multiplier), ``ln_final.hook_scale``,
      ``ln_final.hook_normalized``.

    Ragged batches are left-padded: on SSM layers a pad has ``dt = 0`` and a
    zero convolution input (the states pass it unchanged), on attention layers
    pads are masked out as keys and rotary positions count real tokens, so a
    padded row equals its unpadded run. ``forward(..., state=..., return_state=True)``
    continues a sequence (:class:`HybridState`), and ``generate`` takes one
    step per new token. ``state_positions`` forms Mamba-2 layers' states only
    at the chosen positions (Mamba-1 layers form them all).
    """

    architecture: ClassVar[str] = "hybrid"
    cfg: HybridConfig

    def __init__(
        self,
        cfg: HybridConfig,
        embed: nn.Embedding,
        blocks: Sequence[HybridBlock],
        ln_final: RMSNorm,
        unembed: nn.Linear,
        rotary: nn.Module | None = None,
        tokenizer: Any = None,
        hf_config: Any = None,
    ):
        super().__init__(cfg, tokenizer)
        self.hf_config = hf_config  # the HF config it was read from: save_pretrained writes that model type
        self.embed = embed
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(blocks)
        self.ln_final = ln_final
        self.unembed = unembed
        self.rotary = rotary
        self.setup()

    @property
    def layer_types(self) -> list[str]:
        """Each layer's sequence mixer, one of :data:`LAYER_TYPES`."""
        return list(self.cfg.layer_types)

    def forward(
        self,
        input: TextOrTokens,
        *,
        attention_mask: Tensor | None = None,
        state: HybridState | None = None,
        return_state: bool = False,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | tuple[Float[Tensor, "batch pos d_vocab"], HybridState]:
        """Logits ``[batch, pos, d_vocab]`` for ``input``, continuing from ``state`` when given.

        The arguments are :meth:`HookedMamba2.forward`'s (``state`` a
        :class:`HybridState`); ``state_positions`` applies to the Mamba-2 layers.
        """
        tokens, mask = as_batch(self, input, attention_mask)
        b = tokens.shape[0]
        if state is not None and state.mask.shape[0] != b:
            raise ValueError(
                f"state holds a batch of {state.mask.shape[0]} sequences but the input has {b}; "
                "pass the state returned for the same batch"
            )
        real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        past = real[:, :0] if state is None else state.mask.to(real.device)
        columns = None
        if state_positions is not None:
            columns = _state_columns(state_positions, mask, tokens.shape).to(tokens.device)
        resid = self.embed(tokens)
        if self.cfg.embed_scale != 1.0:
            resid = resid * self.cfg.embed_scale
        resid = self.hook_embed(resid)
        embeddings = resid
        ctx = AttentionContext(torch.cat([past, real], dim=1), past.shape[1])
        if self.rotary is not None:
            positions = (past.sum(-1, keepdim=True) + real.cumsum(-1) - 1).clamp(min=0)
            ctx.cos, ctx.sin = self.rotary(resid, positions)
        layers = []
        with sharing_states():
            for i, block in enumerate(self.blocks):
                resid, layer_state = block(
                    resid, mask, ctx, LayerState() if state is None else state.layers[i], columns, embeddings
                )
                layers.append(layer_state)
        logits = self.unembed_resid(resid)
        if not return_state:
            return logits
        pos = tokens.shape[1] + (0 if state is None else state.pos)
        return logits, HybridState(layers, ctx.key_mask, pos)

    def unembed_resid(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        """Logits of residual vectors: the final norm, the unembedding and the logits multiplier."""
        normed = self.ln_final(resid.to(self.ln_final.weight.dtype))
        logits = _at_least_fp32(self.unembed(normed.to(self.unembed.weight.dtype)))
        return logits * self.cfg.logits_scale if self.cfg.logits_scale != 1.0 else logits

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        """The embedding matrix, with the embedding multiplier: ``hook_embed = W_E[tokens]``."""
        return self.embed.weight * self.cfg.embed_scale if self.cfg.embed_scale != 1.0 else self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding (TransformerLens layout), with the logits multiplier."""
        w = self.unembed.weight.T
        return w * self.cfg.logits_scale if self.cfg.logits_scale != 1.0 else w

    # ------------------------------------------------------------ loading
    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: Any = None, *, dtype: torch.dtype = torch.float32) -> HookedHybrid:
        """Open up an in-memory HF hybrid (copied into ``dtype``; the HF model is left as it was).

        Raises :class:`OpaqueLayersError` when some layers cannot be opened up
        (:func:`load_hybrid` then falls back to the Bridge).
        """
        return cls._own(copy.deepcopy(hf_model).to(dtype), tokenizer)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> HookedHybrid:
        """Load an HF hybrid folder (safetensors only) and its tokenizer if any."""
        hf_model, tokenizer = _hf_from_folder(folder, dtype)
        return cls._own(hf_model, tokenizer).to(device or "cpu")

    @classmethod
    def _own(cls, hf_model: nn.Module, tokenizer: Any) -> HookedHybrid:
        """Build from ``hf_model``, taking its modules over (the SSM mixers' weights are mapped into ours)."""
        from dynalens.models.hybrid_archs import read_hybrid

        parts = read_hybrid(hf_model)
        return cls(
            parts.cfg, parts.embed, parts.blocks, parts.ln_final, parts.unembed, parts.rotary, tokenizer,
            copy.deepcopy(hf_model.config),
        ).eval()  # fmt: skip

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the HF folder this model was read from, with its current weights.

        ``config.json`` is the HF config (same ``model_type``), the weights are
        ``model.safetensors`` in HF's names, the tokenizer is written when there
        is one: ``dl.load`` and HF's own ``*ForCausalLM`` read the folder back.
        Raises ``ValueError`` when a weight of ours is not one of HF's as such
        (Falcon-H1 folds its multipliers into the SSM's ``in_proj``).
        """
        if self.hf_config is None:
            raise ValueError("this HookedHybrid was not read from an HF model (hf_config is None); it has no HF format")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.embed.weight.dtype)  # weights replaced below
        twin = type(self)._own(hf, None)  # its parameters are views of hf's
        hf_weights = {k: v.untyped_storage().data_ptr() for k, v in hf.state_dict().items()}
        twin_params = twin.state_dict(keep_vars=True)
        written = {v.untyped_storage().data_ptr() for v in twin_params.values()}
        ours = self.state_dict()
        unmapped = [  # an ungated mixer's norm weight is ours alone, and ones
            k for k, v in twin_params.items() if v.untyped_storage().data_ptr() not in set(hf_weights.values())
            and not (k.endswith("mixer.norm.weight") and bool((ours[k] == 1).all()))
        ] + [k for k, ptr in hf_weights.items() if ptr not in written]  # fmt: skip
        if unmapped:
            raise ValueError(
                f"{self.cfg.model_type}: {len(unmapped)} weights do not map one to one between this model and "
                f"HF's ({', '.join(unmapped[:4])}); it cannot be written in HF's format"
            )
        with torch.no_grad():
            for name, param in twin_params.items():
                param.copy_(ours[name])
        write_pretrained(hf, folder)
        if self.tokenizer is not None:
            write_tokenizer(self.tokenizer, folder)


class HybridBridge(HookedTransformerBridge):
    """A hybrid dynalens cannot open up, behind TransformerBridge (its SSM layers stay opaque).

    ``blocks.{l}.hook_mixer_out`` is the attention output on attention blocks
    and the SSM mixer's output (the Bridge's ``mixer.hook_out``) on the others.
    """

    architecture: ClassVar[str] = "hybrid"

    @property
    def layer_types(self) -> list[str]:
        """Each layer's sequence mixer, as in :attr:`HookedHybrid.layer_types`."""
        return list(self.cfg.layer_types)

    def _add_mixer_aliases(self) -> None:
        targets = []
        for block in self.blocks:
            children = {name for name, _ in block.named_children()}
            if "attn" in children:
                targets.append(block.hook_aliases.get("hook_attn_out", "hook_attn_out"))
            else:
                targets.append("mixer.hook_out" if "mixer" in children else "hook_out")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # aliases of sub-modules a block lacks
            alias_block_hooks(self, [{"hook_mixer_out": target} for target in targets])


def load_hybrid(
    folder: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **placement: Any
) -> HookedHybrid | HybridBridge:
    """``dl.load`` of a hybrid folder: a :class:`HookedHybrid`, or the Bridge with a warning.

    The Bridge takes the model when some of its layers cannot be opened up
    (e.g. an SSM activation other than SiLU); the warning names those layers.
    ``placement`` (``device_map``...) places a HookedHybrid block by block.
    """
    from dynalens.models.hybrid_archs import hf_layer_types

    placement = {k: v for k, v in placement.items() if v is not None}
    hf_model, tokenizer = _hf_from_folder(folder, dtype or torch.float32)
    try:
        model = HookedHybrid._own(hf_model, tokenizer).to(device or "cpu")
    except OpaqueLayersError as err:
        warnings.warn(
            f"{folder}: layers {err.layers} stay opaque ({err}); the model loads through TransformerBridge, "
            "where their internals are not hooked",
            stacklevel=2,
        )
        if placement:
            hf_model, _ = _hf_from_folder(folder, dtype or torch.float32, **placement)
        else:
            hf_model = hf_model.to(device or "cpu")
        bridge = HybridBridge.from_hf(hf_model, tokenizer, name=str(folder))
        bridge.cfg.layer_types = hf_layer_types(hf_model)
        return bridge
    if placement.get("device_map") is None:
        return model
    from dynalens.models.placement import place

    return place(model, placement["device_map"], max_memory=placement.get("max_memory"),
                 offload_folder=placement.get("offload_folder"))  # fmt: skip


def _hf_from_folder(folder: str | Path, dtype: torch.dtype, **placement: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    from dynalens.models.io import read_tokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(
        Path(folder), dtype=dtype, use_safetensors=True, attn_implementation="eager", **placement
    )
    return hf_model.eval(), read_tokenizer(Path(folder))
