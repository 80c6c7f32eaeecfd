"""Retrieval heads (Wu et al. 2024): heads that copy the needle out of a haystack.

The procedure follows the paper's code (``nightdessert/Retrieval_Head``,
``retrieval_head_detection.py``):

- **Haystack**: the first ``context_tokens`` tokens of a book, with the
  needle sentence (``lead + answer``) inserted at a depth from 0 to 1, moved
  back to the nearest sentence end (depth 1 puts it last); the paper uses a
  different text per needle (here three parts of the Python language reference
  that ships with the standard library, ``pydoc_data``). The prompt is the
  context followed directly by ``"Based on the content of the book, Question:
  {question}\\nAnswer:"``: no part of the answer is fed.
- **Needle span**: the positions of the needle's answer clause (the code's
  ``real_needle``), known exactly because token ids are built piece by piece.
- **Decoding**: greedy, at most 50 new tokens, ending with the first token
  that holds a newline (and at the end-of-sequence token). At every decoding
  step, whatever token ``w`` the model generates, a head *copy-pastes* when its
  top-1 attention (``argmax``: the first maximum on a tie) lies in the needle
  span on a position holding ``w``; each such step adds ``1 / |span|`` to the
  head's score for that haystack (``retrieval_calculate``).
- **Aggregation**: haystacks whose response has a ROUGE-1 recall of the answer
  at most 0.5 are left out (the code's ``score > 50``); a head's retrieval
  score is its mean over the others. A head is a retrieval head when its
  score exceeds 0.1 (the paper finds fewer than 5% of heads).

One adaptation: a small model often opens its answer with a blank line, and
the code (written for tokenizers whose answers start on the ``Answer:`` line)
would stop there with an empty answer; decoding here ends at the first newline
*after* the answer has begun. ROUGE-1 recall is computed as ``rouge_score``
does (lower-cased alphanumeric words) but without its Porter stemmer.

The decoding steps are read while ``model.generate`` runs with the KV cache:
the prompt pass's last row is the first step's query (the code's prefill stops
one token earlier and feeds the last prompt token as the first step), then one
query per generated token.

Masking (:class:`NeedleScorer` with :func:`~dynalens.circuits.ablate_heads`,
``method="mask"``, ``last_queries=1``) makes the chosen heads attend uniformly
at decoding steps only, as the paper's ``needle_in_haystack_with_mask.py``
does by zeroing their queries; needle accuracy is the ROUGE-1 recall of the
answer, and the random control draws heads outside the top 100.

Mamba has no attention: :func:`mixer_retrieval_scores` applies the same
copy-paste rule to each channel's materialised SSM matrix (the key with the
largest ``|M[q, k]|``) and averages the channels of each channel group.

>>> ret = dl.circuits.retrieval_scores(model, haystacks=30, context_tokens=(1000, 2000))  # doctest: +SKIP
>>> ret.top(10); ret.figure()                                               # doctest: +SKIP
>>> needle = dl.circuits.NeedleScorer(model)                                 # doctest: +SKIP
>>> dl.circuits.ablate_heads(model, ret.top(10), needle, method="mask",
...                          last_queries=needle.answer_queries, exclude=ret.top(100))  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import pandas as pd
import plotly.graph_objects as go
import torch
from dynalens.circuits.heads import channel_group_count, channel_patterns
from dynalens.probes.figures import heatmap
from dynalens.models.surface import architecture_of
from dynalens.models.surface import result_context
from dynalens.probes.results import Result
from dynalens.probes.sinks import check_transformer
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import StoppingCriteria

RETRIEVAL_THRESHOLD = 0.1
"""Score above which a head counts as a retrieval head (the paper's threshold)."""

MIN_RECALL = 0.5
"""Haystacks whose answer has a ROUGE-1 recall at most this are not averaged (the paper's code)."""

MAX_NEW_TOKENS = 50
"""Decoding steps per haystack at most (the paper's code)."""

QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"
"""What follows the context (the paper's code, for models without a chat template)."""


class Needle(NamedTuple):
    """A needle sentence ``lead + answer``, and the question that asks for it.

    ``answer`` is the span that scores (the code's ``real_needle``) and the
    reference of the ROUGE-1 recall.
    """

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

BOOK_PARTS = 3
"""How many parts the haystack text is cut into (one per needle, as the paper's three haystacks)."""


@lru_cache(maxsize=BOOK_PARTS)
def book(part: int = 0) -> str:
    """Part ``part`` of the haystack text: a third of the Python language reference (``pydoc_data``), prose lines unwrapped.

    The paper's haystacks are long English essays, a different part per
    needle; this text ships with every Python, so haystacks need no download.
    """
    from pydoc_data.topics import topics

    if part not in range(BOOK_PARTS):
        raise ValueError(f"part must be one of {list(range(BOOK_PARTS))}, got {part!r}")
    names = sorted(topics)
    size = -(-len(names) // BOOK_PARTS)
    text = "\n\n".join(topics[name] for name in names[part * size : (part + 1) * size])
    return re.sub(r"(?<=\S)\n(?=\S)", " ", text)  # unwrap the hard-wrapped prose lines


@dataclass(frozen=True)
class Haystack:
    """One needle-in-a-haystack prompt, as token ids.

    Attributes
    ----------
    tokens
        ``[pos]``: BOS, the context with the needle, the question.
    needle_span
        ``(start, stop)`` positions of the needle's answer tokens.
    answer
        The needle's answer text (the ROUGE-1 reference).
    """

    tokens: Int[Tensor, " pos"]
    needle_span: tuple[int, int]
    answer: str


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _book_tokens(tokenizer: Any, part: int, n: int) -> list[int]:
    """The first ``n`` tokens of :func:`book` part ``part`` (encoding only as much text as needed)."""
    text, chars = book(part), 8 * n
    ids = _encode(tokenizer, text[:chars])
    while len(ids) < n + 1 and chars < len(text):
        chars *= 2
        ids = _encode(tokenizer, text[:chars])
    if len(ids) < n:
        raise ValueError(f"context_tokens={n} exceeds the {len(ids)} tokens of book part {part}")
    return ids[:n]


def make_haystack(model: Any, needle: Needle, context_tokens: int, depth: float, part: int = 0) -> Haystack:
    """The first ``context_tokens`` tokens of book part ``part`` with ``needle`` at ``depth`` (0 to 1).

    As the paper's ``insert_needle``: the needle goes after the first
    ``round(depth * context_tokens)`` tokens, moved back to the last sentence
    end; the question follows the context.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("needle-in-a-haystack prompts are text: this model has no tokenizer")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    if not isinstance(context_tokens, int) or context_tokens < 1:
        raise ValueError(f"context_tokens must be a positive integer, got {context_tokens!r}")
    context = _book_tokens(tokenizer, part, context_tokens)
    cut = round(depth * len(context))
    while 0 < cut < len(context) and not tokenizer.decode(context[cut - 1 : cut]).endswith("."):
        cut -= 1  # put the needle between sentences
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + context[:cut] + _encode(tokenizer, " " + needle.lead)
    answer = _encode(tokenizer, needle.answer)
    tail = context[cut:] + _encode(tokenizer, QUESTION.format(question=needle.question))
    return Haystack(torch.tensor(head + answer + tail), (len(head), len(head) + len(answer)), needle.answer)


def make_haystacks(
    model: Any,
    n: int,
    *,
    context_tokens: int | Sequence[int] = 500,
    needles: Sequence[Needle] = NEEDLES,
) -> list[Haystack]:
    """``n`` haystacks over a grid of needles × context lengths × needle depths.

    Haystack ``i`` holds needle ``i % N`` (``N`` needles, needle ``j`` in book
    part ``j % 3``), has ``context_tokens[(i // N) % L]`` context tokens
    (``L`` lengths), and its needle at depth ``d / (m - 1)``, ``d = i // (N L)``,
    ``m = ceil(n / (N L))``. With ``n = N * L * m`` that is the full grid, as
    the paper's (needles × lengths × depths).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of haystacks must be a positive integer, got {n!r}")
    lengths = [context_tokens] if isinstance(context_tokens, int) else list(context_tokens)
    if not lengths or any(not isinstance(t, int) or t < 1 for t in lengths):
        raise ValueError(f"context_tokens must be a positive integer or a list of them, got {context_tokens!r}")
    if not needles:
        raise ValueError("needles is empty: pass at least one Needle")
    combos = len(needles) * len(lengths)
    per_combo = -(-n // combos)
    depths = torch.linspace(0.0, 1.0, per_combo).tolist() if per_combo > 1 else [0.5]
    return [
        make_haystack(
            model, needles[i % len(needles)], lengths[(i // len(needles)) % len(lengths)],
            depths[i // combos], part=(i % len(needles)) % BOOK_PARTS,
        )
        for i in range(n)
    ]  # fmt: skip


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall: the share of ``reference``'s words (with multiplicity) that ``response`` holds.

    Words as ``rouge_score`` splits them (lower case, runs of ``[a-z0-9]``),
    without its Porter stemmer.
    """
    ref, hyp = (Counter(re.findall(r"[a-z0-9]+", text.lower())) for text in (reference, response))
    total = sum(ref.values())
    return sum((ref & hyp).values()) / total if total else 0.0


class _EndOfLine(StoppingCriteria):
    """Stop once a generated token holds a newline after the answer has begun."""

    def __init__(self, tokenizer: Any, n_prompt: int) -> None:
        self.tokenizer, self.n_prompt = tokenizer, n_prompt

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        new = input_ids[0, self.n_prompt :].tolist()
        done = "\n" in self.tokenizer.decode(new[-1:]) and self.tokenizer.decode(new[:-1]).strip() != ""
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Decoding(NamedTuple):
    generated: Int[Tensor, " step"]  # the greedy tokens, the stop token included
    top_keys: Int[Tensor, "layer head step"] | None  # each head's top-1 key at each step


@torch.no_grad()
def _decode(model: Any, haystack: Haystack, fwd_hooks: Sequence = (), *, read_heads: bool = False) -> _Decoding:
    """Greedy decoding of the answer (KV cache on), with each head's top-1 key per step if asked."""
    n_layers, n_prompt = model.cfg.n_layers, haystack.tokens.shape[0]
    steps: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def record(pattern: Float[Tensor, "batch head q k"], hook: Any) -> None:
        steps[int(hook.name.split(".")[1])].append(pattern[0, :, -1].argmax(-1).cpu())

    hooks = list(fwd_hooks)
    if read_heads:
        hooks += [(f"blocks.{layer}.attn.hook_pattern", record) for layer in range(n_layers)]
    max_new = min(MAX_NEW_TOKENS, model.cfg.n_ctx - n_prompt)
    out = model.generate(
        haystack.tokens[None], max_new, fwd_hooks=hooks, return_type="tokens",
        eos_token_id=model.tokenizer.eos_token_id,
        stopping_criteria=[_EndOfLine(model.tokenizer, n_prompt)],
    )  # fmt: skip
    generated = out[0, n_prompt:].cpu()
    top_keys = torch.stack([torch.stack(s[: len(generated)], -1) for s in steps]) if read_heads else None
    return _Decoding(generated, top_keys)


def copy_paste_scores(
    top_keys: Int[Tensor, "layer head step"], generated: Int[Tensor, " step"], haystack: Haystack
) -> Float[Tensor, "layer head"]:
    """One haystack's retrieval score per head: its copy-paste steps over the needle span's length.

    A step counts for a head when its top-1 key is a needle-span position
    holding the token generated at that step.
    """
    start, stop = haystack.needle_span
    tokens = haystack.tokens
    in_span = (top_keys >= start) & (top_keys < stop)
    same = tokens[top_keys.clamp(0, tokens.shape[0] - 1)] == generated
    return (in_span & same).sum(-1).float() / (stop - start)


@dataclass(kw_only=True, eq=False)
class RetrievalScores(Result):
    """Retrieval score of every head over needle-in-a-haystack prompts.

    Attributes
    ----------
    scores
        ``[layer, head]`` mean copy-paste score over the retrieved haystacks.
    haystack_scores
        ``[haystack, layer, head]``: each haystack's own scores.
    recall
        ROUGE-1 recall of the needle's answer in each haystack's response.
    responses
        The model's greedy answer to each haystack.
    prompt_tokens
        Prompt length per haystack.
    threshold
        Score above which a head counts as a retrieval head.
    min_recall
        Haystacks with recall at most this are not averaged.
    """

    scores: Float[Tensor, "layer head"]
    haystack_scores: Float[Tensor, "haystack layer head"]
    recall: Float[Tensor, " haystack"]
    responses: list[str]
    prompt_tokens: list[int]
    threshold: float = RETRIEVAL_THRESHOLD
    min_recall: float = MIN_RECALL

    @property
    def retrieved(self) -> int:
        """How many haystacks the model retrieved (the ones averaged)."""
        return int((self.recall > self.min_recall).sum())

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
    context_tokens: int | Sequence[int] = (500, 1000),
    needles: Sequence[Needle] = NEEDLES,
    threshold: float = RETRIEVAL_THRESHOLD,
    min_recall: float = MIN_RECALL,
    progress: bool = False,
) -> RetrievalScores:
    """The retrieval score of every head, averaged over needle-in-a-haystack prompts.

    Parameters
    ----------
    model
        A transformer with a tokenizer.
    haystacks
        How many haystacks to generate (:func:`make_haystacks`), or the haystacks.
    context_tokens
        Context lengths of generated haystacks.
    needles
        Needles of generated haystacks.
    threshold
        Score above which a head is a retrieval head.
    min_recall
        Average only haystacks whose answer's ROUGE-1 recall exceeds this.
    progress
        Show a progress bar over haystacks.

    Returns
    -------
    RetrievalScores
    """
    check_transformer(model)
    if not 0.0 <= min_recall < 1.0:
        raise ValueError(f"min_recall must lie in [0, 1), got {min_recall!r}")
    if isinstance(haystacks, int):
        haystacks = make_haystacks(model, haystacks, context_tokens=context_tokens, needles=needles)
    if not haystacks:
        raise ValueError("haystacks is empty: pass a positive number or at least one Haystack")
    per_haystack, recall, responses = [], [], []
    for haystack in tqdm(haystacks, desc="haystacks", disable=not progress):
        decoding = _decode(model, haystack, read_heads=True)
        per_haystack.append(copy_paste_scores(decoding.top_keys, decoding.generated, haystack))
        responses.append(model.tokenizer.decode(decoding.generated, skip_special_tokens=True).strip())
        recall.append(rouge1_recall(haystack.answer, responses[-1]))
    haystack_scores, recall_t = torch.stack(per_haystack), torch.tensor(recall)
    retrieved = recall_t > min_recall
    scores = haystack_scores[retrieved].mean(0) if retrieved.any() else torch.zeros_like(haystack_scores[0])
    return RetrievalScores(
        **result_context(model, haystacks[0].tokens[None]),
        scores=scores,
        haystack_scores=haystack_scores,
        recall=recall_t,
        responses=responses,
        prompt_tokens=[h.tokens.shape[0] for h in haystacks],
        threshold=threshold,
        min_recall=min_recall,
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
    """Needle accuracy, the ROUGE-1 recall of the answer, as a :class:`~dynalens.circuits.ablation.Scorer`.

    Each trial draws ``n_haystacks`` haystacks of one needle at random depths
    and returns the mean recall of the model's greedy answers. Hooks passed
    by :func:`~dynalens.circuits.ablate_heads` stay on while decoding; with
    ``method="mask"`` and ``last_queries=answer_queries`` they mask the
    decoding steps only, as the paper does.
    """

    model: Any
    n_haystacks: int = 4
    context_tokens: int = 500
    needle: Needle = field(default=NEEDLES[0])
    metric: str = "needle ROUGE-1 recall"

    @property
    def answer_queries(self) -> int:
        """The queries to mask in each forward pass of decoding: its last one.

        That is the last prompt token in the prompt pass (the paper's first
        decoding step) and the one new token in every later pass.
        """
        return 1

    def _haystacks(self, generator: torch.Generator) -> list[Haystack]:
        depths = torch.rand(self.n_haystacks, generator=generator).tolist()
        return [make_haystack(self.model, self.needle, self.context_tokens, d) for d in depths]

    def score(self, model: Any, fwd_hooks: Sequence, generator: torch.Generator) -> float:
        recall = []
        for haystack in self._haystacks(generator):
            generated = _decode(model, haystack, fwd_hooks).generated
            recall.append(rouge1_recall(haystack.answer, model.tokenizer.decode(generated, skip_special_tokens=True)))
        return sum(recall) / len(recall)

    def reference_tokens(self, generator: torch.Generator) -> Int[Tensor, "1 pos"]:
        return self._haystacks(generator)[0].tokens[None]
