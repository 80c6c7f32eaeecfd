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

Mamba-2 has heads: each SSD head's matrix ``M = L ∘ (C Bᵀ)``
(:func:`dynalens.kernels.ssd_mixer_matrix`, from the cached ``dt``, ``B``,
``C``), shared by the head's ``d_head`` channels, is read the same way
(:func:`ssd_patterns`) and scored as one head. A hybrid scores each layer by
its own mixer (``model.layer_types``): attention layers from their patterns,
SSM layers from their mixer matrices; the result says which mixer each head
belongs to (:attr:`HeadScoresResult.mixers`), and a layer with fewer heads
than the widest has ``nan`` in the missing columns of the grids.

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

from dynalens.kernels import mixer_matrix, ssd_mixer_matrix
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.models.tasks import BOS, InductionTask
from dynalens.probes.analysis import Analysis, Experiment
from dynalens.probes.figures import heatmap
from dynalens.probes.layers import ssm_layers
from dynalens.probes.mixer import layer_mixers
from dynalens.probes.results import Result

SCORES = ("induction", "prev_token", "sink")
"""The score grids a :class:`HeadScoresResult` holds, in column order."""

DEFAULT_CHANNEL_GROUPS = 8
"""Channel groups of a Mamba layer when none are asked for (``gcd(8, d_inner)``)."""


def grid_frame(grids: dict[str, Tensor], mixers: list[list[str]] | None = None) -> pd.DataFrame:
    """One row per ``(layer, head)`` with a column per ``[layer, head]`` grid.

    With ``mixers`` (each layer's heads' mixers, see :attr:`HeadScoresResult.mixers`)
    a ``mixer`` column follows ``head`` and only the heads a layer has are listed.
    """
    layers, heads = next(iter(grids.values())).shape
    frame = pd.DataFrame({
        "layer": torch.arange(layers).repeat_interleave(heads).numpy(),
        "head": torch.arange(heads).repeat(layers).numpy(),
    })  # fmt: skip
    for name, grid in grids.items():
        frame[name] = grid.flatten().double().numpy()
    if mixers is None:
        return frame
    padded = [layer[h] if h < len(layer) else None for layer in mixers for h in range(heads)]
    frame.insert(2, "mixer", padded)
    return frame[frame["mixer"].notna()].reset_index(drop=True)


def grid_figure(values: Tensor, value_name: str, title: str, signed: bool = False) -> go.Figure:
    layers, heads = values.shape
    return heatmap(
        values.double().numpy(), x_labels=[f"H{h}" for h in range(heads)],
        y_labels=[f"L{layer}" for layer in range(layers)], x_title="head", y_title="layer",
        value_name=value_name, title=title, signed=signed, y_reversed=True,
        cell_format=".2f" if values.numel() <= 400 else None,
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
    mixers
        ``mixers[layer][head]``: the mixer each head of each layer belongs to
        (``attention``, ``mamba``: a channel group, ``mamba2``: an SSD head);
        a layer's list is as long as its heads (a hybrid's layers differ).
    """

    scores: Float[Tensor, "kind prompt layer head"]
    queries: Int[Tensor, "kind prompt"]
    mixers: list[list[str]]

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
        width = per_prompt.shape[-1]
        missing = torch.tensor([[h >= len(heads) for h in range(width)] for heads in self.mixers])
        return (summed / total).masked_fill(missing, float("nan"))

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
        """One row per prompt and head: ``prompt, layer, head, mixer`` and every score."""
        frames = []
        for prompt in range(self.scores.shape[1]):
            frame = grid_frame({kind: self.score(kind, prompt) for kind in SCORES}, self.mixers)
            frame.insert(0, "prompt", prompt)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10, by: str = "induction") -> pd.DataFrame:
        """The ``k`` heads with the highest pooled ``by`` score: ``layer, head, mixer`` and every pooled score."""
        self.score(by)
        frame = grid_frame({kind: self.score(kind) for kind in SCORES}, self.mixers)
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
    """Induction, previous-token and sink scores of every head, from one forward.

    A Mamba layer's "heads" are channel groups, a Mamba-2 layer's its SSD heads.

    Parameters
    ----------
    channel_groups
        Mamba layers only: how many channel groups make its "heads" (default
        ``gcd(8, d_inner)``); they must divide ``d_inner``.

    Examples
    --------
    >>> scores = HeadScores()(model, repeated_tokens(model))   # doctest: +SKIP
    >>> scores.heads("induction", 0.5)                        # doctest: +SKIP
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer", "mamba", "mamba2", "hybrid")
    requirement: ClassVar[str] = "attention patterns or SSM mixer matrices"

    def __init__(self, channel_groups: int | None = None):
        self.channel_groups = channel_groups

    def check(self, model: Any) -> None:
        super().check(model)
        check_channel_groups(model, self.channel_groups)

    def hooks(self, model: Any) -> list[str]:
        return mixer_pattern_hooks(model)

    def _compute(self, cache: Any, prompts: Prompts) -> HeadScoresResult:
        model = cache.model
        scores, queries, mixers = [], [], []
        for prompt in range(len(prompts)):
            tokens = prompts.real(prompts.tokens, prompt, dim=1).cpu()
            layers = [head_patterns(model, cache, layer, prompts, prompt, self.channel_groups)
                      for layer in range(model.cfg.n_layers)]  # fmt: skip
            mixers, patterns = [kinds for kinds, _ in layers], [heads for _, heads in layers]
            per_kind, counts = [], []
            for target in score_targets(tokens):
                counts.append(int(target.any(-1).sum()))
                per_kind.append(pad_heads([attention_scores(p, target) for p in patterns]))
            scores.append(torch.stack(per_kind))
            queries.append(counts)
        return HeadScoresResult(
            **self.provenance(model, prompts),
            scores=torch.stack(scores, 1).float(),
            queries=torch.tensor(queries, dtype=torch.long).T.contiguous(),
            mixers=mixers,
        )


