"""Extreme tokens: attention sinks, value-state drains, residual-state peaks, active and dormant heads.

Guo et al. 2024 ("Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs", arXiv 2410.13835) tie three
phenomena to one token (usually the first): heads put most of their attention
on it (*attention sink*), its value states are small (*value-state drain*) so
attending to it adds almost nothing, and its residual stream is large
(*residual-state peak*). A head is *dormant* on an input when it sinks most
of its attention there, and *active* when it attends elsewhere; the same head
can be dormant on one input domain and active on another (on Bigram-Backcopy:
active where the query is a trigger token, dormant elsewhere).

- :func:`sink_scores`: the mean attention each head puts on the sink position.
- :func:`extreme_tokens`: sink scores with value-state and residual-state norms per token.
- :func:`head_activity`: each head's sink score and active/dormant label per input domain.

Attention patterns exist in transformers only (``blocks.{l}.attn.hook_pattern``);
compare the residual-state peaks of Mamba and RNNs with
:func:`dynalens.probes.residual_norms` and :func:`dynalens.probes.massive_activations`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dynalens.models.base import TextOrTokens
from dynalens.probes.figures import heatmap, token_labels
from dynalens.models.surface import architecture_of, result_context
from dynalens.probes.residual import resid_hook_names, resid_labels
from dynalens.probes.results import Result

SINK_THRESHOLD = 0.5
"""Default sink score above which a head counts as dormant (a sink) on an input."""

Domain = TextOrTokens | tuple[TextOrTokens, Tensor]


def check_transformer(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is a transformer (has attention patterns)."""
    arch = architecture_of(model)
    if arch != "transformer":
        raise TypeError(
            f"attention sinks need attention patterns, which a {arch} model does not have; "
            "use residual_norms or massive_activations to compare its residual-state peaks"
        )


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction of attention in [0, 1], got {threshold!r}")


def sink_query_mask(
    tokens: Int[Tensor, "batch pos"], query_mask: Bool[Tensor, "batch pos"] | None, sink_position: int
) -> Bool[Tensor, "batch pos"]:
    """The queries a sink score averages: ``query_mask`` (default all) after the sink position."""
    batch, pos = tokens.shape
    if not 0 <= sink_position < pos - 1:
        raise ValueError(
            f"sink_position {sink_position} leaves no later query in sequences of {pos} tokens: "
            f"pass 0 <= sink_position < {pos - 1}"
        )
    mask = torch.ones(batch, pos, dtype=torch.bool)
    if query_mask is not None:
        query_mask = torch.as_tensor(query_mask, dtype=torch.bool).cpu()
        if query_mask.shape != (batch, pos):
            raise ValueError(f"query_mask must have the tokens' shape {(batch, pos)}, got {tuple(query_mask.shape)}")
        mask &= query_mask
    mask[:, : sink_position + 1] = False
    if not mask.any():
        raise ValueError("query_mask selects no query after the sink position: nothing to average")
    return mask


def pattern_hook_names(n_layers: int) -> list[str]:
    """The attention-pattern hook names ``blocks.{l}.attn.hook_pattern`` of every layer."""
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]


def sink_scores_from_patterns(
    patterns: list[Float[Tensor, "batch head q k"]], mask: Bool[Tensor, "batch q"], sink_position: int
) -> Float[Tensor, "layer head"]:
    """Mean over the masked queries of each head's attention on the sink key."""
    weights = mask.float()
    scores = [
        torch.einsum("bhq,bq->h", p[..., sink_position].float().cpu(), weights) / weights.sum() for p in patterns
    ]
    return torch.stack(scores)


