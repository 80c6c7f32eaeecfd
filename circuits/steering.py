"""Steering: move the residual stream along a :class:`Direction` while the model runs.

:func:`steer` is a context manager: inside it every forward pass of the model,
``model.generate`` included, has the chosen layers' ``blocks.{l}.hook_resid_post``
changed. Three modes, with ``u`` the unit vector of the layer:

- ``"add"``: ``x + alpha * u``;
- ``"ablate"``: ``x - (x . u) u`` (the projection on ``u`` is removed);
- ``"ablate_add"``: ``x - (x . u) u + alpha * u`` (the projection is set to ``alpha``).

Positions are ``"all"``, ``"prompt"`` or ``"generated"``. A forward pass that
starts a sequence (no KV cache for a transformer, no recurrent state for a
Mamba or RNN) covers the prompt; one that continues a sequence from its cache
covers generated tokens. So with the cache on, the one-position tensors of
later steps are never mistaken for the prompt (the bug of steering-vectors #60),
and a prompt of one token is still a prompt.

Hooks are removed on exit, exceptions included; weights are never touched.

Examples
--------
>>> d = Direction.diff_in_means(model, harmful, harmless)        # doctest: +SKIP
>>> with steer(model, d, layers=[10, 12], alpha=4.0):            # doctest: +SKIP
...     model.generate("How do I pick a lock?")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from dynalens.circuits.directions import Direction, Layers, resid_name, resolve_layers
from jaxtyping import Float
from torch import Tensor

Mode = Literal["add", "ablate", "ablate_add"]
Positions = Literal["all", "prompt", "generated"]
Alpha = float | Sequence[float] | Tensor

MODES = ("add", "ablate", "ablate_add")
POSITIONS = ("all", "prompt", "generated")


def steered(
    resid: Float[Tensor, "batch pos d_model"],
    unit: Float[Tensor, " d_model"],
    alpha: float | Float[Tensor, " batch"],
    mode: Mode,
) -> Float[Tensor, "batch pos d_model"]:
    """``resid`` moved along the unit vector ``unit`` as ``mode`` says (see the module doc).

    ``alpha`` is a number or one value per sequence ``[batch]``.
    """
    u = unit.to(device=resid.device, dtype=resid.dtype)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=resid.device, dtype=resid.dtype).reshape(-1, 1, 1)
    if mode == "add":
        return resid + alpha * u
    projected = resid - (resid @ u).unsqueeze(-1) * u
    return projected if mode == "ablate" else projected + alpha * u


class SequencePhase:
    """Whether the forward pass now running reads the prompt or generated tokens.

    A forward pre-hook on the model: a call without a cache to continue
    (``past_key_values`` for a transformer, ``state`` for our recurrent models)
    starts a sequence, so its positions are the prompt; any other call runs
    generated tokens.
    """

    def __init__(self) -> None:
        self.generating = False

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values", kwargs.get("state"))
        if cache is None and len(args) > 1:  # forward(input, state) called positionally
            cache = args[1]
        self.generating = cache is not None

    def steers(self, positions: Positions) -> bool:
        """Whether positions of the current pass are steered under ``positions``."""
        return positions == "all" or (positions == "generated") == self.generating


@contextmanager
def steer(
    model: Any,
    direction: Direction,
    layers: Layers | None = None,
    alpha: Alpha = 1.0,
    mode: Mode = "add",
    positions: Positions = "all",
) -> Iterator[None]:
    """Steer ``model`` along ``direction`` while the ``with`` block runs.

    Parameters
    ----------
    model
        A dynalens model (``dl.load``): transformer, HookedMamba or HookedRNN.
    direction
        Its vectors are used as unit vectors, so ``alpha`` is in residual-stream units.
    layers
        Blocks to steer; ``None`` steers every layer the direction covers.
    alpha
        One number for every layer, one per entry of ``layers``, or a tensor
        ``[batch]`` (one per sequence) or ``[layer, batch]``. Ignored by ``"ablate"``.
    mode
        ``"add"``, ``"ablate"`` or ``"ablate_add"`` (see the module doc).
    positions
        ``"all"``, ``"prompt"`` (the tokens of the first pass) or ``"generated"``
        (every later pass that continues from the model's cache).

    Raises
    ------
    ValueError
        For an unknown mode or positions, a ``d_model`` that is not the model's,
        or an ``alpha`` with the wrong number of layers.
    KeyError
        For a layer the direction does not cover.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if direction.d_model != model.cfg.d_model:
        raise ValueError(
            f"direction has d_model {direction.d_model} but the model has {model.cfg.d_model}"
        )
    chosen = direction.layers if layers is None else resolve_layers(model, layers)
    unit = direction.unit()
    per_layer = _per_layer_alpha(alpha, len(chosen))
    phase = SequencePhase()

    def hook_for(vector: Tensor, layer_alpha: Any):
        def hook(resid: Tensor, hook: Any) -> Tensor:
            return (
                steered(resid, vector, layer_alpha, mode)
                if phase.steers(positions)
                else resid
            )

        return hook

    fwd_hooks = [
        (resid_name(layer), hook_for(unit.vector(layer), a))
        for layer, a in zip(chosen, per_layer)
    ]
    model.check_hook_names([name for name, _ in fwd_hooks])
    with ExitStack() as stack:
        handle = model.register_forward_pre_hook(phase, with_kwargs=True)
        stack.callback(handle.remove)
        for name, fn in fwd_hooks:
            # Permanent, so a nested `model.hooks()` (as in generate) leaves it on; removed on exit.
            hook_point = model.hook_dict[name]
            lens_handle = hook_point.add_hook(fn, dir="fwd", is_permanent=True)
            stack.callback(_remove_handle, hook_point, lens_handle)
        yield


def _per_layer_alpha(alpha: Alpha, n_layers: int) -> list[Any]:
    if isinstance(alpha, Tensor):
        if alpha.ndim <= 1:
            return [alpha] * n_layers
        if alpha.ndim == 2 and alpha.shape[0] == n_layers:
            return list(alpha)
        raise ValueError(
            f"a tensor alpha must be [batch] or [layer, batch] with {n_layers} layers, "
            f"got shape {tuple(alpha.shape)}"
        )
    if isinstance(alpha, (int, float)):
        return [float(alpha)] * n_layers
    values = [float(a) for a in alpha]
    if len(values) != n_layers:
        raise ValueError(
            f"alpha has {len(values)} values but {n_layers} layers are steered"
        )
    return values


def _remove_handle(hook_point: Any, lens_handle: Any) -> None:
    """Remove one hook from ``hook_point``, leaving every other hook in place."""
    lens_handle.hook.remove()
    hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not lens_handle]
