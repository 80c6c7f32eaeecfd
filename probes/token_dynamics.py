"""Token dynamics of deep selective SSMs (Vo, Pham, Tong & Nguyen, ICLR 2025, arXiv 2410.03292).

The paper reads a stack of S6 layers as the Euler discretisation of an ODE in
depth: each residual layer moves every token ``x_l`` by the layer's output,
so in the limit ``dx_l/dt = y_l(x_1, ..., x_l)``, with the selective scan
("hidden attention", no convolution, gate, norm or ``D`` skip)::

    y_l = sum_{j <= l} P_lj x_j,
    P_lj = diag_d[ (S_C x_l)^T exp(A_d sum_{j<k<=l} Delta_k,d) Delta_j,d (S_B x_j) ]
    Delta(x) = softplus(S_Delta x + b)

``S_B``, ``S_C`` (``d_state x d``) are the B and C rows of ``x_proj``,
``S_Delta = W_dt W_x,dt`` and ``b`` the bias of ``dt_proj``.

Criterion (our derivation of the paper's one-dimensional theorem). In 1-D
``mu = S_C^T S_B`` is a scalar and, when ``A_d = -a I`` (the paper's
assumption), ``P_lj = mu x_l x_j Delta(x_j) E_lj`` with ``E_lj > 0``, so

    dx_l/dt = mu x_l sum_{j<=l} x_j^2 Delta(x_j) E_lj,      dx_1/dt = mu Delta(x_1) x_1^3.

Every ``|x_l|`` therefore moves monotonically in the direction of
``sign(mu)``: ``mu < 0`` makes *all* tokens converge to 0 (the first like
``x_1 sqrt(t) -> 1 / sqrt(2 |mu| softplus(b))``), ``mu > 0`` makes *all*
diverge (in finite time when ``S_Delta x(0) > 0``, logarithmically slowly
when ``S_Delta x(0) < 0``), never a mix; ``mu = 0`` leaves them in place. In
``d`` dimensions the first token obeys ``d|x|^2/dt = 2 (x^T mu x) sum_d
Delta_d x_d^2``, so the eigenvalues of the symmetrised ``mu`` play the role of
the scalar: all (non-zero) negative → convergent, a positive one → divergent
(the paper's rule; it is a guarantee for the first token when the matrix is
semi-definite, which :attr:`MambaRegimesResult.definite` reports). The paper
excludes the convergent case by making ``S_C^T S_B`` positive semi-definite
(:func:`psd_bc_rows`), and reorders tokens by an importance score
``s_l = K^T (S_Delta x_l + b)`` with SoftSort (:func:`soft_sort`).

Mamba-2 (SSD) layers decay by one scalar per head; their limit system
(:class:`~dynalens.probes.ssd_dynamics.SSDSystem`) and criterion, derived in
:mod:`dynalens.probes.ssd_dynamics`, put one ``mu_g`` per group of heads in
the place of ``mu`` and hold for every token, in any dimension, for one
head with a symmetric definite ``mu`` (one weight per past token for all of a
head's channels and states makes ``x^T mu x`` a Lyapunov function).
:class:`MambaRegimes` and :class:`TokenImportance` read Mamba, Mamba-2 and the
SSM layers of hybrids; :class:`TokenTrajectories` reads any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels import selective_scan
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from dynalens.models.validation import check_finite, check_index
from dynalens.probes.analysis import Analysis, AnalysisError, Experiment
from dynalens.probes.figures import TEMPLATE, token_labels
from dynalens.probes.layers import layer_types, ssm_layer, ssm_layers
from dynalens.probes.mixer import to_padded
from dynalens.probes.results import Result
from dynalens.probes.ssd_dynamics import LimitSystem, SSDSystem, layer_regime, sign_regime


# --------------------------------------------------------------------------- the limit system
@dataclass(frozen=True)
class SelectiveSystem(LimitSystem):
    """A batch of idealised S6 layers: the right-hand side of the paper's limit ODE.

    Attributes
    ----------
    S_B, S_C
        ``[system, d_state, dim]``: ``B_l = S_B x_l``, ``C_l = S_C x_l``.
    S_delta, delta_bias
        ``[system, dim, dim]`` and ``[system, dim]``: ``Delta(x) = softplus(S_delta x + delta_bias)``.
    A
        ``[system, dim, d_state]``, negative: the continuous state matrix per channel.
    """

    S_B: Float[Tensor, "system n dim"]
    S_C: Float[Tensor, "system n dim"]
    S_delta: Float[Tensor, "system dim dim"]
    delta_bias: Float[Tensor, "system dim"]
    A: Float[Tensor, "system dim n"]

    def __post_init__(self) -> None:
        s, n, dim = self.S_B.shape
        expected = {
            "S_B": (s, n, dim), "S_C": (s, n, dim), "S_delta": (s, dim, dim),
            "delta_bias": (s, dim), "A": (s, dim, n),
        }
        self._check(expected)

    @classmethod
    def from_mamba(cls, model: Any, layer: int) -> SelectiveSystem:
        """The S6 layer ``layer`` of a HookedMamba as a batch of one system (``dim = d_inner``), float64."""
        _require_mamba(model)
        return cls.from_mixer(model.blocks[check_index("layer", layer, model.cfg.n_layers)].mixer)

    @classmethod
    def from_mixer(cls, mixer: Any) -> SelectiveSystem:
        """One Mamba mixer (a HookedMamba's or a hybrid's ``blocks[l].mixer``) as a batch of one, float64.

        The B, C and dt norms of Falcon-Mamba and Jamba mixers are left out, as the convolution is.
        """
        r, n = mixer.cfg.dt_rank, mixer.cfg.d_state
        W = mixer.x_proj.weight.detach().double().cpu()
        return cls(
            S_B=W[r : r + n][None],
            S_C=W[r + n :][None],
            S_delta=(mixer.dt_proj.weight.detach().double().cpu() @ W[:r])[None],
            delta_bias=mixer.dt_proj.bias.detach().double().cpu()[None],
            A=mixer.A.detach().double().cpu()[None],
        )

    @property
    def mu(self) -> Float[Tensor, "system dim dim"]:
        """The input-output matrix ``S_C^T S_B``."""
        return self.S_C.transpose(1, 2) @ self.S_B

    def regimes(self, rtol: float = 1e-9) -> list[str]:
        """The paper's regime of each system from the eigenvalues of ``sym(mu)`` (see the module notes)."""
        return [sign_regime(lam, rtol) for lam in _sym_eigenvalues(self.mu)]

    def divergence_speed(self, x0: Float[Tensor, "system pos 1"]) -> list[list[str]]:
        """1-D only: ``"fast"`` (blow-up in finite time) or ``"slow"`` (logarithmic) per divergent token.

        For ``|x| -> inf`` the step size behaves like ``S_Delta x`` when
        ``S_Delta x(0) > 0`` (``dx/dt ~ mu S_Delta x^4``: finite-time blow-up)
        and like ``exp(S_Delta x)`` when ``S_Delta x(0) < 0`` (``|x| ~ log t``).
        Tokens of convergent or stationary systems get ``"none"``. The
        distinction is asymptotic: while ``|S_Delta x|`` is small the step size
        is about ``softplus(b)`` and every divergent token grows like a blow-up.
        """
        if self.S_B.shape[2] != 1 or x0.dim() != 3 or x0.shape[0] != self.S_B.shape[0] or x0.shape[2] != 1:
            raise ValueError(f"divergence_speed is for 1-D systems and x0 [system, pos, 1]; got x0 {tuple(x0.shape)}")
        drive = (self.S_delta[:, None, 0, 0] * x0[..., 0].to(self.S_delta.dtype)) > 0  # [system, pos]
        return [
            ["fast" if fast else "slow" for fast in row.tolist()] if regime == "divergent" else ["none"] * len(row)
            for regime, row in zip(self.regimes(), drive)
        ]

    def velocity(self, x: Float[Tensor, "system pos dim"]) -> Float[Tensor, "system pos dim"]:
        """``dx/dt``: the S6 output ``y_l`` of every token, computed by the selective scan.

        The systems become groups of channels of one scan: channel ``i`` of the
        flattened ``[system * dim]`` axis reads the ``B``/``C`` of group ``i // dim``.
        """
        s, length, dim = x.shape
        delta = F.softplus(torch.einsum("sle,sde->sld", x, self.S_delta) + self.delta_bias[:, None])
        B = torch.einsum("sld,snd->snl", x, self.S_B)[None]  # [1, system, n, pos]: grouped layout
        C = torch.einsum("sld,snd->snl", x, self.S_C)[None]
        flat = lambda t: t.transpose(1, 2).reshape(1, s * dim, length)
        # The sequential reference: exact, and fastest for the short sequences simulated here.
        y = selective_scan(flat(x), flat(delta), self.A.reshape(s * dim, -1), B, C, backend="ref")
        return y.reshape(s, dim, length).transpose(1, 2)


