"""Sequence-mixing matrices: how much each position reads from each earlier one.

:class:`MixerMatrix` gives one layer's mixer as ``[batch, group, query, key]``
matrices, whatever the architecture:

- transformer: the attention pattern of each head (``attn.hook_pattern``);
- Mamba: the materialised selective-SSM matrix ``M`` ("hidden attention",
  Ali et al., 2024), rebuilt from the cached ``Δ``, ``B``, ``C`` with
  :func:`dynalens.kernels.mixer_matrix`, as mean ``|M|`` over groups of
  channels or signed for chosen channels; without the ``D`` skip by default
  (it only adds to the diagonal and would drown the mixing), with it
  ``y = M u`` exactly;
- Mamba-2: each head's SSD matrix ``M = L ∘ (C Bᵀ)`` with ``Δ`` folded in
  (:func:`dynalens.kernels.ssd_mixer_matrix`, from the cached ``dt``, ``B``,
  ``C``), signed, one per head (shared by its ``d_head`` channels); with the
  ``D`` skip, ``y = M x`` exactly;
- hybrid: the mixer of the layer's type (``model.layer_types``): attention
  patterns, SSD matrices, or both side by side;
- RNN: the linearised recurrence, Frobenius norms ``‖∂h_t/∂x_s‖`` of the
  Jacobian of the layer's hidden sequence with respect to its input sequence
  (the cached ``hook_resid_pre``), chained from the per-step Jacobians of the
  cell's ``step`` (:func:`linearise`).

Each kind of mixer is one entry of :data:`MIXERS` (the hooks it reads, the
matrices from them) and :func:`layer_mixers` says which a layer has: a new
mixer adds an entry.

Examples
--------
>>> result = MixerMatrix(layer=1)(model, ["The cat sat", "A dog ran"])    # doctest: +SKIP
>>> result.matrix(prompt=0).shape                                         # doctest: +SKIP
torch.Size([4, 3, 3])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels import mixer_matrix, ssd_mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.models.validation import check_index
from dynalens.probes.analysis import Analysis
from dynalens.probes.figures import heatmap, token_labels
from dynalens.probes.layers import layer_types
from dynalens.probes.results import Result

DEFAULT_CHANNEL_GROUPS = 8


# --------------------------------------------------------------------------- padded layout
def to_padded(prompts: Prompts, rows: Sequence[Tensor], dims: Sequence[int] = (0,), fill: float = 0.0) -> Tensor:
    """Per-prompt tensors over real positions, stacked in the prompts' left-padded layout.

    ``rows[i]`` has ``prompts.lengths[i]`` entries along each axis in ``dims``;
    the result is ``[batch, ...]`` with those axes ``pos`` long, prompt ``i``'s
    entries in their last ``lengths[i]`` places and ``fill`` before them.
    """
    width = prompts.tokens.shape[1]
    shape = list(rows[0].shape)
    for d in dims:
        shape[d] = width
    out = rows[0].new_full((len(rows), *shape), fill)
    for i, row in enumerate(rows):
        index = [slice(None)] * row.dim()
        for d in dims:
            index[d] = slice(width - row.shape[d], None)
        out[i][tuple(index)] = row
    return out


def pair_mask(prompts: Prompts) -> Tensor:
    """``[batch, 1, pos, pos]`` True where query and key are both real tokens."""
    mask = prompts.mask
    return (mask[:, :, None] & mask[:, None, :])[:, None]


# --------------------------------------------------------------------------- result
@dataclass(kw_only=True, eq=False)
class MixerMatrixResult(Result):
    """The sequence-mixing matrices of one layer, ``matrices[prompt, group, query, key]``.

    Attributes
    ----------
    layer
        The layer they belong to.
    matrices
        ``[batch, group, pos, pos]`` in the prompts' left-padded layout, zero
        above the diagonal (causal) and wherever query or key is a pad.
    group_labels
        One label per group: ``head 3``, ``channels 0-191``, ``channel 17`` or ``hidden``.
    value_name
        What an entry is: ``attention``, ``mean |M|``, ``M`` or ``‖∂h_t/∂x_s‖``.
    signed
        Whether entries can be negative.
    """

    layer: int
    matrices: Float[Tensor, "batch group q k"]
    group_labels: list[str]
    value_name: str
    signed: bool

    def matrix(self, prompt: int = 0) -> Float[Tensor, "group q k"]:
        """One prompt's matrices over its real tokens, ``[group, n, n]``."""
        n = len(self.str_tokens(prompt))
        return self.matrices[prompt, :, -n:, -n:]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` entries of largest magnitude over all prompts and groups, largest first."""
        frame = self.to_frame()
        order = frame["value"].abs().sort_values(ascending=False, kind="stable").index[:k]
        return frame.loc[order].reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, group, query_position, query_token, key_position, key_token, value``.

        Only causal entries (key ≤ query) between real tokens are listed;
        positions count each prompt's real tokens from 0.
        """
        frames = []
        for prompt in range(self.matrices.shape[0]):
            tokens, m = self.str_tokens(prompt), self.matrix(prompt)
            q, k = torch.tril_indices(len(tokens), len(tokens))
            n_groups = m.shape[0]
            frames.append(pd.DataFrame({
                "prompt": prompt,
                "group": [label for label in self.group_labels for _ in range(len(q))],
                "query_position": q.repeat(n_groups).numpy(),
                "query_token": [tokens[i] for i in q.tolist()] * n_groups,
                "key_position": k.repeat(n_groups).numpy(),
                "key_token": [tokens[i] for i in k.tolist()] * n_groups,
                "value": m[:, q, k].reshape(-1).double().numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def figure(
        self, *, prompt: int = 0, group: int = 0, log: bool = False, position: int | None = None
    ) -> go.Figure:
        """Heatmap query × key of one ``group`` for one ``prompt``.

        ``log`` colours by log10 of the magnitude; ``position`` outlines a key column.
        """
        group = check_index("group", group, self.matrices.shape[1])
        values = self.matrix(prompt)[group].double()
        value_name = self.value_name
        if log and self.signed:
            values, value_name = values.abs(), f"|{value_name}|"
        causal = torch.ones_like(values, dtype=torch.bool).tril()
        labels = token_labels(self.str_tokens(prompt))
        offset = int(self._prompts().offsets[prompt])
        highlight = None if position is None else self.position_index(position, prompt) - offset
        return heatmap(
            values.masked_fill(~causal, float("nan")).numpy(),
            x_labels=labels,
            y_labels=labels,
            x_title="key (source)",
            y_title="query (destination)",
            value_name=value_name,
            title=f"Layer {self.layer} mixer · {self.group_labels[group]} · {self.model_name}",
            log=log,
            signed=self.signed and not log,
            highlight_x=highlight,
            y_reversed=True,
        )


# --------------------------------------------------------------------------- one entry per mixer
class Mixed(NamedTuple):
    """What one mixer gives: ``[batch, group, pos, pos]`` matrices and how to read them.

    ``bound``: the state size that bounds each matrix's off-diagonal rank
    (``d_state`` for an SSM), ``None`` for softmax attention.
    """

    matrices: Tensor
    labels: list[str]
    value_name: str
    signed: bool
    bound: int | None = None


@dataclass(frozen=True)
class MixerKind:
    """One kind of sequence mixer: the hooks it reads and the matrices it rebuilds from them.

    ``hooks(analysis, model)`` names the hooks of ``analysis.layer`` (checking
    the analysis' options against the layer, before any forward);
    ``matrices(analysis, model, cache, prompts)`` returns :class:`Mixed`
    (entries between real tokens; :class:`MixerMatrix` zeroes the rest).
    ``options``: the :class:`MixerMatrix` options that apply to it.
    """

    hooks: Callable[[MixerMatrix, Any], list[str]]
    matrices: Callable[[MixerMatrix, Any, Any, Prompts], Mixed]
    options: tuple[str, ...] = ()


def layer_mixers(model: Any, layer: int) -> tuple[str, ...]:
    """The sequence mixers of block ``layer``, as keys of :data:`MIXERS`.

    One per block (``"attention"`` for a transformer, ``"mamba"``, ``"mamba2"``,
    ``"rnn"``), except on a hybrid, where its layer type decides
    (:func:`~dynalens.probes.layers.layer_types`): ``"attention+mamba2"`` has
    both, an MLP-only layer (``"mlp"``, ``"moe"``) none.
    """
    return tuple(part for part in layer_types(model)[layer].split("+") if part in MIXERS)


def real_positions(value: Tensor, prompts: Prompts) -> Tensor:
    """``value [batch, pos, ...]`` with every pad position zeroed (the model reads pads as zero steps)."""
    mask = prompts.mask.to(value.device)
    return torch.where(mask.reshape(*mask.shape, *([1] * (value.ndim - 2))), value, 0.0)


# --------------------------------------------------------------------------- attention
def _attention(analysis: MixerMatrix, model: Any, cache: Any, prompts: Prompts) -> Mixed:
    pattern = cache[names.pattern(analysis.layer)]
    return Mixed(pattern, [f"head {h}" for h in range(pattern.shape[1])], "attention", False)


# --------------------------------------------------------------------------- Mamba
_SSM_PARTS = ("delta", "B", "C")


def _ssm_selection(analysis: MixerMatrix, d_inner: int) -> tuple[list[list[int]], list[str], bool]:
    """The channels of each group, their labels, and whether each group is one signed channel."""
    if analysis.channels is not None:
        chosen = [check_index("channel", c, d_inner) for c in analysis.channels]
        if not chosen:
            raise ValueError("channels is empty: pass at least one channel index")
        return [[c] for c in chosen], [f"channel {c}" for c in chosen], True
    n_groups = analysis.channel_groups
    if n_groups is None:
        n_groups = math.gcd(DEFAULT_CHANNEL_GROUPS, d_inner)
    is_int = isinstance(n_groups, int) and not isinstance(n_groups, bool)
    if not is_int or not 1 <= n_groups <= d_inner or d_inner % n_groups:
        raise ValueError(
            f"channel_groups must divide d_inner = {d_inner} into equal groups, got {n_groups!r}"
        )
    size = d_inner // n_groups
    spans = [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]
    return spans, [f"channels {s[0]}-{s[-1]}" for s in spans], False


def _ssm_hooks(analysis: MixerMatrix, model: Any) -> list[str]:
    _ssm_selection(analysis, model.blocks[analysis.layer].mixer.cfg.d_inner)
    return [names.mixer(analysis.layer, part) for part in _SSM_PARTS]


def _ssm_matrix(analysis: MixerMatrix, model: Any, cache: Any, prompts: Prompts) -> Mixed:
    layer = analysis.layer
    # Pads read as the model treats them (Δ = 0: the state passes unchanged), whatever the cache holds there.
    delta, B, C = (real_positions(cache[names.mixer(layer, part)], prompts).transpose(1, 2) for part in _SSM_PARTS)
    mixer = model.blocks[layer].mixer
    groups, labels, signed = _ssm_selection(analysis, delta.shape[1])
    D = mixer.D if analysis.include_skip else None
    bound = mixer.cfg.d_state
    if signed:
        channels = [group[0] for group in groups]
        return Mixed(mixer_matrix(delta, mixer.A, B, C, D=D, channels=channels), labels, "M", True, bound)
    matrices = [mixer_matrix(delta, mixer.A, B, C, D=D, channels=group).abs().mean(1) for group in groups]
    return Mixed(torch.stack(matrices, dim=1), labels, "mean |M|", False, bound)


# --------------------------------------------------------------------------- Mamba-2 (SSD)
_SSD_PARTS = ("dt", "B", "C")


def _ssd_heads(analysis: MixerMatrix, n_heads: int) -> list[int]:
    """The heads shown: ``analysis.heads``, checked, or every head."""
    if analysis.heads is None:
        return list(range(n_heads))
    chosen = [check_index("head", h, n_heads) for h in analysis.heads]
    if not chosen:
        raise ValueError("heads is empty: pass at least one head index")
    return chosen


def _ssd_hooks(analysis: MixerMatrix, model: Any) -> list[str]:
    _ssd_heads(analysis, model.blocks[analysis.layer].mixer.cfg.n_heads)
    return [names.mixer(analysis.layer, part) for part in _SSD_PARTS]


def _ssd_matrix(analysis: MixerMatrix, model: Any, cache: Any, prompts: Prompts) -> Mixed:
    """Each head's ``M = L ∘ (C Bᵀ)`` with ``Δ`` (:func:`~dynalens.kernels.ssd_mixer_matrix`), from the cache."""
    layer = analysis.layer
    dt, B, C = (real_positions(cache[names.mixer(layer, part)], prompts) for part in _SSD_PARTS)
    mixer = model.blocks[layer].mixer
    heads = _ssd_heads(analysis, mixer.cfg.n_heads)
    D = mixer.D.to(dt.device) if analysis.include_skip else None
    matrices = ssd_mixer_matrix(dt, mixer.A.to(dt.device), B, C, D=D, heads=heads)
    return Mixed(matrices, [f"head {h}" for h in heads], "M", True, mixer.cfg.d_state)


# --------------------------------------------------------------------------- RNN
class Linearisation(NamedTuple):
    """One RNN layer linearised along one sequence, run from its zero state (float64, CPU).

    ``state_t = F(x_t, state_{t-1})`` (``state = h``, or ``[h, c]`` for an
    LSTM) has the per-step Jacobians ``A[t] = ∂state_t/∂state_{t-1}``
    ``[pos, state, state]`` and ``B[t] = ∂state_t/∂x_t`` ``[pos, state, d_in]``;
    ``h_t`` is the first ``d_hidden`` entries of ``state_t``, so
    ``∂h_t/∂x_s = (A[t] ... A[s+1] B[s])[:d_hidden]``.
    """

    A: Float[Tensor, "pos state state"]
    B: Float[Tensor, "pos state d_in"]
    d_hidden: int


def linearise(cell: Any, x: Float[Tensor, "pos d_in"]) -> Linearisation:
    """The per-step Jacobians of an RNN cell along ``x``, all positions in one batched ``jacrev``.

    Parameters
    ----------
    cell
        An RNN layer's cell (``model.blocks[layer].cell``), run from its zero state.
    x
        ``[pos, d_in]`` the layer's inputs (its ``hook_resid_pre`` at one prompt's real positions).
    """
    cell = copy.deepcopy(cell).double().cpu()
    x = x.detach().double().cpu()
    with torch.no_grad():
        states = [x.new_zeros(1, cell.state_size)]
        for t in range(x.shape[0] - 1):
            states.append(cell.flat_step(x[t : t + 1], states[-1]))
    one = lambda state, x_t: cell.flat_step(x_t[None], state[None])[0]
    A, B = torch.func.vmap(torch.func.jacrev(one, argnums=(0, 1)))(torch.cat(states), x)
    return Linearisation(A, B, cell.d_hidden)


def linearised_jacobian(lin: Linearisation) -> Float[Tensor, "pos d_hidden pos d_in"]:
    """``J[t, :, s, :] = ∂h_t/∂x_s`` from the per-step Jacobians: one ``[state, state] @ [state, t * d_in]`` per step."""
    n, size, d_in = lin.B.shape
    J = lin.B.new_zeros(n, lin.d_hidden, n, d_in)
    reach = lin.B.new_zeros(size, n, d_in)  # ∂state_t/∂x_s for s <= t, updated in place
    for t in range(n):
        reach[:, :t] = (lin.A[t] @ reach[:, :t].reshape(size, -1)).reshape(size, t, d_in)
        reach[:, t] = lin.B[t]
        J[t, :, : t + 1] = reach[: lin.d_hidden, : t + 1]
    return J


def recurrence_jacobian(cell: Any, x: Float[Tensor, "pos d_in"]) -> Float[Tensor, "pos d_hidden pos d_in"]:
    """The linearised RNN layer along one sequence: ``J[t, :, s, :] = ∂h_t/∂x_s`` (zero for ``s > t``).

    Computed in float64 from the cell's per-step Jacobians (:func:`linearise`)
    and returned in ``x``'s dtype and device.

    Parameters
    ----------
    cell
        An RNN layer's cell (``model.blocks[layer].cell``), run from its zero state.
    x
        ``[pos, d_in]`` the layer's inputs (its ``hook_resid_pre`` at one prompt's real positions).
    """
    return linearised_jacobian(linearise(cell, x)).to(x)


def _recurrence_norms(analysis: MixerMatrix, model: Any, cache: Any, prompts: Prompts) -> Mixed:
    x = cache[names.resid_pre(analysis.layer)]
    cell = model.blocks[analysis.layer].cell
    rows = [recurrence_jacobian(cell, prompts.real(x, i)).pow(2).sum(dim=(1, 3)).sqrt() for i in range(len(prompts))]
    return Mixed(to_padded(prompts, rows, dims=(0, 1))[:, None], ["hidden"], "‖∂h_t/∂x_s‖", False)


MIXERS: dict[str, MixerKind] = {
    "attention": MixerKind(lambda analysis, model: [names.pattern(analysis.layer)], _attention),
    "mamba": MixerKind(_ssm_hooks, _ssm_matrix, options=("channel_groups", "channels", "include_skip")),
    "mamba2": MixerKind(_ssd_hooks, _ssd_matrix, options=("heads", "include_skip")),
    "rnn": MixerKind(lambda analysis, model: [names.resid_pre(analysis.layer)], _recurrence_norms),
}
"""Each sequence mixer :class:`MixerMatrix` materialises, by the names :func:`layer_mixers` gives."""

#: Where each option of :class:`MixerMatrix` applies, for its error.
_OPTION_MIXERS = {"channel_groups": "Mamba", "channels": "Mamba", "heads": "Mamba-2", "include_skip": "SSM"}


# --------------------------------------------------------------------------- analysis
class MixerMatrix(Analysis):
    """The sequence-mixing matrices of one layer (attention, SSM matrix, RNN Jacobian norms).

    On a hybrid the layer's own mixer is shown (``model.layer_types``): the
    attention pattern of an attention layer, the SSD matrices of a Mamba-2
    layer, both (attention heads first) on a layer that has both.

    Parameters
    ----------
    layer
        The layer, ``0 <= layer < cfg.n_layers``.
    channel_groups
        Mamba only: split the ``d_inner`` channels into this many contiguous
        groups and show mean ``|M|`` per group (default 8, or
        ``gcd(8, d_inner)`` when 8 does not divide ``d_inner``).
    channels
        Mamba only: show the signed ``M`` of these channels instead.
    heads
        Mamba-2 only: show these heads' signed ``M`` (default every head).
    include_skip
        SSM layers only: add the ``D`` skip on the diagonal, so that ``y = M u``
        (``mixer.hook_y``, before gating; Mamba-2: ``y[..., h, :] = M_h x[..., h, :]``
        for every column of the head).

    Returns
    -------
    MixerMatrixResult
        ``[batch, group, pos, pos]``: heads, channel groups / channels, or one RNN group.
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer", "mamba", "mamba2", "hybrid", "rnn")
    requirement: ClassVar[str] = "a sequence mixer it can materialise"

    def __init__(
        self,
        layer: int,
        *,
        channel_groups: int | None = None,
        channels: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        include_skip: bool = False,
    ):
        self.layer = layer
        self.channel_groups = channel_groups
        self.channels = channels
        self.heads = heads
        self.include_skip = include_skip

    def _kinds(self, model: Any) -> list[MixerKind]:
        """The mixers of the layer, after checking the options against them."""
        self.check(model)
        check_index("layer", self.layer, model.cfg.n_layers)
        mixers = layer_mixers(model, self.layer)
        if not mixers:
            kind = model.layer_types[self.layer]
            mixing = [i for i in range(model.cfg.n_layers) if layer_mixers(model, i)]
            raise ValueError(
                f"layer {self.layer} of this hybrid is an {kind!r} layer, which mixes no positions; "
                f"its mixing layers are {mixing}"
            )
        if self.channel_groups is not None and self.channels is not None:
            raise ValueError("pass channel_groups or channels, not both")
        kinds = [MIXERS[mixer] for mixer in mixers]
        for option, where in _OPTION_MIXERS.items():
            value = getattr(self, option)
            if value is not None and value is not False and not any(option in kind.options for kind in kinds):
                raise ValueError(
                    f"{option} is for {where} layers; layer {self.layer} of this {architecture_of(model)} "
                    f"mixes with {' and '.join(mixers)}"
                )
        return kinds

    def hooks(self, model: Any) -> list[str]:
        return [name for kind in self._kinds(model) for name in kind.hooks(self, model)]

    def parts(self, cache: Any, prompts: Prompts) -> list[Mixed]:
        """The layer's mixers, one :class:`Mixed` each, from a cache holding :meth:`hooks`."""
        model = cache.model
        return [kind.matrices(self, model, cache, prompts) for kind in self._kinds(model)]

    def _compute(self, cache: Any, prompts: Prompts) -> MixerMatrixResult:
        return self.result(cache.model, prompts, self.parts(cache, prompts))

    def result(self, model: Any, prompts: Prompts, parts: Sequence[Mixed]) -> MixerMatrixResult:
        """The Result of :meth:`parts`: their groups in order, zero wherever query or key is a pad."""
        labels = [label for part in parts for label in part.labels]
        if len(parts) > 1:  # a hybrid layer with attention and an SSM side by side
            mixers = layer_mixers(model, self.layer)
            labels = [f"{mixer} {label}" for mixer, part in zip(mixers, parts) for label in part.labels]
        matrices = torch.cat([part.matrices.float() for part in parts], dim=1)
        matrices = torch.where(pair_mask(prompts).to(matrices.device), matrices, 0.0)
        return MixerMatrixResult(
            **self.provenance(model, prompts),
            layer=int(self.layer),
            matrices=matrices.cpu(),
            group_labels=labels,
            value_name=" | ".join(dict.fromkeys(part.value_name for part in parts)),
            signed=any(part.signed for part in parts),
        )
