"""Residual-stream norms per layer and token, and the helpers that read the stream from a cache.

The stream is read at ``names.resid_stream(n_layers)``: the stream entering
layer 0 (the embeddings, positional ones included), then after each layer.

Examples
--------
>>> norms = dl.probes.ResidualNorms()(model, ["The cat sat", "A dog ran off"])   # doctest: +SKIP
>>> norms.to_frame()                                                            # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import Analysis
from dynalens.probes.figures import heatmap, token_labels
from dynalens.probes.results import Result


def resid_labels(hook_names: Sequence[str]) -> list[str]:
    """Row labels of residual-stream hooks: ``embed`` for the stream entering layer 0, ``L{l}`` after layer ``l``."""
    return ["embed" if name == names.resid_pre(0) else f"L{names.layer_of(name)}" for name in hook_names]


def stream_rows(
    cache: Any, n_layers: int, *, same_width: bool = False
) -> tuple[list[str], list[Float[Tensor, "batch pos d"]]]:
    """The residual stream's hook names and tensors from a cache holding ``names.resid_stream(n_layers)``.

    With ``same_width`` the embedding row is left out when it is narrower
    than the stream (an RNN whose embedding feeds a wider first cell), so the
    rows stack.
    """
    hooks = names.resid_stream(n_layers)
    rows = [cache[name] for name in hooks]
    if same_width and rows[0].shape[-1] != rows[-1].shape[-1]:
        hooks, rows = hooks[1:], rows[1:]
    return hooks, rows


def pad_fill(x: Tensor, mask: Tensor, value: float) -> Tensor:
    """``x [batch, pos, ...]`` with ``value`` at the pad positions (``mask`` False)."""
    keep = mask.to(x.device).reshape(*mask.shape, *([1] * (x.ndim - 2)))
    return x.masked_fill(~keep, value)


def row_frame(
    prompts: Prompts, hook_names: Sequence[str], labels: Sequence[str], **columns: Tensor
) -> pd.DataFrame:
    """``prompt, position, token, layer, hook`` per real token and row, plus ``[batch, pos, row]`` columns.

    Rows are in :meth:`Prompts.frame` order, each token's rows (layers) in
    order; ``labels`` name the rows in the ``layer`` column.
    """
    frame = prompts.frame()
    out = frame.loc[frame.index.repeat(len(hook_names))].reset_index(drop=True)
    out["layer"] = np.tile(list(labels), len(frame))
    out["hook"] = np.tile(list(hook_names), len(frame))
    for name, values in columns.items():
        out[name] = prompts.flat(values.cpu()).reshape(-1).double().numpy()
    return out


@dataclass(kw_only=True, eq=False)
class ResidualNormsResult(Result):
    """L2 norms of the residual stream after the embedding and after every layer.

    Attributes
    ----------
    norms
        ``[batch, pos, row]`` norms in the prompts' left-padded layout (NaN at
        pad positions); row 0 the embedding, row ``l + 1`` after layer ``l``.
    hook_names
        The hook each row was read from.
    """

    norms: Float[Tensor, "batch pos row"]
    hook_names: list[str]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest norms (prompt, layer, position), largest first."""
        return self.to_frame().nlargest(k, "norm").reset_index(drop=True)

    def metrics(self) -> dict[str, float]:
        """``max_norm`` over every real token and layer, ``final_norm``: the last row's mean."""
        real = self._prompts().flat(self.norms)  # [n_real, row]
        return {"max_norm": float(real.max()), "final_norm": float(real[:, -1].mean())}

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, position, token, layer, hook, norm``, one row per real token and layer."""
        return row_frame(self._prompts(), self.hook_names, resid_labels(self.hook_names), norm=self.norms)

    def figure(self, *, prompt: int = 0, log: bool = False, position: int | None = None) -> go.Figure:
        """Heatmap layer × token of one prompt; ``log`` colours by log10 norm; ``position`` outlines a token."""
        tokens = self.str_tokens(prompt)
        return heatmap(
            self._prompts().real(self.norms, prompt).T.numpy(),
            x_labels=token_labels(tokens),
            y_labels=resid_labels(self.hook_names),
            x_title="token",
            y_title="layer",
            value_name="‖resid‖",
            title=f"Residual-stream norm · {self.model_name}",
            log=log,
            highlight_x=None if position is None else self.position_index(position, prompt) - self._offset(prompt),
        )

    def _offset(self, prompt: int) -> int:
        return int(self._prompts().offsets[prompt])


class ResidualNorms(Analysis):
    """L2 norm of the residual stream after the embedding and after every layer, at every real token.

    Reads ``names.resid_stream(n_layers)`` on any architecture.

    Examples
    --------
    >>> dl.probes.ResidualNorms()(model, "The capital of France is").figure()   # doctest: +SKIP
    """

    def __init__(self) -> None:
        pass

    def hooks(self, model: Any) -> list[str]:
        return names.resid_stream(model.cfg.n_layers)

    def _compute(self, cache: Any, prompts: Prompts) -> ResidualNormsResult:
        model = cache.model
        hooks, rows = stream_rows(cache, model.cfg.n_layers)
        norms = torch.stack([row.float().norm(dim=-1) for row in rows], -1).cpu()
        return ResidualNormsResult(
            **self.provenance(model, prompts),
            norms=pad_fill(norms, prompts.mask, float("nan")),
            hook_names=hooks,
        )
