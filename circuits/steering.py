"""Steering: move the residual stream (or an SSM state) along a :class:`Direction` while the model runs.

:func:`steer` is a context manager: inside it every forward pass of the model,
``model.generate`` included, has the chosen layers' ``names.resid_post(layer)``
changed, or, for a direction of ``site="state"``, their SSM states
``names.mixer(layer, "ssm_state")`` (Mamba, Mamba-2, a hybrid's SSM layers;
flattened to one vector per position). Three modes, with ``u`` the unit
vector of the layer:

- ``"add"``: ``x + alpha * u``;
- ``"ablate"``: ``x - (x . u) u`` (the projection on ``u`` is removed);
- ``"ablate_add"``: ``x - (x . u) u + alpha * u`` (the projection is set to ``alpha``).

Positions are ``"all"``, ``"prompt"`` or ``"generated"``. In ``generate`` the
first pass is the prompt and each later pass a generated token (passes are
counted at ``names.EMBED``); any other forward that starts a sequence (no KV
cache for a transformer, no recurrent state for a Mamba or RNN) covers the
prompt, one that continues from its cache generated tokens. So with the cache
on, the one-position tensors of later steps are never mistaken for the prompt
(the bug of steering-vectors #60), and a prompt of one token is still a
prompt. In a left-padded batch (:class:`~dynalens.models.prompts.Prompts`, or
token ids with an ``attention_mask``) pad positions are never steered.

A steered state ``h_t`` is the one read out into ``y_t`` and carried on to
the next call (the models' ``hook_ssm_state`` contract): within one pass the
recurrence is not re-run from it, while in ``generate`` every new token starts
from the steered state of the token before.

Hooks and the wrapped ``forward``/``generate`` are removed on exit, exceptions
included; weights are never touched.

:class:`SteeringController` (after Guiding Giants) decides per prompt how much
to steer: ``fit`` on two prompt sets, ``predict`` a global scale and per-layer
weights, ``score`` (ROC AUC of the scale), ``attach(model)`` to steer each
generation as predicted for its own prompt; it saves as one record file
(:class:`~dynalens.probes.results.Saved`).

Examples
--------
>>> d = Direction.from_prompts(model, harmful, harmless)          # doctest: +SKIP
>>> with steer(model, d, layers=[10, 12], alpha=4.0):            # doctest: +SKIP
...     model.generate("How do I pick a lock?")
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from dynalens.circuits.directions import (
    Direction,
    Layers,
    Position,
    resid_activations,
    resolve_layers,
    site_hook,
    site_width,
)
from dynalens.models import names
from dynalens.models.base import as_batch
from dynalens.models.prompts import PromptInput, Prompts
from dynalens.models.validation import check_index
from dynalens.probes.results import Saved

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
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``resid`` moved along the unit vector ``unit`` as ``mode`` says (see the module doc).

    ``alpha`` is a number or one value per sequence ``[batch]``; where
    ``mask`` is False (pad positions) ``resid`` is returned unchanged.
    """
    u = unit.to(device=resid.device, dtype=resid.dtype)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=resid.device, dtype=resid.dtype).reshape(-1, 1, 1)
    if mode == "add":
        out = resid + alpha * u
    else:
        projected = resid - (resid @ u).unsqueeze(-1) * u
        out = projected if mode == "ablate" else projected + alpha * u
    if mask is None:
        return out
    return torch.where(mask.to(resid.device).unsqueeze(-1), out, resid)


# What a forward call continues from: transformers >= 5.24 passes `cache`, earlier
# versions and the Bridge `past_key_values`, HF Mamba `cache_params`, our recurrent
# models `state`.
CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params", "state")


