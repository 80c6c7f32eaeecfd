"""The logit lens: what the residual stream would predict after each layer.

Each layer's residual stream goes through the model's own final norm and
unembedding (``model_surface.unembed_resid``), as if the remaining layers were
skipped (nostalgebraist, 2020).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dynalens.models.base import TextOrTokens
from dynalens.probes.figures import heatmap, token_label, token_labels
from dynalens.models.surface import (
    decode_tokens,
    prompt_tokens,
    result_context,
    unembed_resid,
)
from dynalens.probes.residual import resid_labels, resid_stream
from dynalens.probes.results import Result

_CHUNK = 1024
"""Residual vectors unembedded at once (SmolLM2: 1024 × 49152 float32 logits, 200 MB)."""


@dataclass(kw_only=True, eq=False)
class LogitLens(Result):
    """Top-``k`` next-token predictions of the residual stream after each layer.

    Row 0 reads the embedding, row ``l + 1`` the stream after layer ``l``
    (``hook_names`` says which; a model whose embedding is narrower than its
    stream has no embedding row). The last row is the model's own prediction.

    Attributes
    ----------
    top_ids, top_probs
        ``[row, pos, k]`` token ids and their probabilities, most likely first.
    top_tokens
        ``top_ids`` decoded, nested ``[row][pos][k]``.
    hook_names
        The hook each row was read from.
    """

    top_ids: Int[Tensor, "row pos k"]
    top_probs: Float[Tensor, "row pos k"]
    top_tokens: list[list[list[str]]]
    hook_names: list[str]

    def top(self, k: int = 5, *, position: int = -1) -> pd.DataFrame:
        """The ``k`` most likely tokens at ``position`` after each layer."""
        stored = self.top_ids.shape[-1]
        if not 1 <= k <= stored:
            raise ValueError(f"k must be between 1 and {stored} (the k of this lens), got {k}")
        frame = self.to_frame()
        at = frame["position"] == self.position_index(position)
        return frame[at & (frame["rank"] < k)].reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, hook, position, input_token, rank, token, token_id, prob``."""
        rows, pos, k = self.top_ids.shape
        labels = resid_labels(self.hook_names)
        return pd.DataFrame(
            {
                "layer": np.repeat(labels, pos * k),
                "hook": np.repeat(self.hook_names, pos * k),
                "position": np.tile(np.repeat(np.arange(pos), k), rows),
                "input_token": np.tile(np.repeat(self.str_tokens, k), rows),
                "rank": np.tile(np.arange(k), rows * pos),
                "token": [t for row in self.top_tokens for at in row for t in at],
                "token_id": self.top_ids.reshape(-1).numpy(),
                "prob": self.top_probs.reshape(-1).double().numpy(),
            }
        )

    def figure(self, *, position: int | None = None) -> go.Figure:
        """Layers × top-``k`` at one ``position``; with no position, layers × tokens of the top-1.

        Cells show the predicted token, colour and hover its probability.
        """
        predicted = np.array(
            [[[token_label(t) for t in at] for at in row] for row in self.top_tokens], dtype=object
        )  # [row, pos, k]
        if position is None:
            values, text, columns = self.top_probs[..., 0], predicted[..., 0], self.str_tokens
            x_title, value_name, where = "input token", "p(top-1)", "top-1 prediction"
        else:
            p = self.position_index(position)
            values, text = self.top_probs[:, p], predicted[:, p]
            columns = [f"#{i + 1}" for i in range(self.top_ids.shape[-1])]
            x_title, value_name = "rank", "probability"
            where = f"at {token_label(self.str_tokens[p])} (position {p})"
        return heatmap(
            values.numpy(),
            x_labels=token_labels(columns) if position is None else columns,
            y_labels=resid_labels(self.hook_names),
            x_title=x_title,
            y_title="layer",
            value_name=value_name,
            title=f"Logit lens {where} · {self.model_name}",
            text=text,
        )


@torch.no_grad()
def logit_lens(model: Any, input: TextOrTokens, k: int = 5) -> LogitLens:
    """Decode the residual stream after every layer into its top-``k`` next tokens.

    Parameters
    ----------
    model
        Any dynalens model (transformer, Mamba, RNN).
    input
        One prompt: a string or token ids ``[pos]`` / ``[1, pos]``.
    k
        How many tokens to keep per layer and position (at most ``d_vocab``:
        a larger ``k`` keeps the whole vocabulary).

    Returns
    -------
    LogitLens
        Row 0 from ``blocks.0.hook_resid_pre`` (the embedding), row ``l + 1``
        from ``blocks.{l}.hook_resid_post``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(k, model.cfg.d_vocab)
    tokens = prompt_tokens(model, input)
    names, stream = resid_stream(model, tokens)
    if stream[0].shape[-1] != stream[-1].shape[-1]:  # an embedding narrower than the stream (RNNs)
        names, stream = names[1:], stream[1:]
    flat = torch.stack(stream).flatten(0, 1)  # [row * pos, d_model]
    probs, ids = [], []
    for chunk in flat.split(_CHUNK):  # bounded memory: [chunk, d_vocab] logits at a time
        logits = unembed_resid(model, chunk).float()
        top = logits.topk(k, dim=-1)
        probs.append((top.values - logits.logsumexp(dim=-1, keepdim=True)).exp().cpu())
        ids.append(top.indices.cpu())
    shape = (len(stream), tokens.shape[1], k)
    top_ids = torch.cat(ids).reshape(shape)
    return LogitLens(
        **result_context(model, tokens),
        top_ids=top_ids,
        top_probs=torch.cat(probs).reshape(shape),
        top_tokens=[[decode_tokens(model, ids_at) for ids_at in row] for row in top_ids],
        hook_names=names,
    )
