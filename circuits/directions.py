"""Directions in the residual stream, one vector per layer, read from two prompt sets.

A :class:`Direction` holds one vector per covered layer, read at the shared
``names.resid_post(layer)`` hooks, so the same constructors work for a
transformer, a :class:`HookedMamba` and a :class:`HookedRNN`. Each vector
points from the ``negative`` set towards the ``positive`` set:

- ``method="diff_in_means"``: ``mean(positive) - mean(negative)``;
- ``method="pca"``: the first principal axis of the paired differences
  ``positive[i] - negative[i]`` (uncentred, so a shared shift is kept);
- ``method="probe"``: the weight of a logistic regression (scikit-learn)
  separating the two sets.

:meth:`Direction.from_prompts` reads both sets (any input
:class:`~dynalens.models.prompts.Prompts` takes: strings, token ids, ragged id
lists; one left-padded batch with its mask, pads never read) and
:meth:`Direction.from_activations` fits activations you already hold.
:func:`resid_activations` is the reader both use.

``site="state"`` reads an SSM layer's recurrent state instead
(``names.mixer(layer, "ssm_state")``, flattened: Mamba's ``d_inner × d_state``,
Mamba-2's ``n_heads × d_head × d_state``; a hybrid's SSM layers), so a
direction can be read, and steered (:func:`~dynalens.circuits.steer`), in
the state as well as in the residual stream.

Vectors are stored raw; :meth:`Direction.unit` gives unit vectors. A direction
saves as one record file (:class:`~dynalens.probes.results.Saved`).

Examples
--------
>>> d = Direction.from_prompts(model, harmful, harmless, layers=[4, 8])   # doctest: +SKIP
>>> d.cosine_similarity()                                                 # doctest: +SKIP
>>> d.save("refusal.safetensors"); Direction.load("refusal.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dynalens._version import __version__
from dynalens.models import names
from dynalens.models.prompts import PromptInput, Prompts
from dynalens.models.surface import architecture_of, model_name_of
from dynalens.models.validation import check_finite, check_index
from dynalens.probes.layers import ssm_layers
from dynalens.probes.results import Saved

Layers = Literal["all"] | Sequence[int]
Position = int | Literal["mean"]
Method = Literal["diff_in_means", "pca", "probe"]
Site = Literal["resid", "state"]

SITES = ("resid", "state")


def site_hook(model: Any, layer: int, site: Site) -> str:
    """The hook a direction of ``site`` lives at in ``layer``: ``resid_post``, or the SSM state.

    Raises ``ValueError`` for an unknown site, or ``site="state"`` on a layer
    without an SSM state (naming the layers that have one).
    """
    if site == "resid":
        return names.resid_post(layer)
    if site != "state":
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    with_state = sorted(ssm_layers(model))
    if layer not in with_state:
        raise ValueError(
            f"site='state' reads an SSM layer's recurrent state, and layer {layer} of this "
            f"{architecture_of(model)} has none; layers with one: {with_state}"
        )
    return names.mixer(layer, "ssm_state")


def site_width(model: Any, layer: int, site: Site) -> int:
    """How many numbers a direction of ``site`` has at ``layer``: ``d_model``, or the flattened state."""
    site_hook(model, layer, site)
    if site == "resid":
        return model.cfg.d_model
    cfg = model.blocks[layer].mixer.cfg
    return cfg.d_inner * cfg.d_state  # Mamba-2: n_heads * d_head = d_inner


def resolve_layers(model: Any, layers: Layers) -> list[int]:
    """``layers`` as a sorted list of distinct block indices of ``model``."""
    n_layers = model.cfg.n_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of block indices, got {layers!r}")
        return list(range(n_layers))
    chosen = sorted({check_index("layer", layer, n_layers) for layer in layers})
    if not chosen:
        raise ValueError("layers is empty: pass 'all' or at least one block index")
    return chosen


def check_position(position: Position, prompts: Prompts) -> None:
    """Raise if ``position`` is not ``"mean"`` nor a real position of every prompt."""
    if position == "mean":
        return
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError(f"position must be an int or 'mean', got {position!r}")
    for prompt in range(len(prompts)):
        prompts.position_index(position, prompt)  # IndexError naming the prompt's range


def pool(
    x: Float[Tensor, "batch pos *rest"], prompts: Prompts, position: Position
) -> Float[Tensor, "batch *rest"]:
    """Each prompt's row of ``x`` at its real position ``position``, or the mean over its real positions.

    ``x`` keeps the prompts' left-padded layout; pad positions are never read.
    """
    mask = prompts.mask.to(x.device)
    if position == "mean":
        where = mask.reshape(*mask.shape, *([1] * (x.ndim - 2)))
        total = torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
        return total / prompts.lengths.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 2)))
    columns = [prompts.position_index(position, i) for i in range(len(prompts))]
    return x[torch.arange(len(prompts), device=x.device), torch.tensor(columns, device=x.device)]


def resid_activations(
    model: Any,
    prompts: PromptInput,
    layers: Sequence[int],
    position: Position = -1,
    batch_size: int = 32,
    site: Site = "resid",
) -> Float[Tensor, "prompt layer d_model"]:
    """The residual stream (or SSM state) after each of ``layers`` at ``position`` of every prompt (float32, CPU).

    Parameters
    ----------
    model
        A dynalens model (``dl.load``): transformer, HookedMamba or HookedRNN.
    prompts
        A :class:`Prompts` or what builds one: strings, token ids ``[prompt, pos]``,
        ragged id lists. Read ``batch_size`` prompts per forward, left-padded
        with their mask (pads are never read).
    layers
        Block indices, read at ``names.resid_post(layer)``.
    position
        Each prompt's real token read (negative counts from its end), or
        ``"mean"`` to average over its real tokens.
    batch_size
        Prompts per forward pass.
    site
        ``"resid"`` (``names.resid_post(layer)``) or ``"state"``: the layers'
        SSM states, flattened (see :func:`site_hook`).
    """
    prompts = Prompts(model, prompts)
    check_position(position, prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    hooks = [site_hook(model, check_index("layer", layer, model.cfg.n_layers), site) for layer in layers]
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts if len(prompts) <= batch_size else prompts[start : start + batch_size]
            _, cache = model.run_with_cache(batch, names_filter=hooks)
            resid = torch.stack([cache[name].flatten(2) for name in hooks], dim=2)  # [batch, pos, layer, d]
            out.append(pool(resid, batch, position).float().cpu())
    return torch.cat(out)


@dataclass(eq=False, repr=False)
class Direction(Saved):
    """One vector per layer in the residual stream, and how it was made.

    Attributes
    ----------
    vectors
        Raw vectors ``[layer, d_model]``, one per entry of ``layers`` (``d_model``
        is the flattened state size for ``site="state"``).
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
    site
        Where the vectors live: ``"resid"`` (``resid_post``) or ``"state"`` (the SSM state).
    version
        The dynalens version that made it.
    """

    vectors: Float[Tensor, "layer d_model"]
    layers: list[int]
    method: str = "custom"
    position: Position = -1
    n_positive: int = 0
    n_negative: int = 0
    model_name: str = ""
    architecture: str = ""
    site: Site = "resid"
    version: str = field(default=__version__)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.layers):
            raise ValueError(
                f"vectors must have shape [len(layers), d_model] = [{len(self.layers)}, d_model], "
                f"got {tuple(self.vectors.shape)}"
            )
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be distinct and ascending, got {self.layers}")
        check_finite("direction vectors", self.vectors)
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        self.layers = [int(layer) for layer in self.layers]

    def __repr__(self) -> str:
        return (
            f"Direction(layers={self.layers}, d_model={self.d_model}, site={self.site!r}, method={self.method!r}, "
            f"position={self.position!r}, model_name={self.model_name!r})"
        )

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_prompts(
        cls,
        model: Any,
        positive: PromptInput,
        negative: PromptInput,
        method: Method = "diff_in_means",
        layers: Layers = "all",
        position: Position = -1,
        C: float = 1.0,
        batch_size: int = 32,
        site: Site = "resid",
    ) -> Direction:
        """Read both prompt sets at ``layers`` and turn them into one vector per layer.

        Parameters
        ----------
        model
            A dynalens model (``dl.load``): transformer, HookedMamba or HookedRNN.
        positive, negative
            Prompts the direction points towards and away from: a :class:`Prompts`
            or what builds one (strings, token ids, ragged id lists).
        method
            ``"diff_in_means"``, ``"pca"`` or ``"probe"`` (see the module doc).
        layers
            ``"all"`` or a list of block indices.
        position
            Each prompt's real token read (negative counts from its end), or ``"mean"``.
        C
            The probe's inverse regularisation strength (``"probe"`` only).
        batch_size
            Prompts per forward pass.
        site
            ``"resid"``, or ``"state"``: the SSM state of each layer (``layers="all"``
            takes the layers that have one).
        """
        _check_method(method)
        chosen = resolve_layers(model, layers)
        if site == "state" and layers == "all":  # the layers that have a state (an error names them if none)
            chosen = [layer for layer in chosen if layer in ssm_layers(model)] or chosen
        pos = resid_activations(model, positive, chosen, position, batch_size, site)
        neg = resid_activations(model, negative, chosen, position, batch_size, site)
        return cls.from_activations(
            pos, neg, chosen, method, C=C, position=position,
            model_name=model_name_of(model), architecture=architecture_of(model), site=site,
        )  # fmt: skip

    @classmethod
    def from_activations(
        cls,
        positive: Float[Tensor, "n_positive layer d_model"],
        negative: Float[Tensor, "n_negative layer d_model"],
        layers: Sequence[int],
        method: Method = "diff_in_means",
        *,
        C: float = 1.0,
        position: Position = -1,
        model_name: str = "",
        architecture: str = "",
        site: Site = "resid",
    ) -> Direction:
        """The direction of ``method`` from activations already read (:func:`resid_activations`).

        ``positive``/``negative`` hold one row per prompt and one column per
        entry of ``layers``; ``position``, ``model_name``, ``architecture`` and
        ``site`` are recorded as given.
        """
        _check_method(method)
        if positive.ndim != 3 or negative.ndim != 3 or positive.shape[1:] != negative.shape[1:]:
            raise ValueError(
                "positive and negative must be [prompt, layer, d_model] with the same layers and "
                f"d_model, got {tuple(positive.shape)} and {tuple(negative.shape)}"
            )
        if positive.shape[1] != len(layers):
            raise ValueError(f"activations cover {positive.shape[1]} layers but layers lists {len(layers)}")
        if len(positive) == 0 or len(negative) == 0:
            raise ValueError("both prompt sets need at least one prompt")
        fit = partial(_probe_weight, C=C) if method == "probe" else _METHODS[method]
        return cls(
            vectors=fit(positive.float().cpu(), negative.float().cpu()).float(),
            layers=list(layers),
            method=method,
            position=position,
            n_positive=int(positive.shape[0]),
            n_negative=int(negative.shape[0]),
            model_name=model_name,
            architecture=architecture,
            site=site,
        )

    # --------------------------------------------------------------- reading
    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def unit(self) -> Direction:
        """The same direction with every vector scaled to norm 1."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            zero = [self.layers[i] for i in torch.nonzero(norms[:, 0] == 0)[:, 0].tolist()]
            raise ValueError(f"the vectors of layers {zero} are zero and have no unit direction")
        return Direction(**{**self._fields(), "vectors": self.vectors / norms})

    def vector(self, layer: int) -> Float[Tensor, " d_model"]:
        """The raw vector of ``layer``; a ``KeyError`` lists the covered layers."""
        if layer not in self.layers:
            raise KeyError(f"this direction covers layers {self.layers}, not layer {layer}")
        return self.vectors[self.layers.index(layer)]

    def cosine_similarity(self) -> Float[Tensor, "layer layer"]:
        """Cosine similarity between the vectors of every pair of covered layers."""
        unit = torch.nn.functional.normalize(self.vectors, dim=-1)
        return unit @ unit.T

    def project(self, resid: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "..."]:
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
            "site": self.site,
            "version": self.version,
        }

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Direction:
        return cls(**fields)


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {method!r}")


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
            torch.from_numpy(LogisticRegression(C=C, max_iter=1000).fit(x[:, i], y).coef_[0])
            for i in range(pos.shape[1])
        ]
    )


_METHODS = {"diff_in_means": _mean_difference, "pca": _paired_axis, "probe": _probe_weight}
