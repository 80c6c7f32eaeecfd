"""Massive activations: single scalars of a hidden state orders of magnitude above the rest.

Sun et al. 2024 ("Massive Activations in Large Language Models", arXiv
2402.17762) call an activation massive when its magnitude exceeds 100 *and*
is about 1000× the median magnitude of its hidden state; in LLMs a handful of
them sit in fixed channels on the first token and on delimiter tokens, appear
in an early layer and ride the residual stream to the end, acting as
input-independent biases: setting them to zero breaks the model, setting them
to their mean leaves it intact.

:class:`MassiveActivations` measures, per prompt and layer, the largest
magnitudes with their (token, channel), the median and the criterion; its
Result also holds the ratio ``r = mean_x max|h| / mean_x median|h|`` that
tracks them over training (``.ratio``). :class:`MassiveAblation` is the
intervention. :class:`MassiveActivations` reads the residual stream of any
architecture, or the recurrent state of Mamba, Mamba-2 and a hybrid's SSM
layers (``mixer.hook_ssm_state``) and RNNs (``cell.hook_hidden``, the LSTM's
``cell.hook_cell``), so architectures compare side by side;
:class:`MassiveAblation` edits the residual stream.

Examples
--------
>>> found = dl.probes.MassiveActivations()(model, ["Summer is warm.", "Winter is cold."])  # doctest: +SKIP
>>> found.top(5)                                                                        # doctest: +SKIP
>>> found.carriers(), found.ratio                                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
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

from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.probes.analysis import Analysis, AnalysisError, Experiment
from dynalens.probes.figures import TEMPLATE, heatmap
from dynalens.probes.layers import ssm_layers
from dynalens.probes.residual import stream_rows
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
        ``"resid"``: ``names.resid_stream(n_layers)``, the stream entering
        layer 0 (the embeddings), then after every layer.
        ``"state"``: every layer's recurrent state, Mamba's
        ``names.mixer(l, "ssm_state")`` (channels ``d_inner × d_state``),
        Mamba-2's (channels ``n_heads × d_head × d_state``, row-major: channel
        ``(h * d_head + p) * d_state + n``), a hybrid's on its SSM layers only,
        an LSTM's ``names.cell(l, "cell")``, other RNNs' ``names.cell(l, "hidden")``.
        The state is cached at every position of every layer read: a Mamba-2
        layer holds ``pos × n_heads × d_head × d_state`` floats per prompt.
        Or an explicit list of hook names whose tensors are ``[batch, pos, ...]``
        (trailing dimensions become channels).

    Raises
    ------
    AnalysisError
        ``site="state"`` on a transformer (or a hybrid without SSM layers),
        which has no recurrent state.
    """
    if not isinstance(site, str):
        hooks = list(site)
        if not hooks or not all(isinstance(name, str) for name in hooks):
            raise ValueError(f"site must be 'resid', 'state' or a non-empty list of hook names, got {site!r}")
        return hooks
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(map(repr, SITES))} or a list of hook names, got {site!r}")
    n_layers = model.cfg.n_layers
    if site == "resid":
        return names.resid_stream(n_layers)
    arch = architecture_of(model)
    if arch == "rnn":
        part = "cell" if getattr(model.cfg, "cell", None) == "lstm" else "hidden"
        return [names.cell(layer, part) for layer in range(n_layers)]
    layers = ssm_layers(model)
    if layers:
        return [names.mixer(layer, "ssm_state") for layer in sorted(layers)]
    raise AnalysisError(
        f"site='state' reads a recurrent state, which a {arch} model does not have: "
        "use site='resid' or name hooks explicitly"
    )


