"""Directions in the residual stream, one vector per layer, read from two prompt sets.

A :class:`Direction` holds one vector per covered layer, read at the shared
``blocks.{l}.hook_resid_post`` hooks, so the same constructors work for a
transformer, a :class:`HookedMamba` and a :class:`HookedRNN`. Each vector
points from the ``negative`` set towards the ``positive`` set:

- :meth:`Direction.diff_in_means`: ``mean(positive) - mean(negative)``;
- :meth:`Direction.pca`: the first principal axis of the paired differences
  ``positive[i] - negative[i]`` (uncentred, so a shared shift is kept);
- :meth:`Direction.probe`: the weight of a logistic regression (scikit-learn)
  separating the two sets.

All three are :meth:`Direction.from_prompts` with ``method`` set.

Vectors are stored raw; :meth:`Direction.unit` gives unit vectors. Saving
writes one safetensors file with the rest as JSON metadata (no pickle).

Examples
--------
>>> d = Direction.diff_in_means(model, harmful, harmless, layers=[4, 8])   # doctest: +SKIP
>>> d.cosine_similarity()                                                 # doctest: +SKIP
>>> d.save("refusal.safetensors"); Direction.load("refusal.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from dynalens.models.io import write_safetensors
from dynalens.models.validation import check_finite, check_index
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor

Prompts = Sequence[str] | Tensor
Layers = Literal["all"] | Sequence[int]
Position = int | Literal["mean"]
Method = Literal["diff_in_means", "pca", "probe"]

_METADATA_KEY = "dynalens.direction"


def resid_name(layer: int) -> str:
    """The shared hook name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def resolve_layers(model: Any, layers: Layers) -> list[int]:
    """``layers`` as a sorted list of distinct block indices of ``model``."""
    n_layers = model.cfg.n_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(
                f"layers must be 'all' or a list of block indices, got {layers!r}"
            )
        return list(range(n_layers))
    chosen = sorted({check_index("layer", layer, n_layers) for layer in layers})
    if not chosen:
        raise ValueError("layers is empty: pass 'all' or at least one block index")
    return chosen


def resid_activations(
    model: Any,
    prompts: Prompts,
    layers: Sequence[int],
    position: Position = -1,
    batch_size: int = 16,
) -> Float[Tensor, "prompt layer d_model"]:
    """The residual stream after each of ``layers`` at ``position`` of every prompt.

    Parameters
    ----------
    model
        A dynalens model (``dl.load``).
    prompts
        A list of strings or of token rows ``[1, pos]``, or token ids
        ``[prompt, pos]``. A transformer reads a list ``batch_size`` prompts at a
        time, padded on the left with an attention mask (the padding is never
        attended to nor read); a recurrent model reads a list one prompt at a time.
    layers
        Block indices.
    position
        The token index read in each prompt (negative counts from its end), or
        ``"mean"`` to average over its tokens.
    batch_size
        Prompts per forward pass for a transformer.
    """
    names = [resid_name(layer) for layer in layers]
    if isinstance(prompts, str):
        raise TypeError(
            "prompts must be a list of strings or token ids [prompt, pos], not one string"
        )
    if not (isinstance(position, int) or position == "mean") or isinstance(position, bool):
        raise ValueError(f"position must be an int or 'mean', got {position!r}")
    if isinstance(prompts, Tensor):
        batches = [(prompts, None)]
    else:
        rows = [model.to_tokens(p) if isinstance(p, str) else p for p in prompts]
        if getattr(model, "architecture", "transformer") == "transformer":
            batches = [
                left_padded(model, rows[i : i + batch_size])
                for i in range(0, len(rows), batch_size)
            ]
        else:
            batches = [(row, None) for row in rows]
    if not batches or batches[0][0].shape[0] == 0:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    with torch.no_grad():
        for tokens, mask in batches:
            extra = {} if mask is None else {"attention_mask": mask}
            _, cache = model.run_with_cache(tokens, names_filter=names, **extra)
            resid = torch.stack([cache[name] for name in names], dim=1)  # [batch, layer, pos, d]
            n_pads = [0] * len(tokens) if mask is None else (mask == 0).sum(-1).tolist()
            out += [_read(resid[i, :, n_pad:], position) for i, n_pad in enumerate(n_pads)]
    return torch.stack(out).float()


