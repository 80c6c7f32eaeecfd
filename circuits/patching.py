"""Activation patching, attribution patching and circuit graphs.

Both patchings compare a *clean* and a *corrupt* input of equal shape under a
scalar ``metric(logits)``; effects are normalised so that 0 is the corrupt
run and 1 the clean run.

- :func:`patch_residual`: the clean ``blocks.{l}.hook_resid_pre`` at one
  position patched into the corrupt run, for every layer × position.
- :func:`patch_heads`: one head's clean ``hook_z`` patched into the corrupt run,
  for every layer × head.
- :func:`attribution_graph`: attribution patching (Nanda 2023; edge
  attribution patching, Syed et al. 2023): the linear estimate
  ``(clean - corrupt) · d metric / d activation`` from one forward and one
  backward pass of the corrupt input. Node weights are per head (``hook_z``)
  and per MLP; edges run from every sender (embedding, head, MLP) to every
  later *receiver* (a layer's attention input ``ln1.hook_in``, its MLP input
  ``ln2.hook_in``, the final ``ln_final.hook_in``), weighted by the sender's
  output difference dotted with the receiver's gradient. Receivers are whole
  attention layers, not single heads (a head's own input is the layer's);
  each receiver links to its heads with their node weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.models.base import TextOrTokens
from dynalens.models.io import read_json, write_json
from dynalens.probes.figures import heatmap, token_labels
from dynalens.probes.model_surface import result_context
from dynalens.probes.results import Result
from dynalens.probes.sinks import check_transformer
from jaxtyping import Float, Int
from torch import Tensor

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]


def _pair(model: Any, clean: TextOrTokens, corrupt: TextOrTokens) -> tuple[Tensor, Tensor]:
    clean_tokens, corrupt_tokens = model.to_tokens(clean), model.to_tokens(corrupt)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(
            f"clean and corrupt inputs must have the same shape [batch, pos], got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupt_tokens.shape)}"
        )
    return clean_tokens, corrupt_tokens


@dataclass(kw_only=True, eq=False)
class Patching(Result):
    """Normalised patching effects on a grid (layer × position, or layer × head).

    Attributes
    ----------
    effects
        ``[layer, column]``: ``(metric(patched) - metric(corrupt)) / (metric(clean) - metric(corrupt))``.
    kind
        ``"resid"`` (columns are positions) or ``"heads"`` (columns are heads).
    clean_metric, corrupt_metric
        The metric on the unpatched runs.
    """

    effects: Float[Tensor, "layer column"]
    kind: str
    clean_metric: float
    corrupt_metric: float

    def to_frame(self) -> pd.DataFrame:
        column = "position" if self.kind == "resid" else "head"
        layers, cols = self.effects.shape
        return pd.DataFrame({
            "layer": torch.arange(layers).repeat_interleave(cols).numpy(),
            column: torch.arange(cols).repeat(layers).numpy(),
            "effect": self.effects.flatten().numpy(),
        })  # fmt: skip

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` cells with the largest absolute effect."""
        frame = self.to_frame()
        return frame.loc[frame["effect"].abs().nlargest(k).index].reset_index(drop=True)

    def figure(self) -> go.Figure:
        layers, cols = self.effects.shape
        x_labels = token_labels(self.str_tokens) if self.kind == "resid" else [f"H{h}" for h in range(cols)]
        return heatmap(
            self.effects.numpy(), x_labels=x_labels, y_labels=[f"L{layer}" for layer in range(layers)],
            x_title="token" if self.kind == "resid" else "head", y_title="layer", value_name="patching effect",
            title=f"Activation patching ({self.kind}) · {self.model_name}", signed=True, y_reversed=True,
        )  # fmt: skip


def _normalise(values: Tensor, clean: float, corrupt: float) -> Tensor:
    if clean == corrupt:
        raise ValueError(f"the metric is {clean} on both clean and corrupt inputs: nothing to patch")
    return (values - corrupt) / (clean - corrupt)


