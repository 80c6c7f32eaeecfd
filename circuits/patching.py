"""Activation patching, edge patching and the attribution graph, on clean and corrupt prompts.

Every experiment here runs on a batch of *clean* prompts and takes the
*corrupt* prompts (as many, each as long as its clean one) and a ``metric``
as parameters. The metric maps logits ``[batch, pos, vocab]`` to one value
per prompt ``[batch]`` (:func:`logit_metric`, :func:`logit_diff_metric`);
with left padding, ``logits[:, -1]`` is every prompt's next-token prediction.
Effects are normalised so that 0 is the corrupt run and 1 the clean run:
per prompt, and for the batch from the batch means of the metric.

- :class:`ActivationPatching`: ``site="resid"`` patches the clean
  ``hook_resid_pre`` of one layer at one position into the corrupt run, for
  every layer × position (any architecture); ``site="heads"`` patches one
  head's clean ``attn.hook_z``, for every layer × head (transformers).
- :class:`AttributionGraph`: edge attribution patching (Nanda 2023; Syed
  et al. 2023, "Attribution Patching Outperforms Automated Circuit
  Discovery"): every edge ``sender -> receiver`` between the embedding, the
  heads, the MLPs and the logits gets the linear estimate
  ``(out_clean - out_corrupt) · d metric / d in_receiver`` of patching the
  sender's clean output into that receiver's input alone, from one forward
  and one backward pass of the corrupt prompts (the metric's batch mean). A
  head's output is ``z_h W_O[h]``; a head receives through its own copy of
  the residual stream for each of Q, K and V (TransformerLens' split QKV
  inputs, ``hook_q_input`` / ``k_input`` / ``v_input``, before the layer
  norm), so the edge weight is the sum of its Q, K and V parts. With grouped
  key/value heads the K and V parts belong to the shared key/value head and
  appear on the edges into each of its query heads. Every node also carries
  its effect per token position and the tokens its output promotes most at
  the prompts' last position (direct logit attribution through the final norm
  with the clean run's scale frozen); the edges out of the embedding carry
  their weight per token position. :mod:`~dynalens.circuits.graph_layout`
  draws the graph as layer × token position.
- :class:`EdgePatching`: activation patching of single edges (the same
  intervention, run for real: the sender's clean-minus-corrupt output added
  to one receiver's input), to check the estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, NamedTuple

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dynalens.models import names
from dynalens.models.prompts import PromptInput, Prompts
from dynalens.models.surface import architecture_of, decode_tokens, model_name_of
from dynalens.probes.analysis import AnalysisError, Experiment
from dynalens.probes.figures import TEMPLATE, heatmap, token_labels
from dynalens.probes.results import Result

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]

SITES = ("resid", "heads")
"""What :class:`ActivationPatching` patches."""


# ------------------------------------------------------------------- metrics
def logit_metric(targets: Int[Tensor, "batch pos"], mask: Tensor) -> Metric:
    """Per prompt, the mean log-probability of ``targets`` over its ``mask``ed positions.

    ``targets`` and ``mask`` are ``[batch, pos]`` in the prompts' (left-padded) layout.
    """

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        logp = logits.float().log_softmax(-1).gather(-1, targets.to(logits.device)[..., None])[..., 0]
        weights = mask.to(logits.device).float()
        return (logp * weights).sum(-1) / weights.sum(-1)

    return metric


def logit_diff_metric(correct: int, wrong: int, position: int = -1) -> Metric:
    """Per prompt, ``logit[correct] - logit[wrong]`` at column ``position`` (-1: each prompt's last token)."""

    def metric(logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        last = logits[:, position].float()
        return last[:, correct] - last[:, wrong]

    return metric


def metric_values(metric: Metric, logits: Tensor, n_prompts: int) -> Float[Tensor, " batch"]:
    """``metric(logits)`` checked to hold one value per prompt (a scalar is accepted for one prompt)."""
    value = metric(logits)
    if not isinstance(value, Tensor):
        value = torch.as_tensor(value)
    if value.ndim == 0 and n_prompts == 1:
        value = value[None]
    if value.shape != (n_prompts,):
        raise ValueError(
            f"metric must return one value per prompt, shape [{n_prompts}], got shape {list(value.shape)}: "
            "e.g. logit_metric(targets, mask) or logit_diff_metric(correct, wrong), or a function that "
            "does not average over the batch"
        )
    return value.float()


def _corrupt_of(model: Any, clean: Prompts, corrupt: PromptInput) -> Prompts:
    corrupt = Prompts(model, corrupt)
    if corrupt.tokens.shape != clean.tokens.shape or not torch.equal(corrupt.mask.cpu(), clean.mask.cpu()):
        raise ValueError(
            "clean and corrupt prompts must have the same number of tokens, prompt by prompt: got lengths "
            f"{clean.lengths.tolist()} and {corrupt.lengths.tolist()}"
        )
    return corrupt


def _check_site(model: Any, site: str, analysis: str) -> None:
    if site not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {site!r}")
    arch = architecture_of(model)
    if site == "heads" and arch != "transformer":
        raise AnalysisError(
            f"{analysis}(site='heads') needs attention heads: it applies to transformer models, and this "
            f"model is a {arch} ({model_name_of(model)}); site='resid' patches the residual stream of any model"
        )


# ------------------------------------------------------- clean/corrupt results
def _prompts_fields(prompts: Prompts) -> dict[str, Any]:
    tensors, plain = prompts.state()
    return {**tensors, **plain}


def _prompts_from(stored: dict[str, Any]) -> Prompts:
    return Prompts.from_parts(
        stored["tokens"], stored["mask"], stored["str_tokens"], texts=stored["texts"], pad_id=stored["pad_id"]
    )


@dataclass(kw_only=True, eq=False)
class PatchingResult(Result):
    """The shared part of the patching results: the corrupt prompts and the metric on both runs.

    Attributes
    ----------
    corrupt
        The corrupt prompts (``prompts`` holds the clean ones).
    clean_metric, corrupt_metric
        ``[prompt]``: the metric on the unpatched clean and corrupt runs.
    """

    corrupt: Prompts
    clean_metric: Float[Tensor, " prompt"]
    corrupt_metric: Float[Tensor, " prompt"]

    @property
    def span(self) -> float:
        """Batch-mean metric, clean minus corrupt: what effects are normalised by."""
        return (self.clean_metric.mean() - self.corrupt_metric.mean()).item()

    def _fields(self) -> dict[str, Any]:
        fields = super()._fields()
        fields["corrupt"] = _prompts_fields(self.corrupt)
        return fields

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> PatchingResult:
        fields["corrupt"] = _prompts_from(fields["corrupt"])
        return super()._from_fields(fields)


def _check_span(clean: Tensor, corrupt: Tensor) -> None:
    if torch.isclose(clean.mean(), corrupt.mean(), rtol=0, atol=0):
        raise ValueError(
            f"the metric is {clean.mean().item()} on both clean and corrupt prompts (batch mean): nothing to patch"
        )


# --------------------------------------------------------- activation patching
@dataclass(kw_only=True, eq=False)
class ActivationPatchingResult(PatchingResult):
    """The metric of every patched run, per prompt, on a grid (layer × position, or layer × head).

    Attributes
    ----------
    site
        ``"resid"`` (columns are the positions of the left-padded batch) or
        ``"heads"`` (columns are heads).
    values
        ``[prompt, layer, column]``: the metric of each prompt in the patched
        run. A resid column that is padding in a prompt patches nothing there.
    """

    site: str
    values: Float[Tensor, "prompt layer column"]

    @property
    def prompt_effects(self) -> Float[Tensor, "prompt layer column"]:
        """Per prompt, ``(patched - corrupt) / (clean - corrupt)`` of its own metric."""
        corrupt = self.corrupt_metric[:, None, None]
        return (self.values - corrupt) / (self.clean_metric[:, None, None] - corrupt)

    @property
    def effects(self) -> Float[Tensor, "layer column"]:
        """For the batch, from the batch-mean metric: ``(patched - corrupt) / (clean - corrupt)``."""
        return (self.values.mean(0) - self.corrupt_metric.mean()) / self.span

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt, layer and real position (``resid``: with the token) or head."""
        prompts = self._prompts()
        frames, all_effects = [], self.prompt_effects
        for prompt in range(len(prompts)):
            effects, values = all_effects[prompt], self.values[prompt]
            if self.site == "resid":
                effects, values = (prompts.real(x, prompt, dim=2) for x in (all_effects, self.values))
            layers, cols = effects.shape
            frame = pd.DataFrame({
                "prompt": prompt,
                "layer": torch.arange(layers).repeat_interleave(cols).numpy(),
                "position" if self.site == "resid" else "head": torch.arange(cols).repeat(layers).numpy(),
            })  # fmt: skip
            if self.site == "resid":
                frame.insert(3, "token", prompts.str_tokens[prompt] * layers)
            frame["value"] = values.flatten().double().numpy()
            frame["effect"] = effects.flatten().double().numpy()
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` largest ``|effect|``: heads by the batch effect, resid cells per prompt and position."""
        if self.site == "heads":
            layers, heads = self.effects.shape
            frame = pd.DataFrame({
                "layer": torch.arange(layers).repeat_interleave(heads).numpy(),
                "head": torch.arange(heads).repeat(layers).numpy(),
                "effect": self.effects.flatten().double().numpy(),
            })  # fmt: skip
        else:
            frame = self.to_frame()
        return frame.loc[frame["effect"].abs().nlargest(k).index].reset_index(drop=True)

    def figure(self, *, prompt: int | None = None) -> go.Figure:
        """Layer × position of one prompt (default the first), or layer × head (default the batch)."""
        if self.site == "resid":
            prompt = 0 if prompt is None else prompt
            values = self._prompts().real(self.prompt_effects, prompt, dim=2)
            x_labels, x_title = token_labels(self.str_tokens(prompt)), "token"
        else:
            values = self.effects if prompt is None else self.prompt_effects[prompt]
            x_labels, x_title = [f"H{h}" for h in range(values.shape[1])], "head"
        where = "" if prompt is None else f", prompt {prompt}"
        return heatmap(
            values.double().numpy(), x_labels=x_labels, y_labels=[f"L{layer}" for layer in range(values.shape[0])],
            x_title=x_title, y_title="layer", value_name="patching effect",
            title=f"Activation patching ({self.site}{where}) · {self.model_name}", signed=True, y_reversed=True,
        )  # fmt: skip


class ActivationPatching(Experiment):
    """Patch clean activations into the corrupt run, one layer × position (or head) at a time.

    Parameters
    ----------
    corrupt
        The corrupt prompts: one per clean prompt, each as long as its clean one.
    metric
        Logits ``[batch, pos, vocab]`` to one value per prompt ``[batch]``
        (higher: more clean-like).
    site
        ``"resid"``: ``hook_resid_pre`` at one position (``layers · pos`` runs,
        any architecture); ``"heads"``: one head's ``attn.hook_z`` at every
        position (``layers · heads`` runs, transformers).

    Examples
    --------
    >>> ActivationPatching(corrupt, logit_diff_metric(a, b), site="heads")(model, clean).figure()  # doctest: +SKIP
    """

    def __init__(self, corrupt: PromptInput, metric: Metric, site: str = "resid"):
        self.corrupt = corrupt
        self.metric = metric
        self.site = site

    def check(self, model: Any) -> None:
        super().check(model)
        _check_site(model, self.site, type(self).__name__)

    @torch.no_grad()
    def run(self, model: Any, prompts: PromptInput) -> ActivationPatchingResult:
        """The patched runs' metrics on the clean ``prompts``."""
        self.check(model)
        clean = Prompts(model, prompts)
        corrupt = _corrupt_of(model, clean, self.corrupt)
        hook_of = names.resid_pre if self.site == "resid" else partial(names.attn, part="z")
        n_layers, n = model.cfg.n_layers, len(clean)
        clean_logits, cache = model.run_with_cache(clean, names_filter=[hook_of(layer) for layer in range(n_layers)])
        clean_value = metric_values(self.metric, clean_logits, n)
        corrupt_value = metric_values(self.metric, model(corrupt), n)
        _check_span(clean_value, corrupt_value)
        n_cols = clean.tokens.shape[1] if self.site == "resid" else model.cfg.n_heads
        mask = clean.mask
        values = torch.zeros(n, n_layers, n_cols)
        for layer in range(n_layers):
            source = cache[hook_of(layer)]
            for col in range(n_cols):
                def patch(act: Tensor, hook: Any, col: int = col, source: Tensor = source) -> Tensor:
                    act = act.clone()
                    if self.site == "resid":
                        rows = mask[:, col].to(act.device)  # prompts for which this column is a real token
                        act[rows, col] = source[rows, col].to(act)
                    else:
                        act[:, :, col] = source[:, :, col].to(act)
                    return act

                logits = model.run_with_hooks(corrupt, fwd_hooks=[(hook_of(layer), patch)])
                values[:, layer, col] = metric_values(self.metric, logits, n).cpu()
        return ActivationPatchingResult(
            **self.provenance(model, clean), corrupt=corrupt.to("cpu"), clean_metric=clean_value.cpu(),
            corrupt_metric=corrupt_value.cpu(), site=self.site, values=values,
        )  # fmt: skip


# ----------------------------------------------------------- circuit graph nodes
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
    return {"embed": names.resid_pre(0), "head": names.attn(node.layer, "z"),
            "mlp": names.mlp_out(node.layer)}[node.kind]  # fmt: skip


def _receiver_hooks(node: Node) -> list[str]:
    if node.kind == "head":
        return [names.block(node.layer, hook) for hook in ("hook_q_input", "hook_k_input", "hook_v_input")]
    return [names.block(node.layer, "ln2.hook_in") if node.kind == "mlp" else names.FINAL_IN]


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


def _mlp_writes(model: Any) -> bool:
    """Whether the model's MLPs write anything (attention-only zoo models zero their output weights).

    A bias-free MLP (Llama) exposes ``mlp.b_out`` as ``None``, and the stacked ``model.b_out``
    raises for it: a missing bias counts as zero.
    """
    if getattr(model.blocks[0], "mlp", None) is None:
        return False
    biases = [block.mlp.b_out for block in model.blocks]
    return bool(model.W_out.detach().any()) or any(b is not None and bool(b.detach().any()) for b in biases)


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


def _check_edges(by_name: dict[str, Node], edges: Sequence[Sequence[str]]) -> list[tuple[str, str]]:
    pairs = [(str(s), str(r)) for s, r in edges]
    for sender, receiver in pairs:
        if sender not in by_name or receiver not in by_name or not _reads(by_name[sender], by_name[receiver]):
            raise ValueError(
                f"({sender!r}, {receiver!r}) is not an edge of this model's circuit graph: senders are "
                "'embed', 'L{l}H{h}', 'L{l}.mlp'; receivers are later heads, MLPs or 'logits'"
            )
    return pairs


# ------------------------------------------------------------- attribution graph
@dataclass(kw_only=True, eq=False)
class AttributionGraphResult(PatchingResult):
    """The circuit graph of edge attribution patching, with each node's top promoted tokens.

    Attributes
    ----------
    graph
        ``networkx.DiGraph``: nodes ``embed``, ``L{l}H{h}``, ``L{l}.mlp``,
        ``logits`` with attributes ``kind``, ``layer``, ``head``, ``effect``
        (the attribution of the node's own output; for ``logits`` the batch-mean
        metric's clean-minus-corrupt change), ``positions`` (``effect`` split
        over the columns of the left-padded batch, where the node writes; for
        ``logits`` all of it at the last column) and ``top_tokens``
        (``[token_id, token, logit]`` rows); edges ``sender -> receiver`` with
        ``weight`` (and its ``q``, ``k``, ``v`` parts into heads; edges out of
        ``embed`` also ``positions``, the weight split over the columns, one
        sender per token). ``graph.graph`` holds the batch-mean clean and
        corrupt metric and the pruning threshold.
    threshold
        Edges of ``|weight|`` at most this fraction of the largest were pruned.
    """

    graph: nx.DiGraph
    threshold: float = 0.0

    def pruned(self, threshold: float) -> AttributionGraphResult:
        """The same result with edges of ``|weight| <= threshold · max |weight|`` and isolated nodes dropped."""
        _check_threshold(threshold)
        return dataclasses.replace(self, graph=prune(self.graph, threshold), threshold=threshold)

    def head_effects(self) -> Float[Tensor, "layer head"]:
        """The attribution effect of every head node (``nan`` where pruned)."""
        effects = torch.full((self.graph.graph["n_layers"], self.graph.graph["n_heads"]), float("nan"))
        for _, data in self.graph.nodes(data=True):
            if data["kind"] == "head":
                effects[data["layer"], data["head"]] = data["effect"]
        return effects

    def top_tokens(self, node: str) -> pd.DataFrame:
        """The tokens ``node``'s output promotes most at the prompts' last position: ``token_id, token, logit``."""
        if node not in self.graph:
            raise ValueError(
                f"no node {node!r} in this graph: names are 'embed', 'L{{l}}H{{h}}', 'L{{l}}.mlp', 'logits' "
                f"(e.g. {', '.join(list(self.graph)[:3])}; pruned nodes are gone)"
            )
        rows = self.graph.nodes[node]["top_tokens"]
        return pd.DataFrame(rows, columns=["token_id", "token", "logit"])

    def to_frame(self) -> pd.DataFrame:
        """One row per edge: ``sender, receiver, weight`` and the ``q, k, v`` parts (``nan`` off heads)."""
        rows = [
            (u, v, d["weight"], d.get("q", float("nan")), d.get("k", float("nan")), d.get("v", float("nan")))
            for u, v, d in self.graph.edges(data=True)
        ]
        return pd.DataFrame(rows, columns=["sender", "receiver", "weight", "q", "k", "v"])

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` edges of largest ``|weight|``."""
        frame = self.to_frame()
        return frame.loc[frame["weight"].abs().nlargest(k).index].reset_index(drop=True)

    def figure(self, *, max_edges: int | None = 60, prompt: int = 0) -> go.Figure:
        """The graph as layer (up the page) × token position (across), labelled, pruned to its ``max_edges``
        strongest edges (None: every edge); columns are labelled with prompt ``prompt``'s tokens
        (:mod:`~dynalens.circuits.graph_layout`)."""
        from dynalens.circuits.graph_layout import graph_figure, layout_graph  # it draws this module's graphs

        placed = layout_graph(self.graph, self.column_tokens(prompt), max_edges=max_edges)
        return graph_figure(placed, title=(
            f"Attribution graph ({len(placed.edges)} of {placed.n_edges} edges, |weight| > "
            f"{placed.threshold:.1%} of the largest) · {self.model_name}"
        ))  # fmt: skip

    def column_tokens(self, prompt: int = 0) -> list[str]:
        """``[pos]``: prompt ``prompt``'s tokens in the left-padded layout of the batch (``""`` for its padding)."""
        tokens = self.str_tokens(prompt)
        return [""] * (self._prompts().tokens.shape[1] - len(tokens)) + tokens

    def _fields(self) -> dict[str, Any]:
        fields = super()._fields()
        fields["graph"] = nx.node_link_data(self.graph, edges="edges")
        return fields

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> AttributionGraphResult:
        fields["graph"] = nx.node_link_graph(fields["graph"], directed=True, edges="edges")
        return super()._from_fields(fields)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a fraction in [0, 1], got {threshold!r}")


def prune(graph: nx.DiGraph, threshold: float) -> nx.DiGraph:
    """A copy of ``graph`` without edges of ``|weight| <= threshold · max |weight|``, nor isolated nodes."""
    pruned = graph.copy()
    weights = [abs(w) for _, _, w in graph.edges(data="weight")]
    if threshold > 0 and weights:
        cut = threshold * max(weights)
        pruned.remove_edges_from([(u, v) for u, v, w in graph.edges(data="weight") if abs(w) <= cut])
        pruned.remove_nodes_from([n for n in list(pruned.nodes) if pruned.degree(n) == 0])
    pruned.graph["threshold"] = threshold
    return pruned


class AttributionGraph(Experiment):
    """Edge attribution patching in one backward pass, as a circuit graph (module docstring).

    Parameters
    ----------
    corrupt
        The corrupt prompts: one per clean prompt, each as long as its clean one.
    metric
        Logits to one value per prompt ``[batch]``; must be differentiable
        (the graph attributes its batch mean).
    threshold
        Prune edges whose ``|weight|`` is at most this fraction of the
        largest ``|weight|`` (0 keeps every edge); isolated nodes are dropped.
    k
        Top promoted tokens kept per node.

    Examples
    --------
    >>> graph = AttributionGraph(corrupt, logit_diff_metric(a, b))(model, clean)   # doctest: +SKIP
    >>> graph.top(10); graph.top_tokens("L1H1"); graph.save("circuit.safetensors") # doctest: +SKIP
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer",)
    requirement: ClassVar[str] = "attention heads"

    def __init__(self, corrupt: PromptInput, metric: Metric, threshold: float = 0.0, k: int = 10):
        self.corrupt = corrupt
        self.metric = metric
        self.threshold = threshold
        self.k = k

    def check(self, model: Any) -> None:
        super().check(model)
        _check_threshold(self.threshold)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer (top tokens per node), got {self.k!r}")

    def run(self, model: Any, prompts: PromptInput) -> AttributionGraphResult:
        """The attribution graph of the clean ``prompts`` against the corrupt ones."""
        self.check(model)
        clean = Prompts(model, prompts)
        corrupt = _corrupt_of(model, clean, self.corrupt)
        n = len(clean)
        nodes = circuit_nodes(model)
        senders = sorted({_sender_hook(node) for node in nodes if node.kind != "logits"})
        receivers = sorted({hook for node in nodes if node.kind != "embed" for hook in _receiver_hooks(node)})
        acts: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any, name: str) -> Tensor:
            act = act.clone()  # a new graph node: its gradient is what flows through this hook only
            acts[name] = act  # keyed by the name asked for (hook.name may be an alias's target)
            return act

        with split_qkv_inputs(model):
            with torch.no_grad():
                clean_logits, clean_cache = model.run_with_cache(clean, names_filter=[*senders, names.FINAL_SCALE])
            with model.hooks(fwd_hooks=[(name, partial(keep, name=name)) for name in senders + receivers]):
                corrupt_values = metric_values(self.metric, model(corrupt), n)
            corrupt_value = corrupt_values.mean()
            # autograd.grad rather than backward(): the model's parameters get no .grad
            found = torch.autograd.grad(corrupt_value, [acts[h] for h in senders + receivers], allow_unused=True)
        grads = {h: torch.zeros_like(acts[h]) if g is None else g.detach() for h, g in zip(senders + receivers, found)}
        with torch.no_grad():
            clean_values = metric_values(self.metric, clean_logits, n)
            graph = self._graph(model, clean, nodes, clean_cache, clean_logits, acts, grads,
                                clean_values.mean().item(), corrupt_value.item())  # fmt: skip
        return AttributionGraphResult(
            **self.provenance(model, clean), corrupt=corrupt.to("cpu"), clean_metric=clean_values.cpu(),
            corrupt_metric=corrupt_values.detach().cpu(), graph=prune(graph, self.threshold), threshold=self.threshold,
        )  # fmt: skip

    def _graph(
        self, model: Any, clean: Prompts, nodes: list[Node], clean_cache: Any, clean_logits: Tensor,
        acts: dict[str, Tensor], grads: dict[str, Tensor], clean_value: float, corrupt_value: float,
    ) -> nx.DiGraph:  # fmt: skip
        graph = nx.DiGraph(
            clean_metric=clean_value, corrupt_metric=corrupt_value, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads
        )
        real = clean.mask.to(clean_logits.device)[:, :, None]
        deltas, w_o = {}, model.W_O.detach()  # W_O is rebuilt from the layers on every access: read it once
        scale = clean_cache[names.FINAL_SCALE][:, -1]  # [batch, 1]: each prompt's last token
        for node in nodes:
            if node.kind == "logits":
                effect = clean_value - corrupt_value
                positions = [0.0] * (clean.tokens.shape[1] - 1) + [effect]  # read at the last position
                top = clean_logits[:, -1].float().mean(0)
            else:
                hook = _sender_hook(node)
                delta = clean_cache[hook] - acts[hook].detach()
                delta = delta * real.reshape(*real.shape[:2], *([1] * (delta.ndim - 2))).to(delta)
                deltas[node.name] = _output(node, delta, w_o)
                own = delta * grads[hook]
                own = own[:, :, node.head] if node.kind == "head" else own
                effect, positions = own.sum().item(), own.sum((0, -1)).tolist()
                output = _output(node, clean_cache[hook], w_o)[:, -1]  # [batch, d_model]
                top = (final_norm(model, output, scale).mean(0) @ model.W_U).float()
            graph.add_node(node.name, kind=node.kind, layer=node.layer, head=node.head, effect=effect,
                           positions=positions, top_tokens=_top_rows(model, top, self.k))  # fmt: skip
        # every sender's output difference dotted with every receiver part's gradient, as one product
        parts = [
            (receiver, hook.rsplit("hook_", 1)[-1].removesuffix("_input"), _receiver_grad(model, receiver, hook, grads))
            for receiver in nodes if receiver.kind != "embed" for hook in _receiver_hooks(receiver)
        ]  # fmt: skip
        outputs = torch.stack([deltas[n.name].flatten() for n in nodes if n.kind != "logits"])
        part_grads = torch.stack([grad for _, _, grad in parts])  # [part, batch, pos, d_model]
        weights = (outputs @ part_grads.flatten(1).T).tolist()
        # the embedding of each token is a sender of its own: the edges out of "embed" per position
        embed_weights = torch.einsum("bpd,rbpd->rp", deltas["embed"], part_grads).tolist()
        for i, sender in enumerate(n for n in nodes if n.kind != "logits"):
            for j, ((receiver, part, _), weight) in enumerate(zip(parts, weights[i])):
                if _reads(sender, receiver):
                    if graph.has_edge(sender.name, receiver.name):
                        edge = graph.edges[sender.name, receiver.name]
                        edge["weight"] += weight
                        if sender.kind == "embed":
                            edge["positions"] = [a + b for a, b in zip(edge["positions"], embed_weights[j])]
                    else:
                        extra = {"positions": embed_weights[j]} if sender.kind == "embed" else {}
                        graph.add_edge(sender.name, receiver.name, weight=weight, **extra)
                    if receiver.kind == "head":
                        graph.edges[sender.name, receiver.name][part] = weight
        return graph


def _top_rows(model: Any, logits: Float[Tensor, " vocab"], k: int) -> list[list[Any]]:
    values, ids = logits.topk(min(k, logits.shape[-1]))
    tokens = decode_tokens(model, ids.cpu())
    return [[i, token, v] for i, token, v in zip(ids.tolist(), tokens, values.tolist())]


# ---------------------------------------------------------------- edge patching
@dataclass(kw_only=True, eq=False)
class EdgePatchingResult(PatchingResult):
    """The metric change of patching single edges, per prompt.

    Attributes
    ----------
    edges
        ``[sender, receiver]`` node names.
    values
        ``[prompt, edge]``: ``metric(patched) - metric(corrupt)`` of each prompt.
    """

    edges: list[list[str]]
    values: Float[Tensor, "prompt edge"]

    @property
    def effects(self) -> Float[Tensor, " edge"]:
        """The batch-mean metric change of each edge."""
        return self.values.mean(0)

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and edge: ``prompt, sender, receiver, effect``."""
        rows = [
            (prompt, sender, receiver, value)
            for prompt, row in enumerate(self.values.tolist())
            for (sender, receiver), value in zip(self.edges, row)
        ]
        return pd.DataFrame(rows, columns=["prompt", "sender", "receiver", "effect"])

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` edges of largest batch-mean ``|effect|``: ``sender, receiver, effect``."""
        frame = pd.DataFrame(
            [(s, r, v) for (s, r), v in zip(self.edges, self.effects.tolist())], columns=["sender", "receiver", "effect"]
        )
        return frame.loc[frame["effect"].abs().nlargest(k).index].reset_index(drop=True)

    def figure(self) -> go.Figure:
        """Bars of the batch-mean effect of each edge."""
        fig = go.Figure(go.Bar(
            x=[f"{s} → {r}" for s, r in self.edges], y=self.effects.tolist(),
            marker_color=["#4c78a8" if v > 0 else "#e45756" for v in self.effects.tolist()],
        ))  # fmt: skip
        fig.update_layout(template=TEMPLATE, yaxis_title="metric change",
                          title=f"Edge patching ({len(self.edges)} edges) · {self.model_name}")  # fmt: skip
        return fig


class EdgePatching(Experiment):
    """Activation patching of single edges: ``metric(patched) - metric(corrupt)`` per prompt and edge.

    Each run adds the sender's clean-minus-corrupt output to the receiver's
    input only (all of a head's Q, K and V inputs), the intervention that
    :class:`AttributionGraph` estimates linearly.

    Parameters
    ----------
    corrupt
        The corrupt prompts: one per clean prompt, each as long as its clean one.
    metric
        Logits to one value per prompt ``[batch]``.
    edges
        ``(sender, receiver)`` node names, as in :class:`AttributionGraph`.
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer",)
    requirement: ClassVar[str] = "attention heads"

    def __init__(self, corrupt: PromptInput, metric: Metric, edges: Sequence[tuple[str, str]]):
        self.corrupt = corrupt
        self.metric = metric
        self.edges = edges

    def provenance(self, model: Any, prompts: Prompts | None) -> dict[str, Any]:
        fields = super().provenance(model, prompts)
        fields["params"]["edges"] = [[str(s), str(r)] for s, r in self.edges]
        return fields

    @torch.no_grad()
    def run(self, model: Any, prompts: PromptInput) -> EdgePatchingResult:
        """The metric change of every edge on the clean ``prompts``."""
        self.check(model)
        by_name = {node.name: node for node in circuit_nodes(model)}
        edges = _check_edges(by_name, self.edges)
        clean = Prompts(model, prompts)
        corrupt = _corrupt_of(model, clean, self.corrupt)
        n = len(clean)
        senders = sorted({_sender_hook(by_name[s]) for s, _ in edges})
        real = clean.mask[:, :, None]
        with split_qkv_inputs(model):
            clean_logits, clean_cache = model.run_with_cache(clean, names_filter=senders)
            corrupt_logits, corrupt_cache = model.run_with_cache(corrupt, names_filter=senders)
            clean_value = metric_values(self.metric, clean_logits, n)
            corrupt_value = metric_values(self.metric, corrupt_logits, n)
            values, w_o = [], model.W_O.detach()
            for sender, receiver in edges:
                node = by_name[sender]
                hook = _sender_hook(node)
                delta = _output(node, clean_cache[hook] - corrupt_cache[hook], w_o)
                delta = delta * real.to(delta)

                def add(act: Tensor, hook: Any, index: int | None, delta: Tensor = delta) -> Tensor:
                    act = act.clone()
                    if index is None:
                        act += delta
                    else:
                        act[:, :, index] += delta
                    return act

                target = by_name[receiver]
                hooks = [(h, partial(add, index=_receiver_index(model, target, h))) for h in _receiver_hooks(target)]
                patched = metric_values(self.metric, model.run_with_hooks(corrupt, fwd_hooks=hooks), n)
                values.append(patched - corrupt_value)
        return EdgePatchingResult(
            **self.provenance(model, clean), corrupt=corrupt.to("cpu"), clean_metric=clean_value.cpu(),
            corrupt_metric=corrupt_value.cpu(), edges=[list(e) for e in edges],
            values=torch.stack(values, -1).cpu() if values else torch.zeros(n, 0),
        )  # fmt: skip
