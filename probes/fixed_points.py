"""RNN dynamics: fixed and slow points, their linearisation, trajectory PCA, kick neurons.

Following Sussillo & Barak (2013) and the analysis of RNNs trained to emulate
HMMs (the zoo's ``lstm-hmm``): with a constant input ``x`` one RNN layer is the
map ``s -> F(x, s)`` (``s = h``, or ``[h, c]`` for an LSTM). Fixed points
solve ``F(s) = s``; slow points are local minima of ``q(s) = |F(s) - s|^2 / 2``
above zero. :func:`find_fixed_points` minimises ``q`` from many starts
(L-BFGS, then Newton steps on ``F(s) - s`` where they lower ``q``), merges
points closer than a tolerance and linearises ``F`` at each: eigenvalues of
``dF/ds`` inside the unit circle make an attractor.

Kick neurons (our reading of the HMM paper's term for the few units that
start a transition): in the recurrent weight graph (edge ``j -> i`` weighted by
``|W_hh[i, j]|``, gate blocks combined by their root sum of squares), a kick
neuron moves many others in one step, so :func:`kick_neurons` ranks units by
weighted out-degree, as a z-score over the layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.models.base import TextOrTokens
from dynalens.models.validation import check_finite, check_index
from dynalens.probes.figures import TEMPLATE, token_labels
from dynalens.models.surface import (
    architecture_of,
    model_name_of,
    prompt_tokens,
    result_context,
)
from dynalens.probes.results import Result
from jaxtyping import Float
from torch import Tensor

StateMap = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- the autonomous map
def cell_map(model: Any, layer: int, input_vector: Float[Tensor, " d_in"] | None = None) -> StateMap:
    """``s -> F(x, s)`` of one RNN layer for a constant input ``x`` (zeros by default), in float64.

    The map takes and returns flat states ``[batch, state]``: ``h``, or
    ``[h, c]`` for an LSTM. It runs on a float64 copy of the cell.
    """
    cell = _cell(model, layer)
    d_in = cell.weight_ih.shape[1]
    x = torch.zeros(d_in, dtype=torch.float64) if input_vector is None else input_vector.double().cpu()
    if tuple(x.shape) != (d_in,):
        raise ValueError(f"input_vector must have shape [d_in] = [{d_in}], got {tuple(x.shape)}")
    check_finite("input_vector", x)
    cell = copy.deepcopy(cell).double().cpu()
    d = cell.d_hidden

    def step(s: Tensor) -> Tensor:
        xs = x.expand(s.shape[0], d_in)
        if cell.cell == "lstm":
            h, c = cell.step(xs, (s[:, :d], s[:, d:]))
            return torch.cat([h, c], dim=1)
        return cell.step(xs, s)

    return step


def state_size(model: Any, layer: int) -> int:
    """The flat state size of a layer: ``d_hidden``, or ``2 * d_hidden`` for an LSTM."""
    cell = _cell(model, layer)
    return 2 * cell.d_hidden if cell.cell == "lstm" else cell.d_hidden


@torch.no_grad()
def iterate_cell(
    model: Any,
    layer: int,
    starts: Float[Tensor, "n state"],
    steps: int,
    input_vector: Float[Tensor, " d_in"] | None = None,
) -> Float[Tensor, "step n state"]:
    """Trajectories ``s_{t+1} = F(x, s_t)`` from each start, ``steps + 1`` states each (float64)."""
    F = cell_map(model, layer, input_vector)
    s = _check_states(model, layer, starts)
    out = [s]
    for _ in range(steps):
        s = F(s)
        out.append(s)
    return torch.stack(out)


# --------------------------------------------------------------------------- fixed points
@dataclass(kw_only=True, eq=False)
class FixedPoints(Result):
    """Fixed and slow points of one RNN layer under a constant input (no prompt: ``tokens`` is empty).

    Attributes
    ----------
    layer
        The layer.
    input_vector
        ``[d_in]`` the constant input.
    points
        ``[point, state]`` (``[h, c]`` for an LSTM), lowest ``q`` first.
    q
        ``[point]`` ``|F(s) - s|^2 / 2`` at each point.
    kinds
        ``"fixed"`` (``q`` below the tolerance) or ``"slow"``.
    eig_real, eig_imag
        ``[point, state]`` eigenvalues of ``dF/ds`` there, largest modulus first.
    """

    layer: int
    input_vector: Float[Tensor, " d_in"]
    points: Float[Tensor, "point state"]
    q: Float[Tensor, " point"]
    kinds: list[str]
    eig_real: Float[Tensor, "point state"]
    eig_imag: Float[Tensor, "point state"]

    @property
    def spectral_radius(self) -> Float[Tensor, " point"]:
        """Largest eigenvalue modulus at each point (< 1: an attractor)."""
        return torch.complex(self.eig_real.double(), self.eig_imag.double()).abs().amax(dim=1)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` points of lowest ``q``."""
        return self.to_frame().head(k)

    def to_frame(self) -> pd.DataFrame:
        """One row per point: ``point, kind, q, spectral_radius, stable``."""
        radius = self.spectral_radius.numpy()
        return pd.DataFrame({
            "point": range(len(self.kinds)), "kind": self.kinds, "q": self.q.double().numpy(),
            "spectral_radius": radius, "stable": radius < 1,
        })

    def figure(self) -> go.Figure:
        """Eigenvalues of every point in the complex plane, with the unit circle."""
        theta = torch.linspace(0, 2 * torch.pi, 200)
        fig = go.Figure(go.Scatter(x=theta.cos().numpy(), y=theta.sin().numpy(), mode="lines",
                                   line=dict(color="#a0aec0", dash="dot"), name="|λ| = 1"))
        for i, kind in enumerate(self.kinds):
            fig.add_trace(go.Scatter(x=self.eig_real[i].numpy(), y=self.eig_imag[i].numpy(), mode="markers",
                                     name=f"{kind} point {i}"))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Jacobian eigenvalues at fixed points, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title="Re λ"), yaxis=dict(title="Im λ", scaleanchor="x"),
        )
        return fig