@torch.no_grad()
def _patch_grid(model: Any, clean: Tensor, corrupt: Tensor, metric: Metric, kind: str) -> Patching:
    n_layers = model.cfg.n_layers
    name_of = (lambda layer: f"blocks.{layer}.hook_resid_pre") if kind == "resid" else (
        lambda layer: f"blocks.{layer}.attn.hook_z")  # fmt: skip
    clean_logits, cache = model.run_with_cache(clean, names_filter=[name_of(layer) for layer in range(n_layers)])
    clean_value, corrupt_value = metric(clean_logits).item(), metric(model(corrupt)).item()
    n_cols = clean.shape[1] if kind == "resid" else model.cfg.n_heads
    effects = torch.zeros(n_layers, n_cols)
    for layer in range(n_layers):
        source = cache[name_of(layer)]
        for col in range(n_cols):
            def patch(act: Tensor, hook: Any, col: int = col, source: Tensor = source) -> Tensor:
                act = act.clone()
                if kind == "resid":
                    act[:, col] = source[:, col]
                else:
                    act[:, :, col] = source[:, :, col]
                return act

            effects[layer, col] = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name_of(layer), patch)])).item()
    return Patching(
        **result_context(model, clean[:1]), effects=_normalise(effects, clean_value, corrupt_value), kind=kind,
        clean_metric=clean_value, corrupt_metric=corrupt_value,
    )  # fmt: skip


def patch_residual(model: Any, clean: TextOrTokens, corrupt: TextOrTokens, metric: Metric) -> Patching:
    """Activation patching of the residual stream, every layer × position (``layers · pos`` runs).

    Parameters
    ----------
    model
        A transformer.
    clean, corrupt
        Inputs of equal shape ``[batch, pos]``.
    metric
        Maps logits ``[batch, pos, vocab]`` to a scalar tensor (higher: more clean-like).
    """
    check_transformer(model)
    return _patch_grid(model, *_pair(model, clean, corrupt), metric, "resid")


def patch_heads(model: Any, clean: TextOrTokens, corrupt: TextOrTokens, metric: Metric) -> Patching:
    """Activation patching of every head's output ``hook_z``, layer × head (``layers · heads`` runs)."""
    check_transformer(model)
    return _patch_grid(model, *_pair(model, clean, corrupt), metric, "heads")


# ----------------------------------------------------------- attribution graph
def _senders(n_layers: int, has_mlp: bool) -> list[tuple[str, int]]:
    """``(hook name, layer)`` of every component that writes to the residual stream."""
    names = [("blocks.0.hook_resid_pre", -1)]  # token and position embeddings
    for layer in range(n_layers):
        names.append((f"blocks.{layer}.attn.hook_z", layer))
        if has_mlp:
            names.append((f"blocks.{layer}.hook_mlp_out", layer))
    return names


def _receivers(n_layers: int, has_mlp: bool) -> list[tuple[str, str, float]]:
    """``(node, hook name, order)`` of every component input; order sorts them along the stream."""
    found = []
    for layer in range(n_layers):
        found.append((f"L{layer}.attn_in", f"blocks.{layer}.ln1.hook_in", layer))
        if has_mlp:
            found.append((f"L{layer}.mlp_in", f"blocks.{layer}.ln2.hook_in", layer + 0.5))
    found.append(("logits", "ln_final.hook_in", n_layers))
    return found


