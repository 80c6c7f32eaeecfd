"""Head scores: previous-token, induction, copying and sink, for every attention head.

Each score is a ``[layer, head]`` grid computed from one forward pass (the
patterns) or from the weights alone (copying):

- *previous-token*: mean attention from position ``i`` to ``i - 1``.
- *induction*: mean attention from a repeated token to the position right
  after its earlier occurrence(s) (on repeated random tokens this is the
  token the model should copy next), over the queries that repeat a token.
- *copying*: eigenvalue positivity of the full OV circuit
  ``W_E W_V W_O W_U`` (Elhage et al. 2021): ``sum(λ) / sum(|λ|)``, in
  ``[-1, 1]``, 1 for a head that copies every token it attends to. The
  nonzero eigenvalues of the ``[vocab, vocab]`` circuit are those of the
  ``[d_head, d_head]`` matrix ``W_O (W_U W_E) W_V`` (a cyclic permutation),
  which is what is decomposed. Layer norms are left out, as usual.
- *sink*: mean attention on the first token, :func:`dynalens.probes.sink_scores`.

Mamba has no heads; each of its ``d_inner`` channels has a materialised SSM
matrix ``M`` (:func:`dynalens.probes.mixer_matrices`), read as that channel's
"attention" once ``|M|`` has every row normalised to sum to one
(:func:`channel_patterns`). The induction, previous-token and sink scores are
computed per channel exactly as for attention and aggregated into channel
groups (the mean over a group's channels), the model's "heads"; copying (no
OV circuit) is ``nan``.

Inputs default to repeated random tokens ``BOS, x_1..x_L, x_1..x_L``
(:class:`~dynalens.models.tasks.InductionTask`), the standard induction workload.

>>> scores = dl.circuits.induction_scores(model)          # doctest: +SKIP
>>> scores.top(5, by="induction")                         # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.models.base import TextOrTokens
from dynalens.models.tasks import BOS, InductionTask
from dynalens.probes.figures import heatmap
from dynalens.probes.mixer import DEFAULT_CHANNEL_GROUPS, mixer_matrices
from dynalens.models.surface import architecture_of, result_context
from dynalens.probes.results import Result
from dynalens.probes.sinks import pattern_hook_names, sink_query_mask, sink_scores_from_patterns
from jaxtyping import Bool, Float, Int
from torch import Tensor

SCORES = ("induction", "prev_token", "copying", "sink")
"""The score grids a :class:`HeadScores` holds, in column order."""


@dataclass(kw_only=True, eq=False)
class HeadScores(Result):
    """Previous-token, induction, copying and sink scores of every head.

    Attributes
    ----------
    induction, prev_token, sink
        ``[layer, head]`` attention fractions in ``[0, 1]``, means over the batch.
    copying
        ``[layer, head]`` OV eigenvalue positivity in ``[-1, 1]``.
    n_sequences
        How many sequences the attention scores average.
    """

    induction: Float[Tensor, "layer head"]
    prev_token: Float[Tensor, "layer head"]
    copying: Float[Tensor, "layer head"]
    sink: Float[Tensor, "layer head"]
    n_sequences: int = 1

    def score(self, kind: str) -> Float[Tensor, "layer head"]:
        """The grid called ``kind`` (one of :data:`SCORES`)."""
        if kind not in SCORES:
            raise ValueError(f"kind must be one of {', '.join(SCORES)}, got {kind!r}")
        return getattr(self, kind)

    def to_frame(self) -> pd.DataFrame:
        """One row per head: ``layer, head`` and every score."""
        layers, heads = self.induction.shape
        frame = pd.DataFrame({
            "layer": torch.arange(layers).repeat_interleave(heads).numpy(),
            "head": torch.arange(heads).repeat(layers).numpy(),
        })  # fmt: skip
        for kind in SCORES:
            frame[kind] = self.score(kind).flatten().numpy()
        return frame

    def top(self, k: int = 10, by: str = "induction") -> pd.DataFrame:
        """The ``k`` heads with the highest ``by`` score."""
        self.score(by)
        return self.to_frame().nlargest(k, by).reset_index(drop=True)

    def heads(self, by: str = "induction", threshold: float = 0.5) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head whose ``by`` score exceeds ``threshold``, best first."""
        frame = self.top(self.induction.numel(), by)
        frame = frame[frame[by] > threshold]
        return list(zip(frame["layer"].tolist(), frame["head"].tolist()))

    def figure(self, *, kind: str = "induction") -> go.Figure:
        """The layer × head grid of one score."""
        values = self.score(kind)
        layers, heads = values.shape
        return heatmap(
            values.numpy(), x_labels=[f"H{h}" for h in range(heads)],
            y_labels=[f"L{layer}" for layer in range(layers)], x_title="head", y_title="layer",
            value_name=kind.replace("_", "-"), title=f"{kind.replace('_', '-')} scores · {self.model_name}",
            signed=kind == "copying", y_reversed=True,
            text=[[f"{v:.2f}" for v in row] for row in values.tolist()] if values.numel() <= 400 else None,
        )  # fmt: skip


