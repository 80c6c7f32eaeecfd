"""Head ablation (zero, mean, resample) and attention masking, against a random-head control.

An ablation replaces a head's output ``blocks.{l}.attn.hook_z`` (``[batch,
pos, head, d_head]``, before ``W_O``):

- ``"zero"``: by zeros;
- ``"mean"``: by its mean over every (sequence, position) of a reference set;
- ``"resample"``: at each (sequence, position), by its value at a random
  (sequence, position) of the reference set.

*Masking* (``"mask"``) instead makes the head attend uniformly to every key
it can see, which is what setting its pre-softmax scores to zero does (the
Retrieval Head paper's intervention); ``last_queries=n`` masks only the last
``n`` query positions (the answer being read out while teacher forcing, so
the prompt is left alone as in the paper's decoding-only masking).

:func:`ablate_heads` measures a task's score with nothing ablated, with the
chosen heads ablated, and with as many random other heads ablated (a new
draw each trial), over several trials, and reports means with confidence
intervals.

>>> effect = dl.circuits.ablate_heads(model, [(1, 6)], task=task, trials=5)   # doctest: +SKIP
>>> effect.to_frame()                                                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.models.tasks import Task
from dynalens.probes.figures import TEMPLATE
from dynalens.models.surface import model_name_of
from dynalens.probes.results import Result
from dynalens.probes.sinks import check_transformer
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

Head = tuple[int, int]
Hook = tuple[str, Callable]

METHODS = ("zero", "mean", "resample", "mask")
"""Accepted ablation methods."""

CONDITIONS = ("clean", "ablated", "control")
"""The three scores of every trial: nothing ablated, the chosen heads, random heads."""


class Scorer(Protocol):
    """What :func:`ablate_heads` measures: one number per trial, higher is better."""

    def score(self, model: Any, fwd_hooks: Sequence[Hook], generator: torch.Generator) -> float:
        """The score with ``fwd_hooks`` on, on data drawn from ``generator``."""

    def reference_tokens(self, generator: torch.Generator) -> Int[Tensor, "batch pos"]:
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
def _reference_z(model: Any, tokens: Tensor, layers: Iterable[int]) -> dict[int, Float[Tensor, "n head d_head"]]:
    """Every (sequence, position) of each layer's ``hook_z`` on the reference tokens."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return {int(name.split(".")[1]): cache[name].flatten(0, 1) for name in names}


