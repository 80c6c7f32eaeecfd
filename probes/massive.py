"""Massive activations: single scalars of a hidden state orders of magnitude above the rest.

Sun et al. 2024 ("Massive Activations in Large Language Models", arXiv
2402.17762) call an activation massive when its magnitude exceeds 100 *and*
is about 1000× the median magnitude of its hidden state; in LLMs a handful of
them sit in fixed channels on the first token and on delimiter tokens, appear
in an early layer and ride the residual stream to the end, acting as
input-independent biases: setting them to zero breaks the model, setting them
to their mean leaves it intact.

This module measures, per layer, the largest magnitudes with their (token,
channel), the median and the criterion (:func:`massive_activations`); the
ratio ``r = mean_x max|h| / mean_x median|h|`` that tracks them over training
(:func:`massive_ratio`); and the intervention (:func:`ablate_massive`). It
reads the residual stream of any architecture, or the recurrent state of
Mamba (``mixer.hook_ssm_state``) and RNNs (``cell.hook_hidden``, the LSTM's
``cell.hook_cell``), so architectures compare side by side.

Examples
--------
>>> found = dl.probes.massive_activations(model, "Summer is warm. Winter is cold.")  # doctest: +SKIP
>>> found.top(5)                                                                      # doctest: +SKIP
>>> found.carriers()                                                                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dynalens.models.base import TextOrTokens
from dynalens.probes.figures import TEMPLATE, heatmap
from dynalens.models.surface import architecture_of, decode_tokens, prompt_tokens, result_context
from dynalens.probes.residual import resid_hook_names
from dynalens.probes.results import Result

MIN_MAGNITUDE = 100.0
"""Default absolute threshold of the criterion (Sun et al.)."""

MIN_RATIO = 1000.0
"""Default ratio to the hidden state's median magnitude (Sun et al.)."""

SITES = ("resid", "state")
ABLATION_MODES = ("zero", "mean")


# ------------------------------------------------------------------ where to look
def site_hook_names(model: Any, site: str | Sequence[str] = "resid") -> list[str]:
    """The hooks a site reads, one row each.

    Parameters
    ----------
    model
        Any dynalens model.
    site
        ``"resid"``: the stream entering layer 0 (``blocks.0.hook_resid_pre``, the
        embeddings), then every ``blocks.{l}.hook_resid_post``.
        ``"state"``: every layer's recurrent state, Mamba's
        ``blocks.{l}.mixer.hook_ssm_state`` (channels ``d_inner × d_state``),
        an LSTM's ``blocks.{l}.cell.hook_cell``, other RNNs'
        ``blocks.{l}.cell.hook_hidden``. Or an explicit list of hook names whose
        tensors are ``[batch, pos, ...]`` (trailing dimensions become channels).
    """
    if not isinstance(site, str):
        names = list(site)
        if not names:
            raise ValueError("site is an empty list of hook names: pass 'resid', 'state' or hook names")
        return names
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(map(repr, SITES))} or a list of hook names, got {site!r}")
    n_layers = model.cfg.n_layers
    if site == "resid":
        return resid_hook_names(n_layers)
    arch = architecture_of(model)
    if arch == "mamba":
        return [f"blocks.{layer}.mixer.hook_ssm_state" for layer in range(n_layers)]
    if arch == "rnn":
        part = "hook_cell" if getattr(model.cfg, "cell", None) == "lstm" else "hook_hidden"
        return [f"blocks.{layer}.cell.{part}" for layer in range(n_layers)]
    raise ValueError(
        "site='state' reads a recurrent state, which transformers do not have: "
        "use site='resid' or name hooks explicitly"
    )


