"""Emergence over training: measurements over checkpoints, the emergence fit, its prediction from architecture.

Gallego-Feliciano et al. 2025 ("Hidden Dynamics of Massive Activations in
Transformer Training", arXiv 2508.03616) track, per layer and checkpoint, the
ratio ``r = mean_x max|h| / mean_x median|h|`` (``MassiveActivationsResult.ratio``)
and model its trajectory over training steps ``t`` with an
exponentially-modulated logarithmic function of five parameters::

    f(t) = A * exp(-lambda * x_t) * log(x_t) + K,    x_t = gamma * t + t0

(amplitude ``A``, decay ``lambda > 0``, time scale ``gamma``, offset ``t0``,
asymptote ``K``), fitted in the equivalent form
``exp(-beta t) * (A1 log(t + tau0) + A2) + K`` with scipy's
trust-region-reflective ``curve_fit`` on normalised data; they then predict
the fitted parameters from architecture features with a regressor. The
abstract (found through the ``search`` tool) confirms the five-parameter
exponentially-modulated logarithmic form; the exact expression above is the
project's reading of the paper in ``PAPERS.md``.

- :func:`checkpoint_series`: the zoo's checkpoints, a run's, or any list of model folders.
- :class:`Checkpoints`: any analyses over those checkpoints, on the same prompts.
- :class:`MassiveEmergence`: the massive ratio per layer over checkpoints, fitted.
- :class:`EmergenceFit`: the curve fit (scikit-learn style ``fit`` / ``predict`` / ``score``).
- :func:`architecture_features`, :class:`EmergenceRegressor`: features → fitted parameters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from scipy.optimize import curve_fit
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from torch import Tensor
from tqdm.auto import tqdm

from dynalens.models.prompts import Prompts
from dynalens.probes.analysis import Analysis, Experiment
from dynalens.probes.analysis import run as run_all
from dynalens.probes.figures import TEMPLATE
from dynalens.probes.massive import MassiveActivations, site_labels
from dynalens.probes.results import Result, Saved

PARAM_NAMES = ("A", "lambda", "gamma", "t0", "K")
"""The five parameters of :func:`emergence_function`, in order."""

FEATURE_NAMES = ("l/L", "(l/L)^2", "(l/L)^3", "sqrt(l/L)", "H/d", "d_ff/d", "d/L", "H/L", "log d", "l*L")
"""The architecture features of :func:`architecture_features`, in order."""


# ------------------------------------------------------------------ the function
def emergence_function(
    t: np.ndarray, A: float, lam: float, gamma: float, t0: float, K: float
) -> np.ndarray:
    """``f(t) = A * exp(-lam * x) * log(x) + K`` with ``x = gamma * t + t0`` (arXiv 2508.03616)."""
    x = gamma * np.asarray(t, dtype=np.float64) + t0
    return A * np.exp(-lam * x) * np.log(x) + K


def _fitted_form(s: np.ndarray, beta: float, a1: float, a2: float, tau0: float, k: float) -> np.ndarray:
    """The form that is fitted: ``exp(-beta s) * (a1 log(s + tau0) + a2) + k``."""
    return np.exp(-beta * s) * (a1 * np.log(s + tau0) + a2) + k


def _fitted_jacobian(s: np.ndarray, beta: float, a1: float, a2: float, tau0: float, k: float) -> np.ndarray:
    """``[len(s), 5]`` derivatives of :func:`_fitted_form` by its parameters."""
    decay = np.exp(-beta * s)
    log = np.log(s + tau0)
    return np.stack(
        [-s * decay * (a1 * log + a2), decay * log, decay, decay * a1 / (s + tau0), np.ones_like(s)], 1
    )


def _to_five(beta: float, a1: float, a2: float, tau0: float, k: float) -> dict[str, float]:
    """``(beta, A1, A2, tau0, K)`` → ``(A, lambda, gamma, t0, K)``.

    ``A e^{-lam (gamma t + t0)} log(gamma (t + t0 / gamma))`` expands to
    ``e^{-beta t} (A1 log(t + tau0) + A2)`` with ``beta = lam gamma``,
    ``tau0 = t0 / gamma``, ``A1 = A e^{-lam t0}`` and ``A2 = A1 log gamma``.
    """
    gamma = float(np.exp(a2 / a1))
    lam = beta / gamma
    five = {"A": a1 * np.exp(beta * tau0), "lambda": lam, "gamma": gamma, "t0": tau0 * gamma, "K": k}
    return {name: float(value) for name, value in five.items()}


# Starting points of the nonlinear parameters in normalised units; the linear ones are solved for.
_BETA_GRID = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0)
_TAU0_GRID = tuple(np.geomspace(1e-3, 10.0, 9))


class EmergenceFit(RegressorMixin, BaseEstimator):
    """Fit ``f(t) = A exp(-lambda (gamma t + t0)) log(gamma t + t0) + K`` to one trajectory.

    Steps and values are normalised to ``[0, 1]``; the equivalent form
    ``exp(-beta s) (A1 log(s + tau0) + A2) + K`` is fitted by scipy's
    ``curve_fit`` (``method="trf"``, ``beta >= 0`` so ``lambda >= 0``,
    ``tau0 > 0``), started from the best of a grid over ``(beta, tau0)`` at
    which the linear parameters are solved exactly; the result is mapped back
    to the five parameters in the data's own units.

    Parameters
    ----------
    max_nfev
        Most function evaluations of each refinement.

    Attributes
    ----------
    params_
        ``{"A", "lambda", "gamma", "t0", "K"}`` in the units of the data.
    r2_
        R² of the fit on the data it was fitted to.
    converged_
        Whether a refinement converged (else ``params_`` is the best grid start).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.linspace(0, 2000, 40)
    >>> y = emergence_function(t, 50.0, 0.2, 0.01, 1.5, 5.0)
    >>> fit = EmergenceFit().fit(t, y)
    >>> round(fit.params_["lambda"], 3), round(fit.r2_, 6)
    (0.2, 1.0)
    """

    def __init__(self, max_nfev: int = 1000):
        self.max_nfev = max_nfev

    def fit(self, t: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> EmergenceFit:
        """Fit steps ``t`` (``>= 0``) and values ``y``; returns ``self``."""
        t, y = self._check(t, y)
        self.t_scale_ = float(t.max()) if t.max() > 0 else 1.0
        self.y_min_ = float(y.min())
        self.y_scale_ = float(np.ptp(y)) or 1.0
        s, z = t / self.t_scale_, (y - self.y_min_) / self.y_scale_
        starts = sorted(
            (self._linear_start(s, z, beta, tau0) for beta in _BETA_GRID for tau0 in _TAU0_GRID),
            key=lambda r: r[0],
        )[:4]
        # The best grid point is kept if no refinement converges within max_nfev.
        best_sse, best = starts[0]
        self.converged_ = False
        for _, p0 in starts:
            try:
                p, _ = curve_fit(
                    _fitted_form, s, z, p0=p0, jac=_fitted_jacobian, method="trf", x_scale="jac",
                    max_nfev=self.max_nfev,
                    bounds=([0.0, -np.inf, -np.inf, 1e-9, -np.inf], [np.inf, np.inf, np.inf, np.inf, np.inf]),
                )  # fmt: skip
            except RuntimeError:  # max_nfev reached from this start
                continue
            self.converged_ = True
            sse = float(np.sum((_fitted_form(s, *p) - z) ** 2))
            if sse < best_sse:
                best_sse, best = sse, p
        self.coef_ = self._to_data_units(*best)  # beta, A1, A2, tau0, K in data units
        with np.errstate(divide="ignore", over="ignore"):  # degenerate fits give inf parameters
            self.params_ = _to_five(*self.coef_)
        self.r2_ = float(self.score(t, y))
        return self

    def predict(self, t: Sequence[float] | np.ndarray) -> np.ndarray:
        """The fitted curve at steps ``t``."""
        return _fitted_form(np.asarray(t, dtype=np.float64).reshape(-1), *self.coef_)

    def _to_data_units(self, beta: float, a1: float, a2: float, tau0: float, k: float) -> tuple[float, ...]:
        ts, ys = self.t_scale_, self.y_scale_
        return (beta / ts, ys * a1, ys * (a2 - a1 * np.log(ts)), tau0 * ts, self.y_min_ + ys * k)

    @staticmethod
    def _linear_start(s: np.ndarray, z: np.ndarray, beta: float, tau0: float) -> tuple[float, list[float]]:
        """Solve ``A1, A2, K`` by least squares at fixed ``beta, tau0``: ``(sse, p0)``."""
        decay = np.exp(-beta * s)
        design = np.stack([decay * np.log(s + tau0), decay, np.ones_like(s)], 1)
        coef, *_ = np.linalg.lstsq(design, z, rcond=None)
        sse = float(np.sum((design @ coef - z) ** 2))
        return sse, [beta, coef[0] if coef[0] != 0 else 1e-3, coef[1], tau0, coef[2]]

    @staticmethod
    def _check(t: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if t.shape != y.shape:
            raise ValueError(f"t and y must have the same length, got {len(t)} and {len(y)}")
        if len(t) < 6:
            raise ValueError(f"the fit has 5 parameters and needs at least 6 points, got {len(t)}")
        if not (np.isfinite(t).all() and np.isfinite(y).all()):
            raise ValueError("t and y must be finite (no NaN or inf)")
        if t.min() < 0:
            raise ValueError(f"steps t must be >= 0, got a minimum of {t.min()}")
        return t, y


# ---------------------------------------------------------------- checkpoints
def checkpoint_series(source: str | Path | Sequence[str | Path]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint, by increasing step.

    Parameters
    ----------
    source
        A zoo name (``"attn3l-bbc"``), the output folder of a training run
        (with ``checkpoints/step_*``), or a list of model folders; a folder's
        step is the last number in its name (``step_000120`` → 120), or its
        index in the list when the name has none.
    """
    from dynalens.models.zoo import ZOO, checkpoints

    if isinstance(source, (str, Path)):
        if isinstance(source, str) and source in ZOO and not Path(source).exists():
            found = checkpoints(source)
        else:
            found = checkpoints(Path(source))
        if not found:
            raise FileNotFoundError(
                f"no checkpoints under {source!r}: expected <folder>/checkpoints/step_* "
                "(a zoo name, a training run's output folder, or a list of model folders)"
            )
        return found
    folders = [Path(f) for f in source]
    if not folders:
        raise ValueError("source is an empty list: pass a zoo name, a run folder or model folders")
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise FileNotFoundError(f"these checkpoint folders do not exist: {', '.join(missing)}")
    numbers = [re.findall(r"\d+", f.name) for f in folders]
    steps = [int(n[-1]) if n else i for i, n in enumerate(numbers)]
    return sorted(zip(steps, folders))


