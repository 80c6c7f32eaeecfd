"""RNN dynamics: fixed and slow points, their linearisation, trajectory PCA, kick neurons.

Following Sussillo & Barak (2013) and the analysis of RNNs trained to emulate
HMMs (the zoo's ``lstm-hmm``): with a constant input ``x`` one RNN layer is the
map ``s -> F(x, s)`` (``s = h``, or ``[h, c]`` for an LSTM). Fixed points
solve ``F(s) = s``; slow points are local minima of ``q(s) = |F(s) - s|^2 / 2``
above zero. :func:`find_fixed_points` minimises ``q`` from many starts
(L-BFGS, then Newton steps on ``F(s) - s`` where they lower ``q``), merges
points closer than a tolerance and linearises ``F`` at each: eigenvalues of
``dF/ds`` inside the unit circle make an attractor. :class:`FixedPoints` runs
it on a model's layer (weights only), :class:`TrajectoryPCA` draws the hidden
trajectories of prompts in their principal components (a phase portrait).

Kick neurons (our reading of the HMM paper's term for the few units that
start a transition): in the recurrent weight graph (edge ``j -> i`` weighted by
``|W_hh[i, j]|``, gate blocks combined by their root sum of squares), a kick
neuron moves many others in one step, so :class:`KickNeurons` ranks units by
weighted out-degree, as a z-score over the layer.

The numerical routines (:func:`cell_map`, :func:`iterate_cell`,
:func:`find_fixed_points`, :func:`recurrent_graph`) take a cell
(``model.blocks[layer].cell``) and tensors.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from dynalens.models import names
from dynalens.models.io import digest_tensor
from dynalens.models.prompts import Prompts
from dynalens.models.rnn import RNNCell
from dynalens.models.validation import check_finite, check_index
from dynalens.probes.analysis import Analysis, Experiment
from dynalens.probes.figures import TEMPLATE, token_labels
from dynalens.probes.results import Result

StateMap = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------- the autonomous map
def cell_map(cell: RNNCell, input_vector: Float[Tensor, " d_in"] | None = None) -> StateMap:
    """``s -> F(x, s)`` of one RNN cell for a constant input ``x`` (zeros by default), in float64.

    The map takes and returns flat states ``[batch, state]``: ``h``, or
    ``[h, c]`` for an LSTM. It runs on a float64 copy of the cell.
    """
    _check_cell(cell)
    d_in = cell.weight_ih.shape[1]
    x = torch.zeros(d_in, dtype=torch.float64) if input_vector is None else input_vector.detach().double().cpu()
    if tuple(x.shape) != (d_in,):
        raise ValueError(f"input_vector must have shape [d_in] = [{d_in}], got {tuple(x.shape)}")
    check_finite("input_vector", x)
    cell = copy.deepcopy(cell).double().cpu()
    return lambda s: cell.flat_step(x.expand(s.shape[0], d_in), s)


def state_size(cell: RNNCell) -> int:
    """The flat state size of a cell: ``d_hidden``, or ``2 * d_hidden`` for an LSTM."""
    _check_cell(cell)
    return cell.state_size


@torch.no_grad()
def iterate_cell(
    cell: RNNCell,
    starts: Float[Tensor, "n state"],
    steps: int,
    input_vector: Float[Tensor, " d_in"] | None = None,
) -> Float[Tensor, "step n state"]:
    """Trajectories ``s_{t+1} = F(x, s_t)`` from each start, ``steps + 1`` states each (float64)."""
    F = cell_map(cell, input_vector)
    s = _check_states(cell, starts)
    out = [s]
    for _ in range(steps):
        s = F(s)
        out.append(s)
    return torch.stack(out)


# --------------------------------------------------------------------------- fixed points
class FixedPointSet(NamedTuple):
    """What :func:`find_fixed_points` finds (float64), lowest ``q`` first.

    ``points [point, state]``; ``q [point]`` ``|F(s) - s|^2 / 2``;
    ``eigenvalues [point, state]`` (complex) of ``dF/ds`` there, largest modulus first.
    """

    points: Tensor
    q: Tensor
    eigenvalues: Tensor


def find_fixed_points(
    cell: RNNCell,
    *,
    input_vector: Float[Tensor, " d_in"] | None = None,
    starts: Float[Tensor, "n state"] | None = None,
    n_starts: int = 64,
    max_iter: int = 200,
    slow_tol: float = 1e-4,
    merge_tol: float = 1e-4,
    seed: int = 0,
) -> FixedPointSet:
    """Fixed and slow points of ``s -> F(x, s)``: minimise ``|F(s) - s|^2 / 2`` from many starts.

    Parameters
    ----------
    cell
        An RNN layer's cell (``model.blocks[layer].cell``).
    input_vector
        The constant input ``x`` ``[d_in]``; zeros by default (the "no input" dynamics).
    starts
        ``[n, state]`` initial states, e.g. hidden states from a cache; by
        default ``n_starts`` states uniform in ``[-1, 1]``.
    n_starts
        Number of random starts when ``starts`` is omitted.
    max_iter
        L-BFGS iterations.
    slow_tol
        ``q`` below which a minimum is kept.
    merge_tol
        Points closer than this (Euclidean) are one point.
    seed
        Seed of the random starts.

    Returns
    -------
    FixedPointSet
        The same search on the same weights is done once: later calls (a page's
        next prompt, another analysis) read it back from a small in-process
        memo keyed by the cell's parameter values and these arguments.
    """
    _check_cell(cell)
    key = _search_key(cell, input_vector, starts, n_starts, max_iter, slow_tol, merge_tol, seed)
    with _FOUND_LOCK:
        found = _FOUND.get(key)
        if found is not None:
            _FOUND.move_to_end(key)
    if found is None:
        found = _search(cell, input_vector, starts, n_starts, max_iter, slow_tol, merge_tol, seed)
        with _FOUND_LOCK:
            _FOUND[key] = found
            while len(_FOUND) > _FOUND_SIZE:
                _FOUND.popitem(last=False)
    return FixedPointSet(*(t.clone() for t in found))


_FOUND: OrderedDict[str, FixedPointSet] = OrderedDict()
_FOUND_LOCK = threading.Lock()
_FOUND_SIZE = 32


def _search_key(cell: RNNCell, *arguments: Any) -> str:
    """A SHA-256 of the cell's kind and parameter values and of the search's arguments (tensors by value)."""
    digest = hashlib.sha256(f"{cell.cell}:{cell.d_hidden}".encode())
    for name, tensor in [*cell.named_parameters(), *((f"arg{i}", a) for i, a in enumerate(arguments))]:
        if isinstance(tensor, Tensor):
            digest_tensor(digest, name, tensor)
        else:
            digest.update(f"{name}:{tensor!r}".encode())
    return digest.hexdigest()


def _search(
    cell: RNNCell,
    input_vector: Tensor | None,
    starts: Tensor | None,
    n_starts: int,
    max_iter: int,
    slow_tol: float,
    merge_tol: float,
    seed: int,
) -> FixedPointSet:
    """:func:`find_fixed_points` without the memo."""
    F = cell_map(cell, input_vector)
    if starts is None:
        g = torch.Generator().manual_seed(seed)
        starts = 2 * torch.rand(n_starts, state_size(cell), generator=g, dtype=torch.float64) - 1
    s = _check_states(cell, starts).clone().requires_grad_(True)

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
        eig = [_jacobian_eigenvalues(F, p) for p in points]
    eigenvalues = torch.stack(eig) if eig else torch.zeros(0, s.shape[1], dtype=torch.complex128)
    return FixedPointSet(points, q, eigenvalues)


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


@dataclass(kw_only=True, eq=False)
class FixedPointsResult(Result):
    """Fixed and slow points of one RNN layer under a constant input (weights only: no prompts).

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


