"""Sequence-mixing matrices: how much each position reads from each earlier one.

One layer's mixer as ``[group, query, key]`` matrices, whatever the
architecture:

- transformer: the attention pattern of each head (``attn.hook_pattern``);
- Mamba: the materialised selective-SSM matrix ``M`` ("hidden attention",
  Ali et al., 2024), rebuilt from the cached ``Δ``, ``B``, ``C`` with
  :func:`dynalens.kernels.mixer_matrix`, as mean ``|M|`` over groups of
  channels or signed for chosen channels; without the ``D`` skip by default
  (it only adds to the diagonal and would drown the mixing), with it
  ``y = M u`` exactly;
- RNN: the linearised recurrence, Frobenius norms ``‖∂h_t/∂x_s‖`` of the
  Jacobian of the layer's hidden sequence (``cell.hook_hidden``) with respect
  to its input sequence (``hook_resid_pre``), by autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dynalens.kernels import mixer_matrix
from dynalens.models.base import TextOrTokens
from dynalens.models.validation import check_index
from dynalens.probes.figures import heatmap, token_labels
from dynalens.models.surface import architecture_of, prompt_tokens, result_context
from dynalens.probes.results import Result

DEFAULT_CHANNEL_GROUPS = 8


@dataclass(kw_only=True, eq=False)
class MixerMatrices(Result):
    """The sequence-mixing matrices of one layer, ``matrices[group, query, key]``.

    Attributes
    ----------
    layer
        The layer they belong to.
    matrices
        ``[group, pos, pos]``, zero above the diagonal (causal).
    group_labels
        One label per group: ``head 3``, ``channels 0-191``, ``channel 17`` or ``hidden``.
    value_name
        What an entry is: ``attention``, ``mean |M|``, ``M`` or ``‖∂h_t/∂x_s‖``.
    signed
        Whether entries can be negative.
    """

    layer: int
    matrices: Float[Tensor, "group q k"]
    group_labels: list[str]
    value_name: str
    signed: bool

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` entries of largest magnitude over all groups, largest first."""
        frame = self.to_frame()
        order = frame["value"].abs().sort_values(ascending=False, kind="stable").index[:k]
        return frame.loc[order].reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``group, query_position, query_token, key_position, key_token, value``.

        Only causal entries (key ≤ query) are listed.
        """
        n_groups, pos, _ = self.matrices.shape
        q, k = torch.tril_indices(pos, pos)
        values = self.matrices[:, q, k]
        return pd.DataFrame(
            {
                "group": [label for label in self.group_labels for _ in range(len(q))],
                "query_position": q.repeat(n_groups).numpy(),
                "query_token": [self.str_tokens[i] for i in q.tolist()] * n_groups,
                "key_position": k.repeat(n_groups).numpy(),
                "key_token": [self.str_tokens[i] for i in k.tolist()] * n_groups,
                "value": values.reshape(-1).double().numpy(),
            }
        )

    def figure(
        self, *, group: int = 0, log: bool = False, position: int | None = None
    ) -> go.Figure:
        """Heatmap query × key of one ``group``.

        ``log`` colours by log10 of the magnitude; ``position`` outlines a key column.
        """
        group = check_index("group", group, self.matrices.shape[0])
        values = self.matrices[group].double()
        value_name = self.value_name
        if log and self.signed:
            values, value_name = values.abs(), f"|{value_name}|"
        causal = torch.ones_like(values, dtype=torch.bool).tril()
        labels = token_labels(self.str_tokens)
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
            highlight_x=None if position is None else self.position_index(position),
            y_reversed=True,
        )


def mixer_matrices(
    model: Any,
    input: TextOrTokens,
    layer: int,
    *,
    channel_groups: int | None = None,
    channels: Sequence[int] | None = None,
    include_skip: bool = False,
) -> MixerMatrices:
    """The sequence-mixing matrices of one layer (attention, SSM matrix, RNN Jacobian).

    Parameters
    ----------
    model
        Any dynalens model (transformer, Mamba, RNN).
    input
        One prompt: a string or token ids ``[pos]`` / ``[1, pos]``.
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
    MixerMatrices
        ``[group, pos, pos]``: heads, channel groups / channels, or one RNN group.
    """
    arch = architecture_of(model)
    layer = check_index("layer", layer, model.cfg.n_layers)
    if arch != "mamba" and (channel_groups is not None or channels is not None or include_skip):
        raise ValueError(
            f"channel_groups, channels and include_skip are for Mamba; this model is a {arch}"
        )
    tokens = prompt_tokens(model, input)
    if arch == "transformer":
        matrices, labels, value_name, signed = _attention(model, tokens, layer)
    elif arch == "mamba":
        matrices, labels, value_name, signed = _ssm_matrix(
            model, tokens, layer, channel_groups, channels, include_skip
        )
    else:
        matrices, labels, value_name, signed = _recurrence_jacobian(model, tokens, layer)
    return MixerMatrices(
        **result_context(model, tokens),
        layer=layer,
        matrices=matrices.float().cpu(),
        group_labels=labels,
        value_name=value_name,
        signed=signed,
    )


@torch.no_grad()
def _attention(model: Any, tokens: Int[Tensor, "1 pos"], layer: int):
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    pattern = cache[name][0]
    return pattern, [f"head {h}" for h in range(pattern.shape[0])], "attention", False


@torch.no_grad()
def _ssm_matrix(
    model: Any,
    tokens: Int[Tensor, "1 pos"],
    layer: int,
    channel_groups: int | None,
    channels: Sequence[int] | None,
    include_skip: bool,
):
    if channel_groups is not None and channels is not None:
        raise ValueError("pass channel_groups or channels, not both")
    prefix = f"blocks.{layer}.mixer"
    names = [f"{prefix}.hook_delta", f"{prefix}.hook_B", f"{prefix}.hook_C"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    delta, B, C = (cache[name].transpose(1, 2) for name in names)  # [1, d_inner | d_state, pos]
    mixer = model.blocks[layer].mixer
    d_inner = delta.shape[1]

    def materialise(chosen: list[int]) -> Float[Tensor, "c pos pos"]:
        D = mixer.D if include_skip else None
        return mixer_matrix(delta, mixer.A, B, C, D=D, channels=chosen)[0]

    if channels is not None:
        chosen = [check_index("channel", c, d_inner) for c in channels]
        if not chosen:
            raise ValueError("channels is empty: pass at least one channel index")
        return materialise(chosen), [f"channel {c}" for c in chosen], "M", True
    n_groups = channel_groups
    if n_groups is None:
        n_groups = math.gcd(DEFAULT_CHANNEL_GROUPS, d_inner)
    is_int = isinstance(n_groups, int) and not isinstance(n_groups, bool)
    if not is_int or not 1 <= n_groups <= d_inner or d_inner % n_groups:
        raise ValueError(
            f"channel_groups must divide d_inner = {d_inner} into equal groups, got {n_groups!r}"
        )
    size = d_inner // n_groups
    spans = [range(g * size, (g + 1) * size) for g in range(n_groups)]
    matrices = torch.stack([materialise(list(span)).abs().mean(0) for span in spans])
    return matrices, [f"channels {s.start}-{s.stop - 1}" for s in spans], "mean |M|", False


def _recurrence_jacobian(model: Any, tokens: Int[Tensor, "1 pos"], layer: int):
    captured: dict[str, Tensor] = {}

    def take_input(x: Tensor, hook: Any) -> Tensor:
        captured["x"] = x.detach().requires_grad_(True)
        return captured["x"]

    def take_hidden(h: Tensor, hook: Any) -> None:
        captured["h"] = h

    fwd_hooks = [
        (f"blocks.{layer}.hook_resid_pre", take_input),
        (f"blocks.{layer}.cell.hook_hidden", take_hidden),
    ]
    with torch.enable_grad():
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
        x, hidden = captured["x"], captured["h"][0]  # [1, pos, d_in], [pos, d_hidden]
        eye = torch.eye(hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        rows = []
        for t in range(hidden.shape[0]):
            # one batched backward per query position: the d_hidden rows of ∂h_t/∂x
            (jac,) = torch.autograd.grad(
                hidden[t], x, grad_outputs=eye, is_grads_batched=True, retain_graph=True
            )  # [d_hidden, 1, pos, d_in]
            rows.append(jac[:, 0].pow(2).sum(dim=(0, 2)).sqrt())
    return torch.stack(rows)[None], ["hidden"], "‖∂h_t/∂x_s‖", False