@torch.no_grad()
def sink_scores(
    model: Any,
    input: TextOrTokens,
    *,
    query_mask: Bool[Tensor, "batch pos"] | None = None,
    sink_position: int = 0,
) -> Float[Tensor, "layer head"]:
    """Each head's mean attention weight on the sink position.

    Parameters
    ----------
    model
        A transformer (``blocks.{l}.attn.hook_pattern``).
    input
        Prompts or token ids ``[batch, pos]`` (one batch, equal lengths).
    query_mask
        Optional ``[batch, pos]`` booleans: average over these queries only
        (an input *domain*, e.g. the queries that are trigger tokens).
    sink_position
        The key position taken as the sink (the first token by default).
        Queries at or before it are never counted.

    Returns
    -------
    Tensor ``[layer, head]`` in ``[0, 1]``.
    """
    check_transformer(model)
    tokens = model.to_tokens(input)
    mask = sink_query_mask(tokens, query_mask, sink_position)
    names = pattern_hook_names(model.cfg.n_layers)
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return sink_scores_from_patterns([cache[n] for n in names], mask, sink_position)


# -------------------------------------------------------------- extreme tokens
@dataclass(kw_only=True, eq=False)
class ExtremeTokens(Result):
    """Sink scores per head with value-state and residual-state norms per token.

    Token fields are means over the sequences of the batch at each position;
    ``tokens`` / ``str_tokens`` show the first sequence.

    Attributes
    ----------
    sink_scores
        ``[layer, head]`` mean attention on the sink position.
    value_norms
        ``[layer, kv_head, pos]`` L2 norm of the value state (``attn.hook_v``).
    resid_norms
        ``[layer + 1, pos]`` L2 norm of the residual stream (``blocks.0.hook_resid_pre``, then
        each ``blocks.{l}.hook_resid_post``).
    sink_position, threshold
        The sink key, and the sink score above which a head counts as a sink.
    n_sequences
        How many sequences the means are over.
    """

    sink_scores: Float[Tensor, "layer head"]
    value_norms: Float[Tensor, "layer kv_head pos"]
    resid_norms: Float[Tensor, "row pos"]
    sink_position: int = 0
    threshold: float = SINK_THRESHOLD
    n_sequences: int = 1

    def sink_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head whose sink score exceeds the threshold."""
        return [tuple(x) for x in torch.nonzero(self.sink_scores > self.threshold).tolist()]

    def value_drain(self) -> Float[Tensor, "layer kv_head"]:
        """Value norm of the sink token over the mean value norm of the other tokens (< 1: a drain)."""
        return _sink_over_others(self.value_norms, self.sink_position)

    def resid_peak(self) -> Float[Tensor, " row"]:
        """Residual norm of the sink token over the mean residual norm of the other tokens (> 1: a peak)."""
        return _sink_over_others(self.resid_norms, self.sink_position)

    def to_frame(self) -> pd.DataFrame:
        """One row per head: ``layer, head, sink_score, sink``."""
        layers, heads = self.sink_scores.shape
        scores = self.sink_scores.tolist()
        return pd.DataFrame(
            [(layer, head, scores[layer][head], scores[layer][head] > self.threshold)
             for layer in range(layers) for head in range(heads)],
            columns=["layer", "head", "sink_score", "sink"],
        )  # fmt: skip

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the highest sink scores."""
        return self.to_frame().nlargest(k, "sink_score").reset_index(drop=True)

    def figure(self, *, kind: str = "sinks") -> go.Figure:
        """``"sinks"``: layer × head sink scores; ``"values"``: value norms (layer·head × token);
        ``"resid"``: residual norms (layer × token, log colour)."""
        layers, heads = self.sink_scores.shape
        if kind == "sinks":
            text = [[f"{v:.2f}" for v in row] for row in self.sink_scores.tolist()]
            return heatmap(
                self.sink_scores.numpy(), x_labels=[f"H{h}" for h in range(heads)],
                y_labels=[f"L{layer}" for layer in range(layers)], x_title="head", y_title="layer",
                value_name="sink score", title=f"Attention on token {self.sink_position} · {self.model_name}",
                text=text, y_reversed=True,
            )  # fmt: skip
        x_labels = token_labels(self.str_tokens)
        if kind == "values":
            kv = self.value_norms.shape[1]
            return heatmap(
                self.value_norms.flatten(0, 1).numpy(), x_labels=x_labels,
                y_labels=[f"L{layer} V{h}" for layer in range(layers) for h in range(kv)], x_title="token",
                y_title="value head", value_name="‖v‖", title=f"Value-state norms · {self.model_name}",
                y_reversed=True,
            )  # fmt: skip
        if kind == "resid":
            return heatmap(
                self.resid_norms.numpy(), x_labels=x_labels,
                y_labels=resid_labels(resid_hook_names(layers)), x_title="token", y_title="layer",
                value_name="‖resid‖", title=f"Residual-state norms · {self.model_name}", log=True,
            )  # fmt: skip
        raise ValueError(f"kind must be 'sinks', 'values' or 'resid', got {kind!r}")


