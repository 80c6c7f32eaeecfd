"""Activation patching, attribution patching and circuit graphs.

Both patchings compare a *clean* and a *corrupt* input of equal shape under a
scalar ``metric(logits)``; effects are normalised so that 0 is the corrupt
run and 1 the clean run.

- :func:`patch_residual`: the clean ``blocks.{l}.hook_resid_pre`` at one
  position patched into the corrupt run, for every layer × position.
- :func:`patch_heads`: one head's clean ``hook_z`` patched into the corrupt run,
  for every layer × head.
- :func:`attribution_graph`: edge attribution patching (Nanda 2023; Syed
  et al. 2023, "Attribution Patching Outperforms Automated Circuit
  Discovery"): every edge ``sender -> receiver`` between the embedding, the
  heads, the MLPs and the logits gets the linear estimate
  ``(out_clean - out_corrupt) · d metric / d in_receiver`` of patching the
  sender's clean output into that receiver's input alone, from one forward
  and one backward pass of the corrupt input. A head's output is
  ``z_h W_O[h]``; a head receives through its own copy of the residual
  stream for each of Q, K and V (TransformerLens' split QKV inputs,
  ``blocks.{l}.hook_q_input`` / ``k_input`` / ``v_input``, before the layer
  norm), so the edge weight is the sum of its Q, K and V parts. With grouped
  key/value heads the K and V parts belong to the shared key/value head and
  appear on the edges into each of its query heads.
- :func:`patch_edges`: activation patching of single edges (the same
  intervention, run for real: the sender's clean-minus-corrupt output added to
  one receiver's input), to check the estimate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.models.base import TextOrTokens
from dynalens.models.io import read_json, write_json
from dynalens.probes.figures import heatmap, token_labels
from dynalens.models.surface import result_context
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
class Node(NamedTuple):
    """A circuit-graph node: its name, kind (embed, head, mlp, logits), layer and head."""

    name: str
    kind: str
    layer: int
    head: int | None = None

    @property
    def order(self) -> float:
        """Position along the residual stream (a layer's heads read before its MLP writes)."""
        return {"embed": -1.0, "head": self.layer, "mlp": self.layer + 0.5}.get(self.kind, float(self.layer))


def circuit_nodes(model: Any) -> list[Node]:
    """Every node of ``model``'s circuit graph, in residual-stream order."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    nodes, mlps = [Node("embed", "embed", -1)], _mlp_writes(model)
    for layer in range(n_layers):
        nodes += [Node(f"L{layer}H{head}", "head", layer, head) for head in range(n_heads)]
        if mlps:
            nodes.append(Node(f"L{layer}.mlp", "mlp", layer))
    return nodes + [Node("logits", "logits", n_layers)]


def _sender_hook(node: Node) -> str:
    return {"embed": "blocks.0.hook_resid_pre", "head": f"blocks.{node.layer}.attn.hook_z",
            "mlp": f"blocks.{node.layer}.hook_mlp_out"}[node.kind]  # fmt: skip


def _receiver_hooks(node: Node) -> list[str]:
    if node.kind == "head":
        return [f"blocks.{node.layer}.hook_{x}_input" for x in "qkv"]
    return [f"blocks.{node.layer}.ln2.hook_in" if node.kind == "mlp" else "ln_final.hook_in"]


def _receiver_grad(model: Any, node: Node, hook: str, grads: dict[str, Tensor]) -> Float[Tensor, "batch pos d_model"]:
    index = _receiver_index(model, node, hook)
    return grads[hook] if index is None else grads[hook][:, :, index]


def _receiver_index(model: Any, node: Node, hook: str) -> int | None:
    """Which slot of a split QKV input a head reads (its key/value head for K and V)."""
    if node.kind != "head":
        return None
    if hook.endswith("hook_q_input"):
        return node.head
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return node.head // (model.cfg.n_heads // n_kv)


@contextmanager
def split_qkv_inputs(model: Any) -> Iterator[None]:
    """Give every head its own residual copy for Q, K and V (``hook_{q,k,v}_input``) inside the block."""
    before = bool(getattr(model.cfg, "use_split_qkv_input", False))
    attn_in = bool(getattr(model.cfg, "use_attn_in", False))
    if attn_in:
        model.set_use_attn_in(False)
    model.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(before)
        if attn_in:
            model.set_use_attn_in(True)


def _output(
    node: Node, act: Tensor, w_o: Float[Tensor, "layer head d_head d_model"]
) -> Float[Tensor, "batch pos d_model"]:
    """What a sender adds to the residual stream, from its hook's activation (``w_o``: the model's ``W_O``)."""
    if node.kind == "head":
        return act[:, :, node.head] @ w_o[node.layer, node.head].to(act.dtype)
    return act


def _reads(sender: Node, receiver: Node) -> bool:
    return receiver.kind != "embed" and sender.kind != "logits" and receiver.order > sender.order


def attribution_graph(
    model: Any,
    clean: TextOrTokens,
    corrupt: TextOrTokens,
    metric: Metric,
    *,
    threshold: float = 0.0,
) -> nx.DiGraph:
    """Edge attribution patching in one backward pass, as a circuit graph (see the module docstring).

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
        Nodes ``embed``, ``L{l}H{h}``, ``L{l}.mlp``, ``logits`` with attributes
        ``kind``, ``layer``, ``head`` and ``effect`` (the attribution of the
        node's own output; for ``logits`` the metric's clean-minus-corrupt
        change); edges ``sender -> receiver`` with attribute ``weight`` (and
        its ``q``, ``k``, ``v`` parts into heads). ``graph.graph`` holds the
        clean and corrupt metric values.
    """
    check_transformer(model)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction in [0, 1], got {threshold!r}")
    clean_tokens, corrupt_tokens = _pair(model, clean, corrupt)
    nodes = circuit_nodes(model)
    senders = sorted({_sender_hook(n) for n in nodes if n.kind != "logits"})
    receivers = sorted({hook for n in nodes if n.kind != "embed" for hook in _receiver_hooks(n)})
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any, name: str) -> Tensor:
        act = act.clone()  # a new graph node: its gradient is what flows through this hook only
        acts[name] = act  # keyed by the name asked for (hook.name may be an alias's target)
        return act

    with split_qkv_inputs(model):
        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=senders)
        with model.hooks(fwd_hooks=[(name, partial(keep, name=name)) for name in senders + receivers]):
            corrupt_value = metric(model(corrupt_tokens))
        # autograd.grad rather than backward(): the model's parameters get no .grad
        found = torch.autograd.grad(corrupt_value, [acts[n] for n in senders + receivers], allow_unused=True)
    grads = {n: torch.zeros_like(acts[n]) if g is None else g.detach() for n, g in zip(senders + receivers, found)}
    clean_value = metric(clean_logits).item()
    graph = nx.DiGraph(clean_metric=clean_value, corrupt_metric=corrupt_value.item())
    deltas, w_o = {}, model.W_O.detach()  # W_O is rebuilt from the layers on every access: read it once
    with torch.no_grad():
        for node in nodes:
            if node.kind == "logits":
                effect = clean_value - corrupt_value.item()
            else:
                hook = _sender_hook(node)
                delta = clean_cache[hook] - acts[hook].detach()
                deltas[node.name] = _output(node, delta, w_o)
                own = delta * grads[hook]
                effect = (own[:, :, node.head] if node.kind == "head" else own).sum().item()
            graph.add_node(node.name, kind=node.kind, layer=node.layer, head=node.head, effect=effect)
        # every sender's output difference dotted with every receiver part's gradient, as one product
        parts = [
            (receiver, hook.rsplit("hook_", 1)[-1].removesuffix("_input"), _receiver_grad(model, receiver, hook, grads))
            for receiver in nodes if receiver.kind != "embed" for hook in _receiver_hooks(receiver)
        ]  # fmt: skip
        outputs = torch.stack([deltas[n.name].flatten() for n in nodes if n.kind != "logits"])
        weights = (outputs @ torch.stack([grad.flatten() for _, _, grad in parts]).T).tolist()
        for i, sender in enumerate(n for n in nodes if n.kind != "logits"):
            for (receiver, part, _), weight in zip(parts, weights[i]):
                if _reads(sender, receiver):
                    if graph.has_edge(sender.name, receiver.name):
                        graph.edges[sender.name, receiver.name]["weight"] += weight
                    else:
                        graph.add_edge(sender.name, receiver.name, weight=weight)
                    if receiver.kind == "head":
                        graph.edges[sender.name, receiver.name][part] = weight
    return prune(graph, threshold)


@torch.no_grad()
def patch_edges(
    model: Any, clean: TextOrTokens, corrupt: TextOrTokens, metric: Metric, edges: Sequence[tuple[str, str]]
) -> Float[Tensor, " edge"]:
    """Activation patching of single edges: ``metric(patched) - metric(corrupt)`` per edge.

    Each run adds the sender's clean-minus-corrupt output to the receiver's
    input only (all of a head's Q, K and V inputs), the intervention that
    :func:`attribution_graph` estimates linearly.

    Parameters
    ----------
    model
        A transformer.
    clean, corrupt
        Inputs of equal shape ``[batch, pos]``.
    metric
        Maps logits to a scalar tensor.
    edges
        ``(sender, receiver)`` node names, as in :func:`attribution_graph`.
    """
    check_transformer(model)
    clean_tokens, corrupt_tokens = _pair(model, clean, corrupt)
    by_name = {node.name: node for node in circuit_nodes(model)}
    for sender, receiver in edges:
        if sender not in by_name or receiver not in by_name or not _reads(by_name[sender], by_name[receiver]):
            raise ValueError(
                f"({sender!r}, {receiver!r}) is not an edge of this model's circuit graph: senders are "
                "'embed', 'L{l}H{h}', 'L{l}.mlp'; receivers are later heads, MLPs or 'logits'"
            )
    senders = sorted({_sender_hook(by_name[s]) for s, _ in edges})
    with split_qkv_inputs(model):
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=senders)
        _, corrupt_cache = model.run_with_cache(corrupt_tokens, names_filter=senders)
        corrupt_value = metric(model(corrupt_tokens)).item()
        effects, w_o = [], model.W_O.detach()
        for sender, receiver in edges:
            node = by_name[sender]
            hook = _sender_hook(node)
            delta = _output(node, clean_cache[hook] - corrupt_cache[hook], w_o)

            def add(act: Tensor, hook: Any, index: int | None) -> Tensor:
                act = act.clone()
                if index is None:
                    act += delta
                else:
                    act[:, :, index] += delta
                return act

            target = by_name[receiver]
            hooks = [(h, partial(add, index=_receiver_index(model, target, h))) for h in _receiver_hooks(target)]
            effects.append(metric(model.run_with_hooks(corrupt_tokens, fwd_hooks=hooks)).item() - corrupt_value)
    return torch.tensor(effects)


def _mlp_writes(model: Any) -> bool:
    """Whether the model's MLPs write anything (attention-only zoo models zero their output weights).

    A bias-free MLP (Llama) exposes ``mlp.b_out`` as ``None``, and the stacked ``model.b_out``
    raises for it: a missing bias counts as zero.
    """
    if getattr(model.blocks[0], "mlp", None) is None:
        return False
    biases = [block.mlp.b_out for block in model.blocks]
    return bool(model.W_out.detach().any()) or any(b is not None and bool(b.detach().any()) for b in biases)


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
    for _, data in graph.nodes(data=True):
        if data.get("kind") == "head":
            effects[data["layer"], data["head"]] = data["effect"]
    return effects


def logit_metric(targets: Int[Tensor, "batch pos"], mask: Tensor) -> Metric:
    """Mean log-probability of ``targets`` over the ``mask``ed positions, as a patching metric."""

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        logp = logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return logp[mask].mean()

    return metric


def logit_diff_metric(correct: int, wrong: int, position: int = -1) -> Metric:
    """``logit[correct] - logit[wrong]`` at ``position``, averaged over the batch (e.g. IOI's name pair)."""

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        last = logits[:, position].float()
        return (last[:, correct] - last[:, wrong]).mean()

    return metric


@torch.no_grad()
def node_top_tokens(
    model: Any, input: TextOrTokens, node: str, *, k: int = 10, position: int = -1
) -> pd.DataFrame:
    """The tokens a circuit node's output promotes most (direct logit attribution).

    The node's output at ``position`` on the first sequence of ``input`` (the
    embedding, a head's ``z_h W_O[h]`` or an MLP's output) goes through the
    final norm with that run's scale frozen, then ``W_U``; for ``logits``, the
    model's own logits. Returns ``k`` rows ``token_id, token, logit``, highest first.
    """
    check_transformer(model)
    by_name = {n.name: n for n in circuit_nodes(model)}
    if node not in by_name:
        raise ValueError(f"no node {node!r} in this model's circuit graph: names are 'embed', 'L{{l}}H{{h}}', "
                         f"'L{{l}}.mlp', 'logits' (e.g. {', '.join(list(by_name)[:3])})")  # fmt: skip
    tokens = model.to_tokens(input)[:1]
    chosen = by_name[node]
    if chosen.kind == "logits":
        logits = model(tokens)[0, position].float()
    else:
        hook = _sender_hook(chosen)
        _, cache = model.run_with_cache(tokens, names_filter=[hook, "ln_final.hook_scale"])
        output = _output(chosen, cache[hook], model.W_O)[0, position]
        logits = (final_norm(model, output, cache["ln_final.hook_scale"][0, position]) @ model.W_U).float()
    values, ids = logits.topk(min(k, logits.shape[-1]))
    tokenizer = getattr(model, "tokenizer", None)
    names = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in ids.tolist()]
    return pd.DataFrame({"token_id": ids.cpu().numpy(), "token": names, "logit": values.cpu().numpy()})


def final_norm(
    model: Any, output: Float[Tensor, "... d_model"], scale: Float[Tensor, "... 1"]
) -> Float[Tensor, "... d_model"]:
    """A residual-stream write as the unembedding reads it: the final norm with a run's ``scale`` frozen.

    Centred for LayerNorm, divided by ``scale`` (``ln_final.hook_scale``),
    times the norm's weight; the bias is left out (it belongs to no node).
    """
    norm = getattr(model.ln_final, "original_component", model.ln_final)
    if str(getattr(model.cfg, "normalization_type", "")).startswith("LN"):
        output = output - output.mean(-1, keepdim=True)
    output = output / scale
    weight = getattr(norm, "weight", None)
    return output if weight is None else output * weight