def site_labels(hook_names: Sequence[str]) -> list[str]:
    """Short row labels: ``embed``, ``L{l}`` for residual hooks, ``L{l} <hook>`` for others."""
    labels = []
    for name in hook_names:
        if name in ("hook_embed", "blocks.0.hook_resid_pre"):
            labels.append("embed")
        elif name.startswith("blocks.") and name.endswith(".hook_resid_post"):
            labels.append(f"L{name.split('.')[1]}")
        elif name.startswith("blocks."):
            labels.append(f"L{name.split('.')[1]} {name.rsplit('.', 1)[-1].removeprefix('hook_')}")
        else:
            labels.append(name)
    return labels


@torch.no_grad()
def site_magnitudes(
    model: Any, tokens: Int[Tensor, "batch pos"], hook_names: Sequence[str]
) -> list[Float[Tensor, "batch pos channel"]]:
    """``|h|`` at each hook, trailing dimensions flattened into channels, float32 on the CPU."""
    _, cache = model.run_with_cache(tokens, names_filter=list(hook_names))
    return [cache[name].detach().float().abs().flatten(2).cpu() for name in hook_names]


def is_massive(
    magnitude: Tensor, median: Tensor, min_magnitude: float = MIN_MAGNITUDE, min_ratio: float = MIN_RATIO
) -> Tensor:
    """The criterion: ``magnitude > min_magnitude`` and ``magnitude >= min_ratio * median``."""
    return (magnitude > min_magnitude) & (magnitude >= min_ratio * median)


def _check_thresholds(min_magnitude: float, min_ratio: float) -> None:
    if not min_magnitude >= 0 or not min_ratio >= 0:
        raise ValueError(
            f"min_magnitude and min_ratio must be non-negative numbers, got {min_magnitude!r} and {min_ratio!r}"
        )