class FixedPoints(Experiment):
    """Fixed and slow points of an RNN layer under a constant input, from its weights.

    Weights only: prompts, if given, are not read (the Result's ``prompts`` is ``None``).

    Parameters
    ----------
    layer
        The layer.
    input_vector
        The constant input ``x`` ``[d_in]``; zeros by default.
    starts
        ``[n, state]`` initial states (e.g. hidden states from a cache); by
        default ``n_starts`` random states in ``[-1, 1]``.
    n_starts, max_iter, slow_tol, merge_tol, seed
        As for :func:`find_fixed_points`.
    fixed_tol
        ``q`` below which a point is ``"fixed"`` (else ``"slow"``).

    Returns
    -------
    FixedPointsResult
    """

    architectures: ClassVar[tuple[str, ...]] = ("rnn",)
    requirement: ClassVar[str] = "a recurrent cell to iterate"

    def __init__(
        self,
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
    ):
        self.layer = layer
        self.input_vector = input_vector
        self.starts = starts
        self.n_starts = n_starts
        self.max_iter = max_iter
        self.fixed_tol = fixed_tol
        self.slow_tol = slow_tol
        self.merge_tol = merge_tol
        self.seed = seed

    def run(self, model: Any, prompts: Prompts | None = None) -> FixedPointsResult:
        cell = _layer_cell(self, model)
        found = find_fixed_points(
            cell, input_vector=self.input_vector, starts=self.starts, n_starts=self.n_starts,
            max_iter=self.max_iter, slow_tol=self.slow_tol, merge_tol=self.merge_tol, seed=self.seed,
        )
        x = torch.zeros(cell.weight_ih.shape[1]) if self.input_vector is None else self.input_vector.detach().cpu()
        return FixedPointsResult(
            **self.provenance(model, None),
            layer=int(self.layer), input_vector=x.float(), points=found.points.float(), q=found.q.float(),
            kinds=["fixed" if v < self.fixed_tol else "slow" for v in found.q.tolist()],
            eig_real=found.eigenvalues.real.float(), eig_imag=found.eigenvalues.imag.float(),
        )


