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
  channel, ``d_k`` for linear attention, the state size for an RNN), while
  softmax attention has no such bound.

Linear attention is the selective SSM with ``A_t = I`` (``A = 0``, ``Delta = 1``),
``B_t = k_t``, ``C_t = q_t`` and each value channel as an SSM channel:
:func:`linear_attention_ssm_gap` checks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.kernels import mixer_matrix, selective_scan
from dynalens.models.base import TextOrTokens
from dynalens.models.validation import check_index
from dynalens.probes.figures import SEQUENTIAL, TEMPLATE
from dynalens.probes.mixer import mixer_matrices
from dynalens.models.surface import architecture_of, prompt_tokens, result_context
from dynalens.probes.results import Result
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor


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
    sigma = torch.linalg.svdvals(M.double())
    total = sigma.sum(-1, keepdim=True)
    p = sigma / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(p * p.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), 0.0)


def offdiagonal_rank(
    M: Float[Tensor, "rows cols"], *, block: tuple[int, int] = (1, 1), rtol: float = 1e-6
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
    """
    if M.dim() != 2 or M.shape[0] % block[0] or M.shape[1] % block[1] or M.shape[0] // block[0] != M.shape[1] // block[1]:
        raise ValueError(f"M {tuple(M.shape)} is not a square grid of {block} blocks over positions")
    pos = M.shape[0] // block[0]
    M = M.double()
    cutoff = rtol * float(torch.linalg.matrix_norm(M, ord=2))
    ranks = [
        int((torch.linalg.svdvals(M[t * block[0] :, : t * block[1]]) > cutoff).sum()) for t in range(1, pos)
    ]
    return max(ranks, default=0)


def rnn_input_output_map(model: Any, input: TextOrTokens, layer: int) -> Float[Tensor, "pos d_hidden pos d_in"]:
    """The linearised RNN layer: ``J[t, :, s, :] = dh_t / dx_s`` along one prompt.

    ``x`` is the layer's input (``blocks.{layer}.hook_resid_pre``) and ``h`` its
    hidden sequence, re-run through the cell's pure ``step``; zero for ``s > t``.
    """
    if architecture_of(model) != "rnn":
        raise TypeError(f"rnn_input_output_map linearises an RNN cell; got a {architecture_of(model)}")
    layer = check_index("layer", layer, model.cfg.n_layers)
    tokens = prompt_tokens(model, input)
    name = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[name])
    x = cache[name][0].detach()
    cell = model.blocks[layer].cell

    def hidden_sequence(inputs: Tensor) -> Tensor:
        state = cell.initial_state(1, inputs)
        out = []
        for t in range(inputs.shape[0]):
            state = cell.step(inputs[t][None], state)
            out.append(state[0] if isinstance(state, tuple) else state)
        return torch.cat(out)  # [pos, d_hidden]

    with torch.enable_grad():
        return torch.autograd.functional.jacobian(hidden_sequence, x, vectorize=True)


# --------------------------------------------------------------------------- comparison across models
@dataclass(kw_only=True, eq=False)
class MixerComparison(Result):
    """One layer's mixer of several models on one prompt, with its structure.

    ``model_name`` joins the names; ``architecture`` is ``"mixed"`` when they differ.

    Attributes
    ----------
    names, architectures
        One entry per model.
    layer
        The layer compared.
    matrices
        ``[model, pos, pos]``: mean ``|M|`` over the model's groups (heads, channels, the RNN's blocks).
    stats
        One row per (model, group): ``effective_rank``, ``offdiagonal_rank`` and
        the state-size ``bound`` of the latter (``None`` for softmax attention).
    """

    names: list[str]
    architectures: list[str]
    layer: int
    matrices: Float[Tensor, "model q k"]
    stats: list[dict[str, Any]]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` groups of highest effective rank."""
        return self.to_frame().sort_values("effective_rank", ascending=False, kind="stable").head(k).reset_index(drop=True)

    def to_frame(self) -> pd.DataFrame:
        """Columns ``model, architecture, group, effective_rank, offdiagonal_rank, bound``."""
        return pd.DataFrame(self.stats, columns=["model", "architecture", "group", "effective_rank", "offdiagonal_rank", "bound"])

    def figure(self) -> go.Figure:
        """The models' mean ``|M|`` side by side, each normalised to its largest entry."""
        n = len(self.names)
        fig = make_subplots(rows=1, cols=n, subplot_titles=[f"{a}: {m}" for m, a in zip(self.names, self.architectures)])
        for i in range(n):
            values = self.matrices[i].double()
            values = values / values.max().clamp_min(torch.finfo(torch.float64).tiny)
            causal = torch.ones_like(values, dtype=torch.bool).tril()
            fig.add_trace(
                go.Heatmap(
                    z=values.masked_fill(~causal, float("nan")).numpy(), colorscale=SEQUENTIAL,
                    showscale=i == n - 1, zmin=0, zmax=1, hoverongaps=False,
                    hovertemplate="query %{y} · key %{x}<br>|M| / max: %{z:.3g}<extra></extra>",
                ),
                row=1, col=i + 1,
            )
            fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
        fig.update_layout(template=TEMPLATE, title=dict(text=f"Layer {self.layer} mixers on one prompt (DSF view)"))
        return fig


