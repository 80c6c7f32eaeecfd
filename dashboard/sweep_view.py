"""A sweep store (``dl.sweep``) drawn per checkpoint: the summary metrics its cells stored, nothing recomputed.

The emergence panel opens a store folder with :func:`is_store` and draws
:func:`figure` of :func:`metric_frame`: one row of the figure per metric, one
line per prompt set, the checkpoints along x in training order. Only the
store's Parquet rows are read; no model is loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dynalens.probes.figures import TEMPLATE
from dynalens.probes.sweep import STATUS_OK, Sweep

MAX_METRICS = 6
"""Metrics drawn at most (rows of the figure), in name order."""


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder that :func:`dynalens.probes.sweep.sweep` wrote (its ``cells/`` rows)."""
    folder = Path(path).expanduser()
    return (folder / "cells").is_dir() and (folder / "sweep.json").is_file()


def step_of(label: str) -> int | None:
    """The training step a model label names: its last number (``step_1500`` → 1500); None without one."""
    numbers = re.findall(r"\d+", label)
    return int(numbers[-1]) if numbers else None


def metric_frame(store: str | os.PathLike) -> pd.DataFrame:
    """One row per finished cell and metric: ``model, step, prompts, analysis, metric, value``, by training step.

    ``metric`` is ``{analysis}.{name}`` when the store holds several analyses, else the name.
    """
    frame = Sweep(Path(store).expanduser()).frame()
    done = frame[frame["status"] == STATUS_OK]
    columns = [c for c in done.columns if c.startswith("metric.")]
    long = done.melt(
        id_vars=["model", "prompts", "analysis"], value_vars=columns, var_name="metric", value_name="value"
    ).dropna(subset=["value"])
    long["metric"] = long["metric"].str.removeprefix("metric.")
    if long["analysis"].nunique() > 1:
        long["metric"] = long["analysis"] + "." + long["metric"]
    long.insert(1, "step", long["model"].map(step_of))
    return long.sort_values(["step", "model", "prompts", "metric"], na_position="last").reset_index(drop=True)


def figure(frame: pd.DataFrame, title: str = "Sweep store: stored metrics per checkpoint") -> go.Figure:
    """One row per metric (the first :data:`MAX_METRICS` by name), one line per prompt set, checkpoints along x."""
    metrics = sorted(frame["metric"].unique())[:MAX_METRICS]
    order = list(dict.fromkeys(frame["model"]))  # training order: the frame is sorted by step
    ticks = {m: str(step_of(m)) if step_of(m) is not None else m for m in order}
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, subplot_titles=metrics, vertical_spacing=0.08)
    colours = {p: f"hsl({(i * 137) % 360}, 65%, 45%)" for i, p in enumerate(sorted(frame["prompts"].unique()))}
    for row, metric in enumerate(metrics, start=1):
        for prompts, part in frame[frame["metric"] == metric].groupby("prompts", sort=True):
            fig.add_trace(
                go.Scatter(
                    x=[ticks[m] for m in part["model"]], y=part["value"].tolist(), mode="lines+markers",
                    name=prompts, legendgroup=prompts, showlegend=row == 1, line={"color": colours[prompts]},
                    hovertemplate=f"{metric}<br>checkpoint %{{x}}<br>%{{y:.4g}}<extra>{prompts}</extra>",
                ),
                row=row, col=1,
            )  # fmt: skip
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=[ticks[m] for m in order])
    fig.update_xaxes(title_text="checkpoint (training step)", row=len(metrics), col=1)
    fig.update_layout(title=title, template=TEMPLATE, legend_title_text="prompts",
                      margin={"l": 60, "r": 20, "t": 70, "b": 50})  # fmt: skip
    return fig
