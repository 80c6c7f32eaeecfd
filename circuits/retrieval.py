"""Retrieval heads (Wu et al. 2024): heads that copy the needle out of a haystack.

A needle sentence is hidden at some depth in filler text; the prompt then
asks for it and starts the answer (``"...Answer: The best thing to do in San
Francisco is"``), and the model continues with the rest of the needle. The
score follows the paper and its code (``retrieval_calculate``): at each step
where the model generates a needle token ``w``, a head *copy-pastes* when its
top-1 attention lies on the needle position holding ``w``; each such step adds
``1 / len(needle span)`` to the head's score for that haystack. Haystacks
whose answer the model does not retrieve (needle accuracy at most
``min_accuracy``, the code's ROUGE-1 recall > 50 gate) are left out; the
retrieval score of a head is its mean over the rest, drawn across haystack
lengths and needle depths. A head is a retrieval head when its score exceeds
0.1 (the paper finds fewer than 5% of heads).

The answer is read out by teacher forcing: one forward pass over the prompt
followed by the needle's answer tokens; step ``j`` is the prediction at the
position before answer token ``j``, and it counts only when the model's own
top-1 token *is* answer token ``j``. Such a step is exactly a greedy
decoding step while the model copies correctly (the attention of a KV-cached
step equals the same row of the full causal pass), at the cost of one
forward per haystack; a step where the model would generate something else
never counts. For the same reason the needle accuracy is the teacher-forced
top-1 accuracy on the answer tokens, not the paper's ROUGE-1 recall of a free
generation.

Mamba has no attention: :func:`mixer_retrieval_scores` applies the same
copy-paste rule to each channel's materialised SSM matrix (the key with the
largest ``|M[q, k]|``) and averages the channels of each channel group.

>>> ret = dl.circuits.retrieval_scores(model, haystacks=20)                  # doctest: +SKIP
>>> ret.top(10); ret.figure()                                               # doctest: +SKIP
>>> needle = dl.circuits.NeedleScorer(model)                                 # doctest: +SKIP
>>> dl.circuits.ablate_heads(model, ret.top(10), needle, method="mask",
...                          last_queries=needle.answer_queries, exclude=ret.top(100))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.circuits.heads import channel_group_count, channel_patterns
from dynalens.probes.figures import heatmap
from dynalens.probes.model_surface import architecture_of
from dynalens.probes.model_surface import result_context
from dynalens.probes.results import Result
from dynalens.probes.sinks import check_transformer
from jaxtyping import Bool, Float, Int
from torch import Tensor

RETRIEVAL_THRESHOLD = 0.1
"""Score above which a head counts as a retrieval head (the paper's threshold)."""


class Needle(NamedTuple):
    """A needle sentence ``lead + answer``, and the question that asks for it."""

    lead: str
    answer: str
    question: str


NEEDLES = (
    Needle(
        "The best thing to do in San Francisco is",
        " eat a sandwich and sit in Dolores Park on a sunny day.",
        "What is the best thing to do in San Francisco?",
    ),
    Needle(
        "The secret ingredient of the famous harbour soup is",
        " a spoonful of smoked paprika with fresh lemon zest.",
        "What is the secret ingredient of the famous harbour soup?",
    ),
    Needle(
        "The old lighthouse keeper keeps his spare key",
        " under the third blue flowerpot beside the wooden gate.",
        "Where does the old lighthouse keeper keep his spare key?",
    ),
)
"""The needles of the default haystacks (the paper's San Francisco needle first)."""

FILLER = (
    "The committee met on Tuesday to review the budget for the coming year.",
    "Most of the members agreed that the roads needed repair before winter.",
    "A small bakery on the corner sells bread every morning at seven.",
    "The river rises each spring when the snow melts in the hills.",
    "Several students stayed late in the library to finish their essays.",
    "The museum opened a new wing devoted to maps and navigation.",
    "Farmers in the valley grow wheat, barley and a little corn.",
    "The train to the coast leaves twice a day from the central station.",
    "An old clock tower stands in the middle of the market square.",
    "Volunteers planted two hundred trees along the edge of the park.",
    "The weather service expects light rain for most of the weekend.",
    "Her grandfather repaired radios in a workshop behind the house.",
    "The choir rehearses on Thursday evenings in the town hall.",
    "Engineers tested the bridge with heavy trucks before it opened.",
    "The local paper prints the football results every Monday.",
    "A family of ducks nests each year near the mill pond.",
    "The school added a course on programming for younger pupils.",
    "Tourists often photograph the painted doors of the harbour houses.",
    "The hospital hired new nurses to staff the night shift.",
    "Shops along the high street close early on Sundays.",
)
"""Neutral filler sentences the haystacks are drawn from."""


@dataclass(frozen=True)
class Haystack:
    """One needle-in-a-haystack prompt with its answer, as token ids.

    Attributes
    ----------
    tokens
        ``[pos]``: the prompt, then the answer tokens (the last ``n_answer``).
    needle_span
        ``(start, stop)`` positions of the needle's answer tokens in the haystack.
    n_answer
        How many answer tokens end ``tokens``.
    """

    tokens: Int[Tensor, " pos"]
    needle_span: tuple[int, int]
    n_answer: int

    @property
    def answer_start(self) -> int:
        return self.tokens.shape[0] - self.n_answer


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def make_haystack(
    model: Any, needle: Needle, context_tokens: int, depth: float, generator: torch.Generator
) -> Haystack:
    """A haystack of about ``context_tokens`` filler tokens with ``needle`` at ``depth`` (0 to 1).

    Token ids are built piece by piece (BOS, filler, needle lead, needle
    answer, filler, question and answer lead, answer), so the needle's answer
    tokens are the same ids in the haystack and in the answer.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("needle-in-a-haystack prompts are text: this model has no tokenizer")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    filler: list[int] = []
    while len(filler) < context_tokens:
        sentence = FILLER[int(torch.randint(len(FILLER), (1,), generator=generator))]
        filler += _encode(tokenizer, " " + sentence)
    filler = filler[:context_tokens]
    cut = round(depth * len(filler))
    while 0 < cut < len(filler) and not tokenizer.decode(filler[cut - 1 : cut]).endswith("."):
        cut -= 1  # put the needle between sentences
    answer = _encode(tokenizer, needle.answer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + filler[:cut] + _encode(tokenizer, " " + needle.lead)
    tail = filler[cut:] + _encode(tokenizer, f"\nQuestion: {needle.question}\nAnswer: {needle.lead}")
    ids = head + answer + tail + answer
    return Haystack(torch.tensor(ids), (len(head), len(head) + len(answer)), len(answer))


def make_haystacks(
    model: Any,
    n: int,
    *,
    context_tokens: int | Sequence[int] = 200,
    needles: Sequence[Needle] = NEEDLES,
    seed: int = 0,
) -> list[Haystack]:
    """``n`` haystacks over a grid of filler lengths × needle depths, cycling through ``needles``.

    Haystack ``i`` has ``context_tokens[i % L]`` filler tokens (``L`` lengths)
    and its needle at depth ``j / (m - 1)``, ``j = i // L``, ``m = ceil(n / L)``
    (evenly spaced from 0 to 1 at every length); its needle is ``needles[i % len(needles)]``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of haystacks must be a positive integer, got {n!r}")
    lengths = [context_tokens] if isinstance(context_tokens, int) else list(context_tokens)
    if not lengths or any(not isinstance(t, int) or t < 1 for t in lengths):
        raise ValueError(f"context_tokens must be a positive integer or a list of them, got {context_tokens!r}")
    generator = torch.Generator().manual_seed(seed)
    per_length = -(-n // len(lengths))
    depths = torch.linspace(0.0, 1.0, per_length).tolist() if per_length > 1 else [0.5]
    return [
        make_haystack(model, needles[i % len(needles)], lengths[i % len(lengths)], depths[i // len(lengths)], generator)
        for i in range(n)
    ]


class _Readout(NamedTuple):
    top_keys: Int[Tensor, "layer head step"]  # each head's top-1 key at each answer step
    predictions: Int[Tensor, " step"]  # the model's top-1 token at each answer step


@torch.no_grad()
def _read_answer(model: Any, haystack: Haystack, fwd_hooks: Sequence = ()) -> _Readout:
    """One teacher-forced pass: each head's top-1 key and the model's prediction per answer step."""
    start, n_layers = haystack.answer_start, model.cfg.n_layers
    rows = slice(start - 1, start - 1 + haystack.n_answer)  # the queries that predict the answer
    top_keys: list[Tensor] = [torch.empty(0)] * n_layers

    def record(pattern: Float[Tensor, "batch head q k"], hook: Any) -> None:
        top_keys[int(hook.name.split(".")[1])] = pattern[0, :, rows].argmax(-1).cpu()

    record_hooks = [(f"blocks.{layer}.attn.hook_pattern", record) for layer in range(n_layers)]
    logits = model.run_with_hooks(haystack.tokens[None], fwd_hooks=list(fwd_hooks) + record_hooks)
    return _Readout(torch.stack(top_keys), logits[0, rows].argmax(-1).cpu())


def copy_paste_scores(
    top_keys: Int[Tensor, "layer head step"], predictions: Int[Tensor, " step"], haystack: Haystack
) -> Float[Tensor, "layer head"]:
    """One haystack's retrieval score per head: its copy-paste steps over the needle span's length.

    A step counts for a head when the model's top-1 prediction is the answer
    token being copied and the head's top-1 key is a needle position holding
    that same token.
    """
    start, stop = haystack.needle_span
    tokens = haystack.tokens
    in_span = (top_keys >= start) & (top_keys < stop)
    same = tokens[top_keys.clamp(0, tokens.shape[0] - 1)] == predictions
    copied = predictions == tokens[haystack.answer_start :]
    return (in_span & same & copied).sum(-1).float() / (stop - start)


@dataclass(kw_only=True, eq=False)
class RetrievalScores(Result):
    """Retrieval score of every head over needle-in-a-haystack prompts.

    Attributes
    ----------
    scores
        ``[layer, head]`` mean copy-paste share of the needle over the
        retrieved haystacks, in ``[0, 1]``.
    haystack_scores
        ``[haystack, layer, head]``: each haystack's own scores.
    accuracy
        Teacher-forced top-1 accuracy on the answer tokens, per haystack.
    prompt_tokens
        Prompt length (tokens before the answer) per haystack.
    threshold
        Score above which a head counts as a retrieval head.
    min_accuracy
        Haystacks with needle accuracy at most this are not averaged.
    """

    scores: Float[Tensor, "layer head"]
    haystack_scores: Float[Tensor, "haystack layer head"]
    accuracy: Float[Tensor, " haystack"]
    prompt_tokens: list[int]
    threshold: float = RETRIEVAL_THRESHOLD
    min_accuracy: float = 0.5

    @property
    def retrieved(self) -> int:
        """How many haystacks the model retrieved (the ones averaged)."""
        return int((self.accuracy > self.min_accuracy).sum())

    @property
    def fraction(self) -> float:
        """Share of heads whose score exceeds the threshold."""
        return (self.scores > self.threshold).float().mean().item()

    def heads(self) -> list[tuple[int, int]]:
        """The retrieval heads (score above threshold), best first."""
        frame = self.to_frame()
        frame = frame[frame["retrieval"]].sort_values("score", ascending=False)
        return list(zip(frame["layer"].tolist(), frame["head"].tolist()))

    def to_frame(self) -> pd.DataFrame:
        """One row per head: ``layer, head, score, retrieval``."""
        layers, heads = self.scores.shape
        flat = self.scores.flatten()
        return pd.DataFrame({
            "layer": torch.arange(layers).repeat_interleave(heads).numpy(),
            "head": torch.arange(heads).repeat(layers).numpy(),
            "score": flat.numpy(),
            "retrieval": (flat > self.threshold).numpy(),
        })  # fmt: skip

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the highest retrieval scores."""
        return self.to_frame().nlargest(k, "score", keep="first").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """The layer × head grid of retrieval scores."""
        layers, heads = self.scores.shape
        return heatmap(
            self.scores.numpy(), x_labels=[f"H{h}" for h in range(heads)],
            y_labels=[f"L{layer}" for layer in range(layers)], x_title="head", y_title="layer",
            value_name="retrieval score",
            title=f"Retrieval scores ({self.fraction:.1%} of heads > {self.threshold}) · {self.model_name}",
            y_reversed=True,
        )  # fmt: skip


def retrieval_scores(
    model: Any,
    haystacks: int | Sequence[Haystack] = 20,
    *,
    context_tokens: int | Sequence[int] = (200, 400, 800),
    threshold: float = RETRIEVAL_THRESHOLD,
    min_accuracy: float = 0.5,
    seed: int = 0,
) -> RetrievalScores:
    """The retrieval score of every head, averaged over needle-in-a-haystack prompts.

    Parameters
    ----------
    model
        A transformer with a tokenizer.
    haystacks
        How many haystacks to generate (:func:`make_haystacks`), or the haystacks.
    context_tokens
        Filler lengths of generated haystacks (cycled; depths spread at each length).
    threshold
        Score above which a head is a retrieval head.
    min_accuracy
        Average only haystacks whose needle accuracy exceeds this (the
        paper's code keeps generations with ROUGE-1 recall > 50%).
    seed
        Seeds the filler of generated haystacks.

    Returns
    -------
    RetrievalScores
    """
    check_transformer(model)
    if not 0.0 <= min_accuracy < 1.0:
        raise ValueError(f"min_accuracy must lie in [0, 1), got {min_accuracy!r}")
    if isinstance(haystacks, int):
        haystacks = make_haystacks(model, haystacks, context_tokens=context_tokens, seed=seed)
    if not haystacks:
        raise ValueError("haystacks is empty: pass a positive number or at least one Haystack")
    per_haystack, accuracy = [], []
    for haystack in haystacks:
        readout = _read_answer(model, haystack)
        per_haystack.append(copy_paste_scores(readout.top_keys, readout.predictions, haystack))
        accuracy.append((readout.predictions == haystack.tokens[haystack.answer_start :]).float().mean())
    haystack_scores, accuracy_t = torch.stack(per_haystack), torch.stack(accuracy)
    retrieved = accuracy_t > min_accuracy
    scores = haystack_scores[retrieved].mean(0) if retrieved.any() else torch.zeros_like(haystack_scores[0])
    return RetrievalScores(
        **result_context(model, haystacks[0].tokens[None]),
        scores=scores,
        haystack_scores=haystack_scores,
        accuracy=accuracy_t,
        prompt_tokens=[h.answer_start for h in haystacks],
        threshold=threshold,
        min_accuracy=min_accuracy,
    )


@torch.no_grad()
def mixer_retrieval_scores(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    score_mask: Bool[Tensor, "batch pos"],
    source_mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    channel_groups: int | None = None,
) -> Float[Tensor, "layer group"]:
    """Retrieval scores of a Mamba model's channel groups, from the materialised SSM matrices.

    At every scored step (query ``q`` with ``score_mask[b, q]``, predicting
    ``tokens[b, q + 1]``) where the model's top-1 token is that next token, a
    channel copy-pastes when the key with the largest ``|M[q, k]|`` lies in
    ``source_mask`` and holds that same token. A channel's score is its
    copy-paste share of the scored steps of a sequence, averaged over the
    batch; a group's score is the mean over its channels.

    Parameters
    ----------
    model
        A Mamba model.
    tokens
        ``[batch, pos]`` sequences that copy earlier tokens (e.g. associative recall).
    score_mask
        ``[batch, pos]``: the queries that copy (a task batch's ``score_mask``).
    source_mask
        ``[batch, pos]``: where the copied tokens may be read from (the needle,
        the key-value context); default every position.
    channel_groups
        How many channel groups to report (default as in :func:`~dynalens.probes.mixer_matrices`).

    Returns
    -------
    Tensor ``[layer, group]`` in ``[0, 1]``.
    """
    if architecture_of(model) != "mamba":
        raise TypeError(
            f"mixer_retrieval_scores reads SSM matrices of Mamba models; this model is a {architecture_of(model)}"
        )
    tokens = torch.as_tensor(tokens).cpu()
    score_mask = torch.as_tensor(score_mask, dtype=torch.bool).cpu()
    source_mask = torch.ones_like(score_mask) if source_mask is None else source_mask
    source_mask = torch.as_tensor(source_mask, dtype=torch.bool).cpu()
    if score_mask.shape != tokens.shape or source_mask.shape != tokens.shape:
        raise ValueError(f"score_mask and source_mask must have the tokens' shape {tuple(tokens.shape)}")
    score_mask = score_mask.clone()
    score_mask[:, -1] = False  # the last position has no next token to copy
    steps = score_mask.sum(-1)
    if not steps.all():
        raise ValueError("score_mask must select at least one query before the last position in every sequence")
    groups = channel_group_count(model, channel_groups)
    target = tokens.roll(-1, dims=1)
    copied = (model(tokens).argmax(-1).cpu() == target) & score_mask  # [batch, q]
    scores = []
    for layer in range(model.cfg.n_layers):
        top = channel_patterns(model, tokens, layer).argmax(-1)  # [batch, channel, q]
        held = tokens.gather(1, top.flatten(1)).view_as(top)
        hit = (held == target[:, None]) & source_mask.gather(1, top.flatten(1)).view_as(top) & copied[:, None]
        per_channel = (hit.sum(-1) / steps[:, None]).mean(0)  # [channel]
        scores.append(per_channel.view(groups, -1).mean(-1))
    return torch.stack(scores)


@dataclass
class NeedleScorer:
    """Needle accuracy as a :class:`~dynalens.circuits.ablation.Scorer` for :func:`ablate_heads`.

    Each trial draws ``n_haystacks`` haystacks of one needle (so every prompt
    ends with the same ``answer_queries`` answer-reading queries, the ones to
    mask) and returns the mean teacher-forced answer accuracy.
    """

    model: Any
    n_haystacks: int = 4
    context_tokens: int = 200
    needle: Needle = field(default=NEEDLES[0])
    metric: str = "needle accuracy"

    @property
    def answer_queries(self) -> int:
        """The queries that read out the answer: the last prompt position and each answer token."""
        return len(_encode(self.model.tokenizer, self.needle.answer)) + 1

    def _haystacks(self, generator: torch.Generator) -> list[Haystack]:
        depths = torch.rand(self.n_haystacks, generator=generator).tolist()
        return [make_haystack(self.model, self.needle, self.context_tokens, d, generator) for d in depths]

    def score(self, model: Any, fwd_hooks: Sequence, generator: torch.Generator) -> float:
        correct = []
        for haystack in self._haystacks(generator):
            readout = _read_answer(model, haystack, fwd_hooks)
            correct.append((readout.predictions == haystack.tokens[haystack.answer_start :]).float().mean())
        return torch.stack(correct).mean().item()

    def reference_tokens(self, generator: torch.Generator) -> Int[Tensor, "1 pos"]:
        return self._haystacks(generator)[0].tokens[None]
