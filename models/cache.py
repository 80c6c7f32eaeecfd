"""One cache type for every architecture: TransformerLens' ``ActivationCache``, extended.

``run_with_cache`` of every dynalens model (transformers through the Bridge,
``HookedMamba``, ``HookedRNN``) returns a :class:`Cache`. It keeps every
``ActivationCache`` behaviour and makes the architecture-independent methods
work on all three families:

- short names: ``cache["resid_post", -1]``, ``cache["ssm_state", 0]``
  (``blocks.0.mixer.hook_ssm_state``), ``cache["hidden", 1]``
  (``blocks.1.cell.hook_hidden``), ``cache["pattern", 0]``, ``cache["embed"]``;
- :meth:`Cache.stack_activation`, :meth:`Cache.accumulated_resid`,
  :meth:`Cache.decompose_resid` and :meth:`Cache.logit_attrs`;
- methods with no meaning for an architecture (head results on an RNN or a
  Mamba) raise :class:`CacheMethodError` naming the method and the
  architectures it applies to.

Hook names are built by :mod:`dynalens.models.names` only.

Examples
--------
>>> import torch
>>> from dynalens.models import HookedMamba, MambaConfig
>>> model = HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=50))
>>> tokens = torch.tensor([[1, 2, 3]])
>>> logits, cache = model.run_with_cache(tokens)
>>> stack = cache.accumulated_resid(apply_ln=True)        # [n_layers + 1, batch, pos, d_model]
>>> cache.logit_attrs(stack, tokens).shape                 # logit lens of each token
torch.Size([3, 1, 3])
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice

from dynalens.models import names

TRANSFORMERS = ("transformer",)
# Short names of per-layer hooks, resolved in this order of places (first one the
# cache or the model has wins): the block itself, attention, an SSM mixer, an RNN cell.
_STREAM = {
    "resid_pre": names.resid_pre,
    "resid_mid": names.resid_mid,
    "resid_post": names.resid_post,
    "mixer_out": names.mixer_out,
    "attn_out": names.attn_out,
    "mlp_out": names.mlp_out,
}
_TOP = {
    "embed": names.EMBED,
    "pos_embed": names.POS_EMBED,
    "scale": names.FINAL_SCALE,
    "normalized": names.FINAL_NORMALIZED,
}


class CacheMethodError(TypeError):
    """A cache method that has no meaning for the model's architecture."""


