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

- :class:`SinkScores`: the mean attention each head puts on the sink position, per prompt.
- :class:`ExtremeTokens`: sink scores with value-state and residual-state norms per token.
- :class:`HeadActivity`: each head's sink score and active/dormant label per input domain
  (a domain is a set of queries, given as a mask over the prompts).

The sink position counts each prompt's real tokens from 0, and a prompt's
score averages its real queries after the sink (those a ``query_mask``
keeps); batch-wide scores weight every query alike. Attention patterns exist
in transformers only (``names.pattern(l)``); compare the residual-state peaks
of Mamba and RNNs with :class:`~dynalens.probes.ResidualNorms` and
:class:`~dynalens.probes.MassiveActivations`. The tensor functions
(:func:`sink_query_mask`, :func:`sink_attention`, :func:`pooled_sink_scores`)
score any attention-like pattern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import Analysis
from dynalens.probes.figures import heatmap, token_labels
from dynalens.probes.residual import pad_fill, resid_labels, stream_rows
from dynalens.probes.results import Result

SINK_THRESHOLD = 0.5
"""Default sink score above which a head counts as dormant (a sink) on an input."""


def pattern_hook_names(n_layers: int) -> list[str]:
    """``names.pattern(l)`` of every layer."""
    return [names.pattern(layer) for layer in range(n_layers)]


# ------------------------------------------------------------ tensor functions
def sink_query_mask(
    prompts: Prompts | Int[Tensor, "batch pos"],
    query_mask: Bool[Tensor, "batch pos"] | None = None,
    sink_position: int = 0,
) -> Bool[Tensor, "batch pos"]:
    """The queries a sink score averages: each prompt's real tokens after its sink, kept by ``query_mask``.

    Parameters
    ----------
    prompts
        The batch (left-padded), or token ids ``[batch, pos]`` whose every token is real.
    query_mask
        Optional ``[batch, pos]`` booleans in the same layout: the queries to keep.
    sink_position
        The sink key, counted in each prompt's real tokens from 0.

    Returns
    -------
    Tensor ``[batch, pos]`` on the CPU.
    """
    if isinstance(prompts, Prompts):
        real, offsets = prompts.mask.cpu(), prompts.offsets.cpu()
    else:
        real = torch.ones(tuple(prompts.shape), dtype=torch.bool)
        offsets = torch.zeros(prompts.shape[0], dtype=torch.long)
    batch, pos = real.shape
    lengths = real.sum(-1)
    if isinstance(sink_position, bool) or not isinstance(sink_position, int) or sink_position < 0:
        raise ValueError(f"sink_position must be a non-negative integer, got {sink_position!r}")
    short = [b for b in range(batch) if int(lengths[b]) < sink_position + 2]
    if short:
        n = int(lengths[short[0]])
        raise ValueError(
            f"sink_position {sink_position} leaves no later query in prompt {short[0]} of {n} tokens: "
            f"pass 0 <= sink_position < {n - 1}, or longer prompts"
        )
    queries = real & (torch.arange(pos)[None, :] > (offsets + sink_position)[:, None])
    if query_mask is not None:
        query_mask = torch.as_tensor(query_mask).cpu()
        if query_mask.shape != (batch, pos) or query_mask.dtype != torch.bool:
            raise ValueError(
                f"query_mask must be booleans of the tokens' shape {(batch, pos)} (the prompts' left-padded "
                f"layout), got {query_mask.dtype} {tuple(query_mask.shape)}"
            )
        queries &= query_mask
    if not queries.any():
        raise ValueError("query_mask selects no query after the sink position: nothing to average")
    return queries