def find_fixed_points(
    model: Any,
    layer: int = 0,
    *,
    input_vector: Float[Tensor, " d_in"] | None = None,
    starts: Float[Tensor, "n state"] | None = None,
    n_starts: int = 64,
    max_iter: int = 200,
    fixed_tol: float = 1e-12,
    slow_tol: float = 1e-4,
    merge_tol: float = 1e-4,
    seed: int = 0,
) -> FixedPoints:
    """Fixed and slow points of ``s -> F(x, s)``: minimise ``|F(s) - s|^2 / 2`` from many starts.

    Parameters
    ----------
    model
        A HookedRNN.
    layer
        The layer.
    input_vector
        The constant input ``x`` ``[d_in]``; zeros by default (the "no input" dynamics).
    starts
        ``[n, state]`` initial states, e.g. hidden states from a cache; by
        default ``n_starts`` states uniform in ``[-1, 1]``.
    n_starts
        Number of random starts when ``starts`` is omitted.
    max_iter
        L-BFGS iterations.
    fixed_tol
        ``q`` below which a point is fixed.
    slow_tol
        ``q`` below which a non-fixed minimum is kept as a slow point.
    merge_tol
        Points closer than this (Euclidean) are one point.
    seed
        Seed of the random starts.

    Returns
    -------
    FixedPoints
    """
    F = cell_map(model, layer, input_vector)
    if starts is None:
        g = torch.Generator().manual_seed(seed)
        starts = 2 * torch.rand(n_starts, state_size(model, layer), generator=g, dtype=torch.float64) - 1
    s = _check_states(model, layer, starts).clone().requires_grad_(True)

    def speed(z: Tensor) -> Tensor:
        return 0.5 * (F(z) - z).pow(2).sum(dim=1)

    optimiser = torch.optim.LBFGS([s], max_iter=max_iter, tolerance_grad=1e-15, tolerance_change=1e-20,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = speed(s).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
        points = _newton_polish(F, s.detach())
    q = speed(points).detach()
    keep = q < slow_tol
    points, q = points[keep], q[keep]
    order = q.argsort()
    chosen: list[int] = []
    for i in order.tolist():
        if all(float((points[i] - points[j]).norm()) > merge_tol for j in chosen):
            chosen.append(i)
    points, q = points[chosen], q[chosen]
    eig = torch.stack([_jacobian_eigenvalues(F, p) for p in points]) if chosen else torch.zeros(0, s.shape[1], dtype=torch.complex128)
    x = torch.zeros(_cell(model, layer).weight_ih.shape[1]) if input_vector is None else input_vector.detach().cpu()
    return FixedPoints(
        model_name=model_name_of(model), architecture="rnn", tokens=torch.zeros(0, dtype=torch.long), str_tokens=[],
        layer=layer, input_vector=x.float(), points=points.float(), q=q.float(),
        kinds=["fixed" if v < fixed_tol else "slow" for v in q.tolist()],
        eig_real=eig.real.float(), eig_imag=eig.imag.float(),
    )


def _newton_polish(F: StateMap, s: Tensor, steps: int = 8) -> Tensor:
    """Newton steps on ``G(s) = F(s) - s`` for each point, kept only where they lower ``|G|``."""
    s = s.clone()
    eye = torch.eye(s.shape[1], dtype=s.dtype)
    for i in range(s.shape[0]):
        for _ in range(steps):
            point = s[i]
            residual = F(point[None])[0] - point
            J = torch.autograd.functional.jacobian(lambda z: F(z[None])[0], point, vectorize=True)
            try:
                candidate = point - torch.linalg.solve(J - eye, residual)
            except RuntimeError:  # singular: leave the point as L-BFGS left it
                break
            if not (F(candidate[None])[0] - candidate).norm() < residual.norm():
                break
            s[i] = candidate.detach()
    return s.detach()


def _jacobian_eigenvalues(F: StateMap, point: Tensor) -> Tensor:
    J = torch.autograd.functional.jacobian(lambda z: F(z[None])[0], point, vectorize=True)
    eig = torch.linalg.eigvals(J)
    return eig[eig.abs().argsort(descending=True)]


# --------------------------------------------------------------------------- trajectory PCA
@dataclass(kw_only=True, eq=False)
class TrajectoryPCA(Result):
    """A layer's hidden trajectory along a prompt in its top principal components (a phase portrait).

    Attributes
    ----------
    layer
        The layer.
    coords
        ``[pos, component]`` projected hidden states.
    components
        ``[component, d_hidden]`` principal axes; ``mean`` ``[d_hidden]`` the centre.
    explained
        ``[component]`` explained-variance ratios.
    fixed_coords
        ``[point, component]`` projected fixed points (``h`` part), possibly empty.
    """

    layer: int
    coords: Float[Tensor, "pos component"]
    components: Float[Tensor, "component d_hidden"]
    mean: Float[Tensor, " d_hidden"]
    explained: Float[Tensor, " component"]
    fixed_coords: Float[Tensor, "point component"]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` tokens farthest from the centre in PC space."""
        frame = self.to_frame()
        frame["radius"] = self.coords.double().norm(dim=1).numpy()
        return frame.nlargest(k, "radius").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``position, token, pc1, pc2, ...``."""
        frame = pd.DataFrame(self.coords.double().numpy(), columns=[f"pc{i + 1}" for i in range(self.coords.shape[1])])
        frame.insert(0, "token", self.str_tokens)
        frame.insert(0, "position", range(len(self.str_tokens)))
        return frame

    def figure(self) -> go.Figure:
        """PC1 against PC2: the trajectory in token order, fixed points as crosses."""
        if self.coords.shape[1] < 2:
            raise ValueError("the phase portrait needs two components: compute with n_components >= 2")
        labels = token_labels(self.str_tokens)
        fig = go.Figure(go.Scatter(
            x=self.coords[:, 0].numpy(), y=self.coords[:, 1].numpy(), mode="lines+markers", name="trajectory",
            marker=dict(color=list(range(len(labels))), colorscale="Viridis", size=7),
            line=dict(color="#cbd5e0"), text=labels, hovertemplate="%{text}<extra></extra>",
        ))
        if len(self.fixed_coords):
            fig.add_trace(go.Scatter(x=self.fixed_coords[:, 0].numpy(), y=self.fixed_coords[:, 1].numpy(),
                                     mode="markers", marker=dict(symbol="x", size=12, color="#c53030"),
                                     name="fixed points"))
        ev = self.explained.double().tolist()
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Phase portrait, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title=f"PC1 ({ev[0]:.0%})"), yaxis=dict(title=f"PC2 ({ev[1]:.0%})"),
        )
        return fig


@torch.no_grad()
def trajectory_pca(
    model: Any, input: TextOrTokens, layer: int = 0, *, n_components: int = 2, fixed_points: FixedPoints | None = None
) -> TrajectoryPCA:
    """PCA of an RNN layer's hidden states (``blocks.{layer}.cell.hook_hidden``) along one prompt.

    ``fixed_points`` (from :func:`find_fixed_points` on the same layer) are projected too.
    """
    _cell(model, layer)
    tokens = prompt_tokens(model, input)
    name = f"blocks.{layer}.cell.hook_hidden"
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    hidden = cache[name][0].double().cpu()
    if not 1 <= n_components <= min(hidden.shape):
        raise ValueError(f"n_components must lie in [1, {min(hidden.shape)}] for {hidden.shape[0]} tokens, got {n_components!r}")
    mean = hidden.mean(0)
    _, S, Vh = torch.linalg.svd(hidden - mean, full_matrices=False)
    components = Vh[:n_components]
    variance = S.pow(2)
    explained = variance[:n_components] / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
    fixed = torch.zeros(0, n_components, dtype=torch.float64)
    if fixed_points is not None:
        fixed = (fixed_points.points[:, : hidden.shape[1]].double() - mean) @ components.T
    return TrajectoryPCA(
        **result_context(model, tokens), layer=layer, coords=((hidden - mean) @ components.T).float(),
        components=components.float(), mean=mean.float(), explained=explained.float(), fixed_coords=fixed.float(),
    )


# --------------------------------------------------------------------------- kick neurons
@dataclass(kw_only=True, eq=False)
class KickNeurons(Result):
    """Units of one RNN layer ranked by their weighted out-degree in the recurrent graph.

    Attributes
    ----------
    layer
        The layer.
    out_strength, in_strength
        ``[d_hidden]`` sums of ``|W|`` leaving / entering each unit (self-loops excluded).
    score
        ``[d_hidden]`` z-score of the out-strength over the layer.
    """

    layer: int
    out_strength: Float[Tensor, " d_hidden"]
    in_strength: Float[Tensor, " d_hidden"]
    score: Float[Tensor, " d_hidden"]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` strongest candidates."""
        return self.to_frame().head(k)

    def to_frame(self) -> pd.DataFrame:
        """One row per unit, highest score first."""
        frame = pd.DataFrame({
            "neuron": range(len(self.score)), "score": self.score.double().numpy(),
            "out_strength": self.out_strength.double().numpy(), "in_strength": self.in_strength.double().numpy(),
        })
        return frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """Out- against in-strength of every unit, coloured by score."""
        fig = go.Figure(go.Scatter(
            x=self.in_strength.numpy(), y=self.out_strength.numpy(), mode="markers+text",
            text=[str(i) for i in range(len(self.score))], textposition="top center",
            marker=dict(color=self.score.numpy(), colorscale="Viridis", size=10, showscale=True),
        ))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Kick-neuron candidates, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title="in-strength Σ|W|"), yaxis=dict(title="out-strength Σ|W|"),
        )
        return fig


def recurrent_graph(model: Any, layer: int) -> nx.DiGraph:
    """The recurrent weight graph: edge ``j -> i`` with ``weight = |W_hh[i, j]|`` (gates combined), no self-loops."""
    cell = _cell(model, layer)
    d = cell.d_hidden
    W = cell.weight_hh.detach().double().cpu().reshape(-1, d, d).pow(2).sum(0).sqrt()
    graph = nx.DiGraph()
    graph.add_nodes_from(range(d))
    graph.add_weighted_edges_from((j, i, float(W[i, j])) for i in range(d) for j in range(d) if i != j and W[i, j] > 0)
    return graph


def kick_neurons(model: Any, layer: int = 0) -> KickNeurons:
    """Candidate kick neurons of an RNN layer from its recurrent weight graph (see the module notes)."""
    graph = recurrent_graph(model, layer)
    nodes = sorted(graph.nodes)
    out = torch.tensor([graph.out_degree(n, weight="weight") for n in nodes], dtype=torch.float64)
    inn = torch.tensor([graph.in_degree(n, weight="weight") for n in nodes], dtype=torch.float64)
    score = (out - out.mean()) / out.std().clamp_min(torch.finfo(torch.float64).tiny)
    return KickNeurons(
        model_name=model_name_of(model), architecture="rnn", tokens=torch.zeros(0, dtype=torch.long), str_tokens=[],
        layer=layer, out_strength=out.float(), in_strength=inn.float(), score=score.float(),
    )


# --------------------------------------------------------------------------- checks
def _cell(model: Any, layer: int) -> Any:
    arch = architecture_of(model)
    if arch != "rnn":
        raise TypeError(f"this analysis iterates an RNN cell: it takes a HookedRNN, got a {arch}")
    return model.blocks[check_index("layer", layer, model.cfg.n_layers)].cell


def _check_states(model: Any, layer: int, states: Tensor) -> Tensor:
    size = state_size(model, layer)
    if states.dim() != 2 or states.shape[1] != size:
        raise ValueError(
            f"states must have shape [n, state] with state = {size} (h, or [h, c] for an LSTM), got {tuple(states.shape)}"
        )
    return check_finite("states", states).double().cpu()
