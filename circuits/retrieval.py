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
query per generated token. ``generate`` runs its 50 steps (or to the
end-of-sequence token) and the answer is cut where decoding ends; greedy
steps after that are not read.

Masking (:class:`NeedleScorer` with :class:`~dynalens.circuits.HeadAblation`,
``method="mask"``, ``last_queries=1``) makes the chosen heads attend uniformly
at decoding steps only, as the paper's ``needle_in_haystack_with_mask.py``
does by zeroing their queries; needle accuracy is the ROUGE-1 recall of the
answer, and the random control draws heads outside the top 100.

:class:`RetrievalScores` decodes each haystack on its own (its result's
``prompts`` are the haystacks, left-padded).

Mamba has no attention: :class:`MixerRetrievalScores` applies the same
copy-paste rule, from a cache, to each channel's materialised SSM matrix (the
key with the largest ``|M[q, k]|``) and averages the channels of each channel
group; on Mamba-2 to each SSD head's matrix, on a hybrid to each layer's own
mixer (attention heads by their pattern's top key).

>>> ret = dl.circuits.RetrievalScores(30, context_tokens=(1000, 2000))(model)   # doctest: +SKIP
>>> ret.top(10); ret.figure()                                                   # doctest: +SKIP
>>> needle = dl.circuits.NeedleScorer(model)                                     # doctest: +SKIP
>>> dl.circuits.HeadAblation(ret.top(10), needle, method="mask", last_queries=needle.answer_queries,
...                          exclude=ret.top(100))(model)                        # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, ClassVar, NamedTuple

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from dynalens.circuits.heads import (
    channel_group_count,
    check_channel_groups,
    grid_figure,
    grid_frame,
    layer_patterns,
    mixer_pattern_hooks,
    pad_heads,
)
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import unembed_resid
from dynalens.probes.analysis import Analysis, Experiment
from dynalens.probes.results import Result

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


def ends_answer(tokenizer: Any, generated: Sequence[int], eos_token_id: int | None = None) -> bool:
    """Whether the last generated token ends the answer: the end-of-sequence token, or a token
    holding a newline once the answer has begun (the paper's stop)."""
    last = generated[-1]
    if last == eos_token_id:
        return True
    return "\n" in tokenizer.decode([last]) and tokenizer.decode(list(generated[:-1])).strip() != ""


def answer_end(tokenizer: Any, generated: Sequence[int], eos_token_id: int | None = None) -> int:
    """How many generated tokens the answer takes, its stop token included (:func:`ends_answer`);
    all of them when none stops it."""
    stops = (n for n in range(1, len(generated) + 1) if ends_answer(tokenizer, generated[:n], eos_token_id))
    return next(stops, len(generated))


class _Decoding(NamedTuple):
    generated: Int[Tensor, " step"]  # the greedy tokens, the stop token included
    top_keys: Int[Tensor, "layer head step"] | None  # each head's top-1 key at each step


@torch.no_grad()
def _decode(model: Any, haystack: Haystack, fwd_hooks: Sequence = (), *, read_heads: bool = False) -> _Decoding:
    """Greedy decoding of the answer (KV cache on), with each head's top-1 key per step if asked."""
    n_layers, n_prompt = model.cfg.n_layers, haystack.tokens.shape[0]
    steps: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def record(pattern: Float[Tensor, "batch head q k"], hook: Any, layer: int) -> None:
        steps[layer].append(pattern[0, :, -1].argmax(-1).cpu())

    hooks = list(fwd_hooks)
    if read_heads:
        hooks += [(names.pattern(layer), partial(record, layer=layer)) for layer in range(n_layers)]
    max_new = min(MAX_NEW_TOKENS, model.cfg.n_ctx - n_prompt)
    eos = model.tokenizer.eos_token_id
    def stop(new: Int[Tensor, "1 n"]) -> Tensor:
        return torch.tensor([ends_answer(model.tokenizer, new[0].tolist(), eos)])

    out = model.generate(
        haystack.tokens[None], max_new, fwd_hooks=hooks, return_type="tokens", eos_token_id=eos, stop_when=stop
    )
    generated = out[0, n_prompt:].cpu()
    generated = generated[: answer_end(model.tokenizer, generated.tolist(), eos)]
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
class RetrievalScoresResult(Result):
    """Retrieval score of every head over needle-in-a-haystack prompts (``prompts``: the haystacks).

    Attributes
    ----------
    haystack_scores
        ``[haystack, layer, head]``: each haystack's own copy-paste scores.
    recall
        ROUGE-1 recall of the needle's answer in each haystack's response.
    responses
        The model's greedy answer to each haystack.
    needle_spans
        ``[start, stop]`` real positions of each haystack's needle answer.
    answers
        Each haystack's needle answer (the ROUGE-1 reference).
    threshold
        Score above which a head counts as a retrieval head.
    min_recall
        Haystacks with recall at most this are not averaged.
    """

    haystack_scores: Float[Tensor, "haystack layer head"]
    recall: Float[Tensor, " haystack"]
    responses: list[str]
    needle_spans: list[list[int]]
    answers: list[str]
    threshold: float = RETRIEVAL_THRESHOLD
    min_recall: float = MIN_RECALL

    @property
    def scores(self) -> Float[Tensor, "layer head"]:
        """Each head's mean score over the retrieved haystacks (zeros when none was retrieved)."""
        retrieved = self.recall > self.min_recall
        if not retrieved.any():
            return torch.zeros_like(self.haystack_scores[0])
        return self.haystack_scores[retrieved].mean(0)

    @property
    def retrieved(self) -> int:
        """How many haystacks the model retrieved (the ones averaged)."""
        return int((self.recall > self.min_recall).sum())

    @property
    def prompt_tokens(self) -> list[int]:
        """Prompt length per haystack."""
        return self._prompts().lengths.tolist()

    @property
    def fraction(self) -> float:
        """Share of heads whose score exceeds the threshold."""
        return (self.scores > self.threshold).float().mean().item()

    def haystacks(self) -> list[Haystack]:
        """The haystacks the scores were computed on."""
        prompts = self._prompts()
        return [
            Haystack(prompts.real(prompts.tokens, i).cpu(), (span[0], span[1]), answer)
            for i, (span, answer) in enumerate(zip(self.needle_spans, self.answers))
        ]

    def heads(self) -> list[tuple[int, int]]:
        """The retrieval heads (score above threshold), best first."""
        frame = self.top(self.scores.numel())
        frame = frame[frame["retrieval"]]
        return list(zip(frame["layer"].tolist(), frame["head"].tolist()))

    def to_frame(self) -> pd.DataFrame:
        """One row per haystack and head: ``prompt, layer, head, score, retrieved`` (whether it is averaged)."""
        frames = []
        for prompt, scores in enumerate(self.haystack_scores):
            frame = grid_frame({"score": scores})
            frame.insert(0, "prompt", prompt)
            frame["retrieved"] = bool(self.recall[prompt] > self.min_recall)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` heads with the highest mean scores: ``layer, head, score, retrieval``."""
        frame = grid_frame({"score": self.scores})
        frame["retrieval"] = frame["score"] > self.threshold
        return frame.nlargest(k, "score", keep="first").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """The layer × head grid of mean retrieval scores."""
        return grid_figure(
            self.scores, "retrieval score",
            f"Retrieval scores ({self.fraction:.1%} of heads > {self.threshold}) · {self.model_name}",
        )  # fmt: skip


class RetrievalScores(Experiment):
    """The retrieval score of every head, averaged over needle-in-a-haystack prompts (greedy decoding).

    Parameters
    ----------
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

    The haystacks are the experiment's prompts: the prompts of a run are not
    read, and the result's ``prompts`` hold the haystacks.

    Examples
    --------
    >>> ret = RetrievalScores(30, context_tokens=(1000, 2000))(model)     # doctest: +SKIP
    >>> ret.top(10); ret.figure()                                         # doctest: +SKIP
    """

    architectures: ClassVar[tuple[str, ...]] = ("transformer",)
    requirement: ClassVar[str] = "attention heads"

    def __init__(
        self,
        haystacks: int | Sequence[Haystack] = 20,
        *,
        context_tokens: int | Sequence[int] = (500, 1000),
        needles: Sequence[Needle] = NEEDLES,
        threshold: float = RETRIEVAL_THRESHOLD,
        min_recall: float = MIN_RECALL,
        progress: bool = False,
    ):
        self.haystacks = haystacks
        self.context_tokens = context_tokens
        self.needles = needles
        self.threshold = threshold
        self.min_recall = min_recall
        self.progress = progress

    def check(self, model: Any) -> None:
        super().check(model)
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("needle-in-a-haystack prompts are text: this model has no tokenizer")
        if not 0.0 <= self.min_recall < 1.0:
            raise ValueError(f"min_recall must lie in [0, 1), got {self.min_recall!r}")

    def provenance(self, model: Any, prompts: Prompts | None) -> dict[str, Any]:
        fields = super().provenance(model, prompts)
        if not isinstance(self.haystacks, int):  # the haystacks themselves are the result's prompts
            fields["params"]["haystacks"] = len(self.haystacks)
        return fields

    def run(self, model: Any, prompts: Prompts | None = None) -> RetrievalScoresResult:
        """Decode every haystack and score each head's copy-paste steps."""
        self.check(model)
        haystacks = self.haystacks
        if isinstance(haystacks, int):
            haystacks = make_haystacks(model, haystacks, context_tokens=self.context_tokens, needles=self.needles)
        haystacks = list(haystacks)
        if not haystacks:
            raise ValueError("haystacks is empty: pass a positive number or at least one Haystack")
        per_haystack, recall, responses = [], [], []
        for haystack in tqdm(haystacks, desc="haystacks", disable=not self.progress):
            decoding = _decode(model, haystack, read_heads=True)
            per_haystack.append(copy_paste_scores(decoding.top_keys, decoding.generated, haystack))
            responses.append(model.tokenizer.decode(decoding.generated, skip_special_tokens=True).strip())
            recall.append(rouge1_recall(haystack.answer, responses[-1]))
        batch = Prompts(model, [h.tokens for h in haystacks])
        return RetrievalScoresResult(
            **self.provenance(model, batch),
            haystack_scores=torch.stack(per_haystack),
            recall=torch.tensor(recall),
            responses=responses,
            needle_spans=[list(h.needle_span) for h in haystacks],
            answers=[h.answer for h in haystacks],
            threshold=self.threshold,
            min_recall=self.min_recall,
        )


# ----------------------------------------------------------------- SSM mixers
@dataclass(kw_only=True, eq=False)
class MixerRetrievalScoresResult(Result):
    """Retrieval scores of every head (Mamba: channel group; Mamba-2: SSD head), per prompt.

    Attributes
    ----------
    prompt_scores
        ``[prompt, layer, group]`` in ``[0, 1]``: each prompt's copy-paste share
        of its scored steps (``nan`` for a prompt with none, and past a layer's heads).
    steps
        ``[prompt]``: the scored steps of each prompt.
    mixers
        ``mixers[layer][group]``: the mixer each group belongs to (``attention``,
        ``mamba``, ``mamba2``; see :attr:`~dynalens.circuits.HeadScoresResult.mixers`).
    """

    prompt_scores: Float[Tensor, "prompt layer group"]
    steps: Int[Tensor, " prompt"]
    mixers: list[list[str]]

    @property
    def scores(self) -> Float[Tensor, "layer group"]:
        """The mean over the prompts that have scored steps."""
        return self.prompt_scores[self.steps > 0].mean(0)

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt, layer and group: ``prompt, layer, group, mixer, score``."""
        frames = []
        for prompt, scores in enumerate(self.prompt_scores):
            frame = grid_frame({"score": scores}, self.mixers).rename(columns={"head": "group"})
            frame.insert(0, "prompt", prompt)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` groups with the highest mean scores."""
        frame = grid_frame({"score": self.scores}, self.mixers).rename(columns={"head": "group"})
        return frame.nlargest(k, "score", keep="first").reset_index(drop=True)

    def figure(self) -> go.Figure:
        """The layer × group grid of mean retrieval scores."""
        return grid_figure(self.scores, "retrieval score", f"Mixer retrieval scores · {self.model_name}")


class MixerRetrievalScores(Analysis):
    """Retrieval scores of a Mamba model's channel groups (Mamba-2: SSD heads), from the materialised mixer matrices.

    At every scored step (query ``q`` of a prompt, predicting its real token
    ``q + 1``) where the model's top-1 token is that next token, a channel
    copy-pastes when the key with the largest ``|M[q, k]|`` lies in the
    source positions and holds that same token. A channel's score is its
    copy-paste share of the scored steps of a prompt; a group's score is the
    mean over its channels; the batch's, the mean over prompts. A Mamba-2
    head is scored as one channel, from its SSD matrix; a hybrid's attention
    heads (and Mamba-2 heads) as such, by the top key of their pattern
    (matrix), its Mamba-1 layers by channel groups.

    Parameters
    ----------
    score_mask
        ``[batch, pos]`` in the prompts' (left-padded) layout: the queries that
        copy (a task batch's ``score_mask``); default every real position.
    source_mask
        ``[batch, pos]``: where the copied tokens may be read from (the needle,
        the key-value context); default every real position.
    channel_groups
        Mamba layers only: how many channel groups to report (default ``gcd(8, d_inner)``).
    """

    architectures: ClassVar[tuple[str, ...]] = ("mamba", "mamba2", "hybrid")
    requirement: ClassVar[str] = "SSM mixer matrices"

    def __init__(
        self,
        score_mask: Bool[Tensor, "batch pos"] | None = None,
        source_mask: Bool[Tensor, "batch pos"] | None = None,
        channel_groups: int | None = None,
    ):
        self.score_mask = score_mask
        self.source_mask = source_mask
        self.channel_groups = channel_groups

    def check(self, model: Any) -> None:
        super().check(model)
        check_channel_groups(model, self.channel_groups)

    def hooks(self, model: Any) -> list[str]:
        return [*mixer_pattern_hooks(model), names.resid_post(model.cfg.n_layers - 1)]

    def provenance(self, model: Any, prompts: Prompts | None) -> dict[str, Any]:
        fields = super().provenance(model, prompts)
        for key in ("score_mask", "source_mask"):
            value = getattr(self, key)
            if value is not None:
                fields["params"][key] = torch.as_tensor(value).int().tolist()
        return fields

    def _mask(self, value: Tensor | None, prompts: Prompts, name: str) -> Bool[Tensor, "batch pos"]:
        if value is None:
            return prompts.mask.cpu()
        value = torch.as_tensor(value, dtype=torch.bool).cpu()
        if value.shape != prompts.tokens.shape:
            raise ValueError(
                f"{name} must have the prompts' tokens' shape {tuple(prompts.tokens.shape)} (left-padded), "
                f"got {tuple(value.shape)}"
            )
        return value & prompts.mask.cpu()

    def _compute(self, cache: Any, prompts: Prompts) -> MixerRetrievalScoresResult:
        model = cache.model
        score_mask = self._mask(self.score_mask, prompts, "score_mask")
        source_mask = self._mask(self.source_mask, prompts, "source_mask")
        predicted = unembed_resid(model, cache[names.resid_post(model.cfg.n_layers - 1)]).argmax(-1).cpu()
        scores, steps, mixers = [], [], []
        for prompt in range(len(prompts)):
            tokens, guess, score, source = (
                prompts.real(x, prompt).cpu() for x in (prompts.tokens, predicted, score_mask, source_mask)
            )
            target = tokens.roll(-1)
            score = score.clone()
            score[-1] = False  # the last position has no next token to copy
            n_steps = int(score.sum())
            copied = (guess == target) & score  # [q]
            per_layer, mixers = [], []
            for layer in range(model.cfg.n_layers):
                groups, kinds = [], []
                for mixer, patterns in layer_patterns(model, cache, layer, prompts, prompt):
                    top = patterns.argmax(-1)  # [unit, q]
                    hit = ((tokens[top] == target) & source[top] & copied).sum(-1) / n_steps
                    if mixer == "mamba":
                        hit = hit.view(channel_group_count(model, self.channel_groups, layer), -1).mean(-1)
                    groups.append(hit)
                    kinds += [mixer] * len(hit)
                per_layer.append(torch.cat(groups) if groups else torch.zeros(0))
                mixers.append(kinds)
            scores.append(pad_heads(per_layer))
            steps.append(n_steps)
        return MixerRetrievalScoresResult(
            **self.provenance(model, prompts),
            prompt_scores=torch.stack(scores).float(),
            steps=torch.tensor(steps, dtype=torch.long),
            mixers=mixers,
        )


@dataclass
class NeedleScorer:
    """Needle accuracy, the ROUGE-1 recall of the answer, as a :class:`~dynalens.circuits.ablation.Scorer`.

    Each trial draws ``n_haystacks`` haystacks of one needle at random depths
    and returns the mean recall of the model's greedy answers. Hooks passed
    by :class:`~dynalens.circuits.HeadAblation` stay on while decoding; with
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