@dataclass(frozen=True)
class TokenFlow:
    """Simulated token norms of a :class:`SelectiveSystem` batch (see :func:`simulate_tokens`).

    Attributes
    ----------
    times
        ``[step, system]`` ODE time after each step (step 0 is ``t = 0``).
    norms
        ``[step, system, pos]`` token norms ``|x_l(t)|``.
    outcome
        ``[system, pos]``: ``-1`` converged (norm fell by ``growth``), ``+1``
        diverged (norm grew by ``growth``), ``0`` undecided when the run ended.
    exit_time
        ``[system, pos]`` time at which the token was decided (``inf`` if undecided).
    """

    times: Float[Tensor, "step system"]
    norms: Float[Tensor, "step system pos"]
    outcome: Float[Tensor, "system pos"]
    exit_time: Float[Tensor, "system pos"]

    def figure(self, system: int = 0) -> go.Figure:
        """Token norms against time (log-log) for one system."""
        system = check_index("system", system, self.outcome.shape[0])
        fig = go.Figure()
        for pos in range(self.norms.shape[2]):
            fig.add_trace(go.Scatter(
                x=self.times[1:, system].numpy(), y=self.norms[1:, system, pos].numpy(),
                mode="lines", name=f"token {pos}",
            ))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Token norms in the continuous-time limit · system {system}"),
            xaxis=dict(title="t (depth)", type="log"), yaxis=dict(title="|x_l(t)|", type="log"),
        )
        return fig