def site_labels(hook_names: Sequence[str]) -> list[str]:
    """Short row labels: ``embed``, ``L{l}`` for residual hooks, ``L{l} <hook>`` for others."""
    labels = []
    for name in hook_names:
        layer = names.layer_of(name)
        if name in (names.EMBED, names.resid_pre(0)):
            labels.append("embed")
        elif layer is not None and name == names.resid_post(layer):
            labels.append(f"L{layer}")
        elif layer is not None:
            labels.append(f"L{layer} {names.short(name).rsplit('.', 1)[-1].removeprefix('hook_')}")
        else:
            labels.append(name)
    return labels


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
class MassiveActivationsResult(Result):
    """The largest magnitudes of each layer's hidden state, per prompt, with the criterion.

    Attributes
    ----------
    hook_names
        The hook each row was read from.
    top_values, top_positions, top_channels
        ``[batch, row, k]``: the ``k`` largest ``|h|`` of each prompt's row over
        its real tokens and every channel, largest first, and where they are
        (real token position, channel); NaN and -1 past a prompt's entries.
    medians
        ``[batch, row]``: the median ``|h|`` over the prompt's real tokens and every channel.
    channel_max
        ``[batch, row, channel]``: the largest ``|h|`` of each channel over the
        prompt's real tokens (NaN past a narrower row's channels).
    min_magnitude, min_ratio
        The criterion's thresholds.
    """

    hook_names: list[str]
    top_values: Float[Tensor, "batch row k"]
    top_positions: Int[Tensor, "batch row k"]
    top_channels: Int[Tensor, "batch row k"]
    medians: Float[Tensor, "batch row"]
    channel_max: Float[Tensor, "batch row channel"]
    min_magnitude: float = MIN_MAGNITUDE
    min_ratio: float = MIN_RATIO

    @property
    def massive(self) -> Bool[Tensor, "batch row k"]:
        """Which of the top entries meet the criterion."""
        return is_massive(self.top_values, self.medians[..., None], self.min_magnitude, self.min_ratio)

    @property
    def found(self) -> bool:
        """Whether any prompt and layer holds a massive activation."""
        return bool(self.massive.any())

    @property
    def ratio(self) -> Float[Tensor, " row"]:
        """``r = mean_x max|h| / mean_x median|h|`` per row over the prompts ``x`` (arXiv 2508.03616).

        The quantity the emergence paper tracks over training: a layer's top
        magnitude relative to its median, averaged over a fixed set of sequences.
        """
        return self.top_values[..., 0].mean(0) / self.medians.mean(0)

    def metrics(self) -> dict[str, float]:
        """``n_massive`` entries among the tops, ``max_magnitude``, ``max_ratio`` (the largest :attr:`ratio`)."""
        return {
            "n_massive": float(self.massive.sum()),
            "max_magnitude": float(self.top_values[..., 0].max()),
            "max_ratio": float(self.ratio.max()),
        }

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, layer, hook, rank, position, token, channel, magnitude, median, ratio, massive``."""
        labels = site_labels(self.hook_names)
        massive = self.massive
        rows = []
        for b in range(self.top_values.shape[0]):
            tokens = self.str_tokens(b)
            for r, hook in enumerate(self.hook_names):
                median = float(self.medians[b, r])
                for rank in range(self.top_values.shape[2]):
                    value, pos = float(self.top_values[b, r, rank]), int(self.top_positions[b, r, rank])
                    if pos < 0:
                        continue
                    rows.append((
                        b, labels[r], hook, rank, pos, tokens[pos], int(self.top_channels[b, r, rank]),
                        value, median, value / median if median > 0 else float("inf"), bool(massive[b, r, rank]),
                    ))  # fmt: skip
        columns = ["prompt", "layer", "hook", "rank", "position", "token", "channel",
                   "magnitude", "median", "ratio", "massive"]  # fmt: skip
        return pd.DataFrame(rows, columns=columns)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest entries over all prompts and layers, largest first."""
        return self.to_frame().nlargest(k, "magnitude").reset_index(drop=True)

    def layers(self) -> pd.DataFrame:
        """One row per layer over the batch: ``layer, hook, top, median, ratio, n_massive``.

        ``top`` is the largest ``|h|`` of any prompt, ``median`` the mean of the
        prompts' medians, ``ratio`` :attr:`ratio`, ``n_massive`` the massive
        entries among every prompt's top ``k``.
        """
        return pd.DataFrame({
            "layer": site_labels(self.hook_names),
            "hook": self.hook_names,
            "top": self.top_values[..., 0].max(0).values.tolist(),
            "median": self.medians.mean(0).tolist(),
            "ratio": self.ratio.tolist(),
            "n_massive": self.massive.sum((0, 2)).tolist(),
        })  # fmt: skip

    def carriers(self) -> pd.DataFrame:
        """Which (prompt, token, channel) triples carry massive activations, across layers.

        Columns ``prompt, position, token, channel, n_layers, first_layer,
        last_layer, max_magnitude``, most layers first.
        """
        frame = self.to_frame()
        frame = frame[frame["massive"]]
        row_of = {hook: r for r, hook in enumerate(self.hook_names)}
        frame = frame.assign(row=frame["hook"].map(row_of))
        grouped = frame.groupby(["prompt", "position", "token", "channel"], sort=False)
        out = grouped.agg(
            n_layers=("row", "nunique"), first_row=("row", "min"), last_row=("row", "max"),
            max_magnitude=("magnitude", "max"),
        ).reset_index()  # fmt: skip
        labels = site_labels(self.hook_names)
        out["first_layer"] = [labels[r] for r in out.pop("first_row")]
        out["last_layer"] = [labels[r] for r in out.pop("last_row")]
        columns = ["prompt", "position", "token", "channel", "n_layers", "first_layer", "last_layer", "max_magnitude"]
        return out[columns].sort_values(["n_layers", "max_magnitude"], ascending=False).reset_index(drop=True)

    def figure(self, *, kind: str = "map", prompt: int | None = None) -> go.Figure:
        """``kind="map"``: layer × channel max ``|h|`` (log colour), massive ones circled;
        ``kind="layers"``: the top magnitudes and the median per layer (log scale).

        ``prompt`` draws one prompt; ``None`` draws the batch (the largest over
        its prompts, the mean median).
        """
        if kind not in ("map", "layers"):
            raise ValueError(f"kind must be 'map' or 'layers', got {kind!r}")
        picked = range(self.top_values.shape[0]) if prompt is None else [self._prompt_index(prompt)]
        values, medians = self.top_values[list(picked)], self.medians[list(picked)]
        labels = site_labels(self.hook_names)
        if kind == "layers":
            return self._layers_figure(labels, values.max(0).values, medians.mean(0))
        channel_max = self.channel_max[list(picked)].nan_to_num(nan=-1.0).max(0).values
        channel_max[channel_max < 0] = float("nan")
        fig = heatmap(
            channel_max.numpy(),
            x_labels=[str(c) for c in range(channel_max.shape[1])],
            y_labels=labels,
            x_title="channel",
            y_title="layer",
            value_name="max |h|",
            title=f"Largest magnitude per channel · {self.model_name}",
            log=True,
        )
        fig.update_xaxes(tickmode="auto", nticks=20, tickangle=0)
        massive = self.massive[list(picked)]
        batch, rows, ranks = torch.nonzero(massive, as_tuple=True)
        if len(rows):
            channels = self.top_channels[list(picked)][batch, rows, ranks]
            seen = sorted({(int(r), int(c)) for r, c in zip(rows, channels)})
            fig.add_trace(go.Scatter(
                x=[c for _, c in seen], y=[r for r, _ in seen], mode="markers",
                marker=dict(symbol="circle-open", size=12, color="#d62728", line=dict(width=2)),
                name="massive", hovertemplate="massive: channel %{x}<extra></extra>",
            ))  # fmt: skip
        return fig

    def _prompt_index(self, prompt: int) -> int:
        n = self.top_values.shape[0]
        if isinstance(prompt, bool) or not -n <= prompt < n:
            raise IndexError(f"prompt {prompt!r} is out of range: this result has {n} prompts")
        return prompt % n

    def _layers_figure(self, labels: list[str], top: Tensor, medians: Tensor) -> go.Figure:
        fig = go.Figure()
        for rank in range(min(3, top.shape[1])):
            fig.add_trace(go.Scatter(x=labels, y=top[:, rank].tolist(), mode="lines+markers",
                                     name=f"top {rank + 1}"))
        fig.add_trace(go.Scatter(x=labels, y=medians.tolist(), mode="lines+markers", name="median",
                                 line=dict(dash="dot", color="#555")))
        fig.add_trace(go.Scatter(x=labels, y=(medians * self.min_ratio).clamp(min=self.min_magnitude).tolist(),
                                 mode="lines", name="threshold", line=dict(dash="dash", color="#d62728")))
        fig.update_layout(template=TEMPLATE, title=dict(text=f"Top magnitudes per layer · {self.model_name}"),
                          xaxis_title="layer", yaxis=dict(title="|h|", type="log"))
        return fig