def _each_checkpoint(
    source: Any, prompts: Prompts, loader: Callable[[Path], Any] | None, progress: bool
) -> Iterator[tuple[int, Path, Any, Prompts]]:
    """``(step, folder, model, prompts)`` of every checkpoint, loaded one at a time."""
    if loader is None:
        from dynalens.models.loading import load as loader
    for step, folder in tqdm(checkpoint_series(source), disable=not progress, desc="checkpoints"):
        model = loader(folder)
        largest = int(prompts.tokens.max())
        if largest >= model.cfg.d_vocab:
            raise ValueError(
                f"the checkpoint at {os.fspath(folder)!r} has d_vocab {model.cfg.d_vocab}, too small for "
                f"token id {largest} of the prompts: every checkpoint must share the model's vocabulary"
            )
        yield step, folder, model, Prompts(model, prompts)


@dataclass(kw_only=True, eq=False)
class CheckpointsResult(Result):
    """The Results of some analyses at every checkpoint of a training run.

    Attributes
    ----------
    steps
        The checkpoints' training steps, increasing.
    folders
        Each checkpoint's folder.
    results
        ``{analysis name: [Result per checkpoint]}``.
    """

    steps: list[int]
    folders: list[str]
    results: dict[str, list[Result]]

    def metrics(self) -> dict[str, float]:
        """Each analysis' metrics at the last checkpoint, as ``{analysis}.{metric}``."""
        return {f"{name}.{k}": v for name, series in self.results.items() for k, v in series[-1].metrics().items()}

    def to_frame(self) -> pd.DataFrame:
        """Every result's ``to_frame()`` with ``step`` and ``analysis`` columns in front."""
        frames = []
        for name, series in self.results.items():
            for step, result in zip(self.steps, series):
                frame = result.to_frame()
                frame.insert(0, "analysis", name)
                frame.insert(0, "step", step)
                frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """Each analysis' ``top(k)`` at the last checkpoint, with an ``analysis`` column."""
        frames = [series[-1].top(k).assign(analysis=name) for name, series in self.results.items()]
        return pd.concat(frames, ignore_index=True)

    def figure(self, *, analysis: str | None = None, column: str | None = None,
               by: Sequence[str] = ()) -> go.Figure:  # fmt: skip
        """The mean of one ``column`` of an analysis' frame over the steps, one line per ``by`` group.

        ``analysis`` defaults to the first, ``column`` to the last numeric column of its frame.
        """
        name = next(iter(self.results)) if analysis is None else analysis
        if name not in self.results:
            raise KeyError(f"no analysis named {name!r}; this result holds {sorted(self.results)}")
        frame = self.to_frame().query("analysis == @name").dropna(axis=1, how="all")
        numeric = [c for c in frame.select_dtypes("number").columns if c not in ("step", "prompt", *by)]
        column = numeric[-1] if column is None else column
        if column not in frame.columns:
            raise KeyError(f"{name} has no column {column!r}; its numeric columns: {numeric}")
        fig = go.Figure()
        groups = frame.groupby(list(by)) if by else [((), frame)]
        for key, group in groups:
            means = group.groupby("step")[column].mean()
            label = ", ".join(f"{b}={v}" for b, v in zip(by, key if isinstance(key, tuple) else (key,)))
            fig.add_trace(go.Scatter(x=means.index.tolist(), y=means.tolist(), mode="lines+markers",
                                     name=label or column))  # fmt: skip
        fig.update_layout(template=TEMPLATE, xaxis_title="training step", yaxis_title=f"mean {column}",
                          title=dict(text=f"{name} over training · {self.model_name}"))
        return fig

    def _fields(self) -> dict[str, Any]:
        fields = super()._fields()
        fields["results"] = {
            name: [{"type": type(r).__name__, "fields": r._fields()} for r in series]
            for name, series in self.results.items()
        }
        return fields

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> CheckpointsResult:
        fields["results"] = {
            name: [Saved.registered(r["type"])._from_fields(r["fields"]) for r in series]
            for name, series in fields["results"].items()
        }
        return super()._from_fields(fields)