# --------------------------------------------------------------------------- trajectory PCA
@dataclass(kw_only=True, eq=False)
class TrajectoryPCAResult(Result):
    """Hidden trajectories of prompts in their top principal components (phase portraits).

    Attributes
    ----------
    layer
        The layer.
    coords
        ``[batch, pos, component]`` projected hidden states (zero at pads).
    components
        ``[batch, component, d_hidden]`` principal axes of each prompt (the
        same row for every prompt when ``shared``); ``mean`` ``[batch, d_hidden]`` the centre.
    explained
        ``[batch, component]`` explained-variance ratios.
    fixed_coords
        ``[batch, point, component]`` projected fixed points (``h`` part), possibly no points.
    """

    layer: int
    coords: Float[Tensor, "batch pos component"]
    components: Float[Tensor, "batch component d_hidden"]
    mean: Float[Tensor, "batch d_hidden"]
    explained: Float[Tensor, "batch component"]
    fixed_coords: Float[Tensor, "batch point component"]

    def _columns(self) -> dict[str, Tensor]:
        return {f"pc{i + 1}": self.coords[..., i] for i in range(self.coords.shape[-1])}

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` tokens farthest from their centre in PC space, over all prompts."""
        frame = self.position_frame(**self._columns(), radius=self.coords.double().norm(dim=-1))
        return frame.nlargest(k, "radius").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, position, token, pc1, pc2, ...``."""
        return self.position_frame(**self._columns())

    def figure(self, *, prompt: int | None = 0) -> go.Figure:
        """PC1 against PC2: the trajectory in token order, fixed points as crosses.

        ``prompt=None`` draws every prompt (meaningful with ``shared=True``: one basis).
        """
        if self.coords.shape[-1] < 2:
            raise ValueError("the phase portrait needs two components: compute with n_components >= 2")
        shown = range(self.coords.shape[0]) if prompt is None else [check_index("prompt", prompt, self.coords.shape[0])]
        fig = go.Figure()
        for p in shown:
            labels = token_labels(self.str_tokens(p))
            coords = self.coords[p, -len(labels):]
            fig.add_trace(go.Scatter(
                x=coords[:, 0].numpy(), y=coords[:, 1].numpy(), mode="lines+markers", name=f"prompt {p}",
                marker=dict(color=list(range(len(labels))), colorscale="Viridis", size=7),
                line=dict(color="#cbd5e0"), text=labels, hovertemplate="%{text}<extra></extra>",
            ))
        first = shown[0]
        if self.fixed_coords.shape[1]:
            fig.add_trace(go.Scatter(x=self.fixed_coords[first, :, 0].numpy(), y=self.fixed_coords[first, :, 1].numpy(),
                                     mode="markers", marker=dict(symbol="x", size=12, color="#c53030"),
                                     name="fixed points"))
        ev = self.explained[first].double().tolist()
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Phase portrait, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title=f"PC1 ({ev[0]:.0%})"), yaxis=dict(title=f"PC2 ({ev[1]:.0%})"),
        )
        return fig


def _pca(X: Float[Tensor, "n d"], n_components: int) -> tuple[Tensor, Tensor, Tensor]:
    """``mean [d]``, ``components [c, d]`` (each with its largest-magnitude entry positive), ``explained [c]``."""
    mean = X.mean(0)
    _, S, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    components = Vh[:n_components]
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    variance = S.pow(2)
    explained = variance[:n_components] / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return mean, components * signs, explained


class TrajectoryPCA(Analysis):
    """PCA of an RNN layer's hidden states (``cell.hook_hidden``) along each prompt.

    Parameters
    ----------
    layer
        The layer.
    n_components
        Principal components kept (at most the tokens of a prompt, and ``d_hidden``).
    fixed_points
        States to project too: a :class:`FixedPoints` experiment (run on the
        model's weights when the PCA is computed; its layer should be this
        one) or a tensor ``[point, state]`` (e.g. ``FixedPoints(layer)(model).points``).
    shared
        One PCA over the real tokens of every prompt (one basis for all
        trajectories) instead of one per prompt; a prompt's result then
        depends on the others in the batch.

    Returns
    -------
    TrajectoryPCAResult
    """

    architectures: ClassVar[tuple[str, ...]] = ("rnn",)
    requirement: ClassVar[str] = "a recurrent cell's hidden states"

    def __init__(
        self,
        layer: int = 0,
        *,
        n_components: int = 2,
        fixed_points: FixedPoints | Tensor | None = None,
        shared: bool = False,
    ):
        self.layer = layer
        self.n_components = n_components
        self.fixed_points = fixed_points
        self.shared = shared

    def hooks(self, model: Any) -> list[str]:
        d_hidden = _layer_cell(self, model).d_hidden
        points = self.fixed_points
        if points is not None and not isinstance(points, (Tensor, FixedPoints)):
            raise ValueError(
                f"fixed_points must be a FixedPoints experiment or a tensor [point, state], got a {type(points).__name__}"
            )
        if isinstance(points, Tensor) and (points.dim() != 2 or points.shape[1] < d_hidden):
            raise ValueError(
                f"fixed_points must be a tensor [point, state] with state >= d_hidden = {d_hidden}, "
                f"got shape {tuple(points.shape)}"
            )
        return [names.cell(self.layer, "hidden")]

    def _points(self, model: Any) -> Tensor | None:
        """The fixed points to project: the tensor given, or those the FixedPoints experiment finds."""
        if isinstance(self.fixed_points, FixedPoints):
            return self.fixed_points.run(model, None).points
        return self.fixed_points

    def _compute(self, cache: Any, prompts: Prompts) -> TrajectoryPCAResult:
        model = cache.model
        (name,) = self.hooks(model)
        hidden = cache[name].double().cpu()
        d = hidden.shape[-1]
        rows = [prompts.flat(hidden)] if self.shared else [prompts.real(hidden, i) for i in range(len(prompts))]
        n = self.n_components
        shortest = min(len(r) for r in rows)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= min(shortest, d):
            raise ValueError(
                f"n_components must lie in [1, {min(shortest, d)}] (tokens of the shortest prompt and "
                f"d_hidden = {d}), got {n!r}"
            )
        fits = [_pca(X, n) for X in rows]
        if self.shared:
            fits = fits * len(prompts)
        mean, components, explained = (torch.stack(parts) for parts in zip(*fits))
        coords = torch.einsum("bpd,bcd->bpc", hidden - mean[:, None], components)
        coords = torch.where(prompts.mask.cpu()[..., None], coords, 0.0)
        points = self._points(model)
        points = torch.zeros(0, d) if points is None else points.detach()[:, :d]
        fixed = torch.einsum("bpd,bcd->bpc", points.double().cpu()[None] - mean[:, None], components)
        return TrajectoryPCAResult(
            **self.provenance(model, prompts), layer=int(self.layer), coords=coords.float(),
            components=components.float(), mean=mean.float(), explained=explained.float(), fixed_coords=fixed.float(),
        )


# --------------------------------------------------------------------------- kick neurons
@dataclass(kw_only=True, eq=False)
class KickNeuronsResult(Result):
    """Units of one RNN layer ranked by their weighted out-degree in the recurrent graph (weights only).

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


def recurrent_graph(cell: RNNCell) -> nx.DiGraph:
    """The recurrent weight graph: edge ``j -> i`` with ``weight = |W_hh[i, j]|`` (gates combined), no self-loops."""
    _check_cell(cell)
    d = cell.d_hidden
    W = cell.weight_hh.detach().double().cpu().reshape(-1, d, d).pow(2).sum(0).sqrt()
    graph = nx.DiGraph()
    graph.add_nodes_from(range(d))
    graph.add_weighted_edges_from((j, i, float(W[i, j])) for i in range(d) for j in range(d) if i != j and W[i, j] > 0)
    return graph


class KickNeurons(Experiment):
    """Candidate kick neurons of an RNN layer from its recurrent weight graph (see the module notes).

    Weights only: prompts, if given, are not read.

    Parameters
    ----------
    layer
        The layer.

    Returns
    -------
    KickNeuronsResult
    """

    architectures: ClassVar[tuple[str, ...]] = ("rnn",)
    requirement: ClassVar[str] = "recurrent weights"

    def __init__(self, layer: int = 0):
        self.layer = layer

    def run(self, model: Any, prompts: Prompts | None = None) -> KickNeuronsResult:
        graph = recurrent_graph(_layer_cell(self, model))
        nodes = sorted(graph.nodes)
        out = torch.tensor([graph.out_degree(n, weight="weight") for n in nodes], dtype=torch.float64)
        inn = torch.tensor([graph.in_degree(n, weight="weight") for n in nodes], dtype=torch.float64)
        score = (out - out.mean()) / out.std().clamp_min(torch.finfo(torch.float64).tiny)
        return KickNeuronsResult(
            **self.provenance(model, None),
            layer=int(self.layer), out_strength=out.float(), in_strength=inn.float(), score=score.float(),
        )


# --------------------------------------------------------------------------- checks
def _layer_cell(analysis: Analysis, model: Any) -> RNNCell:
    """The cell of ``analysis.layer``, after the architecture check."""
    analysis.check(model)
    return model.blocks[check_index("layer", analysis.layer, model.cfg.n_layers)].cell


def _check_cell(cell: Any) -> None:
    if not isinstance(cell, RNNCell):
        raise TypeError(
            f"expected an RNN cell (model.blocks[layer].cell of a HookedRNN), got a {type(cell).__name__}"
        )


def _check_states(cell: RNNCell, states: Tensor) -> Tensor:
    size = state_size(cell)
    if states.dim() != 2 or states.shape[1] != size:
        raise ValueError(
            f"states must have shape [n, state] with state = {size} (h, or [h, c] for an LSTM), got {tuple(states.shape)}"
        )
    return check_finite("states", states).double().cpu()