def head_hooks(
    model: Any,
    heads: Iterable[Head] | pd.DataFrame,
    method: str = "zero",
    *,
    reference: Int[Tensor, "batch pos"] | None = None,
    last_queries: int | None = None,
    generator: torch.Generator | None = None,
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
        Token ids whose activations ``"mean"`` and ``"resample"`` use.
    last_queries
        ``"mask"`` only: mask the last ``last_queries`` query positions only.
    generator
        Seeds ``"resample"``'s draws.

    Returns
    -------
    list of ``(hook_name, fn)``, one per layer that holds a chosen head.
    """
    check_transformer(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if last_queries is not None and (method != "mask" or not isinstance(last_queries, int) or last_queries < 1):
        raise ValueError(f"last_queries must be a positive integer, with method='mask' only; got {last_queries!r}")
    layers = _by_layer(as_heads(heads, model))
    if method == "mask":
        return [(f"blocks.{layer}.attn.hook_pattern", _mask_fn(idx, last_queries)) for layer, idx in layers.items()]
    if method == "zero":
        return [(f"blocks.{layer}.attn.hook_z", _replace_fn(idx, None, None)) for layer, idx in layers.items()]
    if reference is None:
        raise ValueError(f"method={method!r} needs reference token ids to draw activations from")
    ref = _reference_z(model, model.to_tokens(reference), layers)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return [
        (f"blocks.{layer}.attn.hook_z", _replace_fn(idx, ref[layer][:, idx], gen if method == "resample" else None))
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


def _mask_fn(heads: list[int], last_queries: int | None) -> Callable:
    def hook(pattern: Float[Tensor, "batch head q k"], hook: Any) -> Tensor:
        q, k = pattern.shape[-2:]
        visible = torch.ones(q, k, dtype=pattern.dtype, device=pattern.device).tril(k - q)
        uniform = visible / visible.sum(-1, keepdim=True)
        rows = slice(None) if last_queries is None else slice(max(0, k - last_queries - (k - q)), None)
        pattern = pattern.clone()
        pattern[:, heads, rows] = uniform[rows]
        return pattern

    return hook


@dataclass(kw_only=True, eq=False)
class HeadAblation(Result):
    """A task's score with nothing, the chosen heads, and random control heads ablated, per trial.

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
        """One row per condition plus the two effects (``clean - ablated``, ``clean - control``)."""
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


def ablate_heads(
    model: Any,
    heads: Iterable[Head] | pd.DataFrame,
    task: Task | Scorer,
    *,
    method: str = "zero",
    baseline: str = "random",
    trials: int = 5,
    exclude: Iterable[Head] | pd.DataFrame = (),
    last_queries: int | None = None,
    batch_size: int = 32,
    confidence: float = 0.95,
    seed: int = 0,
) -> HeadAblation:
    """Score a task with ``heads`` ablated and with as many random heads ablated, over trials.

    Parameters
    ----------
    model
        A transformer.
    heads
        ``(layer, head)`` pairs or a frame with ``layer`` / ``head`` columns.
    task
        A synthetic :class:`~dynalens.models.tasks.Task` (scored by its
        teacher-forced accuracy on ``batch_size`` fresh sequences per trial) or
        any :class:`Scorer` (e.g. :class:`dynalens.circuits.NeedleScorer`).
    method
        ``"zero"``, ``"mean"``, ``"resample"`` or ``"mask"``.
    baseline
        ``"random"``: the control ablates as many heads drawn at random, anew
        each trial, from the heads outside ``heads`` and ``exclude``.
    trials
        Number of trials; each draws new data and new control heads.
    exclude
        Heads the control never draws (the Retrieval Head paper draws outside
        the top 100 retrieval heads).
    last_queries
        ``"mask"`` only: mask the last ``last_queries`` queries only (for a
        :class:`~dynalens.circuits.NeedleScorer`, its ``answer_queries``).
    confidence
        Level of the reported confidence intervals.
    seed
        Seeds data, control draws and resampling.

    Returns
    -------
    HeadAblation
    """
    check_transformer(model)
    chosen = as_heads(heads, model)
    if not chosen:
        raise ValueError("heads is empty: pass at least one (layer, head)")
    if baseline != "random":
        raise ValueError(f"baseline must be 'random', got {baseline!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    scorer = TaskScorer(task, batch_size) if isinstance(task, Task) else task
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    skip = set(chosen) | set(as_heads(exclude, model))
    pool = [(layer, head) for layer in range(n_layers) for head in range(n_heads) if (layer, head) not in skip]
    if len(pool) < len(chosen):
        raise ValueError(
            f"the control needs {len(chosen)} heads outside heads and exclude, but only {len(pool)} remain"
        )
    draws = torch.Generator().manual_seed(seed)
    scores, controls = [], []
    for trial in range(trials):
        control = [pool[i] for i in torch.randperm(len(pool), generator=draws)[: len(chosen)].tolist()]
        reference = (
            scorer.reference_tokens(torch.Generator().manual_seed(seed + 10_000 + trial))
            if method in ("mean", "resample") else None
        )  # fmt: skip
        row = []
        for chosen_heads in (None, chosen, control):
            hooks = [] if chosen_heads is None else head_hooks(
                model, chosen_heads, method, reference=reference, last_queries=last_queries,
                generator=torch.Generator().manual_seed(seed + trial),
            )  # fmt: skip
            row.append(scorer.score(model, hooks, torch.Generator().manual_seed(seed + trial)))
        scores.append(row)
        controls.append([list(h) for h in control])
    return HeadAblation(
        model_name=model_name_of(model),
        architecture="transformer",
        tokens=torch.zeros(0, dtype=torch.long),
        str_tokens=[],
        scores=torch.tensor(scores, dtype=torch.float32),
        heads=[list(h) for h in chosen],
        control_heads=controls,
        method=method,
        metric=getattr(scorer, "metric", "accuracy"),
        confidence=confidence,
    )
