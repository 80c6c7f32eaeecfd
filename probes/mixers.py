"""Mixer matrices side by side: the Dynamical Systems Framework view (Sieber et al., 2024).

Every sequence mixer maps inputs to outputs as ``y_t = sum_{s<=t} M[t, s] x_s``:
softmax attention (``M`` the pattern), unnormalised linear attention
(``M = tril(Q K^T)``), the selective SSM (``M[t, s] = C_t prod exp(Delta A)
Delta_s B_s``, :func:`dynalens.kernels.mixer_matrix`) and, linearised, an RNN
(``M[t, s] = dh_t / dx_s``). Two structural numbers compare them:

- the *effective rank* (Roy & Vetterli, 2007), ``exp`` of the entropy of
  the normalised singular values;
- the *off-diagonal block rank*, ``max_t rank M[t:, :t]``: a recurrence with
  an ``N``-dimensional state passes everything from before ``t`` to after it
  through that state, so the rank is at most ``N`` (``d_state`` for one Mamba
  channel or one Mamba-2 head, ``d_k`` for linear attention, the state size for an RNN), while
  softmax attention has no such bound.

Linear attention is the selective SSM with ``A_t = I`` (``A = 0``, ``Delta = 1``),
``B_t = k_t``, ``C_t = q_t`` and each value channel as an SSM channel:
:func:`linear_attention_ssm_gap` checks it.

Analyses: :class:`MixerComparison` (one model's mixer with both numbers;
:meth:`MixerComparisonResult.join` sets several models side by side) and
:class:`RecurrenceJacobian` (the full ``∂h_t/∂x_s`` of an RNN layer). The
tensor functions above stay plain functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from dynalens.kernels import mixer_matrix, selective_scan
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of, model_name_of
from dynalens.models.validation import check_index
from dynalens.probes.analysis import Analysis
from dynalens.probes.figures import SEQUENTIAL, TEMPLATE, heatmap, token_labels
from dynalens.probes.mixer import (
    Linearisation,
    MixerMatrix,
    layer_mixers,
    linearise,
    linearised_jacobian,
    recurrence_jacobian,
    to_padded,
)
from dynalens.probes.results import Result


# --------------------------------------------------------------------------- linear attention ↔ SSM
def linear_attention_matrix(
    q: Float[Tensor, "... pos d_k"], k: Float[Tensor, "... pos d_k"]
) -> Float[Tensor, "... pos pos"]:
    """The mixer of causal unnormalised linear attention, ``tril(Q K^T)``."""
    return (q @ k.transpose(-1, -2)).tril()


def linear_attention(
    q: Float[Tensor, "... pos d_k"], k: Float[Tensor, "... pos d_k"], v: Float[Tensor, "... pos d_v"]
) -> Float[Tensor, "... pos d_v"]:
    """Causal unnormalised linear attention ``y_t = sum_{s<=t} (q_t . k_s) v_s``."""
    return linear_attention_matrix(q, k) @ v


def linear_attention_as_ssm(
    q: Float[Tensor, "batch pos d_k"], k: Float[Tensor, "batch pos d_k"], v: Float[Tensor, "batch pos d_v"]
) -> Float[Tensor, "batch pos d_v"]:
    """Linear attention computed by the selective scan with ``A_t = I``, ``B_t = k_t``, ``C_t = q_t``.

    Each of the ``d_v`` value channels is one SSM channel with a
    ``d_k``-dimensional state ``h_t = h_{t-1} + k_t v_t`` (``A = 0``,
    ``Delta = 1`` so ``exp(Delta A) = 1`` and ``Delta B = k``), read out as ``q_t . h_t``.
    """
    _check_qkv(q, k, v)
    b, length, d_k = q.shape
    d_v = v.shape[-1]
    ones = torch.ones(b, d_v, length, dtype=v.dtype, device=v.device)
    A = torch.zeros(d_v, d_k, dtype=v.dtype, device=v.device)
    y = selective_scan(v.transpose(1, 2), ones, A, k.transpose(1, 2), q.transpose(1, 2))
    return y.transpose(1, 2)


def linear_attention_ssm_gap(
    q: Float[Tensor, "batch pos d_k"], k: Float[Tensor, "batch pos d_k"], v: Float[Tensor, "batch pos d_v"]
) -> dict[str, float]:
    """How far linear attention and its ``A_t = I`` selective SSM are apart (0 when equivalent).

    Returns
    -------
    dict
        ``"output"``: max ``|linear_attention - linear_attention_as_ssm|``;
        ``"matrix"``: max ``|tril(Q K^T) - mixer_matrix(Delta=1, A=0, B=k, C=q)|``
        (every channel's SSM matrix is the attention matrix).
    """
    _check_qkv(q, k, v)
    b, length, d_k = q.shape
    output = (linear_attention(q, k, v) - linear_attention_as_ssm(q, k, v)).abs().max()
    ones = torch.ones(b, 1, length, dtype=q.dtype, device=q.device)
    ssm = mixer_matrix(ones, torch.zeros(1, d_k, dtype=q.dtype, device=q.device), k.transpose(1, 2), q.transpose(1, 2))
    matrix = (linear_attention_matrix(q, k) - ssm[:, 0]).abs().max()
    return {"output": float(output), "matrix": float(matrix)}


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or q.shape != k.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            "q and k must share the shape [batch, pos, d_k] and v be [batch, pos, d_v]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


# --------------------------------------------------------------------------- structure of a mixer
def effective_rank(M: Float[Tensor, "... rows cols"]) -> Float[Tensor, ...]:
    """Roy & Vetterli's effective rank ``exp(-sum p_i log p_i)``, ``p = sigma / sum sigma``.

    Between 1 (one singular value) and ``min(rows, cols)`` (all equal); 0 for a zero matrix.
    """
    return _entropy_rank(torch.linalg.svdvals(M.double()))


def _entropy_rank(sigma: Float[Tensor, "... k"]) -> Float[Tensor, ...]:
    """:func:`effective_rank` from the singular values ``sigma`` (float64)."""
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(p * p.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), 0.0)


def gram_singular_values(M: Float[Tensor, "rows cols"]) -> Float[Tensor, " k"]:
    """The singular values of ``M`` (float64, descending) as square roots of its smaller Gram matrix's eigenvalues.

    About three times faster than ``torch.linalg.svdvals`` on a large square
    matrix. The Gram matrix holds ``sigma**2``, so each value is off by about
    ``1e-16 * sigma_max**2 / sigma``: ``1e-12 * sigma_max`` at ``sigma = 1e-4 * sigma_max``,
    while values below ``1e-8 * sigma_max`` come back as noise of that
    size (each adds at most about ``2e-7`` to the entropy behind
    :func:`effective_rank`, far less when the spectrum is spread).
    """
    M = M.double()
    gram = M @ M.mT if M.shape[0] <= M.shape[1] else M.mT @ M
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def offdiagonal_rank(
    M: Float[Tensor, "rows cols"],
    *,
    block: tuple[int, int] = (1, 1),
    rtol: float = 1e-6,
    sigma_max: float | None = None,
) -> int:
    """``max_t rank M[t:, :t]`` over the block boundaries of a lower-triangular mixer.

    Parameters
    ----------
    M
        ``[pos * block[0], pos * block[1]]``: position ``t`` owns rows
        ``t * block[0] ...`` and columns ``t * block[1] ...`` (``block = (1, 1)``
        for a scalar mixer; ``(d_hidden, d_in)`` for an RNN's Jacobian).
    block
        Rows and columns per position.
    rtol
        Singular values below ``rtol * sigma_max(M)`` count as zero.
    sigma_max
        ``M``'s largest singular value when the caller has it already (saves an SVD of ``M``).
    """
    if M.dim() != 2 or M.shape[0] % block[0] or M.shape[1] % block[1] or M.shape[0] // block[0] != M.shape[1] // block[1]:
        raise ValueError(f"M {tuple(M.shape)} is not a square grid of {block} blocks over positions")
    pos = M.shape[0] // block[0]
    M = M.double()
    cutoff = rtol * (float(torch.linalg.matrix_norm(M, ord=2)) if sigma_max is None else sigma_max)
    ranks = [
        int((torch.linalg.svdvals(M[t * block[0] :, : t * block[1]]) > cutoff).sum()) for t in range(1, pos)
    ]
    return max(ranks, default=0)


def recurrence_offdiagonal_singular_values(lin: Linearisation) -> list[Float[Tensor, " k"]]:
    """Singular values of each off-diagonal block ``J[t:, :t]`` (``t = 1 ... pos - 1``) of a linearised RNN.

    Each block factors through the state before step ``t``:
    ``J[t:, :t] = O_t R_t`` with ``O_t = ∂h_{>=t}/∂state_{t-1}`` and
    ``R_t = ∂state_{t-1}/∂x_{<t}``. Square-root recursions carry the
    triangular factors of both (``R_{t+1} = [A_t R_t, B_t]`` forward,
    ``O_t = [C; O_{t+1}] A_t`` backward, ``C`` the ``h`` rows of the state),
    one small QR per step, so block ``t``'s singular values are those of a
    ``[state, state]`` product: no SVD of the ``[pos * d_hidden, pos * d_in]``
    Jacobian's blocks. Equal to :func:`offdiagonal_rank`'s singular values
    of :func:`~dynalens.probes.mixer.linearised_jacobian` in exact arithmetic.
    """
    A, B = lin.A, lin.B
    n, size, _ = B.shape
    reach = [B.new_zeros(size, 0)]  # reach[t] R_t^T = R_t R_t^T: the inputs before t seen in state_{t-1}
    for t in range(1, n):
        stacked = torch.cat([A[t - 1] @ reach[-1], B[t - 1]], dim=1)
        reach.append(torch.linalg.qr(stacked.mT, mode="r").R.mT)
    C = torch.eye(size, dtype=B.dtype)[: lin.d_hidden]
    observe = B.new_zeros(0, size)  # observe^T observe = O_t^T O_t
    found = []
    for t in range(n - 1, 0, -1):
        observe = torch.linalg.qr(torch.cat([C, observe]) @ A[t], mode="r").R
        found.append(torch.linalg.svdvals(observe @ reach[t]))
    return found[::-1]


# --------------------------------------------------------------------------- the linearised RNN
@dataclass(kw_only=True, eq=False)
class RecurrenceJacobianResult(Result):
    """One RNN layer linearised along each prompt: ``jacobian[b, t, :, s, :] = ∂h_t/∂x_s``.

    Attributes
    ----------
    layer
        The layer.
    jacobian
        ``[batch, pos, d_hidden, pos, d_in]`` in the prompts' left-padded
        layout (both position axes), zero for ``s > t`` and at pads.
    """

    layer: int
    jacobian: Float[Tensor, "batch pos d_hidden pos d_in"]

    @property
    def norms(self) -> Float[Tensor, "batch pos pos"]:
        """Frobenius norms ``‖∂h_t/∂x_s‖`` ``[batch, pos, pos]`` (what :class:`MixerMatrix` shows for an RNN)."""
        return self.jacobian.pow(2).sum(dim=(2, 4)).sqrt()

    def of(self, prompt: int = 0) -> Float[Tensor, "n d_hidden n d_in"]:
        """One prompt's Jacobian over its real tokens."""
        n = len(self.str_tokens(prompt))
        return self.jacobian[prompt, -n:, :, -n:]

    def blocks(self, prompt: int = 0) -> Float[Tensor, "n_d_hidden n_d_in"]:
        """One prompt's Jacobian as one ``[n * d_hidden, n * d_in]`` matrix (for :func:`offdiagonal_rank`)."""
        jac = self.of(prompt)
        n, d_h, _, d_in = jac.shape
        return jac.reshape(n * d_h, n * d_in)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` (query, key) pairs of largest norm over all prompts."""
        return self.to_frame().nlargest(k, "norm").reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``prompt, query_position, query_token, key_position, key_token, norm`` (key ≤ query)."""
        frames = []
        for prompt in range(self.jacobian.shape[0]):
            tokens = self.str_tokens(prompt)
            n = len(tokens)
            q, k = torch.tril_indices(n, n)
            frames.append(pd.DataFrame({
                "prompt": prompt,
                "query_position": q.numpy(), "query_token": [tokens[i] for i in q.tolist()],
                "key_position": k.numpy(), "key_token": [tokens[i] for i in k.tolist()],
                "norm": self.norms[prompt, -n:, -n:][q, k].double().numpy(),
            }))
        return pd.concat(frames, ignore_index=True)

    def figure(self, *, prompt: int = 0, log: bool = False) -> go.Figure:
        """Heatmap query × key of ``‖∂h_t/∂x_s‖`` for one prompt."""
        n = len(self.str_tokens(prompt))
        values = self.norms[prompt, -n:, -n:].double()
        labels = token_labels(self.str_tokens(prompt))
        causal = torch.ones_like(values, dtype=torch.bool).tril()
        return heatmap(
            values.masked_fill(~causal, float("nan")).numpy(), x_labels=labels, y_labels=labels,
            x_title="input x_s", y_title="hidden h_t", value_name="‖∂h_t/∂x_s‖",
            title=f"Layer {self.layer} recurrence Jacobian · {self.model_name}", log=log, y_reversed=True,
        )


class RecurrenceJacobian(Analysis):
    """The linearised RNN layer: ``∂h_t/∂x_s`` along each prompt, from the cached layer input.

    ``x`` is the layer's input (``hook_resid_pre``) and ``h`` its hidden
    sequence, re-run from the zero state through the cell's pure ``step``
    (:func:`~dynalens.probes.mixer.recurrence_jacobian`).

    Parameters
    ----------
    layer
        The layer, ``0 <= layer < cfg.n_layers``.
    """

    architectures: ClassVar[tuple[str, ...]] = ("rnn",)
    requirement: ClassVar[str] = "a recurrent cell to linearise"

    def __init__(self, layer: int = 0):
        self.layer = layer

    def hooks(self, model: Any) -> list[str]:
        return [names.resid_pre(check_index("layer", self.layer, model.cfg.n_layers))]

    def _compute(self, cache: Any, prompts: Prompts) -> RecurrenceJacobianResult:
        model = cache.model
        (name,) = self.hooks(model)
        cell = model.blocks[self.layer].cell
        rows = [recurrence_jacobian(cell, prompts.real(cache[name], i)) for i in range(len(prompts))]
        return RecurrenceJacobianResult(
            **self.provenance(model, prompts), layer=int(self.layer),
            jacobian=to_padded(prompts, rows, dims=(0, 2)).float().cpu(),
        )


# --------------------------------------------------------------------------- structure of one model's mixer
@dataclass(kw_only=True, eq=False)
class MixerComparisonResult(Result):
    """One layer's mixer of one or several models on the same prompts, with its structure.

    :meth:`join` puts the results of several models side by side; then
    ``model_name`` joins their names and ``architecture`` is ``"mixed"`` when
    they differ.

    Attributes
    ----------
    names, architectures
        One entry per model.
    layer
        The layer compared.
    matrices
        ``[model, batch, pos, pos]``: mean ``|M|`` over the model's groups
        (heads, channels; an RNN's ``‖∂h_t/∂x_s‖``), zero at pads.
    stats
        One row per (model, prompt, group): ``effective_rank``,
        ``offdiagonal_rank`` and the state-size ``bound`` of the latter
        (``None`` for softmax attention).
    """

    names: list[str]
    architectures: list[str]
    layer: int
    matrices: Float[Tensor, "model batch q k"]
    stats: list[dict[str, Any]]

    COLUMNS: ClassVar[list[str]] = [
        "model", "architecture", "prompt", "group", "effective_rank", "offdiagonal_rank", "bound",
    ]

    @classmethod
    def join(cls, results: Mapping[str, MixerComparisonResult]) -> MixerComparisonResult:
        """The results of several models on the same prompts as one, models named by the keys."""
        if not results:
            raise ValueError("results is empty: pass {name: MixerComparisonResult} with at least one result")
        items = list(results.items())
        first = items[0][1]
        for name, result in items:
            if not isinstance(result, MixerComparisonResult):
                raise TypeError(f"results[{name!r}] is a {type(result).__name__}, not a MixerComparisonResult")
            if result.prompts.key() != first.prompts.key():
                raise ValueError(
                    f"results[{name!r}] was computed on other token ids than results[{items[0][0]!r}]: "
                    "the models tokenised the prompts differently; pass the same token ids to each"
                )
            if result.params != first.params:
                raise ValueError(
                    f"results[{name!r}] has parameters {result.params}, results[{items[0][0]!r}] {first.params}: "
                    "compare one layer with one setting"
                )
        labels, archs, stats = [], [], []
        for name, result in items:
            renamed = [name] if len(result.names) == 1 else result.names
            rename = dict(zip(result.names, renamed))
            labels += renamed
            archs += result.architectures
            stats += [{**row, "model": rename[row["model"]]} for row in result.stats]
        return cls(
            model_name=" | ".join(labels), architecture=archs[0] if len(set(archs)) == 1 else "mixed",
            params=first.params, prompts=first.prompts, version=first.version,
            names=labels, architectures=archs, layer=first.layer,
            matrices=torch.cat([result.matrices for _, result in items]), stats=stats,
        )

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` groups of highest effective rank."""
        frame = self.to_frame().sort_values("effective_rank", ascending=False, kind="stable")
        return frame.head(k).reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``model, architecture, prompt, group, effective_rank, offdiagonal_rank, bound``."""
        return pd.DataFrame(self.stats, columns=self.COLUMNS)

    def figure(self, *, prompt: int = 0) -> go.Figure:
        """The models' mean ``|M|`` on one prompt side by side, each normalised to its largest entry."""
        n_models, n = len(self.names), len(self.str_tokens(prompt))
        titles = [f"{a}: {m}" for m, a in zip(self.names, self.architectures)]
        fig = make_subplots(rows=1, cols=n_models, subplot_titles=titles)
        for i in range(n_models):
            values = self.matrices[i, prompt, -n:, -n:].double()
            values = values / values.max().clamp_min(torch.finfo(torch.float64).tiny)
            causal = torch.ones_like(values, dtype=torch.bool).tril()
            fig.add_trace(
                go.Heatmap(
                    z=values.masked_fill(~causal, float("nan")).numpy(), colorscale=SEQUENTIAL,
                    showscale=i == n_models - 1, zmin=0, zmax=1, hoverongaps=False,
                    hovertemplate="query %{y} · key %{x}<br>|M| / max: %{z:.3g}<extra></extra>",
                ),
                row=1, col=i + 1,
            )
            fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
        fig.update_layout(template=TEMPLATE, title=dict(text=f"Layer {self.layer} mixers, prompt {prompt} (DSF view)"))
        return fig


class MixerComparison(Analysis):
    """One layer's mixer with its effective and off-diagonal ranks, for comparing architectures.

    Run it on each model with the same prompts (token ids every model
    accepts), then :meth:`MixerComparisonResult.join` the results::

        compare = MixerComparison(layer=0)
        MixerComparisonResult.join({name: compare(model, ids) for name, model in models.items()})

    Parameters
    ----------
    layer
        The layer compared.
    channels
        SSM layers: the first ``channels`` channels (Mamba) or heads (Mamba-2)
        enter the statistics (signed ``M`` each; its off-diagonal rank is
        bounded by ``d_state``).
    rtol
        Rank tolerance, relative to the largest singular value.
    """

    architectures: ClassVar[tuple[str, ...]] = MixerMatrix.architectures
    requirement: ClassVar[str] = MixerMatrix.requirement

    def __init__(self, layer: int = 0, *, channels: int = 4, rtol: float = 1e-6):
        self.layer = layer
        self.channels = channels
        self.rtol = rtol

    def _mixer(self, model: Any) -> MixerMatrix | None:
        """The :class:`MixerMatrix` read for ``model`` (``None`` for an RNN, linearised here in full)."""
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}")
        if not self.rtol > 0:
            raise ValueError(f"rtol must be positive, got {self.rtol!r}")
        self.check(model)
        check_index("layer", self.layer, model.cfg.n_layers)
        if architecture_of(model) == "rnn":
            return None
        mixers = layer_mixers(model, self.layer)
        ssm = model.blocks[self.layer].mixer.cfg if {"mamba", "mamba2"} & set(mixers) else None
        channels = list(range(min(self.channels, ssm.d_inner))) if "mamba" in mixers else None
        heads = list(range(min(self.channels, ssm.n_heads))) if "mamba2" in mixers else None
        return MixerMatrix(self.layer, channels=channels, heads=heads)

    def hooks(self, model: Any) -> list[str]:
        mixer = self._mixer(model)
        return RecurrenceJacobian(self.layer).hooks(model) if mixer is None else mixer.hooks(model)

    def _compute(self, cache: Any, prompts: Prompts) -> MixerComparisonResult:
        model = cache.model
        arch, name = architecture_of(model), model_name_of(model)
        mixer = self._mixer(model)
        if mixer is None:
            shown, groups = self._recurrence(model, cache, prompts)
        else:
            parts = mixer.parts(cache, prompts)
            result = mixer.result(model, prompts, parts)
            bounds = [part.bound for part in parts for _ in part.labels]
            groups = [
                [(g, *self._structure(m), b) for g, m, b in zip(result.group_labels, result.matrix(p), bounds)]
                for p in range(len(prompts))
            ]
            shown = result.matrices.abs().mean(1)
        stats = [
            {"model": name, "architecture": arch, "prompt": prompt, "group": label,
             "effective_rank": rank, "offdiagonal_rank": offdiagonal, "bound": bound}
            for prompt, rows in enumerate(groups) for label, rank, offdiagonal, bound in rows
        ]  # fmt: skip
        return MixerComparisonResult(
            **self.provenance(model, prompts), names=[name], architectures=[arch], layer=int(self.layer),
            matrices=shown.float()[None].cpu(), stats=stats,
        )

    def _structure(self, M: Float[Tensor, "q k"]) -> tuple[float, int]:
        """Effective and off-diagonal rank of a scalar mixer, from one SVD of ``M`` and one per block."""
        sigma = torch.linalg.svdvals(M.double())
        return float(_entropy_rank(sigma)), offdiagonal_rank(M, rtol=self.rtol, sigma_max=float(sigma[0]))

    def _recurrence(self, model: Any, cache: Any, prompts: Prompts) -> tuple[Tensor, list[list[tuple]]]:
        """An RNN layer's ``‖∂h_t/∂x_s‖`` ``[batch, pos, pos]`` and its one group per prompt.

        The effective rank reads the singular values of the whole Jacobian
        ``[pos * d_hidden, pos * d_in]`` (:func:`gram_singular_values`); the
        off-diagonal ranks those of its blocks through the state
        (:func:`recurrence_offdiagonal_singular_values`), with the same cutoff
        ``rtol * sigma_max`` as :func:`offdiagonal_rank`.
        """
        cell = model.blocks[self.layer].cell
        x = cache[names.resid_pre(self.layer)]
        norms, groups = [], []
        for prompt in range(len(prompts)):
            lin = linearise(cell, prompts.real(x, prompt))
            J = linearised_jacobian(lin)
            n, d_h, _, d_in = J.shape
            sigma = gram_singular_values(J.reshape(n * d_h, n * d_in))
            cutoff = self.rtol * float(sigma[0])
            ranks = [int((s > cutoff).sum()) for s in recurrence_offdiagonal_singular_values(lin)]
            groups.append([("hidden", float(_entropy_rank(sigma)), max(ranks, default=0), cell.state_size)])
            norms.append(J.pow(2).sum(dim=(1, 3)).sqrt())
        return to_padded(prompts, norms, dims=(0, 1)), groups
