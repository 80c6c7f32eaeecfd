"""The per-architecture table of HookedHybrid: how each HF hybrid becomes :class:`HybridBlock` s.

Each reader walks an HF ``*ForCausalLM`` and returns :class:`HybridParts`:
the embedding, one block per layer (its type, norms, mixers, MLP or experts,
multipliers), the final norm, the unembedding and the rotary module. The
pieces shared by all six are the converters below: :func:`norm` (an HF RMSNorm
→ ours, the same weight), :func:`ssd_mixer` (an HF Mamba-2 mixer → our
``Mamba2Mixer`` on the SSD kernel, weights mapped), :func:`selective_mixer`
(Jamba's Mamba-1 mixer → ``MambaMixer``) and :func:`attention` (an HF
attention module's projections → :class:`HookedAttention`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynalens.models.hybrid import HYBRID_MODEL_TYPES, HybridBlock, HybridConfig, OpaqueLayersError
from dynalens.models.hybrid_attention import HookedAttention
from dynalens.models.mamba import MambaConfig, MambaMixer, RMSNorm
from dynalens.models.mamba2 import Mamba2Config, Mamba2Mixer
from dynalens.models.building import on_meta


@dataclass
class HybridParts:
    """What :class:`~dynalens.models.hybrid.HookedHybrid` is built from."""

    cfg: HybridConfig
    embed: nn.Embedding
    blocks: list[HybridBlock]
    ln_final: RMSNorm
    unembed: nn.Linear
    rotary: nn.Module | None


@dataclass
class SSDMixerConfig(Mamba2Config):
    """A ``Mamba2Config`` for one mixer of a hybrid.

    Its width ``d_inner = n_heads * d_head`` need not be ``expand * d_model``
    (Falcon-H1's ``mamba_d_ssm``); ``n_layers`` and ``d_vocab`` are unused.
    """

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "d_head", "d_state", "n_groups", "d_conv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SSDMixerConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"SSDMixerConfig.n_groups ({self.n_groups}) must divide n_heads ({self.n_heads})")
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)


# ------------------------------------------------------------------ converters
def norm(hf_norm: nn.Module) -> RMSNorm:
    """Our hooked RMSNorm with an HF RMSNorm's weight (the same parameter) and epsilon."""
    eps = getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", None))
    ours = RMSNorm(hf_norm.weight.shape[0], float(eps))
    ours.weight = hf_norm.weight
    return ours


def ssd_mixer(hf: nn.Module, layer: int, input_scale: float = 1.0, proj_scale: Tensor | None = None) -> Mamba2Mixer:
    """Our Mamba-2 mixer with an HF hybrid's Mamba-2 mixer weights.

    Falcon-H1 multiplies the mixer's input by ``input_scale`` and ``in_proj``'s
    output by ``proj_scale`` (one number per output); both are folded into ``in_proj``.
    """
    if getattr(hf, "activation", "silu") != "silu":
        raise OpaqueLayersError(
            f"layer {layer}'s Mamba-2 mixer uses activation {hf.activation!r}; dynalens' mixer applies 'silu'",
            [layer],
        )
    gated = hf.norm if not isinstance(hf.norm, nn.Identity) else None
    d_model = hf.in_proj.in_features
    cfg = SSDMixerConfig(
        d_model=d_model, n_layers=1, d_vocab=1, n_heads=hf.num_heads, d_head=hf.head_dim, d_state=hf.ssm_state_size,
        n_groups=hf.n_groups, d_conv=hf.conv_kernel_size, chunk_size=hf.chunk_size,
        use_bias=hf.in_proj.bias is not None, use_conv_bias=hf.conv1d.bias is not None,
        eps=float(gated.variance_epsilon) if gated is not None else 1e-5,
        time_step_limit=tuple(hf.time_step_limit), rmsnorm=gated is not None,
        norm_before_gate=bool(getattr(gated, "norm_before_gate", False)),
    )  # fmt: skip
    if cfg.n_heads * cfg.d_head + cfg.conv_dim + cfg.n_heads != hf.in_proj.out_features:
        raise OpaqueLayersError(f"layer {layer}'s Mamba-2 in_proj has an unexpected width", [layer])
    with on_meta():
        ours = Mamba2Mixer(cfg)
        if (hf.out_proj.bias is not None) != cfg.use_bias:
            ours.out_proj = nn.Linear(cfg.d_inner, d_model, bias=hf.out_proj.bias is not None)
    sd = {k: v for k, v in hf.state_dict().items() if k in dict(ours.named_parameters())}
    if gated is None:
        sd["norm.weight"] = torch.ones(cfg.d_inner, dtype=sd["D"].dtype, device=sd["D"].device)
    if proj_scale is not None or input_scale != 1.0:
        weight = sd["in_proj.weight"]
        scale = torch.ones(()) if proj_scale is None else proj_scale.reshape(-1, 1)
        scale = scale.to(weight)
        sd["in_proj.weight"] = weight * (scale * input_scale)
        if "in_proj.bias" in sd:
            sd["in_proj.bias"] = sd["in_proj.bias"] * scale.reshape(-1)
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours


def selective_mixer(hf: nn.Module, layer: int) -> MambaMixer:
    """Our Mamba-1 mixer with an HF Jamba mixer's weights (its dt, B, C norms included)."""
    if getattr(hf, "activation", "silu") != "silu":
        raise OpaqueLayersError(
            f"layer {layer}'s Mamba mixer uses activation {hf.activation!r}; dynalens' mixer applies 'silu'",
            [layer],
        )
    d_model, d_inner = hf.in_proj.in_features, hf.in_proj.out_features // 2
    if d_inner % d_model:
        raise OpaqueLayersError(f"layer {layer}'s Mamba width {d_inner} is not a multiple of {d_model}", [layer])
    has_norms = hasattr(hf, "b_layernorm")
    cfg = MambaConfig(
        d_model=d_model, n_layers=1, d_vocab=1, d_state=hf.ssm_state_size, expand=d_inner // d_model,
        dt_rank=hf.time_step_rank, d_conv=hf.conv_kernel_size, use_bias=hf.in_proj.bias is not None,
        use_conv_bias=hf.conv1d.bias is not None, bcdt_norm=has_norms,
        bcdt_eps=float(hf.b_layernorm.variance_epsilon) if has_norms else 1e-6,
    )  # fmt: skip
    with on_meta():
        ours = MambaMixer(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)
    return ours


def attention(hf: nn.Module, *, rotary: bool, key_scale: float = 1.0, adapters=None) -> HookedAttention:
    """:class:`HookedAttention` over an HF attention module's projections and scaling."""
    d = hf.head_dim
    return HookedAttention(
        hf.q_proj, hf.k_proj, hf.v_proj, hf.o_proj, n_heads=hf.q_proj.out_features // d,
        n_kv_heads=hf.k_proj.out_features // d, d_head=d, scale=float(hf.scaling), rotary=rotary,
        key_scale=float(key_scale), adapters=adapters,
    )  # fmt: skip


class _Experts(nn.Module):
    """GraniteMoeHybrid's feed-forward: routed experts (when there are any) plus the shared MLP."""

    def __init__(self, experts: nn.Module | None, shared: nn.Module):
        super().__init__()
        self.experts, self.shared = experts, shared

    def forward(self, x: Tensor) -> Tensor:
        return self.shared(x) if self.experts is None else self.experts(x) + self.shared(x)


class _LayerMLP(nn.Module):
    """Zamba2's shared MLP as called from one layer (its per-layer adapter picked by ``layer``)."""

    def __init__(self, mlp: nn.Module, layer: int):
        super().__init__()
        self.inner, self.layer = mlp, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x, self.layer)