# ---------------------------------------------------------------------- detection
@dataclass(kw_only=True, eq=False)
class MassiveActivations(Result):
    """The largest magnitudes of each layer's hidden state, with the criterion.

    Attributes
    ----------
    hook_names
        The hook each row was read from.
    top_values, top_positions, top_channels
        ``[row, k]``: the ``k`` largest ``|h|`` of the row, largest first, and
        where they are (token position, channel).
    medians
        ``[row]``: the median ``|h|`` over every token and channel of the row.
    channel_max
        ``[row, channel]``: the largest ``|h|`` of each channel over the tokens.
    min_magnitude, min_ratio
        The criterion's thresholds.
    """

    hook_names: list[str]
    top_values: Float[Tensor, "row k"]
    top_positions: Int[Tensor, "row k"]
    top_channels: Int[Tensor, "row k"]
    medians: Float[Tensor, " row"]
    channel_max: Float[Tensor, "row channel"]
    min_magnitude: float = MIN_MAGNITUDE
    min_ratio: float = MIN_RATIO

    @property
    def massive(self) -> Bool[Tensor, "row k"]:
        """Which of the top entries meet the criterion."""
        return is_massive(self.top_values, self.medians[:, None], self.min_magnitude, self.min_ratio)

    @property
    def found(self) -> bool:
        """Whether any layer holds a massive activation."""
        return bool(self.massive.any())

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, hook, rank, position, token, channel, magnitude, median, ratio, massive``."""
        labels = site_labels(self.hook_names)
        massive = self.massive
        rows = []
        for r, hook in enumerate(self.hook_names):
            median = float(self.medians[r])
            for rank in range(self.top_values.shape[1]):
                value, pos = float(self.top_values[r, rank]), int(self.top_positions[r, rank])
                rows.append((
                    labels[r], hook, rank, pos, self.str_tokens[pos], int(self.top_channels[r, rank]),
                    value, median, value / median if median > 0 else float("inf"), bool(massive[r, rank]),
                ))  # fmt: skip
        columns = ["layer", "hook", "rank", "position", "token", "channel", "magnitude", "median", "ratio", "massive"]
        return pd.DataFrame(rows, columns=columns)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest entries over all layers, largest first."""
        return self.to_frame().nlargest(k, "magnitude").reset_index(drop=True)

    def layers(self) -> pd.DataFrame:
        """One row per layer: ``layer, hook, top, median, ratio, n_massive``."""
        massive = self.massive
        top, med = self.top_values[:, 0], self.medians
        return pd.DataFrame({
            "layer": site_labels(self.hook_names),
            "hook": self.hook_names,
            "top": top.tolist(),
            "median": med.tolist(),
            "ratio": (top / med).tolist(),
            "n_massive": massive.sum(1).tolist(),
        })  # fmt: skip

    def carriers(self) -> pd.DataFrame:
        """Which (token, channel) pairs carry massive activations, across layers.

        Columns ``position, token, channel, n_layers, first_layer, last_layer,
        max_magnitude``, most layers first.
        """
        frame = self.to_frame()
        frame = frame[frame["massive"]]
        row_of = {hook: r for r, hook in enumerate(self.hook_names)}
        frame = frame.assign(row=frame["hook"].map(row_of))
        grouped = frame.groupby(["position", "token", "channel"], sort=False)
        out = grouped.agg(
            n_layers=("row", "nunique"), first_row=("row", "min"), last_row=("row", "max"),
            max_magnitude=("magnitude", "max"),
        ).reset_index()  # fmt: skip
        labels = site_labels(self.hook_names)
        out["first_layer"] = [labels[r] for r in out.pop("first_row")]
        out["last_layer"] = [labels[r] for r in out.pop("last_row")]
        columns = ["position", "token", "channel", "n_layers", "first_layer", "last_layer", "max_magnitude"]
        return out[columns].sort_values(["n_layers", "max_magnitude"], ascending=False).reset_index(drop=True)

    def figure(self, *, kind: str = "map") -> go.Figure:
        """``kind="map"``: layer × channel max ``|h|`` (log colour), massive ones circled;
        ``kind="layers"``: the top magnitudes and the median per layer (log scale)."""
        labels = site_labels(self.hook_names)
        if kind == "layers":
            return self._layers_figure(labels)
        if kind != "map":
            raise ValueError(f"kind must be 'map' or 'layers', got {kind!r}")
        n_channels = self.channel_max.shape[1]
        fig = heatmap(
            self.channel_max.numpy(),
            x_labels=[str(c) for c in range(n_channels)],
            y_labels=labels,
            x_title="channel",
            y_title="layer",
            value_name="max |h|",
            title=f"Largest magnitude per channel · {self.model_name}",
            log=True,
        )
        fig.update_xaxes(tickmode="auto", nticks=20, tickangle=0)
        rows, ranks = torch.nonzero(self.massive, as_tuple=True)
        if len(rows):
            fig.add_trace(go.Scatter(
                x=self.top_channels[rows, ranks].tolist(), y=rows.tolist(), mode="markers",
                marker=dict(symbol="circle-open", size=12, color="#d62728", line=dict(width=2)),
                name="massive", hovertemplate="massive: channel %{x}<extra></extra>",
            ))  # fmt: skip
        return fig

    def _layers_figure(self, labels: list[str]) -> go.Figure:
        fig = go.Figure()
        for rank in range(min(3, self.top_values.shape[1])):
            fig.add_trace(go.Scatter(x=labels, y=self.top_values[:, rank].tolist(), mode="lines+markers",
                                     name=f"top {rank + 1}"))
        fig.add_trace(go.Scatter(x=labels, y=self.medians.tolist(), mode="lines+markers", name="median",
                                 line=dict(dash="dot", color="#555")))
        fig.add_trace(go.Scatter(x=labels, y=(self.medians * self.min_ratio).clamp(min=self.min_magnitude).tolist(),
                                 mode="lines", name="threshold", line=dict(dash="dash", color="#d62728")))
        fig.update_layout(template=TEMPLATE, title=dict(text=f"Top magnitudes per layer · {self.model_name}"),
                          xaxis_title="layer", yaxis=dict(title="|h|", type="log"))
        return fig


