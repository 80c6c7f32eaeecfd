"""HookedRNN: Elman (tanh/relu), GRU and LSTM language models behind dynalens' hook names.

The layers follow ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` exactly (weight layout,
gate order, biases), so a model built with :meth:`HookedRNN.from_torch` gives the
same outputs and final states as the torch module it came from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from dynalens.models.base import HookedSequenceModel, SequenceConfig, TextOrTokens, as_batch
from dynalens.models.io import (
    read_json,
    read_safetensors,
    read_tokenizer,
    write_json,
    write_safetensors,
    write_tokenizer,
)

MODEL_TYPE = "dynalens-rnn"
CELLS = ("tanh", "relu", "gru", "lstm")
FINAL_NORMS = ("none", "layernorm", "rmsnorm")
# Gate activations each cell records, in torch's row order of ``weight_ih``.
GATES: dict[str, tuple[str, ...]] = {
    "tanh": (),
    "relu": (),
    "gru": ("reset_gate", "update_gate", "new_gate"),
    "lstm": ("input_gate", "forget_gate", "cell_gate", "output_gate"),
}

# One layer's state: ``h`` for Elman and GRU, ``(h, c)`` for LSTM (torch's convention).
CellState = Union[Float[Tensor, "batch d_hidden"], tuple[Tensor, Tensor]]
# The model's state: ``h_n`` ``[n_layers, batch, d_hidden]``, or ``(h_n, c_n)`` for LSTM.
RNNState = Union[Float[Tensor, "n_layers batch d_hidden"], tuple[Tensor, Tensor]]


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


@dataclass
class RNNConfig(SequenceConfig):
    """Sizes and options of a :class:`HookedRNN`.

    Parameters
    ----------
    d_model : int
        Width of the hidden state and of the residual stream (``d_hidden``).
    n_layers, d_vocab : int
        Number of recurrent layers and of tokens.
    n_ctx : int or None
        Longest accepted sequence; ``None`` (the default) accepts any length.
    cell : {"tanh", "relu", "gru", "lstm"}
        Elman cell with that nonlinearity (as ``torch.nn.RNN``), GRU or LSTM.
    bias : bool
        Whether the cells have ``bias_ih`` / ``bias_hh``.
    residual : bool
        ``False``: a plain stacked RNN, ``resid_post`` is the layer's hidden
        sequence. ``True``: ``resid_post = resid_pre + mixer_out``.
    final_norm : {"none", "layernorm", "rmsnorm"}
        Normalisation before the unembedding.
    tie_embeddings : bool
        Use the embedding matrix as the unembedding weight.
    d_embed : int or None
        Width of the embedding (the first layer's input); ``None`` means
        ``d_model``. Must equal ``d_model`` for residual or tied models.
    norm_eps : float
        Epsilon of the final norm.
    """

    architecture: ClassVar[str] = "rnn"

    cell: str = "tanh"
    bias: bool = True
    residual: bool = False
    final_norm: str = "none"
    tie_embeddings: bool = False
    d_embed: int | None = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _choice("cell", self.cell, CELLS)
        _choice("final_norm", self.final_norm, FINAL_NORMS)
        if self.d_embed is None:
            self.d_embed = self.d_model
        for name in ("d_model", "n_layers", "d_vocab", "d_embed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer or None, got {self.n_ctx!r}")
        for name in ("residual", "tie_embeddings"):
            if getattr(self, name) and self.d_embed != self.d_model:
                raise ValueError(
                    f"{name}=True needs d_embed == d_model, got d_embed={self.d_embed} "
                    f"and d_model={self.d_model}"
                )

    @property
    def d_hidden(self) -> int:
        """Width of each cell's hidden state (the residual width, ``d_model``)."""
        return self.d_model


class RNNCell(nn.Module):
    """One recurrent layer with ``torch.nn``'s parameters, gate order and equations.

    The forward pass projects the inputs of all positions in one matmul, then
    loops over time with only the recurrent matmul (:meth:`recur`). Hooks fire
    once, on whole-sequence tensors, after the loop: gate hooks observe (editing
    them changes nothing; the gate sequences are kept only while some hook is on
    a gate), ``hook_cell`` (LSTM) and ``hook_hidden`` feed what comes next,
    including the last state returned for continuation.
    """

    def __init__(self, cell: str, d_in: int, d_hidden: int, bias: bool = True):
        super().__init__()
        _choice("cell", cell, CELLS)
        self.cell = cell
        self.d_hidden = d_hidden
        self.gates = GATES[cell]
        n_blocks = max(len(self.gates), 1)
        self.weight_ih = nn.Parameter(torch.empty(n_blocks * d_hidden, d_in))
        self.weight_hh = nn.Parameter(torch.empty(n_blocks * d_hidden, d_hidden))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(n_blocks * d_hidden))
            self.bias_hh = nn.Parameter(torch.empty(n_blocks * d_hidden))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        for gate in self.gates:
            setattr(self, f"hook_{gate}", HookPoint())
        if cell == "lstm":
            self.hook_cell = HookPoint()
        self.hook_hidden = HookPoint()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ``±1/sqrt(d_hidden)``, as ``torch.nn.RNN`` initialises."""
        bound = 1.0 / math.sqrt(self.d_hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def initial_state(self, batch: int, like: Tensor) -> CellState:
        """The zero state for ``batch`` sequences, on ``like``'s device and dtype."""
        h = like.new_zeros(batch, self.d_hidden)
        return (h, h.clone()) if self.cell == "lstm" else h

    def project_input(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... gates_x_d_hidden"]:
        """``x @ weight_ih.T + bias_ih``: the part of every gate that does not recur."""
        return F.linear(x, self.weight_ih, self.bias_ih)

    def recur(
        self, x_proj: Float[Tensor, "batch gates_x_d_hidden"], state: CellState
    ) -> tuple[CellState, tuple[Tensor, ...]]:
        """One time step from a projected input: the new state and the gate activations."""
        h = state[0] if self.cell == "lstm" else state
        h_proj = F.linear(h, self.weight_hh, self.bias_hh)
        if self.cell == "gru":
            x_r, x_z, x_n = x_proj.chunk(3, dim=-1)
            h_r, h_z, h_n = h_proj.chunk(3, dim=-1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return (1 - z) * n + z * h, (r, z, n)
        pre = x_proj + h_proj
        if self.cell == "tanh":
            return torch.tanh(pre), ()
        if self.cell == "relu":
            return torch.relu(pre), ()
        i, f, g, o = pre.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * state[1] + i * g
        return (o * torch.tanh(c), c), (i, f, g, o)

    def step(self, x_t: Float[Tensor, "batch d_in"], state: CellState) -> CellState:
        """The cell's one-step map ``state_t = F(x_t, state_{t-1})``: pure, differentiable, no hooks.

        The same code as the forward loop; fixed-point, Jacobian and Lyapunov
        analyses call it. ``state`` is ``h`` ``[batch, d_hidden]``, or ``(h, c)`` for LSTM.
        """
        return self.recur(self.project_input(x_t), state)[0]

    @property
    def state_size(self) -> int:
        """The flat state size: ``d_hidden``, or ``2 * d_hidden`` for an LSTM (``[h, c]``)."""
        return 2 * self.d_hidden if self.cell == "lstm" else self.d_hidden

    def flat_step(self, x_t: Float[Tensor, "batch d_in"], state: Float[Tensor, "batch state"]) -> Float[Tensor, "batch state"]:
        """:meth:`step` on flat states ``[batch, state_size]``: ``h``, or ``[h, c]`` for an LSTM."""
        if self.cell == "lstm":
            h, c = self.step(x_t, (state[:, : self.d_hidden], state[:, self.d_hidden :]))
            return torch.cat([h, c], dim=1)
        return self.step(x_t, state)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_in"],
        state: CellState | None = None,
        mask: Bool[Tensor, "batch pos"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_hidden"], CellState]:
        """The hidden sequence and the last state (taken from the hooked tensors).

        At a pad position (``mask`` False) the step carries the state unchanged:
        the hidden (and cell) sequence there repeats the previous state.
        """
        x_proj = self.project_input(x)
        if state is None:
            state = self.initial_state(x.shape[0], x)
        # Gate sequences are kept only when a hook (or the cache) asks for them.
        gate_hooks = [getattr(self, f"hook_{gate}") for gate in self.gates]
        watched = any(hook.has_hooks() for hook in gate_hooks)
        steps = []
        for t in range(x.shape[1]):
            new, gates = self.recur(x_proj[:, t], state)
            state = new if mask is None else _carry(mask[:, t], new, state)
            steps.append((*(state if self.cell == "lstm" else (state,)), *(gates if watched else ())))
        seqs = [torch.stack(seq, dim=1) for seq in zip(*steps)]
        hidden, seqs = seqs[0], seqs[1:]
        if self.cell == "lstm":
            cell, seqs = seqs[0], seqs[1:]
        for hook, seq in zip(gate_hooks, seqs):
            hook(seq)
        hidden = self.hook_hidden(hidden)
        if self.cell == "lstm":
            cell = self.hook_cell(cell)
            return hidden, (hidden[:, -1], cell[:, -1])
        return hidden, hidden[:, -1]


def _carry(keep: Bool[Tensor, " batch"], new: CellState, old: CellState) -> CellState:
    """``new`` where ``keep``, else ``old`` (a pad step leaves the state as it was)."""
    if isinstance(new, tuple):
        return tuple(_carry(keep, n, o) for n, o in zip(new, old))
    return torch.where(keep[:, None], new, old)


class RNNBlock(nn.Module):
    """A layer of the residual stream: ``resid_pre → cell → mixer_out → resid_post``."""

    def __init__(self, cfg: RNNConfig, d_in: int):
        super().__init__()
        self.residual = cfg.residual
        self.hook_resid_pre = HookPoint()
        self.cell = RNNCell(cfg.cell, d_in, cfg.d_model, cfg.bias)
        self.hook_mixer_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_in"],
        state: CellState | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], CellState]:
        resid = self.hook_resid_pre(resid)
        hidden, state = self.cell(resid, state, mask)
        mixer_out = self.hook_mixer_out(hidden)
        resid_post = resid + mixer_out if self.residual else mixer_out
        return self.hook_resid_post(resid_post), state


class FinalNorm(nn.Module):
    """The norm before the unembedding (LayerNorm, RMSNorm or none) and its hooks.

    ``hook_scale`` ``[batch, pos, 1]`` is the denominator (as in TransformerLens
    and the other architectures): ``sqrt(var + eps)`` for LayerNorm (of the
    centred input), ``sqrt(mean(x^2) + eps)`` for RMSNorm, ones for ``"none"``.
    ``hook_normalized`` is the norm's output, weight and bias applied. The
    parameters live in ``norm`` (an ``nn.LayerNorm`` / ``nn.RMSNorm``), so saved
    models keep their names.
    """

    def __init__(self, kind: str, d_model: int, eps: float):
        super().__init__()
        _choice("final_norm", kind, FINAL_NORMS)
        self.kind = kind
        self.eps = eps
        if kind == "layernorm":
            self.norm = nn.LayerNorm(d_model, eps=eps)
        elif kind == "rmsnorm":
            self.norm = nn.RMSNorm(d_model, eps=eps)
        else:
            self.norm = nn.Identity()
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.kind == "none":
            return self.hook_normalized(x / self.hook_scale(x.new_ones(*x.shape[:-1], 1)))
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        out = x / scale * self.norm.weight
        if self.kind == "layernorm":
            out = out + self.norm.bias
        return self.hook_normalized(out)


class HookedRNN(HookedSequenceModel):
    """A recurrent language model (Elman, GRU or LSTM) with TransformerLens hooks.

    ``embed → blocks.{l} (a cell over time) → ln_final → unembed``.

    Hook names (``[batch, pos, d_model]`` unless noted):

    - ``hook_embed`` ``[batch, pos, d_embed]``
    - ``blocks.{l}.hook_resid_pre`` (``[batch, pos, d_embed]`` at layer 0)
    - ``blocks.{l}.cell.hook_hidden`` — the layer's hidden sequence
    - LSTM: ``blocks.{l}.cell.hook_cell`` and ``hook_input_gate``,
      ``hook_forget_gate``, ``hook_cell_gate``, ``hook_output_gate``;
      GRU: ``hook_reset_gate``, ``hook_update_gate``, ``hook_new_gate``
      (activations after their sigmoid/tanh)
    - ``blocks.{l}.hook_mixer_out`` — what the cell contributes (its hidden sequence)
    - ``blocks.{l}.hook_resid_post`` — ``mixer_out``, or ``resid_pre + mixer_out``
      when ``cfg.residual``
    - ``ln_final.hook_scale`` ``[batch, pos, 1]`` (the final norm's denominator),
      ``ln_final.hook_normalized``, ``hook_logits`` ``[batch, pos, d_vocab]``

    Semantics of edits: each layer's time loop runs first and its hooks then
    fire once on whole-sequence tensors, so an edit of ``hook_hidden`` at
    position ``t`` reaches the layers above and the logits but not the same
    layer's positions after ``t`` within that call. The state returned for
    continuation (``return_state=True``) is the *hooked* ``hook_hidden`` (and
    ``hook_cell``) at the last position: during :meth:`generate`, which feeds
    one token per call, an edit at the new position steers the recurrence and
    so every later token. Gate hooks only observe: editing them changes nothing.

    Examples
    --------
    >>> model = HookedRNN(RNNConfig(d_model=16, n_layers=2, d_vocab=10, cell="lstm"))
    >>> logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> cache["blocks.1.cell.hook_forget_gate"].shape
    torch.Size([1, 3, 16])
    """

    architecture: ClassVar[str] = "rnn"
    cfg: RNNConfig

    def __init__(self, cfg: RNNConfig, tokenizer: Any = None):
        super().__init__(cfg, tokenizer)
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_embed)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(
            RNNBlock(cfg, cfg.d_embed if layer == 0 else cfg.d_model)
            for layer in range(cfg.n_layers)
        )
        self.ln_final = FinalNorm(cfg.final_norm, cfg.d_model, cfg.norm_eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab)
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_logits = HookPoint()
        self.setup()

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input: TextOrTokens,
        *,
        attention_mask: Tensor | None = None,
        state: RNNState | None = None,
        return_state: bool = False,
    ) -> Float[Tensor, "batch pos d_vocab"] | tuple[Float[Tensor, "batch pos d_vocab"], RNNState]:
        """Logits ``[batch, pos, d_vocab]`` for ``input``, continuing from ``state``.

        ``input`` is text, a list of prompts (left-padded into a ``Prompts``),
        ids ``[batch, pos]`` (with an optional left-padded ``attention_mask``)
        or a ``Prompts``. A pad step carries every layer's state unchanged, so a
        padded row equals its unpadded run at its real positions. ``state`` and
        the returned state follow torch: ``h_n`` ``[n_layers, batch, d_model]``,
        or ``(h_n, c_n)`` for LSTM; ``None`` starts from zeros.
        """
        tokens, mask = as_batch(self, input, attention_mask)
        layer_states = self._split_state(state, tokens.shape[0])
        resid = self.hook_embed(self.embed(tokens))
        finals = []
        for block, layer_state in zip(self.blocks, layer_states):
            resid, layer_state = block(resid, layer_state, mask)
            finals.append(layer_state)
        logits = self.hook_logits(self.unembed(self.ln_final(resid)))
        if not return_state:
            return logits
        if self.cfg.cell == "lstm":
            h_n, c_n = zip(*finals)
            return logits, (torch.stack(h_n), torch.stack(c_n))
        return logits, torch.stack(finals)

    def _split_state(self, state: RNNState | None, batch: int) -> list[CellState | None]:
        """Per-layer states from a torch-style model state, with a clear error on bad shapes."""
        if state is None:
            return [None] * self.cfg.n_layers
        want = (self.cfg.n_layers, batch, self.cfg.d_model)
        if self.cfg.cell == "lstm":
            if not (isinstance(state, tuple) and len(state) == 2):
                raise ValueError("an LSTM state must be a tuple (h, c) of tensors")
            parts = state
        else:
            parts = (state,)
        for part in parts:
            if not isinstance(part, Tensor) or tuple(part.shape) != want:
                got = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(
                    f"state tensors must have shape [n_layers, batch, d_model] = {list(want)}, "
                    f"got {got}"
                )
        if self.cfg.cell == "lstm":
            return list(zip(state[0].unbind(0), state[1].unbind(0)))
        return list(state.unbind(0))

    # ------------------------------------------------------------ construction
    @classmethod
    def from_torch(
        cls,
        rnn: nn.RNN | nn.GRU | nn.LSTM,
        embedding: nn.Embedding | None = None,
        unembed: nn.Linear | None = None,
        *,
        d_vocab: int | None = None,
        final_norm: str = "none",
        tie_embeddings: bool = False,
        tokenizer: Any = None,
    ) -> HookedRNN:
        """A HookedRNN with copies of the weights of a ``torch.nn`` RNN, GRU or LSTM.

        Parameters
        ----------
        rnn : nn.RNN, nn.GRU or nn.LSTM
            Unidirectional, without ``proj_size``; ``batch_first`` either way
            (HookedRNN always takes ``[batch, pos]``). ``dropout`` is ignored
            (it only acts in training).
        embedding : nn.Embedding, optional
            ``[d_vocab, input_size]``; a fresh one when omitted.
        unembed : nn.Linear, optional
            ``hidden_size → d_vocab`` (a missing bias reads as zeros); a fresh
            one (or the tied embedding) when omitted.
        d_vocab : int, optional
            Needed only when neither ``embedding`` nor ``unembed`` is given.
        final_norm, tie_embeddings, tokenizer
            As in :class:`RNNConfig` / :class:`HookedRNN`.

        Returns
        -------
        HookedRNN
            In eval mode, on ``rnn``'s device and dtype, sharing no storage with it.
        """
        if isinstance(rnn, nn.LSTM):
            cell = "lstm"
            if rnn.proj_size:
                raise ValueError("LSTMs with proj_size > 0 are not supported; use proj_size=0")
        elif isinstance(rnn, nn.GRU):
            cell = "gru"
        elif isinstance(rnn, nn.RNN):
            cell = rnn.nonlinearity
        else:
            raise TypeError(
                f"from_torch takes an nn.RNN, nn.GRU or nn.LSTM, got {type(rnn).__name__}"
            )
        if rnn.bidirectional:
            raise ValueError("bidirectional RNNs are not supported: a language model reads left to right")
        vocabs = {
            "embedding": embedding.num_embeddings if embedding is not None else None,
            "unembed": unembed.out_features if unembed is not None else None,
            "d_vocab": d_vocab,
        }
        given = {k: v for k, v in vocabs.items() if v is not None}
        if not given:
            raise ValueError("pass embedding, unembed or d_vocab so the vocabulary size is known")
        if len(set(given.values())) > 1:
            raise ValueError(f"vocabulary sizes disagree: {given}")
        if embedding is not None and embedding.embedding_dim != rnn.input_size:
            raise ValueError(
                f"embedding_dim {embedding.embedding_dim} != the RNN's input_size {rnn.input_size}"
            )
        if unembed is not None and unembed.in_features != rnn.hidden_size:
            raise ValueError(
                f"unembed.in_features {unembed.in_features} != the RNN's hidden_size {rnn.hidden_size}"
            )
        if tie_embeddings and unembed is not None:
            raise ValueError("tie_embeddings=True takes its unembedding from the embedding: omit unembed")
        cfg = RNNConfig(
            d_model=rnn.hidden_size,
            n_layers=rnn.num_layers,
            d_vocab=next(iter(given.values())),
            cell=cell,
            bias=rnn.bias,
            final_norm=final_norm,
            tie_embeddings=tie_embeddings,
            d_embed=rnn.input_size,
        )
        model = cls(cfg, tokenizer=tokenizer)
        sources = {
            f"blocks.{layer}.cell.{name}": getattr(rnn, f"{name}_l{layer}")
            for layer in range(cfg.n_layers)
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if cfg.bias else ())
        }
        if embedding is not None:
            sources["embed.weight"] = embedding.weight
        if unembed is not None:
            sources["unembed.weight"] = unembed.weight
            if unembed.bias is not None:
                sources["unembed.bias"] = unembed.bias
            else:
                nn.init.zeros_(model.unembed.bias)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, source in sources.items():
                params[name].copy_(source)
        return model.to(device=rnn.weight_ih_l0.device, dtype=rnn.weight_ih_l0.dtype).eval()

    # ------------------------------------------------------------- save / load
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` (``"model_type": "dynalens-rnn"``), ``model.safetensors``
        and the tokenizer, if any, into ``folder`` (files written atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "model.safetensors", self.state_dict(), {"format": "pt"})
        write_json(folder / "config.json", {"model_type": MODEL_TYPE, **self.cfg.to_dict()})
        if self.tokenizer is not None:
            write_tokenizer(self.tokenizer, folder)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HookedRNN:
        """Load a folder written by :meth:`save_pretrained` (with its tokenizer, if any)."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {folder}: not a saved HookedRNN folder")
        config = read_json(config_path)
        model_type = config.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"{config_path} has model_type {model_type!r}; HookedRNN reads {MODEL_TYPE!r}"
            )
        model = cls(RNNConfig.from_dict(config), tokenizer=read_tokenizer(folder))
        model.load_state_dict(read_safetensors(folder / "model.safetensors"))
        return model.to(device=device, dtype=dtype).eval()


__all__ = ["HookedRNN", "RNNConfig", "RNNCell", "CELLS", "FINAL_NORMS", "GATES"]
