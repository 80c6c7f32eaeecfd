"""Head scores: previous-token, induction and sink from a cache; copying from the weights.

:class:`HeadScores` reads one forward's attention patterns and gives, per
prompt, a ``[layer, head]`` grid of each score:

- *induction*: mean attention from a repeated token to the position right
  after its earlier occurrence(s) (on repeated random tokens this is the
  token the model should copy next), over the queries that repeat a token;
- *previous-token*: mean attention from position ``i`` to ``i - 1``;
- *sink*: mean attention on the prompt's first token, over the later queries.

The batch's grid pools the queries of every prompt (each prompt weighs by
the number of queries its score averages), so it is the score of one long
batch of queries; a prompt with no repeated token has no induction score
(``nan``) and no weight in the pooled grid.

:class:`CopyingScores` is weight-only: the eigenvalue positivity of the full
OV circuit ``W_E W_V W_O W_U`` (Elhage et al. 2021): ``sum(λ) / sum(|λ|)``,
in ``[-1, 1]``, 1 for a head that copies every token it attends to. The
nonzero eigenvalues of the ``[vocab, vocab]`` circuit are those of the
``[d_head, d_head]`` matrix ``W_O (W_U W_E) W_V`` (a cyclic permutation),
which is what is decomposed. Layer norms are left out, as usual.

Mamba has no heads; each of its ``d_inner`` channels has a materialised SSM
matrix ``M`` (:func:`dynalens.kernels.mixer_matrix`, from the cached ``Δ``,
``B``, ``C``), read as that channel's "attention" once ``|M|`` has every row
normalised to sum to one (:func:`channel_patterns`). The three scores are
computed per channel exactly as for attention and aggregated into channel
groups (the mean over a group's channels), the model's "heads".

The standard induction workload is :func:`repeated_tokens`
(``BOS, x_1..x_L, x_1..x_L``, :class:`~dynalens.models.tasks.InductionTask`).

>>> tokens = dl.circuits.repeated_tokens(model)                    # doctest: +SKIP
>>> scores = dl.circuits.HeadScores()(model, tokens)               # doctest: +SKIP
>>> scores.top(5, by="induction"); scores.figure()                 # doctest: +SKIP
>>> dl.circuits.CopyingScores()(model).top(5)                      # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dynalens.kernels import mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.models.tasks import BOS, InductionTask
from dynalens.probes.analysis import Analysis, Experiment
from dynalens.probes.figures import heatmap
from dynalens.probes.results import Result

SCORES = ("induction", "prev_token", "sink")
"""The score grids a :class:`HeadScoresResult` holds, in column order."""

DEFAULT_CHANNEL_GROUPS = 8
"""Channel groups of a Mamba layer when none are asked for (``gcd(8, d_inner)``)."""


def grid_frame(grids: dict[str, Tensor]) -> pd.DataFrame:
    """One row per ``(layer, head)`` with a column per ``[layer, head]`` grid."""
    layers, heads = next(iter(grids.values())).shape
    frame = pd.DataFrame({
        "layer": torch.arange(layers).repeat_interleave(heads).numpy(),
        "head": torch.arange(heads).repeat(layers).numpy(),
    })  # fmt: skip
    for name, grid in grids.items():
        frame[name] = grid.flatten().double().numpy()
    return frame


def grid_figure(values: Tensor, value_name: str, title: str, signed: bool = False) -> go.Figure:
    layers, heads = values.shape
    return heatmap(
        values.double().numpy(), x_labels=[f"H{h}" for h in range(heads)],
        y_labels=[f"L{layer}" for layer in range(layers)], x_title="head", y_title="layer",
        value_name=value_name, title=title, signed=signed, y_reversed=True,
        text=[[f"{v:.2f}" for v in row] for row in values.tolist()] if values.numel() <= 400 else None,
    )  # fmt: skip


# ------------------------------------------------------------------ head scores
@dataclass(kw_only=True, eq=False)
class HeadScoresResult(Result):
    """Induction, previous-token and sink scores of every head, per prompt and pooled.

    Attributes
    ----------
    scores
        ``[kind, prompt, layer, head]`` attention fractions in ``[0, 1]``, kinds
        in :data:`SCORES` order; ``nan`` where a prompt has no query for a kind.
    queries
        ``[kind, prompt]``: how many queries each prompt's score averages (its weight in the pooled grid).
    """

    scores: Float[Tensor, "kind prompt layer head"]
    queries: Int[Tensor, "kind prompt"]

    def score(self, kind: str, prompt: int | None = None) -> Float[Tensor, "layer head"]:
        """The grid called ``kind`` (one of :data:`SCORES`): pooled over prompts, or of one ``prompt``."""
        if kind not in SCORES:
            raise ValueError(f"kind must be one of {', '.join(SCORES)}, got {kind!r}")
        per_prompt = self.scores[SCORES.index(kind)]
        if prompt is not None:
            self.str_tokens(prompt)  # checks the index
            return per_prompt[prompt]
        weights = self.queries[SCORES.index(kind)].to(per_prompt.dtype)
        total = weights.sum()
        if total == 0:
            return torch.full(per_prompt.shape[1:], float("nan"))
        summed = (torch.nan_to_num(per_prompt) * weights[:, None, None]).sum(0)
        return summed / total

    @property
    def induction(self) -> Float[Tensor, "layer head"]:
        """Pooled induction scores."""
        return self.score("induction")

    @property
    def prev_token(self) -> Float[Tensor, "layer head"]:
        """Pooled previous-token scores."""
        return self.score("prev_token")

    @property
    def sink(self) -> Float[Tensor, "layer head"]:
        """Pooled sink scores."""
        return self.score("sink")

    def metrics(self) -> dict[str, float]:
        """``max_{kind}`` for each score of :data:`SCORES`: the best head's pooled score (what a sweep stores)."""
        grids = {kind: self.score(kind) for kind in SCORES}
        return {
            f"max_{kind}": float(grid[~grid.isnan()].max()) if (~grid.isnan()).any() else float("nan")
            for kind, grid in grids.items()
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and head: ``prompt, layer, head`` and every score."""
        frames = []
        for prompt in range(self.scores.shape[1]):
            frame = grid_frame({kind: self.score(kind, prompt) for kind in SCORES})
            frame.insert(0, "prompt", prompt)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10, by: str = "induction") -> pd.DataFrame:
        """The ``k`` heads with the highest pooled ``by`` score: ``layer, head`` and every pooled score."""
        self.score(by)
        frame = grid_frame({kind: self.score(kind) for kind in SCORES})
        return frame.nlargest(k, by).reset_index(drop=True)

    def heads(self, by: str = "induction", threshold: float = 0.5) -> list[tuple[int, int]]:
        """``(layer, head)`` of every head whose pooled ``by`` score exceeds ``threshold``, best first."""
        frame = self.top(self.scores.shape[2] * self.scores.shape[3], by)
        frame = frame[frame[by] > threshold]
        return list(zip(frame["layer"].tolist(), frame["head"].tolist()))

    def figure(self, *, kind: str = "induction", prompt: int | None = None) -> go.Figure:
        """The layer × head grid of one score, pooled or of one ``prompt``."""
        values = self.score(kind, prompt)
        name = kind.replace("_", "-")
        where = "" if prompt is None else f" (prompt {prompt})"
        return grid_figure(values, name, f"{name} scores{where} · {self.model_name}")


class HeadScores(Analysis):
    """Induction, previous-token and sink scores of every head (Mamba: channel group), from one forward.

    Parameters
    ----------
    channel_groups
        Mamba only: how many channel groups make its "heads" (default
        ``gcd(8, d_inner)``); they must divide ``d_inner``.

    Examples
    --------
    >>> scores = HeadScores()(model, repeated_tokens(model))   # doctest: +SKIP
    >>> scores.heads("induction", 0.5)                        # doctest: +SKIP
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer", "mamba")
    requirement: ClassVar[str] = "attention patterns (or a Mamba's SSM mixer matrices)"

    def __init__(self, channel_groups: int | None = None):
        self.channel_groups = channel_groups

    def check(self, model: Any) -> None:
        super().check(model)
        if architecture_of(model) == "mamba":
            channel_group_count(model, self.channel_groups)
        elif self.channel_groups is not None:
            raise ValueError(
                f"channel_groups is for Mamba models; this model is a {architecture_of(model)}: "
                "leave channel_groups=None"
            )

    def hooks(self, model: Any) -> list[str]:
        layers = range(model.cfg.n_layers)
        if architecture_of(model) == "mamba":
            return [names.mixer(layer, part) for layer in layers for part in ("delta", "B", "C")]
        return [names.pattern(layer) for layer in layers]

    def _compute(self, cache: Any, prompts: Prompts) -> HeadScoresResult:
        model = cache.model
        mamba = architecture_of(model) == "mamba"
        groups = channel_group_count(model, self.channel_groups) if mamba else None
        scores, queries = [], []
        for prompt in range(len(prompts)):
            tokens = prompts.real(prompts.tokens, prompt, dim=1).cpu()
            if mamba:
                patterns = [group_patterns(channel_patterns(model, cache, layer, prompts, prompt), groups)
                            for layer in range(model.cfg.n_layers)]  # fmt: skip
            else:
                patterns = [_real_pattern(cache[names.pattern(layer)], prompts, prompt)
                            for layer in range(model.cfg.n_layers)]  # fmt: skip
            per_kind, counts = [], []
            for target in score_targets(tokens):
                counts.append(int(target.any(-1).sum()))
                per_kind.append(torch.stack([attention_scores(p, target) for p in patterns]))
            scores.append(torch.stack(per_kind))
            queries.append(counts)
        return HeadScoresResult(
            **self.provenance(model, prompts),
            scores=torch.stack(scores, 1).float(),
            queries=torch.tensor(queries, dtype=torch.long).T.contiguous(),
        )


def _real_pattern(pattern: Tensor, prompts: Prompts, prompt: int) -> Float[Tensor, "head q k"]:
    """One prompt's attention among its real tokens, from a padded ``[batch, head, q, k]`` pattern."""
    offset = int(prompts.offsets[prompt])
    return pattern[prompt, :, offset:, offset:].float().cpu()


def repeated_tokens(
    model: Any, half_len: int = 20, n_sequences: int = 8, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """Repeated random tokens ``BOS, x_1..x_L, x_1..x_L`` drawn from the model's vocabulary.

    The first token is the tokenizer's BOS id when it has one (else id 0);
    the ``x`` are distinct ids from the rest of the vocabulary. ``half_len``
    is lowered to fit the model's context ``n_ctx`` when it has one.
    """
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx:
        half_len = min(half_len, (n_ctx - 1) // 2)
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


def score_targets(tokens: Int[Tensor, " pos"]) -> list[Bool[Tensor, "q k"]]:
    """The ``[q, k]`` keys each score of :data:`SCORES` reads, for one prompt's real tokens."""
    pos = tokens.shape[0]
    below = torch.ones(pos, pos, dtype=torch.bool)
    previous = below.tril(-1).triu(-1)
    sink = torch.zeros(pos, pos, dtype=torch.bool)
    sink[1:, 0] = True
    return [induction_targets(tokens[None])[0], previous, sink]


def attention_scores(pattern: Float[Tensor, "head q k"], target: Bool[Tensor, "q k"]) -> Float[Tensor, " head"]:
    """Per head, the mean over queries that have a target of the attention on the targets.

    ``nan`` for every head when no query has a target.
    """
    has = target.any(-1)
    mass = torch.einsum("hqk,qk->hq", pattern.float(), target.float())
    return (mass * has).sum(-1) / has.sum()


# ----------------------------------------------------------------- Mamba channels
def channel_group_count(model: Any, channel_groups: int | None) -> int:
    """``channel_groups`` checked against ``d_inner`` (default ``gcd(8, d_inner)``)."""
    d_inner = model.cfg.d_inner
    n = math.gcd(DEFAULT_CHANNEL_GROUPS, d_inner) if channel_groups is None else channel_groups
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= d_inner or d_inner % n:
        raise ValueError(f"channel_groups must divide d_inner = {d_inner} into equal groups, got {n!r}")
    return n


def channel_patterns(
    model: Any, cache: Any, layer: int, prompts: Prompts, prompt: int
) -> Float[Tensor, "channel q k"]:
    """Every channel's SSM matrix ``|M|`` over one prompt's real tokens, rows normalised to sum to one (Mamba).

    ``M`` is materialised from the cache's ``mixer.hook_delta``, ``hook_B`` and
    ``hook_C`` of ``layer`` at the prompt's real positions.
    """
    delta, B, C = (
        prompts.real(cache[names.mixer(layer, part)], prompt)[None].transpose(1, 2)
        for part in ("delta", "B", "C")
    )  # [1, d_inner | d_state, pos]
    m = mixer_matrix(delta, model.blocks[layer].mixer.A, B, C)[0].abs().float().cpu()
    return m / m.sum(-1, keepdim=True).clamp_min(1e-12)


def group_patterns(patterns: Float[Tensor, "channel q k"], groups: int) -> Float[Tensor, "group q k"]:
    """Each channel group's mean of its channels' patterns.

    Scores linear in the pattern (induction, previous-token, sink) read from a
    group's mean equal the mean of its channels' own scores.
    """
    return patterns.unflatten(0, (groups, -1)).mean(1)


# --------------------------------------------------------------- copying scores
@dataclass(kw_only=True, eq=False)
class CopyingScoresResult(Result):
    """OV-circuit eigenvalue positivity of every head (weights only: no prompts).

    Attributes
    ----------
    scores
        ``[layer, head]`` in ``[-1, 1]``; 1 for a head that copies what it attends to.
    """

    scores: Float[Tensor, "layer head"]

    def to_frame(self) -> pd.DataFrame:
        """One row per head: ``layer, head, copying``."""
        return grid_frame({"copying": self.scores})

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the highest copying score."""
        return self.to_frame().nlargest(k, "copying").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """The layer × head grid of copying scores."""
        return grid_figure(self.scores, "copying", f"copying scores · {self.model_name}", signed=True)


class CopyingScores(Experiment):
    """OV-circuit eigenvalue positivity ``sum(λ) / sum(|λ|)`` of every head, from the weights alone.

    Examples
    --------
    >>> CopyingScores()(model).top(5)          # doctest: +SKIP
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer",)
    requirement: ClassVar[str] = "attention heads with an OV circuit"

    def __init__(self) -> None:
        pass

    @torch.no_grad()
    def run(self, model: Any, prompts: Prompts | None = None) -> CopyingScoresResult:
        """The scores of ``model``'s heads; ``prompts`` are not read (the result has none)."""
        self.check(model)
        eu = model.W_U.float() @ model.W_E.float()  # [d_model, d_model]: unembed, then embed
        w_v = model.W_V.float()  # [layer, kv_head, d_model, d_head]: grouped-query heads share one
        w_v = w_v.repeat_interleave(model.W_O.shape[1] // w_v.shape[1], dim=1)
        m = model.W_O.float() @ eu @ w_v  # [layer, head, d_head, d_head]
        eig = torch.linalg.eigvals(m)
        scores = eig.sum(-1).real / eig.abs().sum(-1).clamp_min(1e-12)
        return CopyingScoresResult(**self.provenance(model, None), scores=scores.float().cpu())