class Checkpoints(Experiment):
    """Run analyses on every checkpoint of a training run, on the same prompts.

    Each checkpoint is loaded in turn and all the analyses share its one
    forward (:func:`~dynalens.probes.analysis.run`).

    Parameters
    ----------
    source
        See :func:`checkpoint_series`.
    analyses
        The analyses to run at each checkpoint.
    loader
        Loads a folder (default :func:`dynalens.load`).
    progress
        Show a progress bar over the checkpoints.

    Examples
    --------
    >>> series = dl.probes.Checkpoints("attn3l-bbc", [dl.probes.SinkScores()])(model, tokens)  # doctest: +SKIP
    >>> [r.mean[1, 0].item() for r in series.results["sink_scores"]]                         # doctest: +SKIP
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        analyses: Sequence[Analysis],
        loader: Callable[[Path], Any] | None = None,
        progress: bool = False,
    ):
        self.source = source
        self.analyses = analyses
        self.loader = loader
        self.progress = progress

    def run(self, model: Any, prompts: Prompts | None) -> CheckpointsResult:
        if prompts is None:
            raise ValueError("Checkpoints needs prompts: pass the fixed prompts every checkpoint reads")
        analyses = list(self.analyses)
        steps, folders, results = [], [], {a.name: [] for a in analyses}
        for step, folder, checkpoint, at in _each_checkpoint(self.source, prompts, self.loader, self.progress):
            found = run_all(checkpoint, at, analyses)
            steps.append(step)
            folders.append(os.fspath(folder))
            for name in results:
                results[name].append(found[name])
        return CheckpointsResult(**self.provenance(model, prompts), steps=steps, folders=folders, results=results)


# ------------------------------------------------------------- massive emergence
@dataclass(kw_only=True, eq=False)
class MassiveEmergenceResult(Result):
    """The massive ratio of each layer over checkpoints, with its emergence fit.

    Attributes
    ----------
    steps
        ``[checkpoint]`` training steps.
    maxima, medians
        ``[checkpoint, batch, row]`` each prompt's largest and median ``|h|`` per hook.
    hook_names
        The hook of each row.
    fit_params
        ``[row, 5]`` fitted ``A, lambda, gamma, t0, K`` of each row's :attr:`ratios` (NaN where the fit failed).
    r2
        ``[row]`` R² of each fit (NaN where it failed).
    """

    steps: Float[Tensor, " checkpoint"]
    maxima: Float[Tensor, "checkpoint batch row"]
    medians: Float[Tensor, "checkpoint batch row"]
    hook_names: list[str]
    fit_params: Float[Tensor, "row 5"]
    r2: Float[Tensor, " row"]

    @property
    def ratios(self) -> Float[Tensor, "checkpoint row"]:
        """``r = mean_x max|h| / mean_x median|h|`` per checkpoint and hook, over the prompts ``x``."""
        return self.maxima.mean(1) / self.medians.mean(1)

    def metrics(self) -> dict[str, float]:
        """``final_max_ratio`` (the last checkpoint's largest ratio), ``mean_r2`` of the fits that worked."""
        r2 = self.r2[~self.r2.isnan()]
        return {
            "final_max_ratio": float(self.ratios[-1].max()),
            "mean_r2": float(r2.mean()) if len(r2) else float("nan"),
        }

    def fits(self) -> pd.DataFrame:
        """One row per hook: ``layer, hook, r2`` and the five parameters."""
        frame = pd.DataFrame(self.fit_params.double().numpy(), columns=list(PARAM_NAMES))
        frame.insert(0, "r2", self.r2.double().numpy())
        frame.insert(0, "hook", self.hook_names)
        frame.insert(0, "layer", site_labels(self.hook_names))
        return frame

    def curves(self) -> pd.DataFrame:
        """One row per checkpoint and hook: ``step, layer, hook, ratio, fitted``."""
        labels = site_labels(self.hook_names)
        ratios, fitted = self.ratios, self.fitted(self.steps.double().numpy())
        return pd.DataFrame(
            [
                (int(self.steps[c]), labels[r], self.hook_names[r], float(ratios[c, r]), float(fitted[c, r]))
                for c in range(len(self.steps))
                for r in range(len(self.hook_names))
            ],
            columns=["step", "layer", "hook", "ratio", "fitted"],
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per checkpoint, prompt and hook: ``step, prompt, layer, hook, max, median``."""
        labels = site_labels(self.hook_names)
        n_steps, batch, rows = self.maxima.shape
        return pd.DataFrame(
            [
                (int(self.steps[c]), b, labels[r], self.hook_names[r],
                 float(self.maxima[c, b, r]), float(self.medians[c, b, r]))
                for c in range(n_steps) for b in range(batch) for r in range(rows)
            ],
            columns=["step", "prompt", "layer", "hook", "max", "median"],
        )  # fmt: skip

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` hooks with the largest final ratio, with their fit."""
        frame = self.fits()
        frame.insert(2, "final_ratio", self.ratios[-1].double().numpy())
        return frame.nlargest(k, "final_ratio").reset_index(drop=True)

    def fitted(self, steps: np.ndarray) -> np.ndarray:
        """``[len(steps), row]`` the fitted curves (NaN where a fit failed)."""
        p = self.fit_params.double().numpy()
        with np.errstate(invalid="ignore", over="ignore"):  # failed fits hold NaN/inf parameters
            return np.stack([emergence_function(steps, *row) for row in p], 1)

    def figure(self, *, rows: Sequence[int] | None = None) -> go.Figure:
        """The ratio per checkpoint (markers) and its fit (lines), one colour per layer."""
        labels = site_labels(self.hook_names)
        steps = self.steps.double().numpy()
        ratios = self.ratios
        dense = np.linspace(steps.min(), steps.max(), 200)
        curves = self.fitted(dense)
        fig = go.Figure()
        colors = plotly.colors.qualitative.Plotly
        for i, r in enumerate(range(len(labels)) if rows is None else rows):
            color = colors[i % len(colors)]
            fig.add_trace(go.Scatter(x=steps, y=ratios[:, r].tolist(), mode="markers", name=labels[r],
                                     marker=dict(color=color), legendgroup=labels[r]))
            if np.isfinite(curves[:, r]).all():
                fig.add_trace(go.Scatter(x=dense, y=curves[:, r], mode="lines", legendgroup=labels[r],
                                         name=f"{labels[r]} fit (R²={float(self.r2[r]):.3f})",
                                         line=dict(color=color)))
        fig.update_layout(template=TEMPLATE, xaxis_title="training step", yaxis_title="max|h| / median|h|",
                          title=dict(text=f"Emergence of massive activations · {self.model_name}"))
        return fig


class MassiveEmergence(Experiment):
    """The massive ratio of every layer at every checkpoint, each layer's trajectory fitted.

    Each checkpoint reads the prompts once (:class:`~dynalens.probes.MassiveActivations`);
    the ratio's trajectory over the steps is fitted with :class:`EmergenceFit`.

    Parameters
    ----------
    source
        See :func:`checkpoint_series`.
    site
        See :func:`~dynalens.probes.massive.site_hook_names`.
    loader, progress
        See :class:`Checkpoints`.

    Examples
    --------
    >>> run = dl.load("out/run")                                                   # doctest: +SKIP
    >>> dl.probes.MassiveEmergence("out/run")(run, probe_tokens).fits()             # doctest: +SKIP
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        site: str | Sequence[str] = "resid",
        loader: Callable[[Path], Any] | None = None,
        progress: bool = False,
    ):
        self.source = source
        self.site = site
        self.loader = loader
        self.progress = progress

    def run(self, model: Any, prompts: Prompts | None) -> MassiveEmergenceResult:
        if prompts is None:
            raise ValueError("MassiveEmergence needs prompts: pass the fixed probe sequences")
        measure = MassiveActivations(site=self.site, k=1)
        steps, maxima, medians, hooks = [], [], [], []
        for step, _, checkpoint, at in _each_checkpoint(self.source, prompts, self.loader, self.progress):
            found = measure(checkpoint, at)
            steps.append(step)
            maxima.append(found.top_values[..., 0].double())
            medians.append(found.medians.double())
            hooks = found.hook_names
        maxima, medians = torch.stack(maxima), torch.stack(medians)
        ratios = maxima.mean(1) / medians.mean(1)
        params, r2 = [], []
        for row in ratios.T.numpy():
            try:
                fit = EmergenceFit().fit(np.asarray(steps, dtype=np.float64), row)
                params.append([fit.params_[name] for name in PARAM_NAMES])
                r2.append(fit.r2_)
            except (RuntimeError, ValueError, FloatingPointError):
                params.append([np.nan] * len(PARAM_NAMES))
                r2.append(np.nan)
        return MassiveEmergenceResult(
            **self.provenance(model, prompts),
            steps=torch.tensor(steps, dtype=torch.float64),
            maxima=maxima,
            medians=medians,
            hook_names=hooks,
            fit_params=torch.tensor(params, dtype=torch.float64),
            r2=torch.tensor(r2, dtype=torch.float64),
        )


# ------------------------------------------------------ architecture → parameters
def architecture_features(layer: int, n_layers: int, n_heads: int, d_model: int, d_mlp: int) -> np.ndarray:
    """The ten features of arXiv 2508.03616 for block ``layer`` (0-based; ``l = layer + 1``).

    ``l/L, (l/L)^2, (l/L)^3, sqrt(l/L), H/d, d_ff/d, d/L, H/L, log d, l*L`` (see :data:`FEATURE_NAMES`).
    """
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer!r} is out of range: valid layers are 0 to {n_layers - 1}")
    l, L, H, d = layer + 1, n_layers, n_heads, d_model
    x = l / L
    return np.array([x, x**2, x**3, np.sqrt(x), H / d, d_mlp / d, d / L, H / L, np.log(d), l * L])


def model_features(model: Any) -> np.ndarray:
    """``[n_layers, 10]`` :func:`architecture_features` of every block of a transformer."""
    cfg = model.cfg
    sizes = {name: getattr(cfg, name, None) for name in ("n_layers", "n_heads", "d_model", "d_mlp")}
    missing = [name for name, value in sizes.items() if value is None]
    if missing:
        raise TypeError(f"architecture features need cfg.{', cfg.'.join(missing)} (transformers have them)")
    return np.stack([architecture_features(layer, **sizes) for layer in range(sizes["n_layers"])])


def _signed_log1p(y: np.ndarray) -> np.ndarray:
    return np.sign(y) * np.log1p(np.abs(y))


def _signed_expm1(y: np.ndarray) -> np.ndarray:
    return np.sign(y) * np.expm1(np.abs(y))


class EmergenceRegressor(RegressorMixin, BaseEstimator):
    """Predict fitted emergence parameters from architecture features.

    Targets are compressed with a signed ``log1p`` (the paper's ``log1p``,
    extended to the negative amplitudes and asymptotes a fit can return)
    before the regressor sees them, and expanded back on prediction.

    Parameters
    ----------
    estimator
        A scikit-learn regressor handling several outputs; default
        ``StandardScaler`` then ``Ridge(alpha=1.0)``.

    Attributes
    ----------
    model_
        The fitted ``TransformedTargetRegressor``.

    Examples
    --------
    >>> X = np.stack([architecture_features(l, 4, 4, 64, 256) for l in range(4)])
    >>> Y = np.array([[1.0, 0.1, 0.01, 1.0, 2.0 + l] for l in range(4)])
    >>> EmergenceRegressor().fit(X, Y).predict(X).shape
    (4, 5)
    """

    def __init__(self, estimator: Any = None):
        self.estimator = estimator

    def fit(self, X: np.ndarray, Y: np.ndarray) -> EmergenceRegressor:
        """Fit features ``X [n, n_features]`` to parameters ``Y [n, n_targets]``; returns ``self``."""
        X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
        if X.ndim != 2 or Y.ndim not in (1, 2) or len(X) != len(Y):
            raise ValueError(
                f"X must be [n, n_features] and Y [n] or [n, n_targets] with the same n, got {X.shape} and {Y.shape}"
            )
        if not (np.isfinite(X).all() and np.isfinite(Y).all()):
            raise ValueError("X and Y must be finite: drop the layers whose fit failed (NaN parameters)")
        base = make_pipeline(StandardScaler(), Ridge(alpha=1.0)) if self.estimator is None else clone(self.estimator)
        transform = FunctionTransformer(_signed_log1p, inverse_func=_signed_expm1, check_inverse=False)
        self.model_ = TransformedTargetRegressor(regressor=base, transformer=transform).fit(X, Y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted parameters for features ``X``."""
        return self.model_.predict(np.asarray(X, dtype=np.float64))
