"""Stability of a model's recurrence and of its outputs under lower precision.

Halloran, Gulati & Roysdon (2024), "Mamba state-space models are
Lyapunov-stable learners": Mamba's recurrence contracts, so perturbations
(mixed precision among them) stay small, unlike a transformer's.

- :class:`LyapunovExponents`: Lyapunov exponents of one layer's state
  recurrence ``s_t = F(x_t, s_{t-1})`` along each prompt, by the QR method
  (Benettin et al., 1980, :func:`lyapunov_qr`): push an orthonormal frame
  through the step Jacobians ``J_t = dF/ds``, re-orthonormalise after every
  step, and average ``log |diag R|``. Units: per token. For Mamba
  ``J_t = diag(exp(Delta_t A))`` over the ``d_inner * d_state`` states:
  diagonal products, whose exponents the method converges to are the means of
  ``Delta_t A <= 0``, taken in closed form from the cached ``Delta``. For
  Mamba-2 (SSD) the state of head ``h`` is ``[d_head, d_state]`` and
  ``h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_tᵀ``, so ``J_t`` is
  ``exp(dt_t A_h)`` times the identity on each head's block: every head gives
  one exponent, ``mean_t dt_t A_h``, of multiplicity ``d_head * d_state``,
  taken in closed form from the cached ``dt``. For an RNN ``J_t`` is the
  autograd Jacobian of the cell's ``step`` (state ``h``, or ``(h, c)`` for an
  LSTM, :func:`rnn_step_jacobians`) along the cached layer input, and the QR
  method runs. Each kind of recurrent layer is one entry of
  :data:`RECURRENCES`; on a hybrid, its SSM layers (Mamba-2, or Jamba's Mamba).
- :class:`PrecisionDrift`: per layer and token, the relative distance between
  the residual stream of the model in float32 and of a copy in a lower dtype
  (an experiment: two forwards).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.models.validation import check_index
from dynalens.probes.analysis import Analysis, AnalysisError, Experiment
from dynalens.probes.figures import TEMPLATE, heatmap, token_labels
from dynalens.probes.layers import layer_types, ssm_layer
from dynalens.probes.mixer import to_padded
from dynalens.probes.results import Result
from dynalens.probes.token_dynamics import stream_frame, stream_labels

StepJacobian = Callable[[int, Tensor], Tensor]
"""``(t, Q) -> J_t @ Q`` for a ``[dim, k]`` frame ``Q``."""


def lyapunov_qr(
    step_jacobian: StepJacobian, dim: int, steps: int, k: int = 1, *, seed: int = 0
) -> tuple[Float[Tensor, " k"], Float[Tensor, "steps k"]]:
    """The ``k`` largest Lyapunov exponents of a product of Jacobians, by repeated QR.

    Parameters
    ----------
    step_jacobian
        ``(t, Q) -> J_t @ Q`` for ``t = 0 .. steps - 1`` (float64 ``[dim, k]`` in and out).
    dim, steps, k
        State size, number of steps, exponents wanted (``1 <= k <= dim``).
    seed
        Seed of the random initial frame.

    Returns
    -------
    exponents
        ``[k]``, largest first, per step.
    running
        ``[steps, k]``: the estimate after each step (its convergence).
    """
    if not 1 <= k <= dim or steps < 1:
        raise ValueError(f"need 1 <= k <= dim = {dim} and steps >= 1, got k={k!r}, steps={steps!r}")
    # numpy's QR: torch's threaded LAPACK call costs milliseconds on small frames.
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((dim, k)))[0]
    total = np.zeros(k)
    running = np.empty((steps, k))
    for t in range(steps):
        Q, R = np.linalg.qr(step_jacobian(t, torch.from_numpy(Q)).numpy())
        total += np.log(np.maximum(np.abs(np.diagonal(R)), np.finfo(np.float64).tiny))
        running[t] = total / (t + 1)
    running = torch.from_numpy(running)
    return running[-1], running


@dataclass(kw_only=True, eq=False)
class LyapunovExponentsResult(Result):
    """The largest Lyapunov exponents of one layer's recurrence along each prompt.

    Attributes
    ----------
    layer, layer_type
        The layer and its kind (``"mamba"``, ``"mamba2"``, ``"rnn"``).
    exponents
        ``[batch, k]`` largest first, per token (< 0: perturbations of the state shrink).
    running
        ``[batch, pos, k]`` the estimate after each real token (zero at pads).
    """

    layer: int
    layer_type: str
    exponents: Float[Tensor, "batch k"]
    running: Float[Tensor, "batch pos k"]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest exponents over all prompts."""
        return self.to_frame().nlargest(k, "exponent").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, index, exponent``, each prompt's largest first."""
        batch, k = self.exponents.shape
        return pd.DataFrame({
            "prompt": np.repeat(np.arange(batch), k),
            "index": np.tile(np.arange(k), batch),
            "exponent": self.exponents.double().reshape(-1).numpy(),
        })

    def figure(self, *, prompt: int = 0) -> go.Figure:
        """The running estimate of each exponent against the tokens seen, for one prompt."""
        n = len(self.str_tokens(prompt))
        running = self.running[prompt, -n:]
        fig = go.Figure()
        for i in range(running.shape[1]):
            fig.add_trace(go.Scatter(x=list(range(1, n + 1)), y=running[:, i].numpy(), mode="lines", name=f"λ{i + 1}"))
        fig.add_hline(y=0, line=dict(color="#1f2933", width=1, dash="dot"))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Lyapunov exponents, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title="tokens seen"), yaxis=dict(title="exponent per token"),
        )
        return fig