class MassiveActivations(Analysis):
    """Per prompt and layer, the ``k`` largest magnitudes, where they are, the median, the criterion.

    Parameters
    ----------
    site
        What to read: ``"resid"`` (every architecture), ``"state"`` (Mamba,
        Mamba-2, a hybrid's SSM layers, RNN) or hook names; see :func:`site_hook_names`.
    k
        How many of the largest magnitudes to keep per prompt and layer.
    min_magnitude, min_ratio
        The criterion: massive when ``|h| > min_magnitude`` and
        ``|h| >= min_ratio * median|h|`` of that prompt's hidden state at that layer.

    Examples
    --------
    >>> found = dl.probes.MassiveActivations()(model, "Summer is warm. Winter is cold.")  # doctest: +SKIP
    >>> found.carriers()                                                                # doctest: +SKIP
    """

    def __init__(
        self,
        site: str | Sequence[str] = "resid",
        k: int = 10,
        min_magnitude: float = MIN_MAGNITUDE,
        min_ratio: float = MIN_RATIO,
    ):
        self.site = site
        self.k = k
        self.min_magnitude = min_magnitude
        self.min_ratio = min_ratio

    def _validate(self) -> None:
        _check_thresholds(self.min_magnitude, self.min_ratio)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")

    def check(self, model: Any) -> None:
        super().check(model)
        site_hook_names(model, self.site)

    def hooks(self, model: Any) -> list[str]:
        self._validate()
        return site_hook_names(model, self.site)

    def _compute(self, cache: Any, prompts: Prompts) -> MassiveActivationsResult:
        self._validate()
        model, k = cache.model, self.k
        hooks = site_hook_names(model, self.site)
        mags = [cache[name].float().abs().flatten(2).cpu() for name in hooks]  # [batch, pos, channel] each
        batch, n_rows, n_channels = len(prompts), len(hooks), max(m.shape[-1] for m in mags)
        top_values = torch.full((batch, n_rows, k), float("nan"))
        top_positions = torch.full((batch, n_rows, k), -1, dtype=torch.long)
        top_channels = torch.full((batch, n_rows, k), -1, dtype=torch.long)
        medians = torch.empty(batch, n_rows)
        channel_max = torch.full((batch, n_rows, n_channels), float("nan"))
        for b in range(batch):
            for r, m in enumerate(mags):
                real = prompts.real(m, b)  # [length, channel]
                top = real.flatten().topk(min(k, real.numel()))
                width = len(top.values)
                top_values[b, r, :width] = top.values
                top_positions[b, r, :width] = top.indices // real.shape[1]
                top_channels[b, r, :width] = top.indices % real.shape[1]
                medians[b, r] = real.median()
                channel_max[b, r, : real.shape[1]] = real.max(0).values
        return MassiveActivationsResult(
            **self.provenance(model, prompts),
            hook_names=hooks,
            top_values=top_values,
            top_positions=top_positions,
            top_channels=top_channels,
            medians=medians,
            channel_max=channel_max,
            min_magnitude=float(self.min_magnitude),
            min_ratio=float(self.min_ratio),
        )


