"""Head ablation (zero, mean, resample) and attention masking, against a random-head control.

An ablation replaces a head's output ``attn.hook_z`` (``[batch, pos, head,
d_head]``, before ``W_O``):

- ``"zero"``: by zeros;
- ``"mean"``: by its mean over every real (prompt, position) of a reference set;
- ``"resample"``: at each (prompt, position), by its value at a random real
  (prompt, position) of the reference set.

*Masking* (``"mask"``) instead makes the head attend uniformly to every key
it can see, which is what setting its pre-softmax scores to zero does (the
Retrieval Head paper's intervention); ``last_queries=n`` masks only the last
``n`` query positions (the answer being read out while teacher forcing, so
the prompt is left alone as in the paper's decoding-only masking).

:class:`HeadAblation` measures a score with nothing ablated, with the chosen
heads ablated, and with as many random other heads ablated (a new draw each
trial), over several trials, and reports means with confidence intervals.
The score is a synthetic task's accuracy on fresh data each trial, any
:class:`Scorer` (e.g. :class:`~dynalens.circuits.NeedleScorer`), or a
``metric`` of the logits on the prompts the experiment runs on.

>>> effect = dl.circuits.HeadAblation([(1, 6)], task=task, trials=5)(model)   # doctest: +SKIP
>>> effect.to_frame()                                                        # doctest: +SKIP
>>> dl.circuits.HeadAblation([(1, 6)], metric=metric)(model, prompts)        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from scipy import stats
from torch import Tensor

from dynalens.models import names
from dynalens.models.prompts import PromptInput, Prompts
from dynalens.models.tasks import Task
from dynalens.probes.analysis import Experiment
from dynalens.probes.figures import TEMPLATE
from dynalens.probes.results import Result

Head = tuple[int, int]
Hook = tuple[str, Callable]
Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]

METHODS = ("zero", "mean", "resample", "mask")
"""Accepted ablation methods."""

CONDITIONS = ("clean", "ablated", "control")
"""The three scores of every trial: nothing ablated, the chosen heads, random heads."""


class Scorer(Protocol):
    """What :class:`HeadAblation` measures: one number per trial, higher is better."""

    def score(self, model: Any, fwd_hooks: Sequence[Hook], generator: torch.Generator) -> float:
        """The score with ``fwd_hooks`` on, on data drawn from ``generator``."""

    def reference_tokens(self, generator: torch.Generator) -> Int[Tensor, "batch pos"] | Prompts:
        """Inputs whose activations mean and resample ablation draw from."""


@dataclass
class TaskScorer:
    """A synthetic :class:`~dynalens.models.tasks.Task`'s teacher-forced accuracy as a :class:`Scorer`."""

    task: Task
    batch_size: int = 32

    @torch.no_grad()
    def score(self, model: Any, fwd_hooks: Sequence[Hook], generator: torch.Generator) -> float:
        batch = self.task.sample(self.batch_size, generator)
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=list(fwd_hooks))
        return self.task.accuracy(logits, batch)

    def reference_tokens(self, generator: torch.Generator) -> Int[Tensor, "batch pos"]:
        return self.task.sample(self.batch_size, generator).tokens


@dataclass
class PromptScorer:
    """A metric of the logits on fixed prompts as a :class:`Scorer` (the batch mean of its values).

    ``metric`` maps logits ``[batch, pos, vocab]`` to one value per prompt
    ``[batch]`` or a scalar. The prompts are also the reference set of mean and
    resample ablation, and "mask" spreads attention over their real keys only.
    """

    prompts: Prompts
    metric: Metric

    @property
    def key_mask(self) -> Bool[Tensor, "batch pos"]:
        return self.prompts.mask

    @torch.no_grad()
    def score(self, model: Any, fwd_hooks: Sequence[Hook], generator: torch.Generator) -> float:
        return float(self.metric(model.run_with_hooks(self.prompts, fwd_hooks=list(fwd_hooks))).float().mean())

    def reference_tokens(self, generator: torch.Generator) -> Prompts:
        return self.prompts