# --------------------------------------------------------------------- readers
def _bamba(hf: nn.Module) -> tuple[list[HybridBlock], dict]:
    m = hf.model
    blocks = []
    for i, layer in enumerate(m.layers):
        mixer = {"ssm": ssd_mixer(layer.mamba, i)} if layer.block_type == "linear_attention" else {}
        if not mixer:
            mixer = {"attn": attention(layer.self_attn, rotary=True)}
        kind = "mamba2" if "ssm" in mixer else "attention"
        blocks.append(HybridBlock(kind, norm(layer.input_layernorm), **mixer, ln2=norm(layer.pre_ff_layernorm),
                                  mlp=layer.feed_forward))  # fmt: skip
    return blocks, dict(embed=m.embed_tokens, ln_final=m.final_layernorm, rotary=m.rotary_emb)


def _nemotron_h(hf: nn.Module) -> tuple[list[HybridBlock], dict]:
    m = hf.model
    blocks = []
    for i, layer in enumerate(m.layers):
        kind = layer.block_type
        if kind == "linear_attention":
            block = HybridBlock("mamba2", norm(layer.norm), ssm=ssd_mixer(layer.mixer, i))
        elif kind == "full_attention":
            block = HybridBlock("attention", norm(layer.norm), attn=attention(layer.mixer, rotary=False))
        elif kind in ("mlp", "moe"):
            block = HybridBlock(kind, norm(layer.norm), mixer_mlp=layer.mixer)
        else:
            raise OpaqueLayersError(f"layer {i} has block type {kind!r}", [i])
        blocks.append(block)
    return blocks, dict(embed=m.embeddings, ln_final=m.norm_f, rotary=None)


