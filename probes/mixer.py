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
- RNN: the linearised recurrence, Frobenius norms ``‖∂h_t/∂x_s‖`` of the
  Jacobian of the layer's hidden sequence with respect to its input sequence
  (the cached ``hook_resid_pre``), by autograd through the cell's ``step``.

Each architecture is one entry of :data:`MIXERS` (the hooks it reads, the
matrices from them): a new architecture adds an entry.

Examples
--------
>>> result = MixerMatrix(layer=1)(model, ["The cat sat", "A dog ran"])    # doctest: +SKIP
>>> result.matrix(prompt=0).shape                                         # doctest: +SKIP
torch.Size([4, 3, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels import mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.models.validation import check_index
from dynalens.probes.analysis import Analysis
from dynalens.probes.figures import heatmap, token_labels
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


# --------------------------------------------------------------------------- one entry per architecture
class Mixed(NamedTuple):
    """What an architecture's mixer gives: ``[batch, group, pos, pos]`` matrices and how to read them."""

    matrices: Tensor
    labels: list[str]
    value_name: str
    signed: bool


@dataclass(frozen=True)
class MixerKind:
    """One architecture's mixer: the hooks it reads and the matrices it rebuilds from them.

    ``hooks(analysis, model)`` names the hooks (checking the analysis'
    options against the model, before any forward); ``matrices(analysis, model,
    cache, prompts)`` returns :class:`Mixed` (entries between real tokens;
    :class:`MixerMatrix` zeroes the rest). ``channel_options``: whether the
    Mamba options (``channel_groups``, ``channels``, ``include_skip``) apply.
    """

    hooks: Callable[[MixerMatrix, Any], list[str]]
    matrices: Callable[[MixerMatrix, Any, Any, Prompts], Mixed]
    channel_options: bool = False


# --------------------------------------------------------------------------- transformer
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
    _ssm_selection(analysis, model.cfg.d_inner)
    return [names.mixer(analysis.layer, part) for part in _SSM_PARTS]


def _ssm_matrix(analysis: MixerMatrix, model: Any, cache: Any, prompts: Prompts) -> Mixed:
    layer = analysis.layer
    # Pads read as the model treats them (Δ = 0: the state passes unchanged), whatever the cache holds there.
    real = prompts.mask.to(cache[names.mixer(layer, "delta")].device)[:, None]
    delta, B, C = (
        torch.where(real, cache[names.mixer(layer, part)].transpose(1, 2), 0.0) for part in _SSM_PARTS
    )  # [b, d | n, pos]
    mixer = model.blocks[layer].mixer
    groups, labels, signed = _ssm_selection(analysis, delta.shape[1])
    D = mixer.D if analysis.include_skip else None
    if signed:
        channels = [group[0] for group in groups]
        return Mixed(mixer_matrix(delta, mixer.A, B, C, D=D, channels=channels), labels, "M", True)
    matrices = [mixer_matrix(delta, mixer.A, B, C, D=D, channels=group).abs().mean(1) for group in groups]
    return Mixed(torch.stack(matrices, dim=1), labels, "mean |M|", False)


# --------------------------------------------------------------------------- RNN
def _hidden_sequence(cell: Any, x: Float[Tensor, "pos d_in"]) -> Float[Tensor, "pos d_hidden"]:
    """The cell's hidden sequence from its zero state, by its pure ``step``."""
    state = cell.initial_state(1, x)
    out = []
    for t in range(x.shape[0]):
        state = cell.step(x[t][None], state)
        out.append(state[0] if isinstance(state, tuple) else state)
    return torch.cat(out)


def _jacobian_rows(cell: Any, x: Float[Tensor, "pos d_in"]) -> Iterator[Float[Tensor, "d_hidden pos d_in"]]:
    """``∂h_t/∂x`` for ``t = 0, 1, ...``: one batched backward per query position."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        hidden = _hidden_sequence(cell, x)
        eye = torch.eye(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        for t in range(hidden.shape[0]):
            (row,) = torch.autograd.grad(hidden[t], x, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
            yield row


def recurrence_jacobian(cell: Any, x: Float[Tensor, "pos d_in"]) -> Float[Tensor, "pos d_hidden pos d_in"]:
    """The linearised RNN layer along one sequence: ``J[t, :, s, :] = ∂h_t/∂x_s`` (zero for ``s > t``).

    Parameters
    ----------
    cell
        An RNN layer's cell (``model.blocks[layer].cell``), run from its zero state.
    x
        ``[pos, d_in]`` the layer's inputs (its ``hook_resid_pre`` at one prompt's real positions).
    """
    return torch.stack(list(_jacobian_rows(cell, x)))


def _recurrence_norms(analysis: MixerMatrix, model: Any, cache: Any, prompts: Prompts) -> Mixed:
    x = cache[names.resid_pre(analysis.layer)]
    cell = model.blocks[analysis.layer].cell
    rows = [
        torch.stack([row.pow(2).sum(dim=(0, 2)).sqrt() for row in _jacobian_rows(cell, prompts.real(x, i))])
        for i in range(len(prompts))
    ]
    return Mixed(to_padded(prompts, rows, dims=(0, 1))[:, None], ["hidden"], "‖∂h_t/∂x_s‖", False)


MIXERS: dict[str, MixerKind] = {
    "transformer": MixerKind(lambda analysis, model: [names.pattern(analysis.layer)], _attention),
    "mamba": MixerKind(_ssm_hooks, _ssm_matrix, channel_options=True),
    "rnn": MixerKind(lambda analysis, model: [names.resid_pre(analysis.layer)], _recurrence_norms),
}
"""The mixer of each architecture :class:`MixerMatrix` applies to, by ``architecture_of(model)``."""


# --------------------------------------------------------------------------- analysis
class MixerMatrix(Analysis):
    """The sequence-mixing matrices of one layer (attention, SSM matrix, RNN Jacobian norms).

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
    include_skip
        Mamba only: add the ``D`` skip on the diagonal, so that ``y = M u``
        (``mixer.hook_y``, before gating).

    Returns
    -------
    MixerMatrixResult
        ``[batch, group, pos, pos]``: heads, channel groups / channels, or one RNN group.
    """

    architectures: ClassVar[tuple[str, ...]] = tuple(MIXERS)
    requirement: ClassVar[str] = "a sequence mixer it can materialise"

    def __init__(
        self,
        layer: int,
        *,
        channel_groups: int | None = None,
        channels: Sequence[int] | None = None,
        include_skip: bool = False,
    ):
        self.layer = layer
        self.channel_groups = channel_groups
        self.channels = channels
        self.include_skip = include_skip

    def _kind(self, model: Any) -> MixerKind:
        self.check(model)
        arch = architecture_of(model)
        kind = MIXERS[arch]
        options = self.channel_groups is not None or self.channels is not None or self.include_skip
        if options and not kind.channel_options:
            raise ValueError(
                f"channel_groups, channels and include_skip are for Mamba; this model is a {arch}"
            )
        if self.channel_groups is not None and self.channels is not None:
            raise ValueError("pass channel_groups or channels, not both")
        check_index("layer", self.layer, model.cfg.n_layers)
        return kind

    def hooks(self, model: Any) -> list[str]:
        return self._kind(model).hooks(self, model)

    def _compute(self, cache: Any, prompts: Prompts) -> MixerMatrixResult:
        model = cache.model
        mixed = self._kind(model).matrices(self, model, cache, prompts)
        matrices = torch.where(pair_mask(prompts).to(mixed.matrices.device), mixed.matrices.float(), 0.0)
        return MixerMatrixResult(
            **self.provenance(model, prompts),
            layer=int(self.layer),
            matrices=matrices.cpu(),
            group_labels=mixed.labels,
            value_name=mixed.value_name,
            signed=mixed.signed,
        )

