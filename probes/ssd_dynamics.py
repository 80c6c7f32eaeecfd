"""Token dynamics of deep Mamba-2 (SSD) stacks: the limit system and its regime criterion.

The idealisation is the one :mod:`dynalens.probes.token_dynamics` makes for
Mamba-1 (Vo et al., ICLR 2025): depth is time, each residual layer one Euler
step, and the layer is its scan alone (no convolution, gate, gated norm,
``D`` skip or ``in_proj`` bias), read in the space of the scan input
``x ∈ R^D``, ``D = H P`` (``H`` heads of ``P`` channels, ``x^(h)`` the block
of head ``h``). With ``G`` groups of ``N`` states, head ``h`` in group
``g = g(h)``, the SSD layer (``h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ``,
``y_t = h_t C_t``) has

    B_l^g = S_B^g x_l,   C_l^g = S_C^g x_l   (S_B^g, S_C^g: N x D),
    Δ_l,h = softplus(s_h · x_l + b_h),   A_h < 0 one scalar per head,

so its output, the token's velocity, is

    dx_l^(h)/dt = y_l^(h) = sum_{j<=l} (x_l^T mu_g x_j) Δ_j,h E^h_lj x_j^(h),
    mu_g = S_C^gT S_B^g  (D x D),   E^h_lj = exp(A_h sum_{j<k<=l} Δ_k,h) ∈ (0, 1].

What plays the role of Mamba-1's quantities. Mamba-1's ``mu = S_C^T S_B``
becomes one ``mu_g`` per group, a form on the *whole* token (``B`` and ``C``
read every head's channels). In a HookedMamba2 ``B``, ``C``, ``Δ`` and ``x``
all come from ``in_proj`` of the same normalised residual ``u``
(``x = W_x u``, ``B = W_B u``, ...), so ``S_B = W_B W_x^+``,
``S_C = W_C W_x^+`` and ``s = W_dt W_x^+`` (``W_x^+`` the pseudo-inverse);
every token lies in the range of ``W_x``, on which these maps are exact
when ``W_x`` has full column rank (``D >= d_model``, as in every Mamba-2).
``b`` is ``dt_bias``.

What the scalar decay per head changes. In Mamba-1 the weight of token
``j`` in ``y_l`` differs per channel (``Δ_j,d``, and ``A`` differs across
states in a trained model), so the sign argument of the paper closes only in
one dimension. In SSD the weight ``c^h_lj = Δ_j,h E^h_lj > 0`` is one scalar
for all ``P`` channels and ``N`` states of a head, which gives three exact
statements:

1. *The first token's heads move radially*:
   ``dx_1^(h)/dt = (x_1^T mu_g x_1) Δ_1,h x_1^(h)``; each head block keeps its
   direction and grows or shrinks with the sign of its group's quadratic form
   ``q_g(x) = x^T mu_g x`` (which only ``sym(mu_g)`` enters). With one head
   (``H = 1``) the direction of the whole token is frozen, so the first token
   diverges exactly when ``q(x_1(0)) > 0`` and converges when ``< 0``,
   whatever the spectrum (:meth:`SSDSystem.first_token_regimes`).
2. *A Lyapunov function for every token* when a head has its group to itself
   and ``mu_g`` is symmetric (and, with several groups, reads only its own
   head's channels, so that the heads couple through ``Δ`` alone):
   ``d/dt (x_l^T mu x_l) = 2 sum_{j<=l} c_lj (x_l^T mu x_j)^2 >= 0`` —
   the sum of squares exists because ``c_lj`` is one scalar per head. With
   ``mu`` negative definite, ``-x^T mu x`` is a norm that falls along every
   token (the ``j = l`` term alone gives ``d(-V)/dt <= -2 Δ V^2``, so
   ``|x_l| -> 0``, at least like ``t^(-1/2)``); with ``mu`` positive definite every token
   diverges. So "all converge or all diverge, never a mix" holds for every
   token in any dimension ``P`` — the paper's theorem needs ``D = 1`` — and
   the paper's reparametrisation ``mu = U^T diag(e^s) U``
   (:func:`~dynalens.probes.token_dynamics.psd_bc_rows`) is symmetric, so it
   is covered.
3. *Groups decide separately*: heads of different groups see different forms,
   so one token can have converging heads and diverging heads (in Mamba-1 all
   channels share one ``B``/``C``); with decoupled groups as in 2, each group's
   heads follow the sign of its own ``mu_g``.

The criterion (:meth:`SSDSystem.regimes`) is Mamba-1's rule applied per group:
a group is ``convergent`` when ``sym(mu_g)`` has no positive eigenvalue,
``divergent`` when it has one (``stationary`` when ``mu_g = 0``), and a layer
is divergent when one of its groups is, convergent when all non-stationary
groups are. It is a theorem in case 2, and for the first token whenever
every ``sym(mu_g)`` is definite of one sign (statement 1: ``q_g`` then keeps
that sign). With several heads per group and definite symmetric ``mu_g``,
later tokens have no sum of squares, yet random layers converge or diverge
as the criterion says in simulation (``tests/probes/test_ssd_dynamics.py``).
With an indefinite ``mu_g`` the rule is a heuristic, as Mamba-1's is beyond
one dimension: a first token's fate is the sign of its own ``q(x_1(0))``
(one head), which either sign can take.

The ``D`` skip, left out here as for Mamba-1, adds ``D_h x^(h)`` to the
velocity: a linear term that dominates near the origin, so with ``D_h > 0``
the origin repels and a "convergent" token settles at a finite norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from dynalens.kernels import ssd_scan
from dynalens.models.validation import check_finite


class LimitSystem:
    """What every batch of limit systems offers :func:`~dynalens.probes.token_dynamics.simulate_tokens`.

    Subclasses hold ``S_B`` (``[system, ..., dim]``) and ``A`` and define ``velocity(x)``.
    """

    S_B: Tensor
    A: Tensor

    def _check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise ``ValueError`` unless every field has its expected shape and is finite, and ``A < 0``."""
        kind = type(self).__name__
        for name, shape in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise ValueError(f"{kind}.{name} must have shape {shape}, got {tuple(value.shape)}")
            check_finite(f"{kind}.{name}", value)
        if (self.A >= 0).any():
            raise ValueError(f"{kind}.A must be negative (A = -exp(A_log)); got entries >= 0")

    @property
    def n_systems(self) -> int:
        """How many systems the batch holds."""
        return self.S_B.shape[0]

    @property
    def dim(self) -> int:
        """Token size: ``d_inner`` for a model's layer, ``head * head_dim`` for SSD."""
        return self.S_B.shape[-1]