def attribution_graph(
    model: Any,
    clean: TextOrTokens,
    corrupt: TextOrTokens,
    metric: Metric,
    *,
    threshold: float = 0.0,
) -> nx.DiGraph:
    """Attribution patching in one backward pass, as a circuit graph (see the module docstring).

    Parameters
    ----------
    model
        A transformer.
    clean, corrupt
        Inputs of equal shape ``[batch, pos]``.
    metric
        Maps logits to a scalar tensor; must be differentiable.
    threshold
        Prune edges whose ``|weight|`` is at most this fraction of the
        largest ``|weight|`` (0 keeps every edge); isolated nodes are dropped.

    Returns
    -------
    networkx.DiGraph
        Nodes ``embed``, ``L{l}H{h}``, ``L{l}.mlp`` (senders) with attribute
        ``effect``; receivers ``L{l}.attn_in``, ``L{l}.mlp_in``, ``logits``;
        edges with attribute ``weight``. ``graph.graph`` holds the clean and
        corrupt metric values.
    """
    check_transformer(model)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction in [0, 1], got {threshold!r}")
    clean_tokens, corrupt_tokens = _pair(model, clean, corrupt)
    n_layers = model.cfg.n_layers
    has_mlp = _mlp_writes(model)
    senders, receivers = _senders(n_layers, has_mlp), _receivers(n_layers, has_mlp)
    names = [name for name, _ in senders]
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=names)
    corrupt_acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable:
        def keep(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()  # a new node: its gradient flows through this hook's consumers only
            corrupt_acts[name] = act  # keyed by the name asked for (hook.name may be an alias's target)
            return act

        return keep

    fwd = [(name, keeper(name)) for name in names + [hook for _, hook, _ in receivers]]
    with model.hooks(fwd_hooks=fwd):
        corrupt_value = metric(model(corrupt_tokens))
    # autograd.grad rather than backward(): the model's parameters get no .grad
    kept = list(corrupt_acts)
    found = torch.autograd.grad(corrupt_value, [corrupt_acts[n] for n in kept], allow_unused=True)
    for name, grad in zip(kept, found):
        grads[name] = grad.detach() if grad is not None else torch.zeros_like(corrupt_acts[name])
    graph = nx.DiGraph(clean_metric=metric(clean_logits).item(), corrupt_metric=corrupt_value.item())
    w_o = model.W_O.detach()  # [layer, head, d_head, d_model]
    for name, layer in senders:
        delta = clean_cache[name] - corrupt_acts[name].detach()
        if name.endswith("hook_z"):  # per head: its output difference in the residual stream
            outputs = torch.einsum("bphd,hdm->hbpm", delta, w_o[layer])
            nodes = [(f"L{layer}H{h}", outputs[h], (delta[:, :, h] * grads[name][:, :, h]).sum()) for h in range(len(outputs))]
        else:
            node = "embed" if layer < 0 else f"L{layer}.mlp"
            nodes = [(node, delta, (delta * grads[name]).sum())]
        for node, output, effect in nodes:
            graph.add_node(node, layer=layer, kind="sender", effect=effect.item())
            for receiver, hook, order in receivers:
                if order > layer:
                    graph.add_edge(node, receiver, weight=(output * grads[hook]).sum().item())
    for receiver, _, order in receivers:
        graph.add_node(receiver, layer=order, kind="receiver")
        if receiver.endswith("attn_in"):
            layer = int(order)
            for head in range(model.cfg.n_heads):
                head_node = f"L{layer}H{head}"
                graph.add_edge(receiver, head_node, weight=graph.nodes[head_node]["effect"])
    return prune(graph, threshold)


def _mlp_writes(model: Any) -> bool:
    """Whether the model's MLPs have any nonzero output weight (attention-only zoo models zero them)."""
    mlp = getattr(model.blocks[0], "mlp", None)
    return mlp is not None and any(p.abs().sum() > 0 for p in mlp.parameters())


def prune(graph: nx.DiGraph, threshold: float) -> nx.DiGraph:
    """A copy of ``graph`` without edges of ``|weight| <= threshold · max |weight|``, nor isolated nodes."""
    pruned = graph.copy()
    weights = [abs(w) for _, _, w in graph.edges(data="weight")]
    if threshold > 0 and weights:
        cut = threshold * max(weights)
        pruned.remove_edges_from([(u, v) for u, v, w in graph.edges(data="weight") if abs(w) <= cut])
        pruned.remove_nodes_from([n for n in list(pruned.nodes) if pruned.degree(n) == 0])
    return pruned


def graph_to_json(graph: nx.DiGraph, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The graph as node-link JSON (``networkx.node_link_data``); written atomically when ``path`` is given."""
    data = nx.node_link_data(graph, edges="edges")
    if path is not None:
        write_json(path, data)
    return data


def graph_from_json(data: dict[str, Any] | str | os.PathLike) -> nx.DiGraph:
    """The graph back from :func:`graph_to_json`'s dict or file."""
    if not isinstance(data, dict):
        data = read_json(data)
    return nx.node_link_graph(data, directed=True, edges="edges")


def head_effects(graph: nx.DiGraph, n_layers: int, n_heads: int) -> Float[Tensor, "layer head"]:
    """The attribution effect of every head node (``nan`` where pruned)."""
    effects = torch.full((n_layers, n_heads), float("nan"))
    for node, data in graph.nodes(data=True):
        if data.get("kind") == "sender" and "H" in node and node.startswith("L"):
            layer, head = node[1:].split("H")
            effects[int(layer), int(head)] = data["effect"]
    return effects


def logit_metric(targets: Int[Tensor, "batch pos"], mask: Tensor) -> Metric:
    """Mean log-probability of ``targets`` over the ``mask``ed positions, as a patching metric."""

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        logp = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return logp[mask].mean()

    return metric