def pad_heads(per_layer: list[Float[Tensor, " head"]]) -> Float[Tensor, "layer head"]:
    """Per-layer head vectors as one ``[layer, head]`` grid, ``nan`` past a layer's heads."""
    width = max(len(v) for v in per_layer)
    return torch.stack([torch.cat([v.float(), v.new_full((width - len(v),), float("nan"))]) for v in per_layer])


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


# ----------------------------------------------------------------- every layer's heads
#: The hooks each kind of mixer's patterns read, by layer.
_MIXER_HOOKS = {
    "attention": lambda layer: [names.pattern(layer)],
    "mamba": lambda layer: [names.mixer(layer, part) for part in ("delta", "B", "C")],
    "mamba2": lambda layer: [names.mixer(layer, part) for part in ("dt", "B", "C")],
}


def mixer_pattern_hooks(model: Any) -> list[str]:
    """The hooks :func:`layer_patterns` reads on every layer of ``model``."""
    return [
        name
        for layer in range(model.cfg.n_layers)
        for mixer in layer_mixers(model, layer)
        for name in _MIXER_HOOKS[mixer](layer)
    ]


def layer_patterns(
    model: Any, cache: Any, layer: int, prompts: Prompts, prompt: int
) -> list[tuple[str, Float[Tensor, "unit q k"]]]:
    """Each mixer of ``layer`` with its patterns over one prompt's real tokens, rows summing to one.

    ``(mixer, patterns)`` per mixer of the layer (:func:`~dynalens.probes.mixer.layer_mixers`):
    ``attention`` one per head, ``mamba`` one per channel (:func:`channel_patterns`),
    ``mamba2`` one per SSD head (:func:`ssd_patterns`); none on an MLP-only layer.
    """
    read = {
        "attention": lambda: _real_pattern(cache[names.pattern(layer)], prompts, prompt),
        "mamba": lambda: channel_patterns(model, cache, layer, prompts, prompt),
        "mamba2": lambda: ssd_patterns(model, cache, layer, prompts, prompt),
    }
    return [(mixer, read[mixer]()) for mixer in layer_mixers(model, layer)]


def head_patterns(
    model: Any, cache: Any, layer: int, prompts: Prompts, prompt: int, channel_groups: int | None = None
) -> tuple[list[str], Float[Tensor, "head q k"]]:
    """The mixer of each of ``layer``'s heads and their patterns over one prompt's real tokens.

    :func:`layer_patterns` with a Mamba layer's channels averaged into
    ``channel_groups`` groups (:func:`group_patterns`); no heads on an MLP-only layer.
    """
    mixers, patterns = [], []
    for mixer, pattern in layer_patterns(model, cache, layer, prompts, prompt):
        if mixer == "mamba":
            pattern = group_patterns(pattern, channel_group_count(model, channel_groups, layer))
        mixers += [mixer] * len(pattern)
        patterns.append(pattern)
    n = int(prompts.lengths[prompt])
    return mixers, torch.cat(patterns) if patterns else torch.zeros(0, n, n)


def check_channel_groups(model: Any, channel_groups: int | None) -> None:
    """Raise if ``channel_groups`` does not divide every Mamba layer's ``d_inner``, or the model has none."""
    layers = [layer for layer, kind in ssm_layers(model).items() if kind == "mamba"]
    if channel_groups is not None and not layers:
        raise ValueError(
            f"channel_groups is for Mamba layers; this {architecture_of(model)} has none: leave channel_groups=None"
        )
    for layer in layers:
        channel_group_count(model, channel_groups, layer)


def channel_group_count(model: Any, channel_groups: int | None, layer: int = 0) -> int:
    """``channel_groups`` checked against a Mamba layer's ``d_inner`` (default ``gcd(8, d_inner)``)."""
    d_inner = model.blocks[layer].mixer.cfg.d_inner
    n = math.gcd(DEFAULT_CHANNEL_GROUPS, d_inner) if channel_groups is None else channel_groups
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= d_inner or d_inner % n:
        raise ValueError(f"channel_groups must divide d_inner = {d_inner} into equal groups, got {n!r}")
    return n


def _normalised_rows(m: Float[Tensor, "unit q k"]) -> Float[Tensor, "unit q k"]:
    """``|m|`` with every row scaled to sum to one (float32, CPU)."""
    m = m.abs().float().cpu()
    return m / m.sum(-1, keepdim=True).clamp_min(1e-12)


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
    return _normalised_rows(mixer_matrix(delta, model.blocks[layer].mixer.A, B, C)[0])


def ssd_patterns(model: Any, cache: Any, layer: int, prompts: Prompts, prompt: int) -> Float[Tensor, "head q k"]:
    """Every SSD head's ``|M|`` over one prompt's real tokens, rows normalised to sum to one (Mamba-2).

    ``M = L ∘ (C Bᵀ)`` with ``Δ`` (:func:`~dynalens.kernels.ssd_mixer_matrix`)
    from the cache's ``mixer.hook_dt``, ``hook_B`` and ``hook_C`` of ``layer``
    at the prompt's real positions; the ``D`` skip is left out.
    """
    dt, B, C = (prompts.real(cache[names.mixer(layer, part)], prompt)[None] for part in ("dt", "B", "C"))
    A = model.blocks[layer].mixer.A.to(dt.device)
    return _normalised_rows(ssd_mixer_matrix(dt, A, B, C)[0])


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
