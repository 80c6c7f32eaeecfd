"""The logit lens: what the residual stream would predict after each layer.

Each layer's residual stream goes through the model's own final norm and
unembedding (``models.surface.unembed_resid``), as if the remaining layers
were skipped (nostalgebraist, 2020).

Examples
--------
>>> lens = dl.probes.LogitLens(k=5)(model, ["The capital of France is", "Rome is in"])  # doctest: +SKIP
>>> lens.top(3, prompt=1)                                                             # doctest: +SKIP
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

from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import decode_tokens, unembed_resid
from dynalens.probes.analysis import Analysis
from dynalens.probes.figures import heatmap, token_label, token_labels
from dynalens.probes.residual import resid_labels, stream_rows
from dynalens.probes.results import Result

_CHUNK = 512
"""Residual vectors unembedded at once (SmolLM2: 512 × 49152 float32 logits, 100 MB)."""

_BLOCK = 1024
"""Vocabulary entries per block of :func:`_top_k` (a block's maximum stands for the block)."""


@dataclass(kw_only=True, eq=False)
class LogitLensResult(Result):
    """Top-``k`` next-token predictions of the residual stream after each layer, at every real token.

    Row 0 reads the embedding, row ``l + 1`` the stream after layer ``l``
    (``hook_names`` says which; a model whose embedding is narrower than its
    stream has no embedding row). The last row is the model's own prediction.

    Attributes
    ----------
    top_ids, top_probs
        ``[batch, pos, row, k]`` token ids and their probabilities, most likely
        first, in the prompts' left-padded layout (pad positions: id -1, NaN).
    top_tokens
        ``top_ids`` decoded, nested ``[batch][pos][row][k]`` (empty lists at pad positions).
    hook_names
        The hook each row was read from.
    """

    top_ids: Int[Tensor, "batch pos row k"]
    top_probs: Float[Tensor, "batch pos row k"]
    top_tokens: list[list[list[list[str]]]]
    hook_names: list[str]

    def top(self, k: int = 5, *, prompt: int = 0, position: int = -1) -> pd.DataFrame:
        """The ``k`` most likely tokens at real ``position`` of ``prompt`` after each layer."""
        stored = self.top_ids.shape[-1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= stored:
            raise ValueError(f"k must be between 1 and {stored} (the k of this lens), got {k!r}")
        real = self.position_index(position, prompt) - int(self._prompts().offsets[prompt])
        frame = self.to_frame()
        at = (frame["prompt"] == prompt % len(self._prompts())) & (frame["position"] == real)
        return frame[at & (frame["rank"] < k)].reset_index(drop=True)

    def metrics(self) -> dict[str, float]:
        """``top1_prob``: the model's own top-1 probability, mean over real tokens;
        ``agree_with_final``: the share of (token, layer) whose top-1 is the final top-1."""
        prompts = self._prompts()
        ids, probs = prompts.flat(self.top_ids)[..., 0], prompts.flat(self.top_probs)[..., 0]  # [n_real, row]
        return {
            "top1_prob": float(probs[:, -1].mean()),
            "agree_with_final": float((ids == ids[:, -1:]).float().mean()),
        }

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, position, input_token, layer, hook, rank, token, token_id, prob``.

        One row per real token, layer and rank, in that order.
        """
        prompts = self._prompts()
        frame = prompts.frame().rename(columns={"token": "input_token"})
        rows, k = self.top_ids.shape[2:]
        out = frame.loc[frame.index.repeat(rows * k)].reset_index(drop=True)
        out["layer"] = np.tile(np.repeat(resid_labels(self.hook_names), k), len(frame))
        out["hook"] = np.tile(np.repeat(self.hook_names, k), len(frame))
        out["rank"] = np.tile(np.arange(k), len(frame) * rows)
        out["token"] = [
            t
            for b, row in enumerate(self.top_tokens)
            for p, at in enumerate(row)
            if prompts.mask[b, p]
            for layer in at
            for t in layer
        ]
        out["token_id"] = prompts.flat(self.top_ids).reshape(-1).numpy()
        out["prob"] = prompts.flat(self.top_probs).reshape(-1).double().numpy()
        return out

    def figure(self, *, prompt: int = 0, position: int | None = None) -> go.Figure:
        """Layers × top-``k`` at one ``position`` of ``prompt``; with no position, layers × its tokens (top-1).

        Cells show the predicted token, colour and hover its probability.
        """
        prompts = self._prompts()
        offset = int(prompts.offsets[prompt])
        tokens = self.str_tokens(prompt)
        predicted = np.array(
            [[[token_label(t) for t in layer] for layer in at] for at in self.top_tokens[prompt][offset:]],
            dtype=object,
        )  # [pos, row, k] at real positions
        probs = prompts.real(self.top_probs, prompt)  # [pos, row, k]
        if position is None:
            values, text, columns = probs[..., 0].T, predicted[..., 0].T, token_labels(tokens)
            x_title, value_name, where = "input token", "p(top-1)", "top-1 prediction"
        else:
            p = self.position_index(position, prompt) - offset
            values, text = probs[p], predicted[p]
            columns = [f"#{i + 1}" for i in range(self.top_ids.shape[-1])]
            x_title, value_name = "rank", "probability"
            where = f"at {token_label(tokens[p])} (position {p})"
        return heatmap(
            values.numpy(),
            x_labels=columns,
            y_labels=resid_labels(self.hook_names),
            x_title=x_title,
            y_title="layer",
            value_name=value_name,
            title=f"Logit lens {where} · {self.model_name}",
            text=text,
        )


class LogitLens(Analysis):
    """Decode the residual stream after every layer into its top-``k`` next tokens.

    Reads ``names.resid_stream(n_layers)`` on any architecture (transformer,
    Mamba, RNN); row 0 is the embedding (left out when it is narrower than
    the stream), row ``l + 1`` the stream after layer ``l``.

    Parameters
    ----------
    k
        How many tokens to keep per layer and position (a ``k`` above
        ``d_vocab`` keeps the whole vocabulary).

    Examples
    --------
    >>> dl.probes.LogitLens(k=5)(model, "The capital of France is").top()   # doctest: +SKIP
    """

    def __init__(self, k: int = 5):
        self.k = k

    def _validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")

    def hooks(self, model: Any) -> list[str]:
        self._validate()
        return names.resid_stream(model.cfg.n_layers)

    def _compute(self, cache: Any, prompts: Prompts) -> LogitLensResult:
        self._validate()
        model = cache.model
        k = min(self.k, model.cfg.d_vocab)
        hooks, rows = stream_rows(cache, model.cfg.n_layers, same_width=True)
        real = prompts.flat(torch.stack(rows, 2))  # [n_real, row, d_model]
        probs, ids = [], []
        for chunk in real.flatten(0, 1).split(_CHUNK):  # bounded memory: [chunk, d_vocab] logits at a time
            logits = unembed_resid(model, chunk).float()
            values, indices = _top_k(logits, k)
            probs.append(_softmax_of_top(logits, values).cpu())
            ids.append(indices.cpu())
        mask = prompts.mask.cpu()
        shape = (*mask.shape, len(hooks), k)
        top_ids = torch.full(shape, -1, dtype=torch.long)
        top_probs = torch.full(shape, float("nan"))
        top_ids[mask] = torch.cat(ids).reshape(-1, len(hooks), k)
        top_probs[mask] = torch.cat(probs).reshape(-1, len(hooks), k)
        return LogitLensResult(
            **self.provenance(model, prompts),
            top_ids=top_ids,
            top_probs=top_probs,
            top_tokens=_decoded(model, top_ids, mask),
            hook_names=hooks,
        )


def _top_k(x: Float[Tensor, "n v"], k: int) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """``x.topk(k, dim=-1)`` (values, indices; most likely first), in two stages over a long last axis.

    The ``k`` largest entries of a row lie in the ``k`` blocks of ``_BLOCK``
    entries with the largest maxima (a block outside them has ``k`` blocks
    whose maxima are at least its own), so one vectorised max per block and a
    top-k over ``k`` blocks replace a top-k over the whole row: 49,152 logits
    per row in about half the time. Entries past the last whole block are
    always candidates. Rows with few blocks take ``topk`` directly.
    """
    n, v = x.shape
    n_blocks = v // _BLOCK
    if n_blocks < 2 * k:
        return x.topk(k, dim=-1)
    blocks = x[:, : n_blocks * _BLOCK].unflatten(1, (n_blocks, _BLOCK))  # a view: [n, blocks, _BLOCK]
    best = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [n, k]
    candidates = blocks.gather(1, best[..., None].expand(n, k, _BLOCK)).flatten(1)  # [n, k * _BLOCK]
    candidates = torch.cat([candidates, x[:, n_blocks * _BLOCK :]], dim=1)  # the partial block at the end, if any
    values, at = candidates.topk(k, dim=-1)
    block = best.gather(1, (at // _BLOCK).clamp(max=k - 1))
    in_blocks = at < k * _BLOCK
    return values, torch.where(in_blocks, block * _BLOCK + at % _BLOCK, at + (n_blocks - k) * _BLOCK)


def _softmax_of_top(logits: Float[Tensor, "n d_vocab"], top: Float[Tensor, "n k"]) -> Float[Tensor, "n k"]:
    """The softmax probabilities of the ``top`` logits (most likely first), spending ``logits`` in place.

    One pass over the vocabulary after the top-k, with no [n, d_vocab]
    temporary: the largest logit is ``top[:, 0]``.
    """
    largest = top[:, :1]
    total = logits.sub_(largest).exp_().sum(dim=-1, keepdim=True)
    return (top - largest).exp() / total


def _decoded(model: Any, ids: Int[Tensor, "batch pos row k"], mask: Tensor) -> list[list[list[list[str]]]]:
    """``ids`` as strings, nested ``[batch][pos][row][k]``; empty lists at pad positions."""
    unique = ids[mask].unique()
    text = dict(zip(unique.tolist(), decode_tokens(model, unique)))
    return [
        [[[text[i] for i in layer] for layer in at] if real else [] for at, real in zip(row, row_mask)]
        for row, row_mask in zip(ids.tolist(), mask.tolist())
    ]