def sink_attention(
    patterns: list[Float[Tensor, "batch head q k"]],
    queries: Bool[Tensor, "batch q"],
    sink_columns: Int[Tensor, " batch"],
) -> tuple[Float[Tensor, "batch layer head"], Int[Tensor, " batch"]]:
    """Each prompt's mean attention of each head on its sink key, over its ``queries``.

    Parameters
    ----------
    patterns
        One attention pattern per layer.
    queries
        The queries to average (:func:`sink_query_mask`).
    sink_columns
        Each prompt's sink key as a column of the padded batch.

    Returns
    -------
    scores, n_queries
        ``[batch, layer, head]`` (NaN for a prompt with no query) and ``[batch]``
        how many queries each prompt's scores average.
    """
    queries = queries.cpu()
    n_queries = queries.sum(-1).float()
    scores = []
    for p in patterns:
        p = p.detach().float().cpu()
        index = sink_columns.cpu().reshape(-1, 1, 1, 1).expand(*p.shape[:3], 1)
        on_sink = p.gather(-1, index)[..., 0]  # [batch, head, q]
        on_sink = torch.where(queries[:, None, :], on_sink, 0.0)  # what pad or left-out queries hold never leaks
        scores.append(on_sink.sum(-1) / n_queries[:, None])
    return torch.stack(scores, 1), n_queries.long()


def pooled_sink_scores(
    scores: Float[Tensor, "... batch layer head"], n_queries: Int[Tensor, "... batch"]
) -> Float[Tensor, "... layer head"]:
    """The batch's sink scores, every query weighted alike: ``Σ_b n_b s_b / Σ_b n_b``."""
    weights = n_queries.to(scores.dtype)[..., None, None]
    return (scores.nan_to_num() * weights).sum(-3) / weights.sum(-3)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction of attention in [0, 1], got {threshold!r}")


def _head_frame(scores: Float[Tensor, "batch layer head"], n_queries: Tensor, threshold: float) -> pd.DataFrame:
    batch, layers, heads = scores.shape
    b, layer, head = (i.reshape(-1) for i in torch.meshgrid(
        torch.arange(batch), torch.arange(layers), torch.arange(heads), indexing="ij"
    ))  # fmt: skip
    flat = scores.reshape(-1).double()
    return pd.DataFrame({
        "prompt": b.numpy(), "layer": layer.numpy(), "head": head.numpy(), "sink_score": flat.numpy(),
        "n_queries": n_queries[b].numpy(), "sink": (flat > threshold).numpy(),
    })  # fmt: skip


def _mean_frame(scores: Float[Tensor, "layer head"], column: str = "sink_score") -> pd.DataFrame:
    """``layer, head, <column>`` per head."""
    layers, heads = scores.shape
    return pd.DataFrame({
        "layer": torch.arange(layers).repeat_interleave(heads).numpy(),
        "head": torch.arange(heads).repeat(layers).numpy(),
        column: scores.reshape(-1).double().numpy(),
    })  # fmt: skip


def _sink_heatmap(scores: Float[Tensor, "layer head"], title: str) -> go.Figure:
    layers, heads = scores.shape
    return heatmap(
        scores.numpy(), x_labels=[f"H{h}" for h in range(heads)], y_labels=[f"L{layer}" for layer in range(layers)],
        x_title="head", y_title="layer", value_name="sink score", title=title,
        cell_format=".2f", y_reversed=True,
    )  # fmt: skip


class _SinkAnalysis(Analysis):
    """Attention-pattern analyses: transformers only."""

    architectures: ClassVar[tuple[str, ...] | None] = ("transformer",)
    requirement: ClassVar[str] = "attention patterns"

    def hooks(self, model: Any) -> list[str]:
        return pattern_hook_names(model.cfg.n_layers)

    def _scores(
        self, cache: Any, prompts: Prompts, query_mask: Tensor | None
    ) -> tuple[Float[Tensor, "batch layer head"], Int[Tensor, " batch"]]:
        queries = sink_query_mask(prompts, query_mask, self.sink_position)
        patterns = [cache[name] for name in pattern_hook_names(cache.model.cfg.n_layers)]
        return sink_attention(patterns, queries, prompts.offsets.cpu() + self.sink_position)