def repeated_tokens(
    model: Any, half_len: int = 20, n_sequences: int = 8, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """Repeated random tokens ``BOS, x_1..x_L, x_1..x_L`` drawn from the model's vocabulary.

    The first token is the tokenizer's BOS id when it has one (else id 0);
    the ``x`` are distinct ids from the rest of the vocabulary.
    """
    task = InductionTask(d_vocab=model.cfg.d_vocab, half_len=half_len)
    tokens = task.sample(n_sequences, torch.Generator().manual_seed(seed)).tokens
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    if bos is not None:
        tokens[:, 0] = bos
        content = tokens[:, 1:]
        content[content == bos] = BOS  # keep every content token distinct from the BOS id
    return tokens


def induction_targets(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch q k"]:
    """``[b, q, k]`` is True when key ``k`` follows an earlier occurrence of the query's token.

    TransformerLens' induction detection pattern, batched: ``tokens[k - 1] ==
    tokens[q]`` with ``k - 1 < q``.
    """
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, q, j]: token j equals token q
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool).tril(-1)
    dup = same & earlier
    target = torch.zeros_like(dup)
    target[:, :, 1:] = dup[:, :, :-1]
    return target


def attention_scores(
    pattern: Float[Tensor, "batch head q k"], target: Bool[Tensor, "batch q k"]
) -> Float[Tensor, " head"]:
    """Per head, the mean over queries that have a target of the attention on the targets."""
    has = target.any(-1)
    if not has.any():
        raise ValueError("no query has a target position: the tokens hold no repeated token")
    mass = torch.einsum("bhqk,bqk->bhq", pattern.float(), target.float())
    return (mass * has[:, None]).sum((0, 2)) / has.sum()