@dataclass(frozen=True)
class SSDSystem(LimitSystem):
    """A batch of idealised SSD layers: the right-hand side of the limit ODE (see the module notes).

    Attributes
    ----------
    S_B, S_C
        ``[system, group, d_state, dim]``: ``B_l^g = S_B^g x_l``, ``C_l^g = S_C^g x_l``.
    S_delta, delta_bias
        ``[system, head, dim]`` and ``[system, head]``: ``Δ_h(x) = softplus(S_delta_h · x + delta_bias_h)``.
    A
        ``[system, head]``, negative: the scalar decay rate of each head.

    ``dim = head * head_dim``; head ``h`` reads group ``h // (head / group)``.
    """

    S_B: Float[Tensor, "system group n dim"]
    S_C: Float[Tensor, "system group n dim"]
    S_delta: Float[Tensor, "system head dim"]
    delta_bias: Float[Tensor, "system head"]
    A: Float[Tensor, "system head"]

    def __post_init__(self) -> None:
        if self.S_B.dim() != 4 or self.S_delta.dim() != 3:
            raise ValueError(
                f"SSDSystem.S_B must be [system, group, d_state, dim] and S_delta [system, head, dim]; "
                f"got {tuple(self.S_B.shape)} and {tuple(self.S_delta.shape)}"
            )
        s, g, n, dim = self.S_B.shape
        h = self.S_delta.shape[1]
        if h % g or dim % h:
            raise ValueError(f"SSDSystem: groups ({g}) must divide heads ({h}) and heads must divide dim ({dim})")
        expected = {"S_B": (s, g, n, dim), "S_C": (s, g, n, dim), "S_delta": (s, h, dim), "delta_bias": (s, h),
                    "A": (s, h)}  # fmt: skip
        self._check(expected)

    @classmethod
    def from_mixer(cls, mixer: Any) -> SSDSystem:
        """One Mamba-2 mixer (a HookedMamba2's or a hybrid's ``blocks[l].mixer``) as a batch of one, float64.

        ``S = W W_x^+`` for the B, C and dt rows ``W`` of ``in_proj`` (see the module notes).
        """
        cfg = mixer.cfg
        d, gn, h = cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_heads
        W = mixer.in_proj.weight.detach().double().cpu()
        W_x, W_B, W_C, W_dt = W[d:].split([d, gn, gn, h])
        inverse = torch.linalg.pinv(W_x)  # [d_model, d_inner]
        rows = lambda w: (w @ inverse).reshape(1, cfg.n_groups, cfg.d_state, d)
        return cls(
            S_B=rows(W_B), S_C=rows(W_C), S_delta=(W_dt @ inverse)[None],
            delta_bias=mixer.dt_bias.detach().double().cpu()[None], A=mixer.A.detach().double().cpu()[None],
        )  # fmt: skip

    @property
    def n_heads(self) -> int:
        """Heads per system."""
        return self.S_delta.shape[1]

    @property
    def mu(self) -> Float[Tensor, "system group dim dim"]:
        """The input-output form of each group, ``S_C^gT S_B^g``."""
        return self.S_C.transpose(2, 3) @ self.S_B

    def sym_eigenvalues(self) -> Float[Tensor, "system group dim"]:
        """Eigenvalues of ``(mu_g + mu_g^T) / 2``, ascending, float64."""
        mu = self.mu.double()
        return torch.linalg.eigvalsh((mu + mu.transpose(2, 3)) / 2)

    def group_regimes(self, rtol: float = 1e-9) -> list[list[str]]:
        """The regime of each group of each system (eigenvalues within ``rtol`` of the largest count as 0)."""
        return [[sign_regime(lam, rtol) for lam in system] for system in self.sym_eigenvalues()]

    def regimes(self, rtol: float = 1e-9) -> list[str]:
        """The regime of each system: divergent if a group is, else convergent if one is, else stationary."""
        return [layer_regime(groups) for groups in self.group_regimes(rtol)]

    def first_token_regimes(self, x0: Float[Tensor, "system dim"]) -> list[str]:
        """The regime of a first token ``x0`` by the sign of ``q(x0) = x0^T mu x0`` (one group).

        Exact for one head (statement 1 of the module notes): the token's
        direction never changes, so ``q`` keeps its sign.
        """
        if self.S_B.shape[1] != 1 or tuple(x0.shape) != (self.n_systems, self.dim):
            raise ValueError(
                f"first_token_regimes is for one group and x0 [system, dim] = [{self.n_systems}, {self.dim}]; "
                f"got {self.S_B.shape[1]} groups and x0 {tuple(x0.shape)}"
            )
        x0 = x0.to(self.mu.dtype)
        q = torch.einsum("sd,sde,se->s", x0, self.mu[:, 0], x0)
        return ["divergent" if v > 0 else "convergent" if v < 0 else "stationary" for v in q.tolist()]

    def velocity(self, x: Float[Tensor, "system pos dim"]) -> Float[Tensor, "system pos dim"]:
        """``dx/dt``: the SSD output ``y_l`` of every token, computed by the SSD scan.

        The systems become heads and groups of one scan (``system * head``
        heads reading ``system * group`` groups), with the sequential reference.
        """
        s, length, dim = x.shape
        h, g = self.n_heads, self.S_B.shape[1]
        delta = F.softplus(torch.einsum("sld,shd->slh", x, self.S_delta) + self.delta_bias[:, None])
        B = torch.einsum("sld,sgnd->lsgn", x, self.S_B).reshape(1, length, s * g, -1)
        C = torch.einsum("sld,sgnd->lsgn", x, self.S_C).reshape(1, length, s * g, -1)
        heads = x.reshape(s, length, h, dim // h).transpose(0, 1).reshape(1, length, s * h, dim // h)
        y = ssd_scan(heads, delta.transpose(0, 1).reshape(1, length, s * h), self.A.reshape(-1), B, C, backend="ref")
        return y.reshape(length, s, dim).transpose(0, 1)


def layer_regime(group_regimes: list[str]) -> str:
    """A layer's regime from its groups': divergent if one is, else convergent if one is, else stationary."""
    for regime in ("divergent", "convergent"):
        if regime in group_regimes:
            return regime
    return "stationary"


def sign_regime(eigenvalues: Float[Tensor, " dim"], rtol: float) -> str:
    """``divergent`` with an eigenvalue above ``rtol`` times the largest modulus, ``convergent`` without, ``stationary`` if all are 0."""
    scale = eigenvalues.abs().max()
    if scale == 0:
        return "stationary"
    return "divergent" if bool((eigenvalues > rtol * scale).any()) else "convergent"