# ------------------------------------------------------------------ sink scores
@dataclass(kw_only=True, eq=False)
class SinkScoresResult(Result):
    """Each head's mean attention on the sink token, per prompt.

    Attributes
    ----------
    scores
        ``[batch, layer, head]`` each prompt's mean attention on its sink, in ``[0, 1]``.
    n_queries
        ``[batch]`` how many queries each prompt's scores average.
    sink_position
        The sink key, in each prompt's real tokens.
    """

    scores: Float[Tensor, "batch layer head"]
    n_queries: Int[Tensor, " batch"]
    sink_position: int = 0

    @property
    def mean(self) -> Float[Tensor, "layer head"]:
        """The batch's scores, every query weighted alike."""
        return pooled_sink_scores(self.scores, self.n_queries)

    def metrics(self) -> dict[str, float]:
        """``mean_sink_score`` over heads (batch-wide), ``n_sink_heads`` above 0.5."""
        return {"mean_sink_score": float(self.mean.mean()), "n_sink_heads": float((self.mean > SINK_THRESHOLD).sum())}

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and head: ``prompt, layer, head, sink_score, n_queries, sink`` (score > 0.5)."""
        return _head_frame(self.scores, self.n_queries, SINK_THRESHOLD)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the highest batch-wide scores: ``layer, head, sink_score``."""
        return _mean_frame(self.mean).nlargest(k, "sink_score").reset_index(drop=True)

    def figure(self, *, prompt: int | None = None) -> go.Figure:
        """Layer × head scores of the batch, or of one ``prompt``."""
        scores = self.mean if prompt is None else self.scores[prompt]
        return _sink_heatmap(scores, f"Attention on token {self.sink_position} · {self.model_name}")


class SinkScores(_SinkAnalysis):
    """Each head's mean attention weight on the sink position, per prompt.

    Parameters
    ----------
    sink_position
        The key taken as the sink, in each prompt's real tokens (the first by
        default). Queries at or before it are never counted.
    query_mask
        Optional ``[batch, pos]`` booleans in the prompts' left-padded layout:
        average over these queries only (an input *domain*, e.g. the queries
        that are trigger tokens).

    Examples
    --------
    >>> dl.probes.SinkScores()(model, ["The cat sat on the mat", "A dog ran"]).mean   # doctest: +SKIP
    """

    def __init__(self, sink_position: int = 0, query_mask: Bool[Tensor, "batch pos"] | None = None):
        self.sink_position = sink_position
        self.query_mask = query_mask

    def _compute(self, cache: Any, prompts: Prompts) -> SinkScoresResult:
        scores, n_queries = self._scores(cache, prompts, self.query_mask)
        return SinkScoresResult(
            **self.provenance(cache.model, prompts), scores=scores, n_queries=n_queries,
            sink_position=self.sink_position,
        )  # fmt: skip