def _read(resid: Float[Tensor, "layer pos d_model"], position: Position) -> Tensor:
    if position == "mean":
        return resid.mean(dim=1)
    n_pos = resid.shape[1]
    if not -n_pos <= position < n_pos:
        raise IndexError(
            f"position {position} is out of range for a prompt of {n_pos} tokens: "
            f"valid positions are -{n_pos} to {n_pos - 1}, or 'mean'"
        )
    return resid[:, position]


def left_padded(
    model: Any, rows: Sequence[Int[Tensor, "1 pos"]]
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack token rows ``[1, pos]``, padded on the left, and their attention mask."""
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    width = max(row.shape[-1] for row in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - row.shape[-1] :] = row.reshape(-1)
        mask[i, width - row.shape[-1] :] = 1
    return tokens, mask


@dataclass(eq=False)
class Direction:
    """One vector per layer in the residual stream, and how it was made.

    Attributes
    ----------
    vectors
        Raw vectors ``[layer, d_model]``, one per entry of ``layers``.
    layers
        The block indices covered, ascending.
    method
        ``"diff_in_means"``, ``"pca"``, ``"probe"`` or ``"custom"``.
    position
        Where each prompt was read (an int or ``"mean"``).
    n_positive, n_negative
        How many prompts of each set it was read from.
    model_name, architecture
        The model it was read from.
    """

    vectors: Float[Tensor, "layer d_model"]
    layers: list[int]
    method: str = "custom"
    position: Position = -1
    n_positive: int = 0
    n_negative: int = 0
    model_name: str = ""
    architecture: str = ""

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.layers):
            raise ValueError(
                f"vectors must have shape [len(layers), d_model] = [{len(self.layers)}, d_model], "
                f"got {tuple(self.vectors.shape)}"
            )
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(
                f"layers must be distinct and ascending, got {self.layers}"
            )
        check_finite("direction vectors", self.vectors)
        self.layers = [int(layer) for layer in self.layers]

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_prompts(
        cls,
        model: Any,
        positive: Prompts,
        negative: Prompts,
        method: Method = "diff_in_means",
        layers: Layers = "all",
        position: Position = -1,
        C: float = 1.0,
    ) -> Direction:
        """Read both prompt sets at ``layers`` and turn them into one vector per layer.

        Parameters
        ----------
        model
            A dynalens model (``dl.load``): transformer, HookedMamba or HookedRNN.
        positive, negative
            Prompts the direction points towards and away from: lists of strings
            or of token ids (each run alone), or one tensor ``[prompt, pos]``.
        method
            ``"diff_in_means"``, ``"pca"`` or ``"probe"`` (see :meth:`diff_in_means`,
            :meth:`pca`, :meth:`probe`).
        layers
            ``"all"`` or a list of block indices.
        position
            The token index read (negative counts from the end), or ``"mean"``.
        C
            The probe's inverse regularisation strength (``"probe"`` only).
        """
        if method not in _METHODS:
            raise ValueError(f"method must be one of {tuple(_METHODS)}, got {method!r}")
        fit = partial(_probe_weight, C=C) if method == "probe" else _METHODS[method]
        chosen = resolve_layers(model, layers)
        pos = resid_activations(model, positive, chosen, position)
        neg = resid_activations(model, negative, chosen, position)
        return cls(
            vectors=fit(pos, neg).float().cpu(),
            layers=chosen,
            method=method,
            position=position,
            n_positive=int(pos.shape[0]),
            n_negative=int(neg.shape[0]),
            model_name=str(getattr(model.cfg, "model_name", "") or type(model).__name__),
            architecture=str(getattr(model, "architecture", "transformer")),
        )

    @classmethod
    def diff_in_means(
        cls, model: Any, positive: Prompts, negative: Prompts, **options: Any
    ) -> Direction:
        """``mean(positive) - mean(negative)`` of the residual stream at each layer.

        ``options``: ``layers``, ``position`` as in :meth:`from_prompts`.
        """
        return cls.from_prompts(model, positive, negative, "diff_in_means", **options)

    @classmethod
    def pca(cls, model: Any, positive: Prompts, negative: Prompts, **options: Any) -> Direction:
        """The first principal axis of the paired differences ``positive[i] - negative[i]``.

        The differences are not centred, so an axis shared by every pair is kept;
        the sign makes the mean difference project positively. Vectors are unit.
        ``options``: ``layers``, ``position`` as in :meth:`from_prompts`.
        """
        return cls.from_prompts(model, positive, negative, "pca", **options)

    @classmethod
    def probe(cls, model: Any, positive: Prompts, negative: Prompts, **options: Any) -> Direction:
        """The weight of a logistic regression (positive = 1) on each layer's activations.

        Features are not standardised, so the weight lives in the residual
        stream's own basis. ``options``: ``layers``, ``position``, ``C`` (scikit-learn's
        inverse regularisation strength) as in :meth:`from_prompts`.
        """
        return cls.from_prompts(model, positive, negative, "probe", **options)

    # --------------------------------------------------------------- reading
    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def unit(self) -> Direction:
        """The same direction with every vector scaled to norm 1."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            zero = [
                self.layers[i] for i in torch.nonzero(norms[:, 0] == 0)[:, 0].tolist()
            ]
            raise ValueError(
                f"the vectors of layers {zero} are zero and have no unit direction"
            )
        return Direction(**{**self._fields(), "vectors": self.vectors / norms})

    def vector(self, layer: int) -> Float[Tensor, " d_model"]:
        """The raw vector of ``layer``; a ``KeyError`` lists the covered layers."""
        if layer not in self.layers:
            raise KeyError(
                f"this direction covers layers {self.layers}, not layer {layer}"
            )
        return self.vectors[self.layers.index(layer)]

    def cosine_similarity(self) -> Float[Tensor, "layer layer"]:
        """Cosine similarity between the vectors of every pair of covered layers."""
        unit = torch.nn.functional.normalize(self.vectors, dim=-1)
        return unit @ unit.T

    def project(
        self, resid: Float[Tensor, "... d_model"], layer: int
    ) -> Float[Tensor, ...]:
        """The scalar projection of ``resid`` on the unit vector of ``layer``."""
        u = torch.nn.functional.normalize(self.vector(layer), dim=0)
        return resid.float() @ u.to(resid.device)

    # ----------------------------------------------------------- persistence
    def _fields(self) -> dict[str, Any]:
        return {
            "vectors": self.vectors,
            "layers": self.layers,
            "method": self.method,
            "position": self.position,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "model_name": self.model_name,
            "architecture": self.architecture,
        }

    def metadata(self) -> dict[str, Any]:
        """Every field but the vectors, as plain JSON values."""
        return {k: v for k, v in self._fields().items() if k != "vectors"}

    def save(self, path: str | os.PathLike) -> None:
        """Write the vectors to a safetensors file, the rest as JSON metadata, atomically."""
        write_safetensors(
            path,
            {"vectors": self.vectors},
            metadata={_METADATA_KEY: json.dumps(self.metadata())},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Direction:
        """Read a direction written by :meth:`save`."""
        tensors, plain = read_tagged(path, _METADATA_KEY, "direction")
        return cls(vectors=tensors["vectors"], **plain)


def read_tagged(
    path: str | os.PathLike, key: str, what: str
) -> tuple[dict[str, Tensor], Any]:
    """The tensors of a safetensors file and the JSON stored under metadata ``key``.

    Raises ``ValueError`` naming ``what`` the file should hold when ``key`` is missing.
    """
    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if key not in metadata:
            raise ValueError(f"{os.fspath(path)!r} is not a dynalens {what} file")
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    return tensors, json.loads(metadata[key])


def _mean_difference(pos: Tensor, neg: Tensor) -> Tensor:
    return pos.mean(0) - neg.mean(0)


def _paired_axis(pos: Tensor, neg: Tensor) -> Tensor:
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(
            f"pca pairs the prompts, so both sets need the same size: got {pos.shape[0]} "
            f"positive and {neg.shape[0]} negative"
        )
    diffs = (pos - neg).transpose(0, 1)  # [layer, pair, d_model]
    axes = torch.linalg.svd(diffs, full_matrices=False).Vh[:, 0]  # [layer, d_model]
    sign = torch.sign((diffs.mean(1) * axes).sum(-1, keepdim=True))
    return axes * torch.where(sign == 0, 1.0, sign)


def _probe_weight(pos: Tensor, neg: Tensor, C: float) -> Tensor:
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([pos, neg]).double().numpy()
    y = [1] * pos.shape[0] + [0] * neg.shape[0]
    return torch.stack(
        [
            torch.from_numpy(
                LogisticRegression(C=C, max_iter=1000).fit(x[:, i], y).coef_[0]
            )
            for i in range(pos.shape[1])
        ]
    )


_METHODS = {"diff_in_means": _mean_difference, "pca": _paired_axis, "probe": _probe_weight}
