"""Steering: the prompt's continuation without and with steering along a direction, side by side.

The direction (:class:`~dynalens.circuits.Direction`, by difference of means,
PCA of paired differences or a logistic probe, on every layer) is read from two
prompt sets (:class:`~dynalens.models.prompts.Prompts` batches) on the chosen
model: for a chat model the shipped harmful and harmless train prompts of
:mod:`dynalens.circuits.refusal` in its chat template followed by the refusal
vs the compliance opening of :class:`~dynalens.circuits.ResponseContrast`
(the typed prompt is wrapped in the template too); for a model without a tokenizer (the zoo's Mamba and RNNs)
samples of its own task whose last token is ``a`` against the same samples
ending in ``b``. The steering is either a constant ``alpha`` on the chosen
layers (:func:`~dynalens.circuits.steer`) or a
:class:`~dynalens.circuits.SteeringController` fitted to steer harmful and not
harmless prompts (set A, not set B), whose predicted global scale and
per-layer weights for the prompt are drawn as a bar chart. Directions and
controllers come through the results cache; the generations are greedy
(``model.generate``), so they are reproducible. While the page works, a
progress bar counts the prompts read for the direction (and the controller)
and the tokens generated.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, NamedTuple

import dash
import plotly.graph_objects as go
import torch
from dash import Input, Output, State, callback, dcc, html
from dynalens.circuits import Direction, ResponseContrast, SteeringController, refusal, steer
from dynalens.dashboard import backend
from dynalens.dashboard.components import (
    Figure,
    ProgressBar,
    card,
    choice,
    hint,
    labelled,
    message_id,
    page,
    panel,
    placeholder_figure,
    requested,
    show_errors,
    status_id,
    status_row,
)
from dynalens.dashboard.prefill import PageCallbacks
from dynalens.models.prompts import Prompts
from dynalens.models.zoo import ZOO
from jaxtyping import Int
from torch import Tensor

dash.register_page(__name__, path="/steering", name="Steering", title="dynalens · Steering", order=8)

# Component ids of this page.
SETUP = "steering-setup"
METHOD = "steering-method"
CONTROL = "steering-control"
LAYERS = "steering-layers"
ALPHA = "steering-alpha"
READ_LAYER = "steering-read-layer"
CONTRAST = "steering-contrast"
TOKEN_A = "steering-token-a"
TOKEN_B = "steering-token-b"
UNSTEERED = "steering-unsteered"
STEERED = "steering-steered"
WEIGHTS = "steering-weights"
GENERATIONS = "steering-generations"

METHODS = {"diff_in_means": "difference of means", "pca": "PCA of paired differences", "probe": "logistic probe"}
CONTROLS = {"alpha": "constant alpha", "controller": "controller"}

MAX_ALPHA = 64.0
"""The largest |alpha| the page accepts (residual-stream units)."""

NEW_TOKENS = 24
"""Tokens generated per panel (fewer when the model's context is shorter)."""

ZOO_SET_SIZE, ZOO_BODY_LEN = 32, 15
"""Sequences per set and tokens before the contrasted last token, for a model without a tokenizer."""

PROGRESS = ProgressBar("steering")
"""Counts the prompts the direction (and controller) read, then the generated tokens."""

_EMPTY = placeholder_figure()

PAGE = PageCallbacks(__name__)

WEIGHTS_FIGURE = Figure(WEIGHTS, "Steer with 'controller' above to see the fitted controller's global scale and "
                                 "per-layer weights for the prompt.")
_TEXT = {"whiteSpace": "pre-wrap", "fontFamily": "var(--mono)", "minHeight": "3em", "margin": 0}


@PAGE.page_layout
def layout(**_: Any) -> html.Div:
    """The page for a URL's query (``router`` builds it on the page's first visit)."""
    return page(
        "steering",
        dcc.Store(id=SETUP),
        card(
            "Direction and steering",
            html.Div(
                className="card-controls",
                children=[
                    labelled("Direction", choice(METHOD, METHODS, "diff_in_means")),
                    labelled("Steer with", choice(CONTROL, CONTROLS, "alpha")),
                    labelled("Layers", dcc.Dropdown(id=LAYERS, multi=True, style={"minWidth": "220px"})),
                    labelled("Controller reads layer",
                              dcc.Dropdown(id=READ_LAYER, clearable=False, className="small-dropdown")),
                    html.Div(
                        [labelled("Set A ends in token", _token_input(TOKEN_A, 0)),
                         labelled("set B in", _token_input(TOKEN_B, 1))],
                        id=CONTRAST, style={"display": "none"},
                    ),
                ],
            ),
            labelled(
                "alpha",
                dcc.Slider(id=ALPHA, min=-MAX_ALPHA, max=MAX_ALPHA, step=0.5, value=4.0,
                           marks={v: str(v) for v in (-64, -32, -16, 0, 16, 32, 64)},
                           allow_direct_input=True, updatemode="mouseup"),
            ),
            PROGRESS.layout(),
            html.Div(id=message_id(GENERATIONS)),
        ),
        html.Div(
            className="grid-2",
            children=[
                card("Unsteered", html.Pre(id=UNSTEERED, style=_TEXT)),
                card("Steered", html.Pre(id=STEERED, style=_TEXT)),
            ],
        ),
        panel("Controller: global scale and per-layer weights for the prompt", WEIGHTS_FIGURE, height=320),
    )


def _token_input(id: str, value: int) -> dcc.Input:
    return dcc.Input(id=id, type="number", min=0, step=1, value=value, debounce=True, style={"width": "60px"})


# ------------------------------------------------------------------ the sets
class ContrastSets(NamedTuple):
    """The prompt sets the page reads: ``direction`` (towards, away) and ``controller`` (steer, do not)."""

    direction: tuple[Prompts, Prompts]
    controller: tuple[Prompts, Prompts]
    about: str


def contrast_sets(model: Any, name: str, token_a: int = 0, token_b: int = 1) -> ContrastSets:
    """The page's prompt sets for ``model`` (``name`` as the user picked it).

    A model with a tokenizer: the direction is the response contrast of the
    shipped harmful and harmless train prompts (each in the chat template
    followed by ``ResponseContrast``'s refusal vs compliance opening: the plain
    prompt contrast does not steer SmolLM2-135M, see RESULTS.md), and the
    controller learns harmful (steer) vs harmless (do not). A model without
    one: ``ZOO_SET_SIZE`` samples of its zoo task (random tokens for other
    models), cut to ``ZOO_BODY_LEN`` tokens and ended by ``token_a`` vs
    ``token_b``, for both.
    """
    if getattr(model, "tokenizer", None) is not None:
        harmful, harmless = (refusal.prompt_set(kind, "train") for kind in ("harmful", "harmless"))
        openings = ResponseContrast()
        requests = harmful + harmless
        return ContrastSets(
            direction=(refusal.chat_prompts(model, requests, openings.refusal),
                       refusal.chat_prompts(model, requests, openings.compliance)),
            controller=(refusal.chat_prompts(model, harmful), refusal.chat_prompts(model, harmless)),
            about=f"{len(harmful)} harmful + {len(harmless)} harmless train prompts",
        )  # fmt: skip
    d_vocab = model.cfg.d_vocab
    for token in (token_a, token_b):
        if not isinstance(token, int) or not 0 <= token < d_vocab:
            raise backend.DashboardError(f"The set tokens must be token ids from 0 to {d_vocab - 1}, got {token!r}.")
    g = torch.Generator().manual_seed(0)
    if name in ZOO:
        bodies = ZOO[name].make_task().sample(ZOO_SET_SIZE, g).tokens[:, :ZOO_BODY_LEN]
    else:
        bodies = torch.randint(0, d_vocab, (ZOO_SET_SIZE, ZOO_BODY_LEN), generator=g)
    ends = torch.ones(len(bodies), 1, dtype=torch.long)
    sets = tuple(Prompts(model, torch.cat([bodies, token * ends], 1)) for token in (token_a, token_b))
    kind = "task samples" if name in ZOO else "random sequences"
    return ContrastSets(sets, sets, f"{len(bodies)} {kind} ending in {token_a} vs {token_b}")


def _sets_id(*sets: Prompts) -> str:
    """A short hash of the sets' token ids and masks (a cache key part)."""
    return hashlib.sha256("".join(prompts.key() for prompts in sets).encode()).hexdigest()[:16]


# ----------------------------------------------------------------- callbacks
@PAGE.callback(
    Output(SETUP, "data"),
    Output(LAYERS, "options"),
    Output(LAYERS, "value"),
    Output(READ_LAYER, "options"),
    Output(READ_LAYER, "value"),
    Output(CONTRAST, "style"),
    Output(status_id("steering"), "children"),
    PAGE.request,
    State(LAYERS, "value"),
    State(READ_LAYER, "value"),
)
@show_errors(None, [], [], [], None, {"display": "none"})
def setup(request, layers, read_layer):
    """Load the model and check the prompt; the layer pickers follow the model."""
    model, prompts = requested(request)
    n_layers = model.cfg.n_layers
    options = [{"label": f"layer {i}", "value": i} for i in range(n_layers)]
    if not (layers and all(isinstance(i, int) and 0 <= i < n_layers for i in layers)):
        layers = list(range(n_layers // 5, n_layers // 2 + 1))  # a middle band (6-15 of 30)
    if not (isinstance(read_layer, int) and 0 <= read_layer < n_layers):
        read_layer = 2 * n_layers // 5
    has_tokenizer = getattr(model, "tokenizer", None) is not None
    status = status_row(request["model"], model.cfg.architecture, int(prompts.lengths[0]), n_layers)
    return (
        {"model": request["model"], "prompt": request["prompt"], "run": request.get("run")},
        options, layers, options, read_layer,
        {"display": "none" if has_tokenizer else "inline-flex", "gap": "8px"},
        status,
    )  # fmt: skip


@callback(
    Output(UNSTEERED, "children"),
    Output(STEERED, "children"),
    Output(WEIGHTS, "figure"),
    WEIGHTS_FIGURE.source,
    Output(message_id(WEIGHTS), "children"),
    Output(message_id(GENERATIONS), "children"),
    Input(SETUP, "data"),
    Input(METHOD, "value"),
    Input(CONTROL, "value"),
    Input(LAYERS, "value"),
    Input(ALPHA, "value"),
    Input(READ_LAYER, "value"),
    Input(TOKEN_A, "value"),
    Input(TOKEN_B, "value"),
    PROGRESS.key,
    **backend.background(PROGRESS),
)  # fmt: skip
@show_errors("", "", _EMPTY, None, None)
def generations(setup, method, control, layers, alpha, read_layer, token_a, token_b, progress_key):
    """Unsteered and steered continuations; the controller's prediction when it steers."""
    if not setup:  # no request yet, or the setup failed and says why
        return "", "", _EMPTY, None, None, None
    if not layers:
        raise backend.DashboardError("No layer chosen: pick at least one layer to steer.")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
        raise backend.DashboardError(f"alpha must be a number from {-MAX_ALPHA:g} to {MAX_ALPHA:g}, got {alpha!r}.")
    model, typed = requested(setup)
    name = setup["model"]
    contrast = contrast_sets(model, name, token_a, token_b)
    sets = _sets_id(*contrast.direction, *contrast.controller)
    prompt = _chat_prompt(model, setup["prompt"], typed)
    new_tokens = _new_tokens(model, prompt)
    with backend.reporting(progress_key, steps=4 if control == "controller" else 3) as report:
        report.step(f"Direction: reading {_count(contrast.direction)} prompts", size=_count(contrast.direction))
        direction = backend.cached(
            name, None, "steering_direction", {"method": method, "sets": sets},
            backend.counting_sequences(model, report,
                                       lambda: Direction.from_prompts(model, *contrast.direction, method=method)),
        )  # fmt: skip
        if control == "controller":
            report.step(f"Controller: reading {_count(contrast.controller)} prompts, then fitting",
                        size=_count(contrast.controller))  # fmt: skip
            unfitted = SteeringController(direction, read_layer=read_layer, layers=layers)
            fit = lambda: unfitted.fit(model, *contrast.controller)
            key = (name, None, "steering_controller",
                   {"method": method, "sets": sets, "layers": sorted(layers), "read_layer": read_layer})
            controller = backend.cached(*key, backend.counting_sequences(model, report, fit))
            controller.alpha = float(alpha)
            predicted = backend.run_alone(lambda: controller.predict(model, prompt))
            scale, weights = predicted.scale[0].item(), predicted.weights[0].tolist()
            figure = weights_figure(controller.layers_, scale, weights)
            rows = [{"layer": layer, "weight": w, "scale": scale} for layer, w in zip(controller.layers_, weights)]
            offer = WEIGHTS_FIGURE.offer(backend.cached_key(*key), "steering_controller", csv=False, frame=rows)
            line = hint(f"alpha × scale × weight is added at each layer. Fitted on {contrast.about}: stopped after "
                        f"{controller.n_epochs_} epochs, held-out loss {controller.validation_loss_:.3f}.")  # fmt: skip
            steering = lambda: controller.attach(model)
        else:
            figure, offer, line = _EMPTY, None, None  # the panel's note says what to pick
            steering = lambda: steer(model, direction, layers=layers, alpha=float(alpha))

        def both() -> tuple[Tensor, Tensor]:
            report.step("Generating without steering", size=new_tokens)
            plain = model.generate(prompt, max_new_tokens=new_tokens, return_type="tokens")
            report.step("Generating with steering", size=new_tokens)
            with steering():
                return plain, model.generate(prompt, max_new_tokens=new_tokens, return_type="tokens")

        plain, steered = backend.run_alone(backend.counting_sequences(model, report, both))
    message = hint(f"{METHODS[method]} direction from {contrast.about}; {new_tokens} greedy tokens per panel.")
    n_prompt = prompt.tokens.shape[1]
    return _continuation(model, plain, n_prompt), _continuation(model, steered, n_prompt), figure, offer, line, message


def _count(sets: tuple[Prompts, Prompts]) -> int:
    """How many prompts two sets hold (token rows or strings)."""
    return sum(len(prompts) for prompts in sets)


def _chat_prompt(model: Any, prompt: str, typed: Prompts) -> Prompts:
    """What ``generate`` reads: the prompt in the chat template, or as typed without a tokenizer."""
    if getattr(model, "tokenizer", None) is None:
        return typed
    return refusal.chat_prompts(model, prompt)


def _new_tokens(model: Any, prompt: Prompts) -> int:
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is None or model.cfg.architecture != "transformer":
        return NEW_TOKENS
    room = n_ctx - prompt.tokens.shape[-1]
    if room < 1:
        raise backend.DashboardError(f"The prompt fills the model's context of {n_ctx} tokens: shorten it.")
    return min(NEW_TOKENS, room)


def _continuation(model: Any, tokens: Int[Tensor, "1 pos"], n_prompt: int) -> str:
    """The generated part of ``tokens``: text, or token ids for a model without a tokenizer."""
    new = tokens[0, n_prompt:]
    if getattr(model, "tokenizer", None) is None:
        return " ".join(str(t) for t in new.tolist())
    return model.tokenizer.decode(new, skip_special_tokens=True)


def weights_figure(layers: list[int], scale: float, weights: list[float]) -> go.Figure:
    """One bar per steered layer: the controller's weight; the title gives the global scale."""
    figure = go.Figure(go.Bar(x=[f"L{layer}" for layer in layers], y=weights, name="weight",
                              marker_color="#2563eb"))  # fmt: skip
    figure.update_layout(
        title=f"Controller: global scale {scale:.3f}, per-layer weights",
        yaxis={"range": [0, 1], "title": "weight"},
        xaxis={"title": "layer"},
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
        template="plotly_white",
    )
    return figure