# -------------------------------------------------------------- extreme tokens
@dataclass(kw_only=True, eq=False)
class ExtremeTokensResult(Result):
    """Sink scores per head with value-state and residual-state norms per token.

    Attributes
    ----------
    sink_scores
        ``[batch, layer, head]`` each prompt's mean attention on its sink.
    n_queries
        ``[batch]`` how many queries each prompt's scores average.
    value_norms
        ``[batch, pos, layer, kv_head]`` L2 norm of the value state (``names.attn(l, "v")``),
        NaN at pad positions.
    resid_norms
        ``[batch, pos, row]`` L2 norm of the residual stream (``hook_names``), NaN at pad positions.
    hook_names
        The residual-stream hook of each row.
    sink_position, threshold
        The sink key, and the sink score above which a head counts as a sink.
    """

    sink_scores: Float[Tensor, "batch layer head"]
    n_queries: Int[Tensor, " batch"]
    value_norms: Float[Tensor, "batch pos layer kv_head"]
    resid_norms: Float[Tensor, "batch pos row"]
    hook_names: list[str]
    sink_position: int = 0
    threshold: float = SINK_THRESHOLD

    @property
    def mean_sink_scores(self) -> Float[Tensor, "layer head"]:
        """The batch's sink scores, every query weighted alike."""
        return pooled_sink_scores(self.sink_scores, self.n_queries)

    def sink_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head whose batch-wide sink score exceeds the threshold."""
        return [tuple(x) for x in torch.nonzero(self.mean_sink_scores > self.threshold).tolist()]

    def value_drain(self, prompt: int | None = None) -> Float[Tensor, "layer kv_head"]:
        """Value norm of the sink token over the mean value norm of the prompt's other tokens (< 1: a drain).

        Of one ``prompt``, or the mean over the prompts.
        """
        return self._sink_over_others(self.value_norms, prompt)

    def resid_peak(self, prompt: int | None = None) -> Float[Tensor, " row"]:
        """Residual norm of the sink token over the mean residual norm of the other tokens (> 1: a peak).

        Of one ``prompt``, or the mean over the prompts.
        """
        return self._sink_over_others(self.resid_norms, prompt)

    def _sink_over_others(self, norms: Float[Tensor, "batch pos ..."], prompt: int | None) -> Tensor:
        prompts = self._prompts()
        picked = range(len(prompts)) if prompt is None else [prompt]
        ratios = []
        for b in picked:
            real = prompts.real(norms, b)  # [length, ...]
            others = torch.cat([real[: self.sink_position], real[self.sink_position + 1 :]])
            ratios.append(real[self.sink_position] / others.mean(0))
        return torch.stack(ratios).mean(0)

    def metrics(self) -> dict[str, float]:
        """``mean_sink_score`` over heads (batch-wide), ``n_sink_heads``, ``value_drain`` and ``resid_peak`` (means)."""
        return {
            "mean_sink_score": float(self.mean_sink_scores.mean()),
            "n_sink_heads": float(len(self.sink_heads())),
            "value_drain": float(self.value_drain().mean()),
            "resid_peak": float(self.resid_peak().mean()),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and head: ``prompt, layer, head, sink_score, n_queries, sink``."""
        return _head_frame(self.sink_scores, self.n_queries, self.threshold)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the highest batch-wide sink scores: ``layer, head, sink_score, sink``."""
        frame = _mean_frame(self.mean_sink_scores)
        frame["sink"] = frame["sink_score"] > self.threshold
        return frame.nlargest(k, "sink_score").reset_index(drop=True)

    def figure(self, *, kind: str = "sinks", prompt: int | None = None) -> go.Figure:
        """``"sinks"``: layer × head sink scores (the batch, or one ``prompt``);
        ``"values"``: value norms (layer·head × token); ``"resid"``: residual
        norms (layer × token, log colour), of ``prompt`` (default 0)."""
        if kind == "sinks":
            scores = self.mean_sink_scores if prompt is None else self.sink_scores[prompt]
            return _sink_heatmap(scores, f"Attention on token {self.sink_position} · {self.model_name}")
        if kind not in ("values", "resid"):
            raise ValueError(f"kind must be 'sinks', 'values' or 'resid', got {kind!r}")
        prompt = 0 if prompt is None else prompt
        x_labels = token_labels(self.str_tokens(prompt))
        if kind == "values":
            values = self._prompts().real(self.value_norms, prompt)  # [length, layer, kv_head]
            layers, kv = values.shape[1:]
            return heatmap(
                values.flatten(1).T.numpy(), x_labels=x_labels,
                y_labels=[f"L{layer} V{h}" for layer in range(layers) for h in range(kv)], x_title="token",
                y_title="value head", value_name="‖v‖", title=f"Value-state norms · {self.model_name}",
                y_reversed=True,
            )  # fmt: skip
        return heatmap(
            self._prompts().real(self.resid_norms, prompt).T.numpy(), x_labels=x_labels,
            y_labels=resid_labels(self.hook_names), x_title="token", y_title="layer",
            value_name="‖resid‖", title=f"Residual-state norms · {self.model_name}", log=True,
        )  # fmt: skip


class ExtremeTokens(_SinkAnalysis):
    """Attention sinks, value-state drains and residual-state peaks, from one cache.

    Reads every layer's ``names.pattern(l)`` and ``names.attn(l, "v")`` and
    the residual stream ``names.resid_stream(n_layers)``.

    Parameters
    ----------
    sink_position, query_mask
        See :class:`SinkScores`.
    threshold
        Sink score above which a head counts as a sink.
    """

    def __init__(
        self,
        sink_position: int = 0,
        threshold: float = SINK_THRESHOLD,
        query_mask: Bool[Tensor, "batch pos"] | None = None,
    ):
        self.sink_position = sink_position
        self.threshold = threshold
        self.query_mask = query_mask

    def hooks(self, model: Any) -> list[str]:
        n_layers = model.cfg.n_layers
        values = [names.attn(layer, "v") for layer in range(n_layers)]
        return [*super().hooks(model), *values, *names.resid_stream(n_layers)]

    def _compute(self, cache: Any, prompts: Prompts) -> ExtremeTokensResult:
        _check_threshold(self.threshold)
        model = cache.model
        scores, n_queries = self._scores(cache, prompts, self.query_mask)
        values = [cache[names.attn(layer, "v")] for layer in range(model.cfg.n_layers)]
        value_norms = torch.stack([v.float().norm(dim=-1) for v in values], 2).cpu()  # [batch, pos, layer, kv]
        hooks, rows = stream_rows(cache, model.cfg.n_layers)
        resid_norms = torch.stack([r.float().norm(dim=-1) for r in rows], -1).cpu()
        nan = float("nan")
        return ExtremeTokensResult(
            **self.provenance(model, prompts),
            sink_scores=scores,
            n_queries=n_queries,
            value_norms=pad_fill(value_norms, prompts.mask, nan),
            resid_norms=pad_fill(resid_norms, prompts.mask, nan),
            hook_names=hooks,
            sink_position=self.sink_position,
            threshold=float(self.threshold),
        )


# ------------------------------------------------------------ active / dormant
@dataclass(kw_only=True, eq=False)
class HeadActivityResult(Result):
    """Each head's sink score on each input domain, and whether it is dormant there.

    Attributes
    ----------
    domains
        The domain names.
    sink_scores
        ``[domain, batch, layer, head]`` each prompt's mean attention on its sink
        over the domain's queries (NaN where the prompt has none).
    n_queries
        ``[domain, batch]`` how many queries of each prompt each domain holds.
    threshold
        A head is dormant on a domain when its batch-wide sink score there exceeds this.
    sink_position
        The sink key, in each prompt's real tokens.
    """

    domains: list[str]
    sink_scores: Float[Tensor, "domain batch layer head"]
    n_queries: Int[Tensor, "domain batch"]
    threshold: float = SINK_THRESHOLD
    sink_position: int = 0

    @property
    def mean_sink_scores(self) -> Float[Tensor, "domain layer head"]:
        """Each domain's sink scores over the batch, every query weighted alike."""
        return pooled_sink_scores(self.sink_scores, self.n_queries)

    @property
    def dormant(self) -> Bool[Tensor, "domain layer head"]:
        """Whether each head is dormant (a sink) on each domain."""
        return self.mean_sink_scores > self.threshold

    def to_frame(self) -> pd.DataFrame:
        """One row per (domain, prompt, head): ``domain, prompt, layer, head, sink_score, n_queries, state``.

        ``state`` is the prompt's own: ``dormant`` above the threshold, ``active``
        below, ``none`` where the prompt has no query in the domain.
        """
        frames = []
        for d, name in enumerate(self.domains):
            frame = _head_frame(self.sink_scores[d], self.n_queries[d], self.threshold)
            frame["state"] = ["none" if n == 0 else "dormant" if s else "active"
                              for n, s in zip(frame["n_queries"], frame.pop("sink"))]  # fmt: skip
            frame.insert(0, "domain", name)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def metrics(self) -> dict[str, float]:
        """``n_switching`` heads (dormant on some domain, active on another), ``n_dormant`` (head, domain) pairs."""
        dormant = self.dormant
        return {"n_switching": float((dormant.any(0) & (~dormant).any(0)).sum()), "n_dormant": float(dormant.sum())}

    def switching(self) -> pd.DataFrame:
        """Heads dormant on some domain and active on another, with their batch-wide score per domain.

        Columns ``layer, head``, one ``sink_score`` column per domain, then
        ``dormant_on``, ``active_on`` and ``spread`` (largest minus smallest
        score), largest spread first.
        """
        dormant, scores_all = self.dormant, self.mean_sink_scores
        rows = []
        for layer, head in torch.nonzero(dormant.any(0) & (~dormant).any(0)).tolist():
            scores = scores_all[:, layer, head]
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
        """The ``k`` heads whose batch-wide sink score differs most between domains."""
        scores = self.mean_sink_scores
        spread = scores.max(0).values - scores.min(0).values
        return _mean_frame(spread, "spread").nlargest(k, "spread").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """Heatmap head × domain of batch-wide sink scores, ``D`` marking dormant heads."""
        _, layers, heads = self.mean_sink_scores.shape
        values = self.mean_sink_scores.flatten(1).T.numpy()
        dormant = self.dormant.flatten(1).T.tolist()
        text = [[f"{v:.2f}{' D' if d else ''}" for v, d in zip(row, drow)] for row, drow in zip(values, dormant)]
        return heatmap(
            values, x_labels=list(self.domains), y_labels=[f"L{l}H{h}" for l in range(layers) for h in range(heads)],
            x_title="domain", y_title="head", value_name="sink score", text=text, y_reversed=True,
            title=f"Active (low) and dormant (D) heads per domain · {self.model_name}",
        )  # fmt: skip