def _granitemoehybrid(hf: nn.Module) -> tuple[list[HybridBlock], dict]:
    m = hf.model
    blocks = []
    for i, layer in enumerate(m.layers):
        if layer.mamba is not None:
            kind, mixer = "mamba2", {"ssm": ssd_mixer(layer.mamba, i)}
        else:
            kind, mixer = "attention", {"attn": attention(layer.self_attn, rotary=m.rotary_emb is not None)}
        ffn = _Experts(layer.block_sparse_moe if layer.has_experts else None, layer.shared_mlp)
        blocks.append(HybridBlock(kind, norm(layer.input_layernorm), **mixer, ln2=norm(layer.post_attention_layernorm),
                                  mlp=ffn, residual_scale=float(layer.residual_multiplier)))  # fmt: skip
    scales = dict(embed_scale=float(m.embedding_multiplier), logits_scale=1.0 / float(hf.config.logits_scaling))
    return blocks, dict(embed=m.embed_tokens, ln_final=m.norm, rotary=m.rotary_emb, **scales)


def _zamba2(hf: nn.Module) -> tuple[list[HybridBlock], dict]:
    m, config = hf.model, hf.config
    blocks = []
    for i, layer in enumerate(m.layers):
        if not hasattr(layer, "shared_transformer"):
            blocks.append(HybridBlock("mamba2", norm(layer.input_layernorm), ssm=ssd_mixer(layer.mamba, i)))
            continue
        shared, mamba = layer.shared_transformer, layer.mamba_decoder
        hf_attn = shared.self_attn
        adapters = None
        if config.use_shared_attention_adapter:
            k = hf_attn.layer_dic[i]
            adapters = (hf_attn.linear_q_adapter_list[k], hf_attn.linear_k_adapter_list[k],
                        hf_attn.linear_v_adapter_list[k])  # fmt: skip
        parts = dict(ln_attn=norm(shared.input_layernorm), ln_mlp=norm(shared.pre_ff_layernorm),
                     mlp=_LayerMLP(shared.feed_forward, i), linear=layer.linear)  # fmt: skip
        attn = attention(hf_attn, rotary=bool(config.use_mem_rope), adapters=adapters)
        blocks.append(HybridBlock("attention+mamba2", norm(mamba.input_layernorm), ssm=ssd_mixer(mamba.mamba, i),
                                  attn=attn, shared=parts))  # fmt: skip
    rotary = m.rotary_emb if config.use_mem_rope else None
    return blocks, dict(embed=m.embed_tokens, ln_final=m.final_layernorm, rotary=rotary)


def _falcon_h1(hf: nn.Module) -> tuple[list[HybridBlock], dict]:
    m = hf.model
    blocks = []
    for i, layer in enumerate(m.layers):
        mamba = layer.mamba
        ssm = ssd_mixer(mamba, i, input_scale=float(mamba.ssm_in_multiplier), proj_scale=mamba.mup_vector)
        attn = attention(layer.self_attn, rotary=True, key_scale=layer.self_attn.key_multiplier)
        blocks.append(HybridBlock(
            "attention+mamba2", norm(layer.input_layernorm), ssm=ssm, attn=attn, ln2=norm(layer.pre_ff_layernorm),
            mlp=layer.feed_forward, attn_in=float(layer.attention_in_multiplier),
            attn_out=float(layer.attn_out_multiplier), ssm_out=float(layer.ssm_out_multiplier),
        ))  # fmt: skip
    scales = dict(embed_scale=float(m.embedding_multiplier), logits_scale=float(m.lm_head_multiplier))
    return blocks, dict(embed=m.embed_tokens, ln_final=m.final_layernorm, rotary=m.rotary_emb, **scales)