def compare_mixers(
    models: Mapping[str, Any], input: TextOrTokens, layer: int = 0, *, channels: int = 4, rtol: float = 1e-6
) -> MixerComparison:
    """The mixer of ``layer`` in each model on the same prompt, with effective and off-diagonal ranks.

    Parameters
    ----------
    models
        ``{name: model}``; any architectures, all accepting ``input``.
    input
        One prompt (text, or token ids valid for every model).
    layer
        The layer compared (must exist in every model).
    channels
        Mamba: the first ``channels`` channels enter the statistics (signed ``M`` each).
    rtol
        Rank tolerance, relative to the largest singular value.

    Returns
    -------
    MixerComparison
    """
    if not models:
        raise ValueError("models is empty: pass {name: model} with at least one model")
    matrices, stats, archs, first_tokens = [], [], [], None
    for name, model in models.items():
        arch = architecture_of(model)
        tokens = prompt_tokens(model, input)
        first_tokens = first_tokens if first_tokens is not None else (model, tokens)
        if arch == "rnn":
            jac = rnn_input_output_map(model, tokens, layer)
            pos, d_h, _, d_in = jac.shape
            state = 2 * d_h if model.cfg.cell == "lstm" else d_h
            groups = [("hidden", jac.reshape(pos * d_h, pos * d_in), (d_h, d_in), state)]
            shown = jac.pow(2).sum(dim=(1, 3)).sqrt()  # ‖dh_t/dx_s‖, as the Explorer shows it
        else:
            chosen = list(range(min(channels, model.cfg.d_inner))) if arch == "mamba" else None
            result = mixer_matrices(model, tokens, layer, channels=chosen)
            bound = model.cfg.d_state if arch == "mamba" else None
            groups = [(label, m, (1, 1), bound) for label, m in zip(result.group_labels, result.matrices)]
            shown = result.matrices.abs().mean(0)
        for label, M, block, bound in groups:
            stats.append({
                "model": name, "architecture": arch, "group": label,
                "effective_rank": float(effective_rank(M)),
                "offdiagonal_rank": offdiagonal_rank(M, block=block, rtol=rtol),
                "bound": bound,
            })
        matrices.append(shown)
        archs.append(arch)
    context = result_context(*first_tokens)
    context["model_name"] = " | ".join(models)
    context["architecture"] = archs[0] if len(set(archs)) == 1 else "mixed"
    lengths = {m.shape[-1] for m in matrices}
    if len(lengths) != 1:
        raise ValueError(f"the models tokenised the prompt to different lengths {sorted(lengths)}; pass token ids")
    return MixerComparison(
        **context, names=list(models), architectures=archs, layer=layer,
        matrices=torch.stack(matrices).float(), stats=stats,
    )
