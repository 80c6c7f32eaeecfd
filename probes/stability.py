"""Stability of a model's recurrence and of its outputs under lower precision.

Halloran, Gulati & Roysdon (2024), "Mamba state-space models are
Lyapunov-stable learners": Mamba's recurrence contracts, so perturbations
(mixed precision among them) stay small, unlike a transformer's.

- :func:`lyapunov_exponents`: Lyapunov exponents of one layer's state
  recurrence ``s_t = F(x_t, s_{t-1})`` along a real input, by the QR method
  (Benettin et al., 1980): push an orthonormal frame through the step
  Jacobians ``J_t = dF/ds``, re-orthonormalise after every step, and average
  ``log |diag R|``. Units: per token. For Mamba ``J_t = diag(exp(Delta_t A))``
  over the ``d_inner * d_state`` states: diagonal products, whose exponents
  the method converges to are the means of ``Delta_t A <= 0``, taken in
  closed form; for an RNN ``J_t`` is the autograd Jacobian of the cell's
  ``step`` (state ``h``, or ``(h, c)`` for an LSTM) and the QR method runs.
- :func:`precision_drift`: per layer and token, the relative distance between
  the residual stream of the model in float32 and of a copy in a lower dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.models.base import TextOrTokens
from dynalens.models.validation import check_index
from dynalens.probes.figures import TEMPLATE, heatmap, token_labels
from dynalens.models.surface import architecture_of, prompt_tokens, result_context
from dynalens.probes.residual import resid_labels, resid_stream
from dynalens.probes.results import Result
from jaxtyping import Float
from torch import Tensor

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
class LyapunovExponents(Result):
    """The largest Lyapunov exponents of one layer's recurrence along a prompt.

    Attributes
    ----------
    layer
        The layer.
    exponents
        ``[k]`` largest first, per token (< 0: perturbations of the state shrink).
    running
        ``[pos, k]`` the estimate after each token.
    """

    layer: int
    exponents: Float[Tensor, " k"]
    running: Float[Tensor, "pos k"]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest exponents."""
        return self.to_frame().head(k)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``index, exponent``, largest first."""
        return pd.DataFrame({"index": range(len(self.exponents)), "exponent": self.exponents.double().numpy()})

    def figure(self) -> go.Figure:
        """The running estimate of each exponent against the token position."""
        fig = go.Figure()
        for i in range(self.running.shape[1]):
            fig.add_trace(go.Scatter(y=self.running[:, i].numpy(), mode="lines", name=f"λ{i + 1}"))
        fig.add_hline(y=0, line=dict(color="#1f2933", width=1, dash="dot"))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Lyapunov exponents, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title="tokens seen"), yaxis=dict(title="exponent per token"),
        )
        return fig


@torch.no_grad()
def lyapunov_exponents(model: Any, input: TextOrTokens, layer: int, *, k: int = 1, seed: int = 0) -> LyapunovExponents:
    """Lyapunov exponents of a Mamba or RNN layer's state recurrence along ``input``.

    Parameters
    ----------
    model
        A HookedMamba or HookedRNN (a transformer has no recurrence).
    input
        One prompt; its tokens drive the recurrence.
    layer
        The layer.
    k
        How many exponents (largest first).
    seed
        Seed of the initial frame.

    Returns
    -------
    LyapunovExponents
    """
    arch = architecture_of(model)
    if arch == "transformer":
        raise TypeError("a transformer layer has no state recurrence: pass a Mamba or an RNN")
    layer = check_index("layer", layer, model.cfg.n_layers)
    tokens = prompt_tokens(model, input)
    if arch == "mamba":
        # Diagonal Jacobians: the tangent space splits into the d_inner * d_state
        # states and the QR method converges to the mean log-decay of each, so
        # the spectrum is exact in closed form: mean_t Delta_t[d] A[d, n].
        name = f"blocks.{layer}.mixer.hook_delta"
        _, cache = model.run_with_cache(tokens, names_filter=[name])
        log_decay = cache[name][0].double()[:, :, None] * model.blocks[layer].mixer.A.double()  # [pos, d, n]
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=torch.float64)[:, None]
        running = (log_decay.reshape(tokens.shape[1], -1).cumsum(0) / steps.to(log_decay.device)).cpu()
        if not 1 <= k <= running.shape[1]:
            raise ValueError(f"k must lie in [1, d_inner * d_state = {running.shape[1]}], got {k!r}")
        running = running.topk(k, dim=1).values
        exponents = running[-1]
    else:
        jacobians = rnn_step_jacobians(model, tokens, layer)
        exponents, running = lyapunov_qr(lambda t, Q: jacobians[t] @ Q, jacobians.shape[1], tokens.shape[1], k, seed=seed)
        order = exponents.argsort(descending=True)
        exponents, running = exponents[order], running[:, order]
    return LyapunovExponents(
        **result_context(model, tokens), layer=layer, exponents=exponents.float(), running=running.float()
    )


def rnn_step_jacobians(model: Any, tokens: Tensor, layer: int) -> Float[Tensor, "pos state state"]:
    """``dF(x_t, s)/ds`` at ``s = s_{t-1}`` for every step of an RNN layer (float64, on CPU).

    The state ``s`` is ``h``, or ``[h, c]`` concatenated for an LSTM.
    """
    name = f"blocks.{layer}.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    cell = copy.deepcopy(model.blocks[layer].cell).double().cpu()  # float64 copy: the model is left alone
    x = cache[name][0].double().cpu()
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
class PrecisionDrift(Result):
    """Relative distance between the residual stream in float32 and in a lower precision.

    Attributes
    ----------
    dtype
        The lower precision (``"bfloat16"``).
    drift
        ``[layer + 1, pos]``: ``|r_low - r_32| / |r_32|``; row 0 the stream entering layer 0.
    hook_names
        The hook of each row.
    """

    dtype: str
    drift: Float[Tensor, "row pos"]
    hook_names: list[str]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest drifts (layer, token)."""
        return self.to_frame().nlargest(k, "drift").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``layer, position, token, drift``."""
        labels = resid_labels(self.hook_names)
        rows, pos = self.drift.shape
        return pd.DataFrame(
            [(labels[r], p, self.str_tokens[p], float(self.drift[r, p])) for r in range(rows) for p in range(pos)],
            columns=["layer", "position", "token", "drift"],
        )

    def per_layer(self) -> pd.Series:
        """Mean drift over tokens, indexed by layer label."""
        return pd.Series(self.drift.double().mean(1).numpy(), index=resid_labels(self.hook_names), name="drift")

    def figure(self) -> go.Figure:
        """Heatmap layer × token of the drift (log colour)."""
        return heatmap(
            self.drift.double().numpy(), x_labels=token_labels(self.str_tokens), y_labels=resid_labels(self.hook_names),
            x_title="token", y_title="layer", value_name=f"float32 vs {self.dtype}",
            title=f"Precision drift · {self.model_name}", log=True,
        )


@torch.no_grad()
def precision_drift(model: Any, input: TextOrTokens, dtype: torch.dtype = torch.bfloat16) -> PrecisionDrift:
    """Per-layer residual-stream drift between float32 and ``dtype`` for any model.

    The low-precision run uses a deep copy of the model cast to ``dtype``; the
    model itself is not changed. Both runs see the same token ids.

    Parameters
    ----------
    model
        Any dynalens model in float32.
    input
        One prompt.
    dtype
        ``torch.bfloat16`` or ``torch.float16``.

    Returns
    -------
    PrecisionDrift
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    tokens = prompt_tokens(model, input)
    names, reference = resid_stream(model, tokens)
    low = copy.deepcopy(model).to(dtype)
    _, stream = resid_stream(low, tokens)
    drift = torch.stack([
        (b.double() - a.double()).norm(dim=-1) / a.double().norm(dim=-1).clamp_min(1e-30)
        for a, b in zip(reference, stream)
    ])
    return PrecisionDrift(
        **result_context(model, tokens), dtype=str(dtype).removeprefix("torch."),
        drift=drift.float().cpu(), hook_names=names,
    )