def _sink_over_others(norms: Float[Tensor, "... pos"], sink_position: int) -> Float[Tensor, "..."]:
    """The norm at the sink position over the mean norm at every other position."""
    others = torch.cat([norms[..., :sink_position], norms[..., sink_position + 1 :]], -1)
    return norms[..., sink_position] / others.mean(-1)


@torch.no_grad()
def extreme_tokens(
    model: Any,
    input: TextOrTokens,
    *,
    query_mask: Bool[Tensor, "batch pos"] | None = None,
    sink_position: int = 0,
    threshold: float = SINK_THRESHOLD,
) -> ExtremeTokens:
    """Attention sinks, value-state drains and residual-state peaks in one forward pass.

    Parameters
    ----------
    model
        A transformer.
    input
        Prompts or token ids ``[batch, pos]`` (equal lengths); token fields are
        averaged over the batch position by position.
    query_mask, sink_position
        See :func:`sink_scores`.
    threshold
        Sink score above which a head counts as a sink.

    Returns
    -------
    ExtremeTokens
    """
    check_transformer(model)
    _check_threshold(threshold)
    tokens = model.to_tokens(input)
    mask = sink_query_mask(tokens, query_mask, sink_position)
    n_layers = model.cfg.n_layers
    patterns = pattern_hook_names(n_layers)
    values = [f"blocks.{layer}.attn.hook_v" for layer in range(n_layers)]
    resid = resid_hook_names(n_layers)
    _, cache = model.run_with_cache(tokens, names_filter=patterns + values + resid)
    return ExtremeTokens(
        **result_context(model, tokens[:1]),
        sink_scores=sink_scores_from_patterns([cache[n] for n in patterns], mask, sink_position),
        value_norms=torch.stack([cache[n].float().norm(dim=-1).mean(0).T.cpu() for n in values]),
        resid_norms=torch.stack([cache[n].float().norm(dim=-1).mean(0).cpu() for n in resid]),
        sink_position=sink_position,
        threshold=float(threshold),
        n_sequences=tokens.shape[0],
    )