def as_heads(heads: Iterable[Head] | pd.DataFrame, model: Any) -> list[Head]:
    """``(layer, head)`` pairs from pairs or a frame with ``layer`` and ``head`` columns, checked."""
    if isinstance(heads, pd.DataFrame):
        if not {"layer", "head"} <= set(heads.columns):
            raise ValueError(f"a frame of heads needs 'layer' and 'head' columns, got {list(heads.columns)}")
        heads = zip(heads["layer"].tolist(), heads["head"].tolist())
    pairs = [(int(layer), int(head)) for layer, head in heads]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for layer, head in pairs:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise IndexError(
                f"head ({layer}, {head}) does not exist: layers are 0 to {n_layers - 1}, "
                f"heads 0 to {n_heads - 1}"
            )
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"heads must be distinct, got {pairs}")
    return pairs


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    layers: dict[int, list[int]] = {}
    for layer, head in heads:
        layers.setdefault(layer, []).append(head)
    return layers


@torch.no_grad()
def _reference_z(model: Any, reference: PromptInput, layers: Iterable[int]) -> dict[int, Float[Tensor, "n head d_head"]]:
    """Every real (prompt, position) of each layer's ``attn.hook_z`` on the reference prompts."""
    prompts = Prompts(model, reference)
    wanted = {layer: names.attn(layer, "z") for layer in layers}
    _, cache = model.run_with_cache(prompts, names_filter=list(wanted.values()))
    return {layer: prompts.flat(cache[name]) for layer, name in wanted.items()}


def head_hooks(
    model: Any,
    heads: Iterable[Head] | pd.DataFrame,
    method: str = "zero",
    *,
    reference: PromptInput | None = None,
    last_queries: int | None = None,
    generator: torch.Generator | None = None,
    key_mask: Bool[Tensor, "batch pos"] | None = None,
) -> list[Hook]:
    """Forward hooks that ablate or mask ``heads``; pass them to ``run_with_hooks`` or ``hooks``.

    Parameters
    ----------
    model
        A transformer.
    heads
        ``(layer, head)`` pairs, or a frame with ``layer`` / ``head`` columns
        (``scores.top(k)``).
    method
        ``"zero"``, ``"mean"``, ``"resample"`` or ``"mask"`` (module docstring).
    reference
        Prompts (or token ids) whose activations ``"mean"`` and ``"resample"`` use.
    last_queries
        ``"mask"`` only: mask the last ``last_queries`` query positions only.
    generator
        Seeds ``"resample"``'s draws.
    key_mask
        ``"mask"`` only: ``[batch, pos]`` real keys of the left-padded batch
        the hooks run on (``prompts.mask``); attention is spread over these only.

    Returns
    -------
    list of ``(hook_name, fn)``, one per layer that holds a chosen head.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if last_queries is not None and (method != "mask" or not isinstance(last_queries, int) or last_queries < 1):
        raise ValueError(f"last_queries must be a positive integer, with method='mask' only; got {last_queries!r}")
    layers = _by_layer(as_heads(heads, model))
    if method == "mask":
        return [(names.pattern(layer), _mask_fn(idx, last_queries, key_mask)) for layer, idx in layers.items()]
    if method == "zero":
        return [(names.attn(layer, "z"), _replace_fn(idx, None, None)) for layer, idx in layers.items()]
    if reference is None:
        raise ValueError(f"method={method!r} needs reference prompts or token ids to draw activations from")
    ref = _reference_z(model, reference, layers)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return [
        (names.attn(layer, "z"), _replace_fn(idx, ref[layer][:, idx], gen if method == "resample" else None))
        for layer, idx in layers.items()
    ]


def _replace_fn(heads: list[int], ref: Tensor | None, generator: torch.Generator | None) -> Callable:
    def hook(z: Float[Tensor, "batch pos head d_head"], hook: Any) -> Tensor:
        z = z.clone()
        if ref is None:
            z[:, :, heads] = 0.0
        elif generator is None:
            z[:, :, heads] = ref.mean(0).to(z)
        else:
            draw = torch.randint(ref.shape[0], z.shape[:2], generator=generator)
            z[:, :, heads] = ref[draw].to(z)
        return z

    return hook


def _mask_fn(heads: list[int], last_queries: int | None, key_mask: Tensor | None) -> Callable:
    def hook(pattern: Float[Tensor, "batch head q k"], hook: Any) -> Tensor:
        q, k = pattern.shape[-2:]
        visible = torch.ones(q, k, dtype=pattern.dtype, device=pattern.device).tril(k - q)
        visible = visible.expand(pattern.shape[0], q, k)
        if key_mask is not None and key_mask.shape == (pattern.shape[0], k):
            visible = visible * key_mask.to(pattern.device, pattern.dtype)[:, None, :]
        uniform = visible / visible.sum(-1, keepdim=True).clamp_min(1)
        rows = slice(None) if last_queries is None else slice(max(0, q - last_queries), None)
        pattern = pattern.clone()
        pattern[:, heads, rows] = uniform[:, None, rows]
        return pattern

    return hook


@dataclass(kw_only=True, eq=False)
class HeadAblationResult(Result):
    """A score with nothing, the chosen heads, and random control heads ablated, per trial.

    Attributes
    ----------
    scores
        ``[trial, 3]``: the ``clean``, ``ablated`` and ``control`` scores.
    heads
        The ablated ``[layer, head]`` pairs.
    control_heads
        Per trial, the random heads of the control (as many as ``heads``).
    method, metric
        How heads were ablated, and what the score measures.
    confidence
        Level of the confidence intervals (Student t over trials).
    """

    scores: Float[Tensor, "trial 3"]
    heads: list[list[int]]
    control_heads: list[list[list[int]]]
    method: str
    metric: str
    confidence: float = 0.95

    def interval(self, values: Tensor) -> tuple[float, float, float]:
        """Mean and confidence interval of ``values`` over trials (``nan`` width for one trial)."""
        values = values.double()
        mean = values.mean().item()
        if values.numel() < 2:
            return mean, float("nan"), float("nan")
        half = stats.t.ppf(0.5 + self.confidence / 2, values.numel() - 1) * values.std().item() / values.numel() ** 0.5
        return mean, mean - half, mean + half

    def to_frame(self) -> pd.DataFrame:
        """One row per condition plus the two effects (``clean - ablated``, ``clean - control``).

        The score of each trial is over the whole batch (or the task's fresh
        data), so the table has no per-prompt rows.
        """
        rows = {name: self.scores[:, i] for i, name in enumerate(CONDITIONS)}
        rows["effect"] = self.scores[:, 0] - self.scores[:, 1]
        rows["control_effect"] = self.scores[:, 0] - self.scores[:, 2]
        return pd.DataFrame(
            [(name, *self.interval(v)) for name, v in rows.items()],
            columns=["condition", "mean", "ci_low", "ci_high"],
        )

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ablated heads (at most ``k``)."""
        return pd.DataFrame(self.heads[:k], columns=["layer", "head"])

    @property
    def effect(self) -> float:
        """Mean drop of the score when the chosen heads are ablated."""
        return (self.scores[:, 0] - self.scores[:, 1]).mean().item()

    @property
    def control_effect(self) -> float:
        """Mean drop of the score when as many random heads are ablated."""
        return (self.scores[:, 0] - self.scores[:, 2]).mean().item()

    def figure(self) -> go.Figure:
        """Bars of the three mean scores with their confidence intervals."""
        frame = self.to_frame().iloc[:3]
        fig = go.Figure(go.Bar(
            x=frame["condition"], y=frame["mean"], marker_color=["#4c78a8", "#e45756", "#9d9d9d"],
            error_y={"type": "data", "symmetric": False, "array": frame["ci_high"] - frame["mean"],
                     "arrayminus": frame["mean"] - frame["ci_low"]},
        ))  # fmt: skip
        fig.update_layout(
            template=TEMPLATE, yaxis_title=self.metric,
            title=f"{self.method} ablation of {len(self.heads)} heads vs random · {self.model_name}",
        )  # fmt: skip
        return fig