@torch.no_grad()
def simulate_tokens(
    system: SelectiveSystem | SSDSystem,
    x0: Float[Tensor, "system pos dim"],
    *,
    growth: float = 10.0,
    rel_step: float = 0.02,
    max_steps: int = 5000,
) -> TokenFlow:
    """Integrate the limit ODE ``dx/dt = y(x)`` until every token's norm has changed by ``growth``.

    Classical RK4 with one step size per system, chosen so that no undecided
    token's norm changes by more than ``rel_step`` (relative) in a step: the
    step grows as tokens shrink (``~ t`` when ``|x| ~ t^{-1/2}``) and shrinks
    before a blow-up, so a run costs about ``log(growth) / rel_step`` steps
    whatever the time scale. A token is decided (and then held fixed, still
    feeding later tokens) once its norm has grown or shrunk by ``growth``.

    Parameters
    ----------
    system
        The layers to simulate (a batch of independent systems): S6
        (:class:`SelectiveSystem`) or SSD (:class:`~dynalens.probes.ssd_dynamics.SSDSystem`).
    x0
        ``[system, pos, dim]`` initial tokens, non-zero.
    growth
        Factor of norm change that decides a token (> 1).
    rel_step
        Largest relative norm change per step.
    max_steps
        Steps before giving up (tokens still undecided keep outcome 0).

    Returns
    -------
    TokenFlow
    """
    if growth <= 1 or not 0 < rel_step < 1:
        raise ValueError(f"growth must be > 1 and rel_step in (0, 1), got {growth!r} and {rel_step!r}")
    dtype = system.A.dtype
    x = check_finite("x0", x0).to(dtype).clone()
    s, length, _ = x.shape
    if tuple(x.shape) != (system.n_systems, length, system.dim):
        raise ValueError(
            f"x0 must have shape [system, pos, dim] = [{system.n_systems}, pos, {system.dim}], "
            f"got {list(x.shape)}"
        )
    norm0 = x.norm(dim=-1)
    if (norm0 == 0).any():
        raise ValueError("x0 has a zero token: the origin is a fixed point, start every token away from it")
    t = torch.zeros(s, dtype=dtype)
    outcome = torch.zeros(s, length, dtype=dtype)
    exit_time = torch.full((s, length), math.inf, dtype=dtype)
    times, norms = [t.clone()], [norm0.clone()]

    def field(z: Tensor, active: Tensor) -> Tensor:
        return system.velocity(z) * active[..., None]

    for _ in range(max_steps):
        active = (outcome == 0).to(dtype)
        if not active.any():
            break
        k1 = field(x, active)
        rate = (k1.norm(dim=-1) / x.norm(dim=-1) * active).amax(dim=1)  # [system]
        moving = rate > 0
        h = torch.where(moving, rel_step / rate.clamp_min(torch.finfo(dtype).tiny), 0.0)[:, None, None]
        k2 = field(x + h / 2 * k1, active)
        k3 = field(x + h / 2 * k2, active)
        k4 = field(x + h * k3, active)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t + h[:, 0, 0]
        norm = x.norm(dim=-1)
        decided = torch.where(norm >= growth * norm0, 1.0, torch.where(norm <= norm0 / growth, -1.0, 0.0))
        newly = (outcome == 0) & (decided != 0)
        outcome = torch.where(newly, decided.to(dtype), outcome)
        exit_time = torch.where(newly, t[:, None].expand_as(exit_time), exit_time)
        times.append(t.clone())
        norms.append(norm)
        if not moving.any():
            break
    return TokenFlow(torch.stack(times), torch.stack(norms), outcome, exit_time)