@dataclass(frozen=True)
class Recurrence:
    """One kind of layer's state recurrence: the hooks it reads, the state size, the running exponents.

    ``running(analysis, model, cache, prompts)`` returns ``[batch, pos, k]``
    (largest first at each step; anything at pads, :class:`LyapunovExponents`
    zeroes them).
    """

    hooks: Callable[[Any, int], list[str]]
    state_size: Callable[[Any, int], int]
    running: Callable[[LyapunovExponents, Any, Any, Prompts], Tensor]


def _mamba_running(analysis: LyapunovExponents, model: Any, cache: Any, prompts: Prompts) -> Tensor:
    # Diagonal Jacobians: the tangent space splits into the d_inner * d_state
    # states and the QR method converges to the mean log-decay of each, so
    # the spectrum is exact in closed form: mean_t Delta_t[d] A[d, n].
    delta = cache[names.mixer(analysis.layer, "delta")].double()
    log_decay = (delta[..., None] * model.blocks[analysis.layer].mixer.A.double()).flatten(2)  # [b, pos, d * n]
    return _running_mean(prompts, log_decay).topk(analysis.k, dim=2).values


def _mamba2_running(analysis: LyapunovExponents, model: Any, cache: Any, prompts: Prompts) -> Tensor:
    # J_t = exp(dt_t A_h) I on each head's [d_head, d_state] block: one exponent per
    # head, mean_t dt_t A_h, repeated d_head * d_state times.
    dt = cache[names.mixer(analysis.layer, "dt")].double()
    cfg = model.blocks[analysis.layer].mixer.cfg
    per_head = _running_mean(prompts, dt * model.blocks[analysis.layer].mixer.A.double())  # [b, pos, h]
    ordered = per_head.sort(dim=2, descending=True).values
    return ordered.repeat_interleave(cfg.d_head * cfg.d_state, dim=2)[..., : analysis.k]


def _running_mean(prompts: Prompts, log_decay: Float[Tensor, "batch pos state"]) -> Float[Tensor, "batch pos state"]:
    """The mean of ``log_decay`` over each prompt's real tokens so far (anything at pads)."""
    mask = prompts.mask.to(log_decay.device)
    steps = mask.cumsum(1).clamp_min(1)[..., None]
    return torch.where(mask[..., None], log_decay, 0.0).cumsum(1) / steps


def _rnn_running(analysis: LyapunovExponents, model: Any, cache: Any, prompts: Prompts) -> Tensor:
    cell = model.blocks[analysis.layer].cell
    x = cache[names.resid_pre(analysis.layer)]
    rows = []
    for i in range(len(prompts)):
        jacobians = rnn_step_jacobians(cell, prompts.real(x, i))
        exponents, running = lyapunov_qr(
            lambda t, Q: jacobians[t] @ Q, jacobians.shape[1], jacobians.shape[0], analysis.k, seed=analysis.seed
        )
        rows.append(running[:, exponents.argsort(descending=True)])
    return to_padded(prompts, rows)


