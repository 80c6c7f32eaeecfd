"""Residual-stream norms per layer and token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dynalens.models.base import TextOrTokens
from dynalens.probes.figures import heatmap, token_labels
from dynalens.models.surface import prompt_tokens, result_context
from dynalens.probes.results import Result


def resid_hook_names(n_layers: int) -> list[str]:
    """The stream entering layer 0 (embeddings, positional ones included), then after each layer."""
    after = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    return ["blocks.0.hook_resid_pre", *after]


def resid_labels(hook_names: list[str]) -> list[str]:
    """Row labels of :func:`resid_hook_names`: ``embed``, then ``L{l}`` after layer ``l``."""
    return [
        "embed" if name.endswith("hook_resid_pre") else f"L{name.split('.')[1]}"
        for name in hook_names
    ]


@dataclass(kw_only=True, eq=False)
class ResidualNorms(Result):
    """L2 norms of the residual stream, row 0 the embedding, row ``l + 1`` after layer ``l``.

    Attributes
    ----------
    norms
        ``[layer + 1, pos]`` norms.
    hook_names
        The hook each row was read from.
    """

    norms: Float[Tensor, "row pos"]
    hook_names: list[str]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest norms (layer, position), largest first."""
        return self.to_frame().nlargest(k, "norm").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, hook, position, token, norm``."""
        rows, pos = self.norms.shape
        labels = resid_labels(self.hook_names)
        return pd.DataFrame(
            [
                (labels[r], self.hook_names[r], p, self.str_tokens[p], float(self.norms[r, p]))
                for r in range(rows)
                for p in range(pos)
            ],
            columns=["layer", "hook", "position", "token", "norm"],
        )

    def figure(self, *, log: bool = False, position: int | None = None) -> go.Figure:
        """Heatmap layer × token; ``log`` colours by log10 norm; ``position`` outlines a token."""
        return heatmap(
            self.norms.numpy(),
            x_labels=token_labels(self.str_tokens),
            y_labels=resid_labels(self.hook_names),
            x_title="token",
            y_title="layer",
            value_name="‖resid‖",
            title=f"Residual-stream norm · {self.model_name}",
            log=log,
            highlight_x=None if position is None else self.position_index(position),
        )


@torch.no_grad()
def residual_norms(model: Any, input: TextOrTokens) -> ResidualNorms:
    """L2 norm of the residual stream after the embedding and after every layer.

    Parameters
    ----------
    model
        Any dynalens model (transformer, Mamba, RNN).
    input
        One prompt: a string or token ids ``[pos]`` / ``[1, pos]``.

    Returns
    -------
    ResidualNorms
        ``norms[0]`` from ``blocks.0.hook_resid_pre`` (the embedding),
        ``norms[l + 1]`` from ``blocks.{l}.hook_resid_post``.
    """
    tokens = prompt_tokens(model, input)
    names, stream = resid_stream(model, tokens)
    norms = torch.stack([resid.float().norm(dim=-1) for resid in stream]).cpu()
    return ResidualNorms(**result_context(model, tokens), norms=norms, hook_names=names)


def resid_stream(
    model: Any, tokens: Int[Tensor, "1 pos"]
) -> tuple[list[str], list[Float[Tensor, "pos d_model"]]]:
    """The stream of one prompt after the embedding and each layer, and its hook names."""
    names = resid_hook_names(model.cfg.n_layers)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return names, [cache[name][0] for name in names]