class HeadActivity(_SinkAnalysis):
    """Sink scores of every head on each input domain, and active/dormant labels.

    A domain is a set of queries of the prompts: ``{"trigger": is_trigger,
    "other": ~is_trigger}`` with ``[batch, pos]`` masks in the prompts'
    left-padded layout. Domains of different texts are prompts of one batch
    with masks that keep each domain's prompts.

    Parameters
    ----------
    domains
        ``{name: query_mask}``; ``None``: one domain ``"all"`` of every query.
    threshold
        Dormant when the batch-wide sink score exceeds it.
    sink_position
        The sink key position, in each prompt's real tokens.
    """

    def __init__(
        self,
        domains: Mapping[str, Bool[Tensor, "batch pos"]] | None = None,
        threshold: float = SINK_THRESHOLD,
        sink_position: int = 0,
    ):
        self.domains = domains
        self.threshold = threshold
        self.sink_position = sink_position

    def _compute(self, cache: Any, prompts: Prompts) -> HeadActivityResult:
        _check_threshold(self.threshold)
        domains = {"all": None} if self.domains is None else dict(self.domains)
        if not domains or not all(isinstance(name, str) for name in domains):
            raise ValueError("domains must map names (str) to query masks [batch, pos], or be None for every query")
        found = [self._scores(cache, prompts, mask) for mask in domains.values()]
        return HeadActivityResult(
            **self.provenance(cache.model, prompts),
            domains=list(domains),
            sink_scores=torch.stack([scores for scores, _ in found]),
            n_queries=torch.stack([n for _, n in found]),
            threshold=float(self.threshold),
            sink_position=self.sink_position,
        )