def _call_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call to ``module.forward`` by parameter name (``**kwargs`` merged in)."""
    signature = inspect.signature(type(module).forward.__get__(module))
    bound = signature.bind_partial(*args, **kwargs).arguments
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return bound


def continues_sequence(arguments: dict[str, Any]) -> bool:
    """Whether a forward call with these named ``arguments`` continues an earlier pass.

    It does when any of these holds: it carries a cache (:data:`CACHE_ARGUMENTS`)
    that is not empty (a cache with ``get_seq_length`` counts when that is
    positive, any other when it is not ``None``); its ``cache_position`` starts
    after position 0; its ``attention_mask`` is longer than its token input (the
    mask then covers earlier positions). So a prompt of one token is still a prompt.
    """
    for name in CACHE_ARGUMENTS:
        cache = arguments.get(name)
        if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
            return True
    position = arguments.get("cache_position")
    if isinstance(position, Tensor) and position.numel() > 0 and int(position.min()) > 0:
        return True
    tokens, mask = arguments.get("input"), arguments.get("attention_mask")
    return (
        isinstance(tokens, Tensor)
        and not tokens.is_floating_point()
        and isinstance(mask, Tensor)
        and mask.shape[-1] > tokens.shape[-1]
    )


def pass_mask(model: Any, arguments: dict[str, Any]) -> Bool[Tensor, "batch pos"] | None:
    """The real positions of the pass a forward call runs; ``None`` when every position is real.

    The input's mask as the model reads it (:func:`~dynalens.models.base.as_batch`:
    a :class:`Prompts` brings its own, a list of prompts becomes one, token ids
    take their ``attention_mask``); a mask longer than the input (a continuing
    pass) gives its last ``pos`` columns. ``None`` for embeddings.
    """
    tokens, mask = arguments.get("input"), arguments.get("attention_mask")
    if isinstance(tokens, Tensor):
        if tokens.is_floating_point():
            return None
        if isinstance(mask, Tensor) and mask.shape[-1] > tokens.shape[-1]:
            return mask[..., -tokens.shape[-1] :].bool()
    return as_batch(model, tokens, mask if isinstance(tokens, Tensor) else None)[1]


def call_prompts(model: Any, input: Any, attention_mask: Tensor | None = None) -> Prompts | None:
    """The prompts a sequence-starting call reads, as a :class:`Prompts` (pads dropped); ``None`` for embeddings."""
    if isinstance(input, Prompts):
        return input
    if not isinstance(input, Tensor):
        return Prompts(model, input)
    if input.is_floating_point():
        return None
    tokens, mask = as_batch(model, input, attention_mask)
    if mask is None:
        return Prompts(model, tokens)
    return Prompts(model, [row[keep] for row, keep in zip(tokens, mask, strict=True)])


class SequencePhase:
    """Whether the forward pass now running reads the prompt or generated tokens, and its mask.

    Inside ``generate`` (:meth:`generation`), the first pass is the prompt and
    each later one a generated token; passes are counted at the embedding
    (:meth:`on_embed`), whatever way the model runs them. Outside it, each
    outermost forward call (see :func:`watch_forward`) that
    :func:`continues_sequence` runs generated tokens, any other the prompt.
    ``mask`` is the real positions of the running pass (``None``: all real).
    ``on_prompt(prompts)``, when given, runs before every sequence starts with
    its :class:`Prompts` (``None`` for embeddings); passes it makes itself are
    never steered.
    """

    def __init__(self, on_prompt: Callable[[Prompts | None], None] | None = None) -> None:
        self.generating = False
        self.reading = False
        self.mask: Tensor | None = None
        self.on_prompt = on_prompt
        self._prompt_mask: Tensor | None = None
        self._passes: int | None = None  # passes seen in the generate now running; None outside

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """An outermost forward call outside ``generate``, with its arguments."""
        if self.reading or self._passes is not None:
            return
        arguments = _call_arguments(module, args, kwargs)
        self.generating = continues_sequence(arguments)
        self.mask = pass_mask(module, arguments)
        if not self.generating:
            self._read(lambda: call_prompts(module, arguments.get("input"), arguments.get("attention_mask")))

    @contextmanager
    def generation(self, model: Any, input: Any) -> Iterator[None]:
        """``model.generate(input, ...)`` runs in the block: its prompt pass, then one pass per new token."""
        if self.reading or self._passes is not None:
            yield
            return
        mask = as_batch(model, input)[1]
        self._read(lambda: call_prompts(model, input))
        self._prompt_mask, self._passes = mask, 0
        try:
            yield
        finally:
            self._prompt_mask, self._passes = None, None

    def on_embed(self, embedding: Tensor, hook: Any) -> None:
        """A hook on ``names.EMBED``: a pass begins (counted inside ``generate``)."""
        if self._passes is None or self.reading:
            return
        self.generating = self._passes > 0
        self.mask = None if self.generating else self._prompt_mask
        self._passes += 1

    def _read(self, prompts: Callable[[], Prompts | None]) -> None:
        if self.on_prompt is None:
            return
        read = prompts()
        self.reading = True
        try:
            self.on_prompt(read)
        finally:
            self.reading = False

    def steers(self, positions: Positions) -> bool:
        """Whether positions of the current pass are steered under ``positions``."""
        if self.reading:
            return False
        return positions == "all" or (positions == "generated") == self.generating

    def mask_for(self, resid: Tensor, name: str) -> Tensor | None:
        """The pass mask for ``resid [batch, pos, ...]`` read at hook ``name`` (``None``: all real)."""
        if self.mask is None:
            return None
        if tuple(self.mask.shape) != tuple(resid.shape[:2]):
            raise ValueError(
                f"{name} holds [batch, pos] = {tuple(resid.shape[:2])} but the pass's mask of real "
                f"positions is {tuple(self.mask.shape)}: steering cannot tell pads apart"
            )
        return self.mask


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
        Its vectors are used as unit vectors, so ``alpha`` is in residual-stream
        units (state units for a direction of ``site="state"``).
    layers
        Blocks to steer; ``None`` steers every layer the direction covers.
    alpha
        One number for every layer, one per entry of ``layers``, or a tensor
        ``[batch]`` (one per sequence) or ``[layer, batch]``. Ignored by ``"ablate"``.
    mode
        ``"add"``, ``"ablate"`` or ``"ablate_add"`` (see the module doc).
    positions
        ``"all"``, ``"prompt"`` (the tokens of the first pass) or ``"generated"``
        (every later pass that continues from the model's cache). Pad
        positions of a left-padded batch are never steered.

    Raises
    ------
    ValueError
        For an unknown mode or positions, a ``d_model`` that is not the model's
        (the layer's flattened state size for ``site="state"``), a state
        direction on a layer without an SSM state,
        or an ``alpha`` with the wrong number of layers.
    KeyError
        For a layer the direction does not cover.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    chosen = direction.layers if layers is None else resolve_layers(model, layers)
    for layer in chosen:
        width = site_width(model, layer, direction.site)
        if direction.d_model != width:
            where = "d_model" if direction.site == "resid" else f"a state of layer {layer} flattened to"
            raise ValueError(f"direction has d_model {direction.d_model} but the model has {where} {width}")
    per_layer = _per_layer_alpha(alpha, len(chosen))
    with steering_hooks(model, direction, chosen, lambda: per_layer, mode, positions):
        yield


@contextmanager
def steering_hooks(
    model: Any,
    direction: Direction,
    layers: Sequence[int],
    alphas: Callable[[], Sequence[Any]],
    mode: Mode,
    positions: Positions,
    on_prompt: Callable[[Prompts | None], None] | None = None,
) -> Iterator[None]:
    """Hooks steering ``layers``, each with ``alphas()[i]`` read at every pass; removed on exit.

    The engine of :func:`steer` and of :meth:`SteeringController.attach`:
    ``on_prompt(prompts)`` runs when a sequence starts (see :class:`SequencePhase`).
    """
    unit = direction.unit()
    phase = SequencePhase(on_prompt)

    def hook_for(i: int, vector: Tensor):
        def hook(resid: Tensor, hook: Any) -> Tensor:
            if not phase.steers(positions):
                return resid
            flat = resid.flatten(2)  # a state [batch, pos, ...] as one vector per position
            return steered(flat, vector, alphas()[i], mode, phase.mask_for(resid, hook.name)).view_as(resid)

        return hook

    fwd_hooks = [
        (site_hook(model, layer, direction.site), hook_for(i, unit.vector(layer))) for i, layer in enumerate(layers)
    ]
    model.check_hook_names([name for name, _ in fwd_hooks])
    with ExitStack() as stack:
        stack.enter_context(watch_forward(model, phase))
        stack.enter_context(watch_generate(model, phase))
        for name, fn in [(names.EMBED, phase.on_embed), *fwd_hooks]:
            # Permanent, so a nested `model.hooks()` (as in generate) leaves it on; removed on exit.
            hook_point = model.hook_dict[name]
            lens_handle = hook_point.add_hook(fn, dir="fwd", is_permanent=True)
            stack.callback(_remove_handle, hook_point, lens_handle)
        yield


@contextmanager
def watch_forward(model: nn.Module, phase: Callable[[nn.Module, tuple, dict], None]) -> Iterator[None]:
    """Call ``phase(model, args, kwargs)`` before every outermost forward of ``model`` in the block.

    ``model.forward`` is wrapped for the block's duration, so calls through
    ``model(...)`` and direct ``model.forward(...)`` calls (TransformerLens'
    Bridge runs ``run_with_cache`` that way, past module pre-hooks) are both
    seen; forwards nested in a forward are not. Restored on exit, exceptions included.
    """
    depth = 0

    def wrap(original: Callable) -> Callable:
        def watched(*args: Any, **kwargs: Any) -> Any:
            nonlocal depth
            if depth == 0:
                phase(model, args, kwargs)
            depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth -= 1

        return watched

    with _wrapped_method(model, "forward", wrap):
        yield


@contextmanager
def watch_generate(model: Any, phase: SequencePhase) -> Iterator[None]:
    """Run every ``model.generate`` call of the block inside ``phase.generation``."""

    def wrap(original: Callable) -> Callable:
        def watched(input: Any, *args: Any, **kwargs: Any) -> Any:
            with phase.generation(model, input):
                return original(input, *args, **kwargs)

        return watched

    with _wrapped_method(model, "generate", wrap):
        yield


@contextmanager
def _wrapped_method(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """``obj.name`` replaced by ``wrap(obj.name)`` (an instance attribute) while the block runs."""
    original = getattr(obj, name)
    own = vars(obj).get(name)
    setattr(obj, name, functools.wraps(original)(wrap(original)))
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


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
        raise ValueError(f"alpha has {len(values)} values but {n_layers} layers are steered")
    return values


def _remove_handle(hook_point: Any, lens_handle: Any) -> None:
    """Remove one hook from ``hook_point``, leaving every other hook in place."""
    lens_handle.hook.remove()
    hook_point.fwd_hooks = [h for h in hook_point.fwd_hooks if h is not lens_handle]


@dataclass
class ControllerOutput:
    """What a :class:`SteeringController` predicts for each prompt.

    Attributes
    ----------
    scale
        The global scale ``sigmoid(s)`` in ``[0, 1]``, ``[prompt]``: how much to steer.
    weights
        The per-layer weights ``sigmoid(w)`` in ``[0, 1]``, ``[prompt, layer]``.
    """

    scale: Float[Tensor, " prompt"]
    weights: Float[Tensor, "prompt layer"]

    def alphas(self, alpha: float) -> Float[Tensor, "layer prompt"]:
        """The steering strength of each layer and prompt: ``alpha * scale * weight``."""
        return alpha * (self.scale[:, None] * self.weights).T


class ControllerNet(nn.Module):
    """A one-hidden-layer MLP: pooled activation → scale logit and per-layer weights."""

    def __init__(self, d_in: int, n_layers: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, 1 + n_layers))

    def forward(self, x: Float[Tensor, "batch d_in"]) -> tuple[Tensor, Tensor]:
        out = self.body(x)
        return out[:, 0], torch.sigmoid(out[:, 1:])


class SteeringController(Saved):
    """A light controller that decides, per prompt, how much to steer (Guiding Giants).

    It reads one layer's pooled residual stream, standardised, and predicts a
    global scale (a logit trained with binary cross-entropy: positive set 1,
    negative set 0) and per-layer sigmoid weights. With no steering outcome in
    the objective, each layer weight is a gate trained with the same labels
    (binary cross-entropy) plus a small L1 penalty, so it differs across layers
    only through its own head; the paper's weights are trained the same way.
    Steering then adds ``alpha * scale * weight_l`` times the unit direction at
    each layer ``l``. Training is full-batch AdamW with early stopping on the
    held-out loss. ``__init__`` only stores its arguments (scikit-learn style);
    ``save``/``load`` write and read one record file, fitted or not.

    Parameters
    ----------
    direction
        The direction steered along.
    read_layer
        The block whose ``names.resid_post`` the controller reads.
    layers
        Blocks steered; ``None``: every layer of ``direction``.
    alpha
        Strength at scale 1 and weight 1 (residual-stream units).
    position
        Where the read layer is pooled: a real token index or ``"mean"``.
    hidden, lr, weight_penalty, max_epochs, patience, validation_fraction, random_state
        MLP width, AdamW learning rate, L1 weight on the layer weights, epoch cap,
        epochs without held-out improvement before stopping, held-out share, seed.
    mode
        The steering mode, ``"add"`` or ``"ablate_add"``.
    """

    def __init__(
        self,
        direction: Direction,
        read_layer: int,
        layers: Sequence[int] | None = None,
        alpha: float = 4.0,
        position: Position = -1,
        hidden: int = 32,
        lr: float = 1e-2,
        weight_penalty: float = 1e-3,
        max_epochs: int = 300,
        patience: int = 20,
        validation_fraction: float = 0.25,
        random_state: int = 0,
        mode: Mode = "add",
    ):
        self.direction = direction
        self.read_layer = read_layer
        self.layers = layers
        self.alpha = alpha
        self.position = position
        self.hidden = hidden
        self.lr = lr
        self.weight_penalty = weight_penalty
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.mode = mode

    # ------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        """The constructor arguments by name (scikit-learn's ``get_params``)."""
        signature = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name in signature.parameters if name != "self"}

    def set_params(self, **params: Any) -> SteeringController:
        """Set constructor arguments by name; unknown names are an error. Returns ``self``."""
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"SteeringController has no parameter {name!r}; its parameters: {sorted(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        return f"SteeringController({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    # --------------------------------------------------------------- fitting
    @torch.enable_grad()
    def fit(self, model: Any, positive: PromptInput, negative: PromptInput) -> SteeringController:
        """Train on the two prompt sets (steer on ``positive``, not on ``negative``).

        Both are a :class:`Prompts` or what builds one. Gradients are switched
        on for the controller's own training, so ``fit`` works inside
        ``torch.no_grad()``; the model is only read.
        """
        if self.mode not in ("add", "ablate_add"):
            raise ValueError(f"mode must be 'add' or 'ablate_add', got {self.mode!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")
        check_index("read_layer", self.read_layer, model.cfg.n_layers)
        layers = list(self.direction.layers if self.layers is None else resolve_layers(model, self.layers))
        for layer in layers:
            self.direction.vector(layer)  # a layer the direction lacks fails here
        pos = resid_activations(model, positive, [self.read_layer], self.position)[:, 0]
        neg = resid_activations(model, negative, [self.read_layer], self.position)[:, 0]
        x, y = torch.cat([pos, neg]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
        g = torch.Generator().manual_seed(self.random_state)
        order = torch.randperm(len(x), generator=g)
        n_val = max(1, round(self.validation_fraction * len(x)))
        if len(x) - n_val < 2:
            raise ValueError(f"fit needs at least 3 prompts in all, got {len(x)}")
        val, train = order[:n_val], order[n_val:]
        self.layers_ = layers
        self.mean_ = x[train].mean(0)
        self.std_ = x[train].std(0).clamp_min(1e-6)
        x = (x - self.mean_) / self.std_
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            net = ControllerNet(x.shape[1], len(self.layers_), self.hidden)
        optimiser = torch.optim.AdamW(net.parameters(), lr=self.lr)
        best, best_state, waited = float("inf"), copy.deepcopy(net.state_dict()), 0
        self.n_epochs_ = 0
        for _ in range(self.max_epochs):
            net.train()
            optimiser.zero_grad()
            self._loss(net, x[train], y[train]).backward()
            optimiser.step()
            self.n_epochs_ += 1
            with torch.no_grad():
                val_loss = self._loss(net.eval(), x[val], y[val]).item()
            if val_loss < best - 1e-6:
                best, best_state, waited = val_loss, copy.deepcopy(net.state_dict()), 0
            else:
                waited += 1
                if waited >= self.patience:
                    break
        net.load_state_dict(best_state)
        self.net_ = net.eval()
        self.validation_loss_ = best
        return self

    def _loss(self, net: ControllerNet, x: Tensor, y: Tensor) -> Tensor:
        logit, weights = net(x)
        bce = nn.functional.binary_cross_entropy_with_logits
        gates = nn.functional.binary_cross_entropy(weights, y[:, None].expand_as(weights))
        return bce(logit, y) + gates + self.weight_penalty * weights.mean()

    # ------------------------------------------------------------ predicting
    def predict(self, model: Any, prompts: PromptInput) -> ControllerOutput:
        """The scale and per-layer weights for each prompt (one left-padded batch, pads unread)."""
        return self.predict_activations(resid_activations(model, prompts, [self.read_layer], self.position)[:, 0])

    def predict_activations(self, x: Float[Tensor, "prompt d_model"]) -> ControllerOutput:
        """:meth:`predict` from the pooled read-layer activations (:func:`resid_activations`)."""
        if not hasattr(self, "net_"):
            raise RuntimeError("this SteeringController is not fitted yet: call fit(model, positive, negative)")
        with torch.no_grad():
            logit, weights = self.net_((x.float().cpu() - self.mean_) / self.std_)
        return ControllerOutput(scale=torch.sigmoid(logit), weights=weights)

    def score(self, model: Any, positive: PromptInput, negative: PromptInput) -> float:
        """ROC AUC of the predicted scale for telling ``positive`` from ``negative``."""
        from sklearn.metrics import roc_auc_score

        pos, neg = self.predict(model, positive).scale, self.predict(model, negative).scale
        labels = [1] * len(pos) + [0] * len(neg)
        return float(roc_auc_score(labels, torch.cat([pos, neg]).numpy()))

    # ----------------------------------------------------------- persistence
    def _fields(self) -> dict[str, Any]:
        params = {k: v for k, v in self.get_params().items() if k != "direction"}
        if params["layers"] is not None:  # any sequence (a range) is stored as a list
            params["layers"] = [int(layer) for layer in params["layers"]]
        fitted = None
        if hasattr(self, "net_"):
            fitted = {
                "layers_": self.layers_,
                "n_epochs_": self.n_epochs_,
                "validation_loss_": self.validation_loss_,
                "mean_": self.mean_,
                "std_": self.std_,
                "net_": dict(self.net_.state_dict()),
            }
        return {"params": params, "direction": self.direction._fields(), "fitted": fitted}

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> SteeringController:
        ctrl = cls(Direction._from_fields(fields["direction"]), **fields["params"])
        fitted = fields["fitted"]
        if fitted is not None:
            ctrl.layers_ = [int(layer) for layer in fitted["layers_"]]
            ctrl.n_epochs_ = fitted["n_epochs_"]
            ctrl.validation_loss_ = fitted["validation_loss_"]
            ctrl.mean_, ctrl.std_ = fitted["mean_"], fitted["std_"]
            ctrl.net_ = ControllerNet(ctrl.mean_.shape[0], len(ctrl.layers_), ctrl.hidden)
            ctrl.net_.load_state_dict(fitted["net_"])
            ctrl.net_.eval()
        return ctrl

    # ------------------------------------------------------------- steering
    @contextmanager
    def attach(self, model: Any) -> Iterator[None]:
        """Steer ``model`` as the controller predicts for each prompt, while the block runs.

        When a sequence starts (the prompt pass of ``generate``, or any call
        without a cache), the controller reads that batch without steering
        (one left-padded batch, pads unread), predicts each prompt's scale and
        weights, then steers each prompt and every token generated after it
        with ``alpha * scale * weight_l`` at each layer; pads are never steered.
        The read is one extra forward pass, which other hooks on the model also see.
        """
        if not hasattr(self, "net_"):
            raise RuntimeError("this SteeringController is not fitted yet: call fit(model, positive, negative)")
        alphas: list[Tensor] = []

        def plan(prompts: Prompts | None) -> None:
            if prompts is None:
                raise ValueError("the controller reads token prompts; this forward call passed embeddings")
            alphas[:] = list(self.predict(model, prompts).alphas(self.alpha))

        with steering_hooks(model, self.direction, self.layers_, lambda: alphas, self.mode, "all", plan):
            yield