def psd_bc_rows(
    U: Float[Tensor, "n dim"], log_scale: Float[Tensor, " n"]
) -> tuple[Float[Tensor, "n dim"], Float[Tensor, "n dim"]]:
    """The paper's reparametrisation that excludes the convergent regime.

    ``S_B = U`` and ``S_C = diag(exp(log_scale)) U``, so ``S_C^T S_B = U^T D U``
    with ``D > 0`` is positive semi-definite for any ``U``.

    Returns
    -------
    (S_B, S_C)
        The B and C rows to place in ``x_proj``.
    """
    if U.dim() != 2 or tuple(log_scale.shape) != (U.shape[0],):
        raise ValueError(f"U must be [n, dim] and log_scale [n]; got {tuple(U.shape)} and {tuple(log_scale.shape)}")
    return U, log_scale.exp()[:, None] * U


# --------------------------------------------------------------------------- regimes of a model
@dataclass(kw_only=True, eq=False)
class MambaRegimesResult(Result):
    """The regime of every SSM layer of a model, from its weights (no prompts).

    One row per SSM layer: every layer of a Mamba or Mamba-2, the SSM layers of a hybrid.

    Attributes
    ----------
    layers, layer_types
        The model layer of each row and its kind, ``"mamba"`` (S6) or ``"mamba2"`` (SSD).
    regimes
        One of ``convergent``, ``divergent``, ``stationary`` per row.
    group_regimes
        Per row, the regime of each group of heads sharing ``B``/``C`` (one for Mamba).
    sym_max, sym_min
        ``[row]`` largest and smallest eigenvalue of ``(mu + mu^T) / 2`` over the groups.
    eig_real, eig_imag
        ``[row, n]`` the non-zero spectrum of ``mu = S_C^T S_B`` (that of
        ``S_B S_C^T``), ``n = d_state`` for Mamba, ``n_groups * d_state`` for
        Mamba-2 (group by group), each row sorted by real part.
    channel_mu
        ``[row, d_inner]`` the diagonal of ``mu`` (of the channel's group): the 1-D criterion of each channel alone.
    delta0
        ``softplus(b)``, the step size at ``x = 0``: ``[row, d_inner]`` (Mamba), ``[row, n_heads]`` (Mamba-2).
    definite
        Per row, whether ``sym(mu)`` of every group is semi-definite, all of one sign.
    """

    layers: list[int]
    layer_types: list[str]
    regimes: list[str]
    group_regimes: list[list[str]]
    sym_max: Float[Tensor, " row"]
    sym_min: Float[Tensor, " row"]
    eig_real: Float[Tensor, "row n"]
    eig_imag: Float[Tensor, "row n"]
    channel_mu: Float[Tensor, "row d_inner"]
    delta0: Float[Tensor, "row step"]
    definite: list[bool]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` layers with the largest ``sym(mu)`` eigenvalue (most divergent first)."""
        return self.to_frame().sort_values("sym_max", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """One row per SSM layer: kind, regime, spectrum extremes, shares of convergent channels and groups, mean ``Delta(0)``."""
        return pd.DataFrame({
            "layer": self.layers,
            "layer_type": self.layer_types,
            "regime": self.regimes,
            "sym_max": self.sym_max.double().numpy(),
            "sym_min": self.sym_min.double().numpy(),
            "max_real_eig": self.eig_real.amax(dim=1).double().numpy(),
            "definite": self.definite,
            "convergent_channels": (self.channel_mu < 0).double().mean(dim=1).numpy(),
            "convergent_groups": [groups.count("convergent") / len(groups) for groups in self.group_regimes],
            "mean_delta0": self.delta0.double().mean(dim=1).numpy(),
        })

    def figure(self) -> go.Figure:
        """The non-zero eigenvalues of ``mu`` per layer (real part), coloured by regime."""
        fig = go.Figure()
        colours = {"convergent": "#2b6cb0", "divergent": "#c53030", "stationary": "#718096"}
        mixed = len(set(self.layer_types)) > 1 or self.architecture == "hybrid"
        for row, (layer, regime) in enumerate(zip(self.layers, self.regimes)):
            kind = f" · {self.layer_types[row]}" if mixed else ""
            fig.add_trace(go.Scatter(
                x=[layer] * self.eig_real.shape[1], y=self.eig_real[row].numpy(), mode="markers",
                marker=dict(color=colours[regime], size=8), name=f"L{layer}{kind} · {regime}",
                customdata=self.eig_imag[row].numpy(),
                hovertemplate="Re %{y:.4g}<br>Im %{customdata:.4g}<extra></extra>",
            ))
        fig.add_hline(y=0, line=dict(color="#1f2933", width=1, dash="dot"))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Token-dynamics regime per layer · {self.model_name}"),
            xaxis=dict(title="layer", tickmode="array", tickvals=list(self.layers)),
            yaxis=dict(title="Re eig(S_C^T S_B)"),
        )
        return fig


class MambaRegimes(Experiment):
    """Classify every SSM layer of a Mamba, Mamba-2 or hybrid as convergent or divergent from its weights.

    The criterion is the paper's idealisation (see the module notes): it
    ignores the convolution, gate, norm and ``D`` skip. For Mamba (S6)
    layers, a trained model's ``A`` differs across states (S4D-real), so for
    tokens after the first the sign argument holds only approximately; the
    first token's is exact. For Mamba-2 (SSD) layers the decay is one scalar
    per head, which the criterion of :mod:`dynalens.probes.ssd_dynamics`
    uses: ``mu_g = S_C^gT S_B^g`` per group of heads, with
    ``S = W W_x^+`` from the rows of ``in_proj``; each group's regime is the
    sign rule on ``sym(mu_g)``, a layer is divergent when one group is. With
    one head and a symmetric definite ``mu`` (or one head per group, each
    group's ``B``/``C`` reading only its head) it holds for every token:
    ``x^T mu x`` is then a Lyapunov function.
    Weights only: prompts, if given, are not read.

    Parameters
    ----------
    rtol
        Eigenvalues within ``rtol * max|eigenvalue|`` of zero count as zero.

    Returns
    -------
    MambaRegimesResult
    """

    architectures: ClassVar[tuple[str, ...]] = ("mamba", "mamba2", "hybrid")
    requirement: ClassVar[str] = "a selective SSM's B, C and step-size projections"

    def __init__(self, rtol: float = 1e-9):
        self.rtol = rtol

    @torch.no_grad()
    def run(self, model: Any, prompts: Prompts | None = None) -> MambaRegimesResult:
        self.check(model)
        if not self.rtol >= 0:
            raise ValueError(f"rtol must be non-negative, got {self.rtol!r}")
        layers = ssm_layers(model)
        if not layers:
            raise AnalysisError(
                f"MambaRegimes reads the weights of SSM layers, and this {architecture_of(model)}'s run inside "
                "the Bridge, unopened (load it with dl.load to open them)"
            )
        rows = [_layer_criterion(model.blocks[layer].mixer, kind, self.rtol) for layer, kind in layers.items()]
        stack = lambda key: torch.stack([row[key] for row in rows]).float()
        return MambaRegimesResult(
            **self.provenance(model, None), layers=list(layers), layer_types=list(layers.values()),
            regimes=[layer_regime(row["groups"]) for row in rows], group_regimes=[row["groups"] for row in rows],
            sym_max=stack("sym_max"), sym_min=stack("sym_min"), eig_real=stack("eig_real"),
            eig_imag=stack("eig_imag"), channel_mu=stack("channel_mu"), delta0=stack("delta0"),
            definite=[row["definite"] for row in rows],
        )  # fmt: skip


def _layer_criterion(mixer: Any, kind: str, rtol: float) -> dict[str, Any]:
    """One SSM layer's criterion: group regimes, ``sym(mu)`` extremes, spectrum, diagonal, ``Delta(0)``, definiteness."""
    if kind == "mamba2":
        system = SSDSystem.from_mixer(mixer)
        sym = system.sym_eigenvalues()[0]  # [group, d_inner]
        spectra = torch.linalg.eigvals(system.S_B[0] @ system.S_C[0].transpose(1, 2))  # [group, n]
        channels = torch.arange(system.dim)
        group = channels // (system.dim // system.n_heads) // (system.n_heads // sym.shape[0])
        channel_mu = system.mu[0][group, channels, channels]
    else:
        system = SelectiveSystem.from_mixer(mixer)
        sym = _sym_eigenvalues(system.mu)  # [1, d_inner]
        spectra = torch.linalg.eigvals(system.S_B[0] @ system.S_C[0].T)[None]
        channel_mu = system.mu[0].diagonal()
    spectra = spectra.reshape(-1)
    spectra = spectra[spectra.real.argsort(descending=True)]
    scale = sym.abs().max().clamp_min(torch.finfo(sym.dtype).tiny)
    nonzero = sym[sym.abs() > rtol * scale]
    return {
        "groups": [sign_regime(lam, rtol) for lam in sym], "sym_max": sym.max(), "sym_min": sym.min(),
        "eig_real": spectra.real, "eig_imag": spectra.imag, "channel_mu": channel_mu,
        "delta0": F.softplus(system.delta_bias[0]), "definite": bool((nonzero >= 0).all() or (nonzero <= 0).all()),
    }  # fmt: skip


def _sym_eigenvalues(mu: Float[Tensor, "system dim dim"]) -> Float[Tensor, "system dim"]:
    return torch.linalg.eigvalsh((mu + mu.transpose(1, 2)).double() / 2)


# --------------------------------------------------------------------------- trajectories across layers
def stream_labels(hook_names: list[str]) -> list[str]:
    """Row labels of the residual stream ``names.resid_stream(n)``: ``embed``, then ``L{l}`` after layer ``l``."""
    return ["embed" if name == names.resid_pre(0) else f"L{names.layer_of(name)}" for name in hook_names]


def stream_frame(result: Result, hook_names: list[str], layer_types: list[str], **values: Tensor) -> pd.DataFrame:
    """One row per real token and stream row: ``prompt, position, token, layer, layer_type`` and ``values``.

    ``values`` are ``[batch, pos, row]`` (one column per stream row) or
    ``[batch, pos]`` (the same for every row); ``layer_type`` is ``embed`` on
    the embedding row, else the layer's mixer (:func:`~dynalens.probes.layers.layer_types`).
    """
    frames = []
    for row, (label, kind) in enumerate(zip(stream_labels(hook_names), ["embed", *layer_types])):
        frame = result.position_frame(**{k: v[..., row] if v.dim() == 3 else v for k, v in values.items()})
        frame.insert(3, "layer", label)
        frame.insert(4, "layer_type", kind)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["prompt", "position"], kind="stable").reset_index(drop=True)


@dataclass(kw_only=True, eq=False)
class TokenTrajectoriesResult(Result):
    """Each token's residual-stream norm across depth: the paper's ``|x_l(t)|`` with layers as time.

    Attributes
    ----------
    norms
        ``[batch, pos, layer + 1]``: row 0 the stream entering layer 0, row
        ``l + 1`` after layer ``l``; zero at pads.
    hook_names
        The hook each row was read from.
    layer_types
        Each layer's sequence mixer (``attention``, ``mamba``, ``mamba2``, ``rnn``, a hybrid's own types).
    growth
        ``[batch, pos]`` least-squares slope of ``log |x_l|`` against depth:
        > 0 growing, < 0 shrinking; zero at pads.
    """

    norms: Float[Tensor, "batch pos row"]
    hook_names: list[str]
    layer_types: list[str]
    growth: Float[Tensor, "batch pos"]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` fastest-growing tokens over all prompts: ``prompt, position, token, growth, final_norm``."""
        frame = self.position_frame(growth=self.growth, final_norm=self.norms[..., -1])
        return frame.sort_values("growth", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, position, token, layer, layer_type, norm, growth``: one row per real token and layer."""
        return stream_frame(self, self.hook_names, self.layer_types, norm=self.norms, growth=self.growth)

    def figure(self, *, prompt: int = 0, log: bool = True) -> go.Figure:
        """One line per token of one prompt: norm against layer (log scale by default).

        Lines without markers: a marker per token and layer (2,000 for 64
        tokens on 30 layers) triples the figure's drawing time; hover still
        reads every layer's point. The layers are sent once, as the x axis'
        tick text over layer indices, which the hover shows.
        """
        tokens = token_labels(self.str_tokens(prompt))
        labels, norms = stream_labels(self.hook_names), self.norms[prompt, -len(tokens):]
        kinds, layers = ["embed", *self.layer_types], list(range(len(labels)))
        fig = go.Figure()
        for p, token in enumerate(tokens):
            fig.add_trace(go.Scatter(
                x=layers, y=norms[p].numpy(), mode="lines", name=f"{p}: {token}", customdata=kinds,
                hovertemplate=f"{token}<br>%{{x}} (%{{customdata}}): %{{y:.4g}}<extra></extra>",
            ))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Token norm trajectories · {self.model_name}"),
            xaxis=dict(title="layer", tickangle=0, tickmode="array", tickvals=layers, ticktext=labels),
            yaxis=dict(title="‖x‖", type="log" if log else "linear"),
        )
        return fig