class HeadAblation(Experiment):
    """Score with ``heads`` ablated and with as many random heads ablated, over trials.

    Parameters
    ----------
    heads
        ``(layer, head)`` pairs or a frame with ``layer`` / ``head`` columns.
    task
        A synthetic :class:`~dynalens.models.tasks.Task` (scored by its
        teacher-forced accuracy on ``batch_size`` fresh sequences per trial) or
        any :class:`Scorer` (e.g. :class:`dynalens.circuits.NeedleScorer`);
        these draw their own data, and the prompts of a run are not read.
    metric
        Instead of ``task``: a metric of the logits ``[batch, pos, vocab]``
        (one value per prompt ``[batch]``, or a scalar), scored on the prompts
        the experiment runs on (the batch mean); the prompts are also the
        reference of ``"mean"`` and ``"resample"``.
    method
        ``"zero"``, ``"mean"``, ``"resample"`` or ``"mask"``.
    baseline
        ``"random"``: the control ablates as many heads drawn at random, anew
        each trial, from the heads outside ``heads`` and ``exclude``.
    trials
        Number of trials; each draws new control heads (and new task data).
    exclude
        Heads the control never draws (the Retrieval Head paper draws outside
        the top 100 retrieval heads).
    last_queries
        ``"mask"`` only: mask the last ``last_queries`` queries only (for a
        :class:`~dynalens.circuits.NeedleScorer`, its ``answer_queries``).
    batch_size
        Sequences per trial of a ``task``.
    confidence
        Level of the reported confidence intervals.
    seed
        Seeds data, control draws and resampling.

    Examples
    --------
    >>> HeadAblation([(1, 1)], task=task, trials=3)(model).to_frame()     # doctest: +SKIP
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer",)
    requirement: ClassVar[str] = "attention heads"

    def __init__(
        self,
        heads: Iterable[Head] | pd.DataFrame,
        task: Task | Scorer | None = None,
        *,
        metric: Metric | None = None,
        method: str = "zero",
        baseline: str = "random",
        trials: int = 5,
        exclude: Iterable[Head] | pd.DataFrame = (),
        last_queries: int | None = None,
        batch_size: int = 32,
        confidence: float = 0.95,
        seed: int = 0,
    ):
        self.heads = heads
        self.task = task
        self.metric = metric
        self.method = method
        self.baseline = baseline
        self.trials = trials
        self.exclude = exclude
        self.last_queries = last_queries
        self.batch_size = batch_size
        self.confidence = confidence
        self.seed = seed

    def provenance(self, model: Any, prompts: Prompts | None) -> dict[str, Any]:
        fields = super().provenance(model, prompts)
        for key in ("heads", "exclude"):  # a frame of heads (``scores.top(k)``) as plain pairs
            fields["params"][key] = [list(h) for h in as_heads(getattr(self, key), model)]
        return fields

    def _validate(self, model: Any) -> list[Head]:
        chosen = as_heads(self.heads, model)
        if not chosen:
            raise ValueError("heads is empty: pass at least one (layer, head)")
        if (self.task is None) == (self.metric is None):
            raise ValueError("pass either task (a Task or a Scorer) or metric (of the logits on the prompts), not both")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.baseline != "random":
            raise ValueError(f"baseline must be 'random', got {self.baseline!r}")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be a positive integer, got {self.trials!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence!r}")
        return chosen

    def run(self, model: Any, prompts: Prompts | None = None) -> HeadAblationResult:
        """The clean, ablated and control scores of every trial.

        ``prompts`` are read with a ``metric`` only (and required then).
        """
        self.check(model)
        chosen = self._validate(model)
        if self.metric is not None:
            if prompts is None:
                raise ValueError("a metric is scored on prompts: pass prompts, e.g. HeadAblation(...)(model, prompts)")
            prompts = Prompts(model, prompts)
            scorer: Any = PromptScorer(prompts, self.metric)
        else:
            prompts = None
            scorer = TaskScorer(self.task, self.batch_size) if isinstance(self.task, Task) else self.task
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        skip = set(chosen) | set(as_heads(self.exclude, model))
        pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in skip]
        if len(pool) < len(chosen):
            raise ValueError(
                f"the control needs {len(chosen)} heads outside heads and exclude, but only {len(pool)} remain"
            )
        seed, draws = self.seed, torch.Generator().manual_seed(self.seed)
        key_mask = getattr(scorer, "key_mask", None)
        scores, controls = [], []
        for trial in range(self.trials):
            control = [pool[i] for i in torch.randperm(len(pool), generator=draws)[: len(chosen)].tolist()]
            reference = (
                scorer.reference_tokens(torch.Generator().manual_seed(seed + 10_000 + trial))
                if self.method in ("mean", "resample") else None
            )  # fmt: skip
            row = []
            for chosen_heads in (None, chosen, control):
                hooks = [] if chosen_heads is None else head_hooks(
                    model, chosen_heads, self.method, reference=reference, last_queries=self.last_queries,
                    generator=torch.Generator().manual_seed(seed + trial), key_mask=key_mask,
                )  # fmt: skip
                row.append(scorer.score(model, hooks, torch.Generator().manual_seed(seed + trial)))
            scores.append(row)
            controls.append([list(h) for h in control])
        default = "accuracy" if self.metric is None else getattr(self.metric, "__name__", "metric")
        return HeadAblationResult(
            **self.provenance(model, prompts),
            scores=torch.tensor(scores, dtype=torch.float32),
            heads=[list(h) for h in chosen],
            control_heads=controls,
            method=self.method,
            metric=getattr(scorer, "metric", default) if self.metric is None else default,
            confidence=self.confidence,
        )