def _rnn_state_size(model: Any, layer: int) -> int:
    cell = model.blocks[layer].cell
    return 2 * cell.d_hidden if cell.cell == "lstm" else cell.d_hidden


RECURRENCES: dict[str, Recurrence] = {
    "mamba": Recurrence(
        lambda model, layer: [names.mixer(layer, "delta")],
        lambda model, layer: model.blocks[layer].mixer.A.numel(),
        _mamba_running,
    ),
    "mamba2": Recurrence(
        lambda model, layer: [names.mixer(layer, "dt")],
        lambda model, layer: (cfg := model.blocks[layer].mixer.cfg).n_heads * cfg.d_head * cfg.d_state,
        _mamba2_running,
    ),
    "rnn": Recurrence(lambda model, layer: [names.resid_pre(layer)], _rnn_state_size, _rnn_running),
}
"""The state recurrence of each kind of layer :class:`LyapunovExponents` applies to."""


class LyapunovExponents(Analysis):
    """Lyapunov exponents of a Mamba, Mamba-2 or RNN layer's state recurrence along each prompt.

    Parameters
    ----------
    layer
        The layer; on a hybrid, one of its SSM layers.
    k
        How many exponents (largest first), ``1 <= k <=`` the state size
        (``d_inner * d_state`` for Mamba, ``n_heads * d_head * d_state`` for
        Mamba-2, ``d_hidden`` or ``2 * d_hidden`` for an LSTM).
    seed
        Seed of the QR method's initial frame (RNN).

    Returns
    -------
    LyapunovExponentsResult
    """

    architectures: ClassVar[tuple[str, ...]] = ("mamba", "mamba2", "hybrid", "rnn")
    requirement: ClassVar[str] = "a state recurrence"

    def __init__(self, layer: int = 0, *, k: int = 1, seed: int = 0):
        self.layer = layer
        self.k = k
        self.seed = seed

    def _kind(self, model: Any) -> str:
        """The kind of recurrent layer ``layer`` is, with ``k`` validated against its state size."""
        self.check(model)
        if architecture_of(model) == "rnn":
            kind = "rnn"
            check_index("layer", self.layer, model.cfg.n_layers)
        else:
            kind = ssm_layer(model, self.layer, type(self).__name__)
        size = RECURRENCES[kind].state_size(model, self.layer)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= size:
            raise ValueError(f"k must lie in [1, state size = {size}], got {self.k!r}")
        return kind

    def hooks(self, model: Any) -> list[str]:
        return RECURRENCES[self._kind(model)].hooks(model, self.layer)

    def _compute(self, cache: Any, prompts: Prompts) -> LyapunovExponentsResult:
        model = cache.model
        kind = self._kind(model)
        running = RECURRENCES[kind].running(self, model, cache, prompts).double().cpu()
        running = torch.where(prompts.mask.cpu()[..., None], running, 0.0)
        return LyapunovExponentsResult(
            **self.provenance(model, prompts), layer=int(self.layer), layer_type=kind,
            exponents=running[:, -1].float(), running=running.float(),
        )


def rnn_step_jacobians(cell: Any, x: Float[Tensor, "pos d_in"]) -> Float[Tensor, "pos state state"]:
    """``dF(x_t, s)/ds`` at ``s = s_{t-1}`` for every step of an RNN cell from its zero state (float64, CPU).

    Parameters
    ----------
    cell
        An RNN layer's cell (``model.blocks[layer].cell``); a float64 copy runs, the cell is left alone.
    x
        ``[pos, d_in]`` the layer's inputs (its ``hook_resid_pre`` at one prompt's real positions).

    The state ``s`` is ``h``, or ``[h, c]`` concatenated for an LSTM.
    """
    cell = copy.deepcopy(cell).double().cpu()
    x = x.double().cpu()
    d = cell.d_hidden
    lstm = cell.cell == "lstm"

    def step(x_t: Tensor, flat: Tensor) -> Tensor:
        state = (flat[:d][None], flat[d:][None]) if lstm else flat[None]
        new = cell.step(x_t[None], state)
        return torch.cat([new[0][0], new[1][0]]) if lstm else new[0]

    flat = torch.zeros(2 * d if lstm else d, dtype=torch.float64)
    out = []
    with torch.enable_grad():
        for x_t in x:
            out.append(torch.autograd.functional.jacobian(lambda s, x_t=x_t: step(x_t, s), flat))
            with torch.no_grad():
                flat = step(x_t, flat)
    return torch.stack(out)