class Cache(ActivationCache):
    """Cached activations of one forward pass, for every architecture.

    Parameters
    ----------
    cache_dict : dict of str to Tensor
        Hook name → activation ``[batch, pos, ...]``.
    model
        The model that ran (``cache.model``); its ``cfg.architecture`` picks
        what each method means.
    has_batch_dim : bool
        Whether the activations keep their batch axis.
    prompts : Prompts, optional
        The batch the forward ran on, when it was given as a ``Prompts`` (or
        strings/ragged ids, which became one); ``None`` for a token tensor.
    """

    def __init__(
        self,
        cache_dict: dict[str, Tensor],
        model: Any,
        has_batch_dim: bool = True,
        prompts: Any = None,
    ):
        super().__init__(cache_dict, model, has_batch_dim)
        self.prompts = prompts

    # ------------------------------------------------------------------ basics
    @property
    def architecture(self) -> str:
        """The model's architecture: ``"transformer"``, ``"mamba"``, ``"rnn"``..."""
        return str(getattr(self.model.cfg, "architecture", "transformer"))

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def __repr__(self) -> str:
        return f"Cache({self.architecture}, {len(self.cache_dict)} activations: {list(self.cache_dict)[:6]}...)"

    def to(self, device: str | torch.device, move_model: bool | None = None) -> Cache:
        """The cache with every activation on ``device`` (the model stays where it is)."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def apply_slice_to_batch_dim(self, batch_slice: Any) -> Cache:
        """A new cache with ``batch_slice`` applied to every activation's batch axis."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return Cache(sliced.cache_dict, self.model, sliced.has_batch_dim)

    def resolve(self, key: str | tuple) -> str:
        """The full hook name of a key: a full name, a short name or ``(name, layer[, sublayer])``.

        ``layer`` may be negative (counted from the end). ``name`` is a stream
        name (``resid_pre``, ``resid_mid``, ``resid_post``, ``mixer_out``,
        ``attn_out``, ``mlp_out``) or a hook of the layer's attention
        (``pattern``, ``z``...), SSM mixer (``ssm_state``, ``delta``...) or RNN
        cell (``hidden``, ``forget_gate``...); ``sublayer`` names a module inside
        the block (``"ln1"``, ``"norm"``...).
        """
        if isinstance(key, str):
            if key in self.cache_dict:
                return key
            if key in _TOP:
                return _TOP[key]
            if "." in key or key.startswith("hook_"):
                return key
            raise KeyError(
                f"{key!r} is neither a hook name in this cache nor a short name: short names "
                f"outside the blocks are {sorted(_TOP)}; per-layer names take a layer, "
                f"e.g. cache[{key!r}, 0]"
            )
        if not isinstance(key, tuple) or not 1 <= len(key) <= 3:
            raise KeyError(f"cache keys are hook names or (name, layer[, sublayer]) tuples, got {key!r}")
        part, layer, sublayer = (*key, None, None)[:3]
        if layer is None:
            return self.resolve(part)
        layer = self._layer(layer)
        candidates = self._candidates(part, layer, sublayer)
        hook_dict = getattr(self.model, "hook_dict", {})
        for pool in (self.cache_dict, hook_dict):
            for name in candidates:
                if name in pool:
                    return name
        return candidates[0]

    def _candidates(self, part: str, layer: int, sublayer: str | None) -> list[str]:
        if sublayer is not None:
            return [names.block(layer, sublayer + ".hook_" + part)]
        if part in _STREAM:
            return [_STREAM[part](layer)]
        found = [
            names.block(layer, "hook_" + part),
            names.attn(layer, part),
            names.mixer(layer, part),
            names.cell(layer, part),
        ]
        if part in ("scale", "normalized"):
            found += [names.block(layer, "ln1.hook_" + part), names.block(layer, "norm.hook_" + part)]
        if part in ("pre", "post", "pre_linear"):
            found.append(names.block(layer, "mlp.hook_" + part))
        return found

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise IndexError(
                f"layer {layer!r} is out of range: this model has layers 0 to {self.n_layers - 1} "
                f"(or -{self.n_layers} to -1 from the end)"
            )
        return layer % self.n_layers

    def __getitem__(self, key: str | tuple) -> Tensor:
        """An activation by full hook name, short name or ``(name, layer[, sublayer])``."""
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        name = self.resolve(key)
        if name in self.cache_dict:
            return self.cache_dict[name]
        if name in getattr(self.model, "hook_dict", {}):
            raise KeyError(
                f"{name!r} (for {key!r}) was not cached: pass it in run_with_cache(..., names_filter=[...]) "
                f"(this cache holds {len(self.cache_dict)} activations)"
            )
        raise KeyError(
            f"{key!r} names no hook of this {self.architecture} model (resolved to {name!r}); "
            "list the model's hooks with model.hook_dict.keys()"
        )

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str) and key in self.cache_dict:
            return True
        try:
            return self.resolve(key) in self.cache_dict  # type: ignore[arg-type]
        except (KeyError, IndexError, TypeError):
            return False

    # ----------------------------------------------------------------- stacking
    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> Float[Tensor, "layers *rest"]:
        """``activation_name`` of layers ``0 .. layer - 1`` stacked on a new first axis.

        ``layer`` ``-1``/``None`` (the default) stacks every layer.
        ``activation_name`` is a short name (``"resid_post"``, ``"ssm_state"``,
        ``"hidden"``, ``"pattern"``...), resolved as in :meth:`resolve`.
        """
        layer = self.n_layers if layer is None or layer == -1 else layer
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)], dim=0)

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Any = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Float[Tensor, "components batch pos d_model"] | tuple[Tensor, list[str]]:
        """The residual stream entering each layer up to ``layer``, then the final stream.

        Parameters
        ----------
        layer : int, optional
            Stack ``resid_pre`` of layers ``0 .. layer`` (read from ``resid_post``
            of the layer before where only that is cached, as with
            ``names.resid_stream``); ``None``, ``-1`` or ``n_layers`` (the
            default) also appends the last ``resid_post`` (label
            ``"final_post"``): ``n_layers + 1`` components.
        incl_mid, mlp_input : bool
            Also ``resid_mid`` (transformers only: the stream between attention and MLP).
        apply_ln : bool
            Apply the model's own final norm to each component, its statistics
            recomputed for that vector and its weight (and bias) included:
            exactly what :func:`dynalens.models.surface.unembed_resid` applies
            before the unembedding. ``logit_attrs`` of the result is the logit lens.
        pos_slice
            A TransformerLens ``Slice`` (or int, list, slice) of positions.
        return_labels : bool
            Also return ``["0_pre", "1_pre", ..., "final_post"]``.

        Returns
        -------
        Tensor ``[components, batch, pos, d_model]`` (and the labels)
        """
        if incl_mid or mlp_input:
            self._require(TRANSFORMERS, "accumulated_resid(incl_mid=True / mlp_input=True)", "resid_mid")
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        n = self.n_layers
        layer = n if layer is None or layer == -1 else layer
        if not 0 <= layer <= n:
            raise IndexError(f"layer must be in 0..{n} (or -1/None for all), got {layer}")
        parts, labels = [], []
        for l in range(layer + 1):
            if l == n:
                parts.append(self[names.resid_post(n - 1)])
                labels.append("final_post")
                continue
            parts.append(self._stream_into(l))
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self[names.resid_mid(l)])
                labels.append(f"{l}_mid")
        parts = [pos_slice.apply(p, dim=-2) for p in parts]
        _check_widths(parts, labels, "accumulated_resid")
        stack = torch.stack(parts, dim=0)
        if apply_ln:
            stack = torch.stack([self._final_norm(x) for x in stack], dim=0)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Float[Tensor, "components batch pos d_model"] | tuple[Tensor, list[str]]:
        """What each part of the model wrote into the residual stream entering ``layer``.

        The components are the embedding (``embed``; ``pos_embed`` too on models
        with learned absolute positions), then each layer's mixer output
        (``{l}_attn_out`` on transformers, ``{l}_mixer_out`` on Mamba and RNNs)
        and, on transformers, its MLP output (``{l}_mlp_out``). They sum to the
        residual stream (``resid_pre`` of ``layer``, or the final ``resid_post``
        for ``layer=None``).

        Parameters
        ----------
        layer : int, optional
            Components written before block ``layer``; ``None``/``-1``/``n_layers``: all.
        mlp_input : bool
            Also the attention output of ``layer`` (transformers only).
        mode : {"all", "mixer", "attn", "mlp"}
            All components, only the mixers (``"attn"`` is the same on transformers),
            or only the MLPs (transformers only).
        apply_ln : bool
            Each component as it reaches the unembedding: centred (LayerNorm),
            divided by the cached final norm scale (``ln_final.hook_scale``) and
            multiplied by the final norm's weight, without its bias. Their sum is
            the normalised final stream minus the norm's bias. Only for ``layer=None``.
        pos_slice, incl_embeds, return_labels
            As in TransformerLens: a slice of positions; whether to include the
            embeddings; also return the labels.

        Returns
        -------
        Tensor ``[components, batch, pos, d_model]`` (and the labels)
        """
        transformer = self.architecture in TRANSFORMERS
        if mode not in ("all", "mixer", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'mixer', 'attn' or 'mlp', got {mode!r}")
        if mode in ("attn", "mlp") or mlp_input:
            what = f"mode={mode!r}" if mode in ("attn", "mlp") else "mlp_input=True"
            self._require(TRANSFORMERS, f"decompose_resid({what})", "attention and MLP outputs")
        if self.architecture == "rnn" and not getattr(self.model.cfg, "residual", True):
            raise CacheMethodError(
                "decompose_resid needs a residual stream that sums what each layer writes: this "
                "HookedRNN has residual=False (each layer replaces the stream). It applies to "
                "transformers, Mamba and RNNs built with residual=True."
            )
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        n = self.n_layers
        layer = n if layer is None or layer == -1 else layer
        if not 0 <= layer <= n:
            raise IndexError(f"layer must be in 0..{n} (or -1/None for all), got {layer}")
        if apply_ln and layer != n:
            raise ValueError(
                "decompose_resid(apply_ln=True) applies the final norm, so it decomposes the final "
                f"stream only: pass layer=None (got layer={layer})"
            )
        mixers, mlps = mode != "mlp", mode == "mlp" or (mode == "all" and transformer)
        parts, labels = [], []
        if incl_embeds:
            parts.append(self[names.EMBED])
            labels.append("embed")
            if transformer and _learned_positions(self.model):
                parts.append(self[names.POS_EMBED])
                labels.append("pos_embed")
        for l in range(layer):
            if mixers:
                parts.append(self[names.attn_out(l) if transformer else names.mixer_out(l)])
                labels.append(f"{l}_attn_out" if transformer else f"{l}_mixer_out")
            if mlps or (mode == "all" and self.architecture == "hybrid" and names.resid_mid(l) in self.model.hook_dict):
                parts.append(self[names.mlp_out(l)])  # hybrids: the layers with an MLP after the mixer
                labels.append(f"{l}_mlp_out")
        if mlp_input and mixers:
            parts.append(self[names.attn_out(layer)])
            labels.append(f"{layer}_attn_out")
        if not parts:
            raise ValueError("decompose_resid has no components to return: include embeds or pass layer > 0")
        parts = [pos_slice.apply(p, dim=-2) for p in parts]
        _check_widths(parts, labels, "decompose_resid")
        stack = torch.stack(parts, dim=0)
        if apply_ln:
            stack = self._final_norm_linear(stack, pos_slice)
        return (stack, labels) if return_labels else stack

    def logit_attrs(
        self,
        residual_stack: Float[Tensor, "components *batch_and_pos d_model"],
        tokens: int | str | Int[Tensor, "..."],
        incorrect_tokens: int | str | Int[Tensor, "..."] | None = None,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
    ) -> Float[Tensor, "components *batch_and_pos"]:
        """Each component's dot product with the unembedding direction of ``tokens``.

        No norm is applied here: pass a stack that is already normalised, e.g.
        ``cache.accumulated_resid(apply_ln=True)`` (the logit lens: this then
        equals the logits of ``unembed_resid`` at ``tokens`` minus the
        unembedding bias ``b_U[tokens]``) or ``cache.decompose_resid(apply_ln=True)``
        (direct logit attribution).

        Parameters
        ----------
        residual_stack : Tensor ``[components, batch, pos, d_model]`` (or any ``[components, ..., d_model]``)
        tokens : int, str, Tensor
            A token (id or single-token string) for every entry, ``[batch]`` (one
            per prompt, over all positions), ``[pos]`` when its length is not the
            batch size (one per position), or ``[batch, pos]``.
        incorrect_tokens : optional
            Same shape as ``tokens``: attribute the logit difference ``tokens - incorrect_tokens``.
        batch_slice
            Applied to the stack's batch axis (axis 1) when ``has_batch_dim``.
        pos_slice
            Accepted for TransformerLens compatibility; positions are already
            sliced in the stack (there is no norm to slice here).

        Returns
        -------
        Tensor ``[components, *batch_and_pos]``
        """
        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        directions = self._directions(tokens)
        if incorrect_tokens is not None:
            wrong = self._directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got "
                    f"{list(directions.shape[:-1])} and {list(wrong.shape[:-1])}"
                )
            directions = directions - wrong
        if (
            has_batch_dim
            and residual_stack.ndim == 4
            and directions.ndim == 2
            and directions.shape[0] == residual_stack.shape[1]
        ):
            directions = directions.unsqueeze(-2)  # one token per prompt: broadcast over positions
        return (residual_stack * directions.to(residual_stack.dtype)).sum(-1)

    # ----------------------------------------------------- transformer-only ones
    def stack_head_results(self, *args: Any, **kwargs: Any) -> Any:
        self._require(TRANSFORMERS, "stack_head_results", "attention heads")
        return super().stack_head_results(*args, **kwargs)

    def compute_head_results(self, *args: Any, **kwargs: Any) -> Any:
        self._require(TRANSFORMERS, "compute_head_results", "attention heads")
        return super().compute_head_results(*args, **kwargs)

    def get_neuron_results(self, *args: Any, **kwargs: Any) -> Any:
        self._require(TRANSFORMERS, "get_neuron_results", "MLP neurons")
        return super().get_neuron_results(*args, **kwargs)

    def stack_neuron_results(self, *args: Any, **kwargs: Any) -> Any:
        self._require(TRANSFORMERS, "stack_neuron_results", "MLP neurons")
        return super().stack_neuron_results(*args, **kwargs)

    def get_full_resid_decomposition(self, *args: Any, **kwargs: Any) -> Any:
        self._require(TRANSFORMERS, "get_full_resid_decomposition", "attention heads and MLP neurons")
        return super().get_full_resid_decomposition(*args, **kwargs)

    def apply_ln_to_stack(self, *args: Any, **kwargs: Any) -> Any:
        self._require(
            TRANSFORMERS, "apply_ln_to_stack", "per-layer LayerNorm scales (use apply_ln=True of "
            "accumulated_resid / decompose_resid on every architecture)"
        )
        return super().apply_ln_to_stack(*args, **kwargs)

    def logit_lens(self, **kwargs: Any) -> Any:
        self._require(
            TRANSFORMERS, "logit_lens", "TransformerLens' logit-lens tool (on every architecture: "
            "logit_attrs(accumulated_resid(apply_ln=True), tokens))"
        )
        return super().logit_lens(**kwargs)

    # ----------------------------------------------------------------- helpers
    def _require(self, architectures: tuple[str, ...], method: str, needs: str) -> None:
        if self.architecture not in architectures:
            raise CacheMethodError(
                f"{method} needs {needs}, which this {self.architecture} model does not have: it "
                f"applies to {', '.join(architectures)} models only"
            )

    def _stream_into(self, layer: int) -> Tensor:
        """``resid_pre`` of ``layer``, or the equal ``resid_post`` of the layer before when only that is cached."""
        if names.resid_pre(layer) not in self.cache_dict and layer > 0 and names.resid_post(layer - 1) in self.cache_dict:
            return self.cache_dict[names.resid_post(layer - 1)]
        return self[names.resid_pre(layer)]

    def _final_norm(self, x: Float[Tensor, "*batch_and_pos d_model"]) -> Tensor:
        """The model's final norm of each vector of ``x``, recomputed for that vector."""
        norm = getattr(self.model, "ln_final", None)
        if norm is None:
            raise CacheMethodError(f"{type(self.model).__name__} has no final norm (ln_final) to apply")
        shape = x.shape
        flat = x if x.ndim == 3 else x.reshape(1, -1, shape[-1])
        return norm(flat).reshape(shape)

    def _final_norm_linear(self, stack: Tensor, pos_slice: Slice) -> Tensor:
        """Components as the unembedding sees them: the final norm's linear part at the cached scale.

        For a norm ``f(x) = g((x - mean) / s(x))`` with ``g`` affine per dimension,
        component ``c`` contributes ``g(c') - g(0)`` with ``c' = (c - mean(c)) / s``,
        ``s`` the cached scale of the whole stream. It is computed through the
        model's own norm (weight conventions included): ``f(c)`` fires
        ``ln_final.hook_scale`` with ``s(c)``, and ``(f(c) - f(0)) * s(c) / s``
        is the contribution.
        """
        scale = pos_slice.apply(self[names.FINAL_SCALE], dim=-2)
        seen: list[Tensor] = []

        def record(x: Tensor, hook: Any) -> None:
            seen.append(x.detach())

        out = []
        with self.model.hooks(fwd_hooks=[(names.FINAL_SCALE, record)]):
            zero = self._final_norm(torch.zeros_like(stack[0]))
            for c in stack:
                seen.clear()
                normed = self._final_norm(c)
                own_scale = seen[-1].reshape(*c.shape[:-1], 1)
                out.append((normed - zero) * own_scale / scale.to(c.dtype))
        return torch.stack(out, dim=0)

    def _directions(self, tokens: Any) -> Float[Tensor, "*shape d_model"]:
        """Unembedding directions ``W_U[:, tokens]`` moved to the last axis."""
        if isinstance(tokens, str):
            tokens = self.model.to_single_token(tokens) if hasattr(self.model, "to_single_token") else None
            if tokens is None:
                raise TypeError("string tokens need a model with a tokenizer; pass token ids")
        ids = torch.as_tensor(tokens)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"tokens must be integer ids, got dtype {ids.dtype}")
        W_U = self.model.W_U
        return W_U[:, ids.to(W_U.device)].movedim(0, -1)