@torch.no_grad()
def massive_activations(
    model: Any,
    input: TextOrTokens,
    *,
    site: str | Sequence[str] = "resid",
    k: int = 10,
    min_magnitude: float = MIN_MAGNITUDE,
    min_ratio: float = MIN_RATIO,
) -> MassiveActivations:
    """Per layer, the ``k`` largest magnitudes, where they are, the median, the criterion.

    Parameters
    ----------
    model
        Any dynalens model.
    input
        One prompt: a string or token ids ``[pos]`` / ``[1, pos]``.
    site
        What to read: ``"resid"`` (every architecture), ``"state"`` (Mamba, RNN)
        or hook names; see :func:`site_hook_names`.
    k
        How many of the largest magnitudes to keep per layer.
    min_magnitude, min_ratio
        The criterion: massive when ``|h| > min_magnitude`` and
        ``|h| >= min_ratio * median|h|`` of that layer's hidden state.

    Returns
    -------
    MassiveActivations
    """
    _check_thresholds(min_magnitude, min_ratio)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    tokens = prompt_tokens(model, input)
    names = site_hook_names(model, site)
    mags = [m[0] for m in site_magnitudes(model, tokens, names)]
    tops = [m.flatten().topk(min(k, m.numel())) for m in mags]
    width = min(len(t.values) for t in tops)
    n_channels = max(m.shape[1] for m in mags)
    channel_max = torch.full((len(mags), n_channels), float("nan"))
    for r, m in enumerate(mags):
        channel_max[r, : m.shape[1]] = m.max(0).values
    return MassiveActivations(
        **result_context(model, tokens),
        hook_names=names,
        top_values=torch.stack([t.values[:width] for t in tops]),
        top_positions=torch.stack([t.indices[:width] // m.shape[1] for t, m in zip(tops, mags)]),
        top_channels=torch.stack([t.indices[:width] % m.shape[1] for t, m in zip(tops, mags)]),
        medians=torch.stack([m.median() for m in mags]),
        channel_max=channel_max,
        min_magnitude=float(min_magnitude),
        min_ratio=float(min_ratio),
    )


def prompt_batches(model: Any, inputs: TextOrTokens | Sequence[TextOrTokens]) -> list[Int[Tensor, "batch pos"]]:
    """Prompts as token batches: a list of prompts runs one by one (no padding), a tensor as is."""
    if isinstance(inputs, Tensor):
        return [model.to_tokens(inputs)]
    prompts = [inputs] if isinstance(inputs, str) else list(inputs)
    if not prompts:
        raise ValueError("no prompts: pass a string, a list of prompts or token ids [batch, pos]")
    return [prompt_tokens(model, p) for p in prompts]


@torch.no_grad()
def massive_ratio(
    model: Any, inputs: TextOrTokens | Sequence[TextOrTokens], *, site: str | Sequence[str] = "resid"
) -> Float[Tensor, " row"]:
    """``r = mean_x max|h| / mean_x median|h|`` per layer, over sequences ``x``.

    The quantity the Massive Activations emergence paper tracks over training
    (arXiv 2508.03616): the top magnitude of a layer's hidden state relative
    to its median, averaged over a fixed set of sequences.

    Parameters
    ----------
    model
        Any dynalens model.
    inputs
        Prompts (strings or ids), or token ids ``[batch, pos]`` (each row one sequence).
    site
        See :func:`site_hook_names`.

    Returns
    -------
    Tensor ``[row]``, one value per hook of the site.
    """
    names = site_hook_names(model, site)
    maxima, medians = [], []
    for tokens in prompt_batches(model, inputs):
        mags = site_magnitudes(model, tokens, names)
        maxima.append(torch.stack([m.flatten(1).max(1).values for m in mags], 1))
        medians.append(torch.stack([m.flatten(1).median(1).values for m in mags], 1))
    return torch.cat(maxima).mean(0) / torch.cat(medians).mean(0)


# ------------------------------------------------------------------- intervention
@dataclass(kw_only=True, eq=False)
class MassiveAblation(Result):
    """Next-token loss with the massive activations replaced, against a random control.

    Attributes
    ----------
    mode
        ``"zero"`` or ``"mean"``: what the massive activations were set to.
    loss_clean, loss_ablated, loss_random
        ``[prompt]`` mean next-token cross-entropy: untouched, with the massive
        activations replaced, and with as many entries in random other channels
        of the same tokens and layers replaced the same way.
    n_entries
        ``[prompt]`` how many (layer, token, channel) entries were replaced.
    channels
        The channels found massive in any prompt, sorted.
    prompts
        Each prompt's tokens as strings.
    """

    mode: str
    loss_clean: Float[Tensor, " prompt"]
    loss_ablated: Float[Tensor, " prompt"]
    loss_random: Float[Tensor, " prompt"]
    n_entries: Int[Tensor, " prompt"]
    channels: list[int]
    prompts: list[str]

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, text, n_entries, loss_clean, loss_ablated, loss_random, delta_ablated, delta_random``."""
        frame = pd.DataFrame({
            "prompt": range(len(self.prompts)),
            "text": self.prompts,
            "n_entries": self.n_entries.tolist(),
            "loss_clean": self.loss_clean.tolist(),
            "loss_ablated": self.loss_ablated.tolist(),
            "loss_random": self.loss_random.tolist(),
        })  # fmt: skip
        frame["delta_ablated"] = frame["loss_ablated"] - frame["loss_clean"]
        frame["delta_random"] = frame["loss_random"] - frame["loss_clean"]
        return frame

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` prompts whose loss the ablation raised most."""
        return self.to_frame().nlargest(k, "delta_ablated").reset_index(drop=True)

    def mean_losses(self) -> dict[str, float]:
        """Mean loss over the prompts: ``clean``, ``ablated``, ``random``."""
        return {
            "clean": float(self.loss_clean.mean()),
            "ablated": float(self.loss_ablated.mean()),
            "random": float(self.loss_random.mean()),
        }

    def figure(self) -> go.Figure:
        """Bars: mean loss clean, with the massive activations set to zero/mean, with random ones."""
        s = self.mean_losses()
        fig = go.Figure(go.Bar(
            x=["clean", f"massive → {self.mode}", f"random → {self.mode}"], y=list(s.values()),
            marker_color=["#4c78a8", "#d62728", "#999999"], text=[f"{v:.3g}" for v in s.values()],
            textposition="outside",
        ))  # fmt: skip
        fig.update_layout(template=TEMPLATE, yaxis_title="next-token loss",
                          title=dict(text=f"Replacing massive activations · {self.model_name}"))
        return fig


Entry = tuple[int, int, int]  # (row, position, channel)


@torch.no_grad()
def ablate_massive(
    model: Any,
    inputs: TextOrTokens | Sequence[TextOrTokens],
    *,
    mode: str = "zero",
    min_magnitude: float = MIN_MAGNITUDE,
    min_ratio: float = MIN_RATIO,
    seed: int = 0,
) -> MassiveAblation:
    """Set the residual stream's massive activations to zero or to their mean; measure the loss.

    Every entry of the residual stream (``blocks.0.hook_resid_pre``, every
    ``blocks.{l}.hook_resid_post``) that meets the
    criterion is replaced in the forward pass, and the mean next-token
    cross-entropy of each prompt is compared with the clean one and with a
    control that replaces as many entries in random *other* channels of the
    same tokens and layers (Sun et al., Table 3).

    Parameters
    ----------
    model
        Any dynalens model.
    inputs
        Prompts (strings or ids) or token ids ``[batch, pos]``, each at least two tokens.
    mode
        ``"zero"``, or ``"mean"``: each (layer, channel)'s mean massive value over
        all the prompts (the control's entries take their own channel means).
    min_magnitude, min_ratio
        The criterion (see :func:`is_massive`).
    seed
        Seeds the choice of the control's channels.

    Returns
    -------
    MassiveAblation
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, ABLATION_MODES))}, got {mode!r}")
    _check_thresholds(min_magnitude, min_ratio)
    names = resid_hook_names(model.cfg.n_layers)
    sequences = [t[None] for batch in prompt_batches(model, inputs) for t in batch]
    if any(t.shape[1] < 2 for t in sequences):
        raise ValueError("every prompt needs at least two tokens to have a next-token loss")
    generator = torch.Generator().manual_seed(seed)
    found: list[list[Entry]] = []
    control: list[list[Entry]] = []
    values: list[list[Float[Tensor, "row pos channel"]]] = []
    for tokens in sequences:
        _, cache = model.run_with_cache(tokens, names_filter=names)
        h = torch.stack([cache[name][0].detach().float().cpu() for name in names])
        mags = h.abs()
        medians = mags.flatten(1).median(1).values[:, None, None]
        entries = [tuple(e) for e in torch.nonzero(is_massive(mags, medians, min_magnitude, min_ratio)).tolist()]
        found.append(entries)
        control.append(_random_control(entries, h.shape[-1], generator))
        values.append(h)
    means = _channel_means(found, values) if mode == "mean" else {}
    control_means = _channel_means(control, values) if mode == "mean" else {}
    clean, ablated, random = [], [], []
    for tokens, entries, ctrl in zip(sequences, found, control):
        clean.append(_loss(model, tokens, names, [], {}))
        ablated.append(_loss(model, tokens, names, entries, means))
        random.append(_loss(model, tokens, names, ctrl, control_means))
    return MassiveAblation(
        **result_context(model, sequences[0]),
        mode=mode,
        loss_clean=torch.tensor(clean),
        loss_ablated=torch.tensor(ablated),
        loss_random=torch.tensor(random),
        n_entries=torch.tensor([len(e) for e in found]),
        channels=sorted({c for entries in found for _, _, c in entries}),
        prompts=["".join(decode_tokens(model, t[0])) for t in sequences],
    )


def _random_control(entries: list[Entry], n_channels: int, generator: torch.Generator) -> list[Entry]:
    """As many entries as ``entries`` at the same (row, position) in channels not among them."""
    taken = {(r, c) for r, _, c in entries}
    out = []
    for r, p, _ in entries:
        free = torch.tensor([c for c in range(n_channels) if (r, c) not in taken])
        c = int(free[torch.randint(len(free), (1,), generator=generator)])
        taken.add((r, c))
        out.append((r, p, c))
    return out


def _channel_means(
    found: list[list[Entry]], values: list[Float[Tensor, "row pos channel"]]
) -> dict[tuple[int, int], float]:
    """The mean value of each (row, channel) over its entries in every prompt."""
    sums: dict[tuple[int, int], list[float]] = {}
    for entries, h in zip(found, values):
        for r, p, c in entries:
            sums.setdefault((r, c), []).append(float(h[r, p, c]))
    return {key: float(np.mean(v)) for key, v in sums.items()}


def _loss(
    model: Any,
    tokens: Int[Tensor, "1 pos"],
    names: list[str],
    entries: list[Entry],
    means: dict[tuple[int, int], float],
) -> float:
    """Mean next-token cross-entropy with ``entries`` set to their mean (or zero)."""
    by_row: dict[int, list[tuple[int, int, float]]] = {}
    for r, p, c in entries:
        by_row.setdefault(r, []).append((p, c, means.get((r, c), 0.0)))

    def replace(edits: list[tuple[int, int, float]]):
        def hook(h: Tensor, hook: Any) -> Tensor:
            h = h.clone()
            for p, c, v in edits:
                h[:, p, c] = v
            return h

        return hook

    hooks = [(names[r], replace(edits)) for r, edits in by_row.items()]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:].to(logits.device)).item()