# --------------------------------------------------------------------------- precision drift
@dataclass(kw_only=True, eq=False)
class PrecisionDriftResult(Result):
    """Relative distance between the residual stream in float32 and in a lower precision.

    Attributes
    ----------
    dtype
        The lower precision (``"bfloat16"``).
    drift
        ``[batch, pos, row]``: ``|r_low - r_32| / |r_32|``; row 0 the stream
        entering layer 0, row ``l + 1`` after layer ``l``; zero at pads.
    hook_names
        The hook of each row.
    layer_types
        Each layer's sequence mixer (see :func:`~dynalens.probes.layers.layer_types`).
    """

    dtype: str
    drift: Float[Tensor, "batch pos row"]
    hook_names: list[str]
    layer_types: list[str]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest drifts (prompt, token, layer)."""
        return self.to_frame().nlargest(k, "drift").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, position, token, layer, layer_type, drift``: one row per real token and layer."""
        return stream_frame(self, self.hook_names, self.layer_types, drift=self.drift)

    def per_layer(self) -> pd.Series:
        """Mean drift over the real tokens of every prompt, indexed by layer label."""
        mean = self._prompts().flat(self.drift).double().mean(0)
        return pd.Series(mean.numpy(), index=stream_labels(self.hook_names), name="drift")

    def figure(self, *, prompt: int = 0) -> go.Figure:
        """Heatmap layer × token of one prompt's drift (log colour)."""
        tokens = self.str_tokens(prompt)
        return heatmap(
            self.drift[prompt, -len(tokens):].T.double().numpy(), x_labels=token_labels(tokens),
            y_labels=stream_labels(self.hook_names), x_title="token", y_title="layer",
            value_name=f"float32 vs {self.dtype}", title=f"Precision drift · {self.model_name}", log=True,
        )


LOW_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class PrecisionDrift(Experiment):
    """Per-layer residual-stream drift between float32 and a lower precision, for any model.

    Two forwards: the model as it is (float32), then a deep copy cast to
    ``dtype``; the model itself is not changed, and both runs see the same
    token ids.

    Parameters
    ----------
    dtype
        ``"bfloat16"`` or ``"float16"`` (or the torch dtype).

    Returns
    -------
    PrecisionDriftResult
    """

    def __init__(self, dtype: str | torch.dtype = "bfloat16"):
        self.dtype = dtype

    def _low(self) -> torch.dtype:
        name = str(self.dtype).removeprefix("torch.")
        if name not in LOW_PRECISIONS:
            raise ValueError(f"dtype must be 'bfloat16' or 'float16' (or the torch dtype), got {self.dtype!r}")
        return LOW_PRECISIONS[name]

    def run(self, model: Any, prompts: Prompts | None) -> PrecisionDriftResult:
        self.check(model)
        low_dtype = self._low()
        if prompts is None:
            raise AnalysisError("PrecisionDrift runs the model: pass prompts")
        prompts = Prompts(model, prompts)
        hooks = names.resid_stream(model.cfg.n_layers)
        with torch.no_grad():
            _, reference = model.run_with_cache(prompts, names_filter=hooks)
            _, low = copy.deepcopy(model).to(low_dtype).run_with_cache(prompts, names_filter=hooks)
        drift = torch.stack([
            (low[name].double() - reference[name].double()).norm(dim=-1)
            / reference[name].double().norm(dim=-1).clamp_min(1e-30)
            for name in hooks
        ], dim=-1).cpu()
        return PrecisionDriftResult(
            **self.provenance(model, prompts), dtype=str(low_dtype).removeprefix("torch."),
            drift=torch.where(prompts.mask.cpu()[..., None], drift, 0.0).float(), hook_names=hooks,
            layer_types=layer_types(model),
        )