class TokenTrajectories(Analysis):
    """Per-token residual-stream norms across layers and their log-slope, on any architecture.

    Reads ``names.resid_stream(n_layers)``: the stream entering layer 0, then
    after each layer; the result names each layer's mixer (on a hybrid,
    attention and SSM layers side by side).

    Returns
    -------
    TokenTrajectoriesResult
    """

    def hooks(self, model: Any) -> list[str]:
        return names.resid_stream(model.cfg.n_layers)

    def _compute(self, cache: Any, prompts: Prompts) -> TokenTrajectoriesResult:
        model = cache.model
        hooks = self.hooks(model)
        norms = torch.stack([cache[name].double().norm(dim=-1) for name in hooks], dim=-1).cpu()  # [b, pos, row]
        depth = torch.arange(norms.shape[-1], dtype=torch.float64)
        centred = depth - depth.mean()
        logs = norms.clamp_min(torch.finfo(torch.float64).tiny).log()
        growth = (centred * (logs - logs.mean(-1, keepdim=True))).sum(-1) / centred.pow(2).sum()
        mask = prompts.mask.cpu()
        return TokenTrajectoriesResult(
            **self.provenance(model, prompts), norms=torch.where(mask[..., None], norms, 0.0).float(), hook_names=hooks,
            layer_types=layer_types(model), growth=torch.where(mask, growth, 0.0).float(),
        )