def _jamba(hf: nn.Module) -> tuple[list[HybridBlock], dict]:
    m = hf.model
    blocks = []
    for i, layer in enumerate(m.layers):
        if hasattr(layer, "mamba"):
            kind, mixer = "mamba", {"ssm": selective_mixer(layer.mamba, i)}
        else:
            kind, mixer = "attention", {"attn": attention(layer.self_attn, rotary=False)}
        blocks.append(HybridBlock(kind, norm(layer.input_layernorm), **mixer, ln2=norm(layer.pre_ff_layernorm),
                                  mlp=layer.feed_forward))  # fmt: skip
    return blocks, dict(embed=m.embed_tokens, ln_final=m.final_layernorm, rotary=None)


#: HF ``model_type`` → reader: ``hf_model → (blocks, model parts)``.
READERS: dict[str, Callable[[nn.Module], tuple[list[HybridBlock], dict]]] = {
    "bamba": _bamba,
    "nemotron_h": _nemotron_h,
    "granitemoehybrid": _granitemoehybrid,
    "zamba2": _zamba2,
    "falcon_h1": _falcon_h1,
    "jamba": _jamba,
}
assert set(READERS) == set(HYBRID_MODEL_TYPES)


def read_hybrid(hf: nn.Module) -> HybridParts:
    """The parts of a HookedHybrid, from an HF hybrid ``*ForCausalLM``.

    Raises ``ValueError`` for a model type outside :data:`READERS` and
    :class:`OpaqueLayersError` naming every layer that cannot be opened up.
    """
    model_type = getattr(hf.config, "model_type", None)
    if model_type not in READERS:
        raise ValueError(f"HookedHybrid opens {', '.join(READERS)} models, not model_type {model_type!r}")
    opaque = _opaque_layers(hf)
    if opaque:
        reasons = sorted(set(opaque.values()))
        raise OpaqueLayersError("; ".join(reasons), sorted(opaque))
    blocks, parts = READERS[model_type](hf)
    attn = next((b.attn for b in blocks if hasattr(b, "attn")), None)
    embed = parts.pop("embed")
    cfg = HybridConfig(
        d_model=embed.weight.shape[1], n_layers=len(blocks), d_vocab=embed.weight.shape[0], model_type=model_type,
        layer_types=[b.kind for b in blocks], n_heads=getattr(attn, "n_heads", None),
        n_key_value_heads=getattr(attn, "n_kv_heads", None), d_head=getattr(attn, "d_head", None),
        embed_scale=parts.pop("embed_scale", 1.0), logits_scale=parts.pop("logits_scale", 1.0),
    )  # fmt: skip
    return HybridParts(cfg, embed, blocks, norm(parts["ln_final"]), hf.lm_head, parts["rotary"])


def _opaque_layers(hf: nn.Module) -> dict[int, str]:
    """Layer → why it stays opaque: SSM mixers whose activation is not SiLU."""
    found = {}
    for i, module in enumerate(hf.model.layers):
        for sub in module.modules():
            act = getattr(sub, "activation", None)
            if hasattr(sub, "A_log") and isinstance(act, str) and act != "silu":
                found[i] = f"their SSM mixers use activation {act!r}, dynalens' mixers apply 'silu'"
    return found


def hf_layer_types(hf: nn.Module) -> list[str]:
    """``layer_types`` of an HF hybrid read from its modules (for models left to the Bridge).

    A layer with an ``A_log`` parameter has an SSM (Mamba-1 when ``A_log`` is a
    matrix, Mamba-2 when a vector per head), one with a ``q_proj`` attention; a
    layer with neither is an MLP, or ``"moe"`` with a module holding ``experts``.
    """
    types = []
    for layer in hf.model.layers:
        a_logs = [sub.A_log for sub in layer.modules() if isinstance(getattr(sub, "A_log", None), Tensor)]
        ssm = None if not a_logs else "mamba" if a_logs[0].dim() == 2 else "mamba2"
        attn = any(hasattr(sub, "q_proj") for sub in layer.modules())
        if ssm and attn:
            types.append(f"attention+{ssm}")
        elif ssm or attn:
            types.append(ssm or "attention")
        else:
            types.append("moe" if any(hasattr(sub, "experts") for sub in layer.modules()) else "mlp")
    return types