def hooks_for(model: Any, method: str, *, apply_ln: bool = False, incl_mid: bool = False, mode: str = "all") -> list[str]:
    """The hooks a :class:`Cache` method reads on ``model``: what ``names_filter`` must hold.

    ``method`` is ``"accumulated_resid"`` or ``"decompose_resid"`` (whole
    stream, ``layer=None``); the options are theirs.

    >>> from dynalens.models import HookedMamba, MambaConfig
    >>> hooks_for(HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=50)), "decompose_resid")
    ['hook_embed', 'blocks.0.hook_mixer_out', 'blocks.1.hook_mixer_out']
    """
    n = model.cfg.n_layers
    transformer = getattr(model.cfg, "architecture", None) in TRANSFORMERS
    if method == "accumulated_resid":
        mids = [names.resid_mid(l) for l in range(n)] if incl_mid else []
        return names.resid_stream(n) + mids
    if method == "decompose_resid":
        found = [names.EMBED] + ([names.POS_EMBED] if transformer and _learned_positions(model) else [])
        for l in range(n):
            if mode != "mlp":
                found.append(names.attn_out(l) if transformer else names.mixer_out(l))
            if transformer and mode in ("all", "mlp"):
                found.append(names.mlp_out(l))
        return found + ([names.FINAL_SCALE] if apply_ln else [])
    raise ValueError(f"method must be 'accumulated_resid' or 'decompose_resid', got {method!r}")


def _learned_positions(model: Any) -> bool:
    return getattr(model.cfg, "positional_embedding_type", None) == "standard"


def _check_widths(parts: list[Tensor], labels: list[str], method: str) -> None:
    widths = {p.shape[-1] for p in parts}
    if len(widths) > 1:
        detail = ", ".join(f"{label}: {p.shape[-1]}" for label, p in zip(labels, parts))
        raise CacheMethodError(
            f"{method} stacks vectors of one width, but these differ ({detail}); a model whose "
            "embedding width differs from d_model has no single residual stream to stack"
        )