@torch.no_grad()
def copying_scores(model: Any) -> Float[Tensor, "layer head"]:
    """OV-circuit eigenvalue positivity ``sum(λ) / sum(|λ|)`` of every head (weights only)."""
    _check_architecture(model, ("transformer",))
    eu = model.W_U.float() @ model.W_E.float()  # [d_model, d_model]: unembed, then embed
    w_v = model.W_V.float()  # [layer, kv_head, d_model, d_head]: grouped-query heads share one
    w_v = w_v.repeat_interleave(model.W_O.shape[1] // w_v.shape[1], dim=1)
    m = model.W_O.float() @ eu @ w_v  # [layer, head, d_head, d_head]
    eig = torch.linalg.eigvals(m)
    return eig.sum(-1).real / eig.abs().sum(-1).clamp_min(1e-12)


@torch.no_grad()
def induction_scores(
    model: Any,
    input: TextOrTokens | None = None,
    *,
    half_len: int = 20,
    n_sequences: int = 8,
    seed: int = 0,
    channel_groups: int | None = None,
) -> HeadScores:
    """Induction, previous-token, copying and sink scores of every head, from one forward pass.

    Parameters
    ----------
    model
        A transformer (``blocks.{l}.attn.hook_pattern``) or a Mamba model
        (its channel groups' mixer matrices; module docstring).
    input
        Prompts or token ids ``[batch, pos]``; default: ``n_sequences`` repeated
        random sequences of ``half_len`` tokens (:func:`repeated_tokens`;
        shorter when the model's context ``n_ctx`` is).
        The induction score needs some repeated tokens in it.
    half_len, n_sequences, seed
        Shape and seed of the default input.
    channel_groups
        Mamba only: how many channel groups make its "heads" (default as in
        :func:`~dynalens.probes.mixer_matrices`).

    Returns
    -------
    HeadScores
    """
    arch = _check_architecture(model, ("transformer", "mamba"))
    if input is None:
        n_ctx = getattr(model.cfg, "n_ctx", None)
        half_len = min(half_len, (n_ctx - 1) // 2) if n_ctx else half_len
        input = repeated_tokens(model, half_len, n_sequences, seed)
    tokens = model.to_tokens(input)
    if arch == "transformer":
        if channel_groups is not None:
            raise ValueError("channel_groups is for Mamba models; this model is a transformer")
        names = pattern_hook_names(model.cfg.n_layers)
        _, cache = model.run_with_cache(tokens, names_filter=names)
        patterns = [cache[name].cpu() for name in names]
        copying = copying_scores(model).cpu()
    else:
        patterns = mixer_patterns(model, tokens, channel_groups)
        copying = torch.full((len(patterns), patterns[0].shape[1]), float("nan"))
    cpu_tokens = tokens.cpu()
    target = induction_targets(cpu_tokens)
    pos = cpu_tokens.shape[-1]
    previous = torch.ones(pos, pos, dtype=torch.bool).tril(-1).triu(-1).expand_as(target)
    return HeadScores(
        **result_context(model, tokens[:1]),
        induction=torch.stack([attention_scores(p, target) for p in patterns]),
        prev_token=torch.stack([attention_scores(p, previous) for p in patterns]),
        copying=copying,
        sink=sink_scores_from_patterns(patterns, sink_query_mask(cpu_tokens, None, 0), 0),
        n_sequences=tokens.shape[0],
    )


@torch.no_grad()
def channel_patterns(model: Any, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch channel q k"]:
    """Every channel's materialised SSM matrix ``|M|`` with rows normalised to sum to one (Mamba)."""
    channels = list(range(model.cfg.d_inner))
    found = []
    for seq in tokens:
        m = mixer_matrices(model, seq[None], layer, channels=channels).matrices.abs()
        found.append(m / m.sum(-1, keepdim=True).clamp_min(1e-12))
    return torch.stack(found)


def channel_group_count(model: Any, channel_groups: int | None) -> int:
    """``channel_groups`` checked against ``d_inner`` (default as in :func:`~dynalens.probes.mixer_matrices`)."""
    d_inner = model.cfg.d_inner
    n = math.gcd(DEFAULT_CHANNEL_GROUPS, d_inner) if channel_groups is None else channel_groups
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= d_inner or d_inner % n:
        raise ValueError(f"channel_groups must divide d_inner = {d_inner} into equal groups, got {n!r}")
    return n


def mixer_patterns(
    model: Any, tokens: Int[Tensor, "batch pos"], channel_groups: int | None = None
) -> list[Float[Tensor, "batch group q k"]]:
    """Per layer, each channel group's mean of its channels' :func:`channel_patterns` (Mamba).

    Scores linear in the pattern (induction, previous-token, sink) read from
    a group's mean equal the mean of its channels' own scores.
    """
    groups = channel_group_count(model, channel_groups)
    return [
        channel_patterns(model, tokens, layer).unflatten(1, (groups, -1)).mean(2) for layer in range(model.cfg.n_layers)
    ]


def _check_architecture(model: Any, accepted: tuple[str, ...]) -> str:
    arch = architecture_of(model)
    if arch not in accepted:
        raise TypeError(
            f"head scores need attention patterns or mixer matrices of {' or '.join(accepted)} models; "
            f"this model is a {arch}"
        )
    return arch