# ------------------------------------------------------------ active / dormant
@dataclass(kw_only=True, eq=False)
class HeadActivity(Result):
    """Each head's sink score on each input domain, and whether it is dormant there.

    ``tokens`` / ``str_tokens`` show the first sequence of the first domain.

    Attributes
    ----------
    domains
        The domain names.
    sink_scores
        ``[domain, layer, head]`` mean attention on the sink position.
    threshold
        A head is dormant on a domain when its sink score there exceeds this.
    """

    domains: list[str]
    sink_scores: Float[Tensor, "domain layer head"]
    threshold: float = SINK_THRESHOLD
    sink_position: int = 0

    @property
    def dormant(self) -> Bool[Tensor, "domain layer head"]:
        """Whether each head is dormant (a sink) on each domain."""
        return self.sink_scores > self.threshold

    def to_frame(self) -> pd.DataFrame:
        """One row per (domain, head): ``domain, layer, head, sink_score, state``."""
        dormant = self.dormant
        n_dom, layers, heads = self.sink_scores.shape
        return pd.DataFrame(
            [
                (self.domains[d], layer, head, float(self.sink_scores[d, layer, head]),
                 "dormant" if dormant[d, layer, head] else "active")
                for d in range(n_dom)
                for layer in range(layers)
                for head in range(heads)
            ],
            columns=["domain", "layer", "head", "sink_score", "state"],
        )  # fmt: skip

    def switching(self) -> pd.DataFrame:
        """Heads dormant on some domain and active on another, with their score per domain.

        Columns ``layer, head``, one ``sink_score`` column per domain, then
        ``dormant_on``, ``active_on`` and ``spread`` (largest minus smallest
        score), largest spread first.
        """
        dormant = self.dormant
        rows = []
        for layer, head in torch.nonzero(dormant.any(0) & (~dormant).any(0)).tolist():
            scores = self.sink_scores[:, layer, head]
            rows.append({
                "layer": layer, "head": head,
                **{f"sink_score[{name}]": float(s) for name, s in zip(self.domains, scores)},
                "dormant_on": [n for n, d in zip(self.domains, dormant[:, layer, head]) if d],
                "active_on": [n for n, d in zip(self.domains, dormant[:, layer, head]) if not d],
                "spread": float(scores.max() - scores.min()),
            })  # fmt: skip
        columns = ["layer", "head", *[f"sink_score[{n}]" for n in self.domains], "dormant_on", "active_on", "spread"]
        frame = pd.DataFrame(rows, columns=columns)
        return frame.sort_values("spread", ascending=False).reset_index(drop=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads whose sink score differs most between domains."""
        spread = self.sink_scores.max(0).values - self.sink_scores.min(0).values
        layers, heads = spread.shape
        frame = pd.DataFrame(
            [(layer, head, float(spread[layer, head])) for layer in range(layers) for head in range(heads)],
            columns=["layer", "head", "spread"],
        )
        return frame.nlargest(k, "spread").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """Heatmap head × domain of sink scores, ``D`` marking dormant heads."""
        n_dom, layers, heads = self.sink_scores.shape
        values = self.sink_scores.flatten(1).T.numpy()
        dormant = self.dormant.flatten(1).T.tolist()
        text = [[f"{v:.2f}{' D' if d else ''}" for v, d in zip(row, drow)] for row, drow in zip(values, dormant)]
        return heatmap(
            values, x_labels=list(self.domains), y_labels=[f"L{l}H{h}" for l in range(layers) for h in range(heads)],
            x_title="domain", y_title="head", value_name="sink score", text=text, y_reversed=True,
            title=f"Active (low) and dormant (D) heads per domain · {self.model_name}",
        )  # fmt: skip


@torch.no_grad()
def head_activity(
    model: Any,
    domains: Mapping[str, Domain],
    *,
    threshold: float = SINK_THRESHOLD,
    sink_position: int = 0,
) -> HeadActivity:
    """Sink scores of every head on each input domain, and active/dormant labels.

    Parameters
    ----------
    model
        A transformer.
    domains
        ``{name: input}``; an input is prompts / token ids ``[batch, pos]``, or a
        pair ``(input, query_mask)`` that averages only the masked queries (a
        domain of query tokens inside shared sequences).
    threshold
        Dormant when the sink score exceeds it.
    sink_position
        The sink key position.

    Returns
    -------
    HeadActivity
    """
    _check_threshold(threshold)
    if not domains:
        raise ValueError("domains is empty: pass {name: prompts or token ids or (tokens, query_mask)}")
    scores, first = [], None
    for name, domain in domains.items():
        input, mask = domain if isinstance(domain, tuple) else (domain, None)
        scores.append(sink_scores(model, input, query_mask=mask, sink_position=sink_position))
        first = model.to_tokens(input)[:1] if first is None else first
    return HeadActivity(
        **result_context(model, first),
        domains=[str(name) for name in domains],
        sink_scores=torch.stack(scores),
        threshold=float(threshold),
        sink_position=sink_position,
    )