# --------------------------------------------------------------------------- importance and reordering
@dataclass(kw_only=True, eq=False)
class TokenImportanceResult(Result):
    """Importance scores ``s_l = K^T (S_Delta x_l + b)`` of one layer and the soft sort they induce.

    Attributes
    ----------
    layer, layer_type
        The SSM layer read and its kind (``"mamba"`` or ``"mamba2"``).
    scores
        ``[batch, pos]`` importance of each token (zero at pads).
    permutation
        ``[batch, pos, pos]`` each prompt's SoftSort matrix over its real
        tokens, in the left-padded layout: row ``offset + i`` weighs the
        tokens that land at rank ``i`` (zero rows and columns at pads).
    """

    layer: int
    layer_type: str
    scores: Float[Tensor, "batch pos"]
    permutation: Float[Tensor, "batch pos pos"]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` most important tokens over all prompts."""
        return self.to_frame().sort_values("score", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, position, token, score, rank`` (rank 0 a prompt's most important token)."""
        frame = self.position_frame(score=self.scores)
        frame["rank"] = frame.groupby("prompt")["score"].rank(ascending=False, method="first").astype(int) - 1
        return frame

    def figure(self, *, prompt: int = 0) -> go.Figure:
        """Bar chart of one prompt's scores in token order."""
        tokens = self.str_tokens(prompt)
        positions = list(range(len(tokens)))
        fig = go.Figure(go.Bar(x=positions, y=self.scores[prompt, -len(tokens):].numpy(), marker_color="#2b6cb0"))
        fig.update_layout(
            template=TEMPLATE, title=dict(text=f"Token importance, layer {self.layer} · {self.model_name}"),
            xaxis=dict(title="token", tickmode="array", tickvals=positions, ticktext=token_labels(tokens)),
            yaxis=dict(title="s_l = Kᵀ(S_Δ x_l + b)"),
        )
        return fig


def soft_sort(scores: Float[Tensor, "... pos"], tau: float = 1.0) -> Float[Tensor, "... pos pos"]:
    """SoftSort (Prillo & Eisenschlos, 2020) of ``scores`` in decreasing order.

    ``P[i, j] = softmax_j(-|sort(s)_i - s_j| / tau)``: a row-stochastic
    relaxation of the permutation matrix that sorts ``s`` decreasingly,
    differentiable in ``s``; it tends to that permutation as ``tau -> 0``.
    The paper reorders tokens as ``P @ x`` with ``tau = 1``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau!r}")
    ordered = scores.sort(dim=-1, descending=True).values
    return torch.softmax(-(ordered[..., :, None] - scores[..., None, :]).abs() / tau, dim=-1)


def reorder_tokens(
    x: Float[Tensor, "... pos d"], scores: Float[Tensor, "... pos"], tau: float = 1.0
) -> Float[Tensor, "... pos d"]:
    """Tokens soft-sorted by decreasing importance: ``soft_sort(scores, tau) @ x``."""
    if x.shape[:-1] != scores.shape:
        raise ValueError(f"x {tuple(x.shape)} must be scores {tuple(scores.shape)} plus a feature axis")
    return soft_sort(scores, tau).to(x.dtype) @ x


class TokenImportance(Analysis):
    """The importance score of every token at one SSM layer and its SoftSort matrix.

    Parameters
    ----------
    layer
        The SSM layer whose step-size pre-activation ``S_Delta u_l + b`` is
        read: for Mamba ``u_l`` is the scan input (its ``mixer.hook_conv``),
        one pre-activation per channel; for Mamba-2 it is the ``dt`` part of
        ``mixer.hook_in_proj`` plus ``dt_bias``, one per head (on a hybrid, an
        SSM layer of either kind).
    readout
        The paper's learned vector ``K``, ``[d_inner]`` (Mamba) or ``[n_heads]``
        (Mamba-2); untrained models have none, so the default is the mean,
        ``K = 1 / d_inner`` or ``1 / n_heads``.
    tau
        SoftSort temperature (the paper uses 1).

    Returns
    -------
    TokenImportanceResult
    """

    architectures: ClassVar[tuple[str, ...]] = ("mamba", "mamba2", "hybrid")
    requirement: ClassVar[str] = "a selective SSM's B, C and step-size projections"

    def __init__(self, layer: int = 0, *, readout: Float[Tensor, " width"] | None = None, tau: float = 1.0):
        self.layer = layer
        self.readout = readout
        self.tau = tau

    def _readout(self, model: Any) -> tuple[str, Float[Tensor, " width"]]:
        """The layer's kind and ``K``, validated."""
        kind = ssm_layer(model, self.layer, type(self).__name__)
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau!r}")
        cfg = model.blocks[self.layer].mixer.cfg
        axis, width = ("n_heads", cfg.n_heads) if kind == "mamba2" else ("d_inner", cfg.d_inner)
        if self.readout is None:
            return kind, torch.full((width,), 1.0 / width, dtype=torch.float64)
        K = torch.as_tensor(self.readout)
        if tuple(K.shape) != (width,):
            raise ValueError(f"readout must have shape [{axis}] = [{width}] at this {kind} layer, got {tuple(K.shape)}")
        return kind, check_finite("readout", K).double().cpu()

    def hooks(self, model: Any) -> list[str]:
        kind = self._readout(model)[0]
        return [names.mixer(self.layer, "in_proj" if kind == "mamba2" else "conv")]

    def _compute(self, cache: Any, prompts: Prompts) -> TokenImportanceResult:
        model = cache.model
        kind, K = self._readout(model)
        mixer = model.blocks[self.layer].mixer
        (name,) = self.hooks(model)
        read = cache[name].double().cpu()
        if kind == "mamba2":  # the dt columns of in_proj (the last n_heads): W_dt u_l, i.e. S_Delta x_l
            pre = read[..., -mixer.cfg.n_heads :] + mixer.dt_bias.detach().double().cpu()
        else:
            system = SelectiveSystem.from_mixer(mixer)
            pre = read @ system.S_delta[0].T + system.delta_bias[0]
        scores = pre @ K  # [b, pos]
        mask = prompts.mask.cpu()
        sorts = [soft_sort(prompts.real(scores, i, dim=1), self.tau) for i in range(len(prompts))]
        return TokenImportanceResult(
            **self.provenance(model, prompts), layer=int(self.layer), layer_type=kind,
            scores=torch.where(mask, scores, 0.0).float(), permutation=to_padded(prompts, sorts, dims=(0, 1)).float(),
        )


def _require_mamba(model: Any) -> None:
    arch = architecture_of(model)
    if arch != "mamba":
        raise TypeError(f"SelectiveSystem.from_mamba reads a selective SSM's x_proj and dt_proj: it takes a Mamba, got a {arch}")