# ------------------------------------------------------------------- intervention
@dataclass(kw_only=True, eq=False)
class MassiveAblationResult(Result):
    """Next-token loss with the massive activations replaced, against a random control.

    Attributes
    ----------
    mode
        ``"zero"`` or ``"mean"``: what the massive activations were set to.
    loss_clean, loss_ablated, loss_random
        ``[batch]`` mean next-token cross-entropy over each prompt's real
        tokens: untouched, with the massive activations replaced, and with as
        many entries in random other channels of the same tokens and layers
        replaced the same way.
    n_entries
        ``[batch]`` how many (layer, token, channel) entries were replaced.
    channels
        The channels found massive in any prompt, sorted.
    """

    mode: str
    loss_clean: Float[Tensor, " batch"]
    loss_ablated: Float[Tensor, " batch"]
    loss_random: Float[Tensor, " batch"]
    n_entries: Int[Tensor, " batch"]
    channels: list[int]

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, text, n_entries, loss_clean, loss_ablated, loss_random, delta_ablated, delta_random``.

        ``text`` is the prompt as given, or its tokens joined.
        """
        prompts = self._prompts()
        frame = pd.DataFrame({
            "prompt": range(len(prompts)),
            "text": prompts.texts or ["".join(tokens) for tokens in prompts.str_tokens],
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

    def metrics(self) -> dict[str, float]:
        """The mean losses (``clean``, ``ablated``, ``random``) and ``n_entries`` replaced."""
        return {**self.mean_losses(), "n_entries": float(self.n_entries.sum())}

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


Entry = tuple[int, int, int, int]  # (prompt, row, padded column, channel)


class MassiveAblation(Experiment):
    """Set the residual stream's massive activations to zero or to their mean; measure the loss.

    Every entry of the residual stream (``names.resid_stream(n_layers)``) that
    meets the criterion in its prompt is replaced in the forward pass, and the
    mean next-token cross-entropy of each prompt is compared with the clean
    one and with a control that replaces as many entries in random *other*
    channels of the same tokens and layers (Sun et al., Table 3). Three
    forwards: detection (which gives the clean loss), ablated, control.

    Parameters
    ----------
    mode
        ``"zero"``, or ``"mean"``: each (layer, channel)'s mean massive value over
        all the prompts (the control's entries take their own channel means).
    min_magnitude, min_ratio
        The criterion (see :func:`is_massive`).
    seed
        Seeds the choice of the control's channels, with each prompt's tokens
        (so a prompt gets the same control in any batch).
    """

    def __init__(
        self,
        mode: str = "zero",
        min_magnitude: float = MIN_MAGNITUDE,
        min_ratio: float = MIN_RATIO,
        seed: int = 0,
    ):
        self.mode = mode
        self.min_magnitude = min_magnitude
        self.min_ratio = min_ratio
        self.seed = seed

    def _validate(self) -> None:
        if self.mode not in ABLATION_MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, ABLATION_MODES))}, got {self.mode!r}")
        _check_thresholds(self.min_magnitude, self.min_ratio)

    def run(self, model: Any, prompts: Prompts | None) -> MassiveAblationResult:
        self._validate()
        if prompts is None:
            raise ValueError("MassiveAblation needs prompts: pass the prompts whose loss it measures")
        if int(prompts.lengths.min()) < 2:
            raise ValueError("every prompt needs at least two tokens to have a next-token loss")
        with torch.no_grad():
            logits, cache = model.run_with_cache(prompts, names_filter=names.resid_stream(model.cfg.n_layers))
            hooks, rows = stream_rows(cache, model.cfg.n_layers, same_width=True)
            h = torch.stack(rows, 2).float().cpu()  # [batch, pos, row, channel]
            found, control = self._entries(h, prompts)
            means = _channel_means(found, h) if self.mode == "mean" else {}
            control_means = _channel_means(control, h) if self.mode == "mean" else {}
            ablated = _edited_logits(model, prompts, hooks, found, means)
            random = _edited_logits(model, prompts, hooks, control, control_means)
        return MassiveAblationResult(
            **self.provenance(model, prompts),
            mode=self.mode,
            loss_clean=next_token_loss(logits, prompts),
            loss_ablated=next_token_loss(ablated, prompts),
            loss_random=next_token_loss(random, prompts),
            n_entries=torch.tensor([sum(e[0] == b for e in found) for b in range(len(prompts))]),
            channels=sorted({c for *_, c in found}),
        )

    def _entries(self, h: Tensor, prompts: Prompts) -> tuple[list[Entry], list[Entry]]:
        """The massive entries of every prompt, and the random control of each."""
        found, control = [], []
        for b in range(len(prompts)):
            offset = int(prompts.offsets[b])
            mags = prompts.real(h, b).abs()  # [length, row, channel]
            medians = mags.transpose(0, 1).flatten(1).median(1).values[None, :, None]
            hits = torch.nonzero(is_massive(mags, medians, self.min_magnitude, self.min_ratio)).tolist()
            entries = [(b, r, offset + p, c) for p, r, c in sorted(hits, key=lambda e: (e[1], e[0], e[2]))]
            found += entries
            control += _random_control(entries, h.shape[-1], _prompt_generator(self.seed, prompts[b]))
        return found, control


def next_token_loss(logits: Float[Tensor, "batch pos vocab"], prompts: Prompts) -> Float[Tensor, " batch"]:
    """Each prompt's mean next-token cross-entropy over its real tokens."""
    losses = []
    for b in range(len(prompts)):
        real = prompts.real(logits, b).float()
        target = prompts.real(prompts.tokens, b).to(real.device)
        losses.append(F.cross_entropy(real[:-1], target[1:]).cpu())
    return torch.stack(losses)


def _prompt_generator(seed: int, prompt: Prompts) -> torch.Generator:
    """A generator seeded by ``seed`` and the prompt's tokens (the same prompt draws the same in any batch)."""
    digest = hashlib.sha256(f"{seed}:{prompt.key()}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _random_control(entries: list[Entry], n_channels: int, generator: torch.Generator) -> list[Entry]:
    """As many entries as ``entries`` at the same (prompt, row, position) in channels not among them."""
    taken = {(r, c) for _, r, _, c in entries}
    out = []
    for b, r, p, _ in entries:
        free = torch.tensor([c for c in range(n_channels) if (r, c) not in taken])
        c = int(free[torch.randint(len(free), (1,), generator=generator)])
        taken.add((r, c))
        out.append((b, r, p, c))
    return out


def _channel_means(entries: list[Entry], h: Float[Tensor, "batch pos row channel"]) -> dict[tuple[int, int], float]:
    """The mean value of each (row, channel) over its entries in every prompt."""
    values: dict[tuple[int, int], list[float]] = {}
    for b, r, p, c in entries:
        values.setdefault((r, c), []).append(float(h[b, p, r, c]))
    return {key: float(np.mean(v)) for key, v in values.items()}


def _edited_logits(
    model: Any, prompts: Prompts, hooks: list[str], entries: list[Entry], means: dict[tuple[int, int], float]
) -> Float[Tensor, "batch pos vocab"]:
    """The logits with each entry set to its (row, channel) mean, or zero."""
    by_row: dict[int, list[tuple[int, int, int, float]]] = {}
    for b, r, p, c in entries:
        by_row.setdefault(r, []).append((b, p, c, means.get((r, c), 0.0)))

    def replace(edits: list[tuple[int, int, int, float]]):
        def hook(h: Tensor, hook: Any) -> Tensor:
            h = h.clone()
            for b, p, c, v in edits:
                h[b, p, c] = v
            return h

        return hook

    return model.run_with_hooks(prompts, fwd_hooks=[(hooks[r], replace(edits)) for r, edits in by_row.items()])
