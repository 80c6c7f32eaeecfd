"""Seeded synthetic tasks whose solving mechanisms are known.

Every task draws batches from a ``torch.Generator`` (so a seed fixes the data)
and returns a :class:`TaskBatch`: the tokens, the next-token targets, the
positions the loss trains on, and the positions its accuracy scores. Position
``i`` of ``targets`` and both masks refers to the prediction made *at* token
``i`` of the next token ``i + 1``, so ``logits = model(batch.tokens)`` lines up
with them directly.

>>> import torch
>>> from dynalens.models.tasks import TASKS
>>> task = TASKS["induction"](d_vocab=16, half_len=4)
>>> batch = task.sample(2, torch.Generator().manual_seed(0))
>>> batch.tokens.shape, task.seq_len
(torch.Size([2, 9]), 9)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dynalens.models.compat_torch import standard_gamma

BOS = 0  # the beginning-of-sequence id of every task that has one


@dataclass
class TaskBatch:
    """One batch of a synthetic task.

    ``extras`` holds task-specific tensors (needle positions, Bayes-optimal
    predictions, ...), each with the batch as its first dimension.
    """

    tokens: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]
    score_mask: Bool[Tensor, "batch pos"]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TaskBatch:
        """The same batch on ``device``."""
        return TaskBatch(
            self.tokens.to(device),
            self.targets.to(device),
            self.loss_mask.to(device),
            self.score_mask.to(device),
            {k: v.to(device) for k, v in self.extras.items()},
        )


def next_token_batch(
    tokens: Int[Tensor, "batch pos"],
    train_on: Bool[Tensor, "batch pos"],
    score_on: Bool[Tensor, "batch pos"],
    extras: dict[str, Tensor] | None = None,
) -> TaskBatch:
    """A :class:`TaskBatch` from masks over the tokens to be *predicted*.

    ``train_on[:, j]`` / ``score_on[:, j]`` mark token ``j`` as a target; they
    are shifted so the masks mark the position (``j - 1``) that predicts it.
    """
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = torch.zeros_like(train_on)
    score_mask = torch.zeros_like(score_on)
    loss_mask[:, :-1] = train_on[:, 1:]
    score_mask[:, :-1] = score_on[:, 1:]
    return TaskBatch(tokens, targets, loss_mask, score_mask, extras or {})


def dirichlet_rows(rows: int, cols: int, concentration: float, generator: torch.Generator) -> Tensor:
    """``rows`` probability vectors drawn from a symmetric Dirichlet (normalised gammas)."""
    gamma = standard_gamma(torch.full((rows, cols), float(concentration)), generator)
    return gamma / gamma.sum(-1, keepdim=True)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Task:
    """A synthetic next-token task. Subclasses set ``d_vocab``, ``seq_len``, ``sample``.

    ``loss`` is the cross-entropy over ``loss_mask``; ``accuracy`` the top-1
    accuracy over ``score_mask`` (tasks with stochastic targets override it).
    """

    name: str = "task"
    d_vocab: int
    seq_len: int

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        raise NotImplementedError

    def loss(
        self, logits: Float[Tensor, "batch pos vocab"], batch: TaskBatch, mask: Tensor | None = None
    ) -> Tensor:
        """Mean cross-entropy over ``mask`` (default: the batch's ``loss_mask``)."""
        mask = batch.loss_mask if mask is None else mask
        return F.cross_entropy(logits[mask].float(), batch.targets[mask])

    def scored_loss(self, logits: Float[Tensor, "batch pos vocab"], batch: TaskBatch) -> Tensor:
        """Mean cross-entropy over the positions the accuracy scores."""
        return self.loss(logits, batch, batch.score_mask)

    def accuracy(self, logits: Float[Tensor, "batch pos vocab"], batch: TaskBatch) -> float:
        """Fraction of scored positions whose argmax is the target."""
        hit = logits.argmax(-1) == batch.targets
        return hit[batch.score_mask].float().mean().item()

    def _check_batch(self, batch: int) -> None:
        _check_positive(batch=batch)


@dataclass
class InductionTask(Task):
    """Repeated random tokens: ``BOS, x_1..x_L, x_1..x_L``, optionally inside random filler.

    With ``min_len=None`` every sequence is ``BOS`` and one segment of
    ``half_len`` tokens repeated twice. With ``min_len`` set, each sequence
    repeats a segment of ``L`` tokens (``L`` uniform in ``[min_len,
    half_len]``) at a random offset: ``BOS, f_1..f_P, x_1..x_L, x_1..x_L,
    f_P+1..f_F`` with ``F = 2 (half_len - L)`` filler tokens, so the length is
    always ``1 + 2 half_len`` but the distance between the two repeats varies
    and only an induction circuit (not a fixed positional look-back) solves it.

    All tokens of a sequence after ``BOS`` are *distinct* ids from ``[1,
    d_vocab)`` (so every repeated token has one successor and perfect
    induction scores 1.0). The loss trains on every position; the accuracy
    scores the second repeat from its second token on (the first cannot be
    inferred by induction). ``extras["repeat_start"]`` and
    ``extras["repeat_len"]`` (``[batch]``) give the position of ``x_1`` and ``L``.
    """

    d_vocab: int = 64
    half_len: int = 16
    min_len: int | None = None
    name: str = "induction"

    def __post_init__(self) -> None:
        _check_positive(d_vocab=self.d_vocab, half_len=self.half_len)
        if self.min_len is not None:
            _check_positive(min_len=self.min_len)
            if self.min_len > self.half_len:
                raise ValueError(f"min_len={self.min_len} must be <= half_len={self.half_len}")
        distinct = 2 * self.half_len - self.shortest
        if distinct > self.d_vocab - 1:
            raise ValueError(
                f"half_len={self.half_len} and min_len={self.min_len} need {distinct} distinct tokens: "
                f"d_vocab > {distinct}, got d_vocab={self.d_vocab}"
            )

    @property
    def shortest(self) -> int:
        """The shortest repeated segment (``min_len``, or ``half_len`` when it is not set)."""
        return self.half_len if self.min_len is None else self.min_len

    @property
    def seq_len(self) -> int:
        return 1 + 2 * self.half_len

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        self._check_batch(batch)
        h = self.half_len
        order = torch.rand(batch, self.d_vocab - 1, generator=generator).argsort(-1) + 1
        if self.min_len is None:
            length, start = torch.full((batch,), h), torch.zeros(batch, dtype=torch.long)
        else:
            length = torch.randint(self.min_len, h + 1, (batch,), generator=generator)
            start = (torch.rand(batch, generator=generator) * (2 * (h - length) + 1)).long()
        # Content position j: filler before the repeats, segment, segment again, filler after.
        rel = torch.arange(2 * h) - start[:, None]
        seg, L = rel.remainder(length[:, None]), length[:, None]
        filler = L + torch.where(rel < 0, rel + start[:, None], rel - 2 * L + start[:, None])
        in_repeats = (rel >= 0) & (rel < 2 * L)
        content = order.gather(1, torch.where(in_repeats, seg, filler))
        tokens = torch.cat([torch.full((batch, 1), BOS, dtype=torch.long), content], dim=1)
        train_on = torch.ones_like(tokens, dtype=torch.bool)
        train_on[:, 0] = False
        score_on = torch.zeros_like(train_on)
        score_on[:, 1:] = (rel > L) & (rel < 2 * L)
        extras = {"repeat_start": 1 + start, "repeat_len": length}
        return next_token_batch(tokens, train_on, score_on, extras)


@dataclass
class AssocRecallTask(Task):
    """Multi-query associative recall (Zoology's MQAR).

    ``k_1 v_1 ... k_n v_n  q_1 a_1 ... q_m a_m``: ``n_pairs`` distinct keys
    from ``[0, n_keys)`` each bound to a value from ``[n_keys, n_keys +
    n_values)``; then ``n_queries`` of those keys (distinct, random order),
    each followed by its value. Loss and accuracy are on the answers ``a_j``.
    """

    n_keys: int = 32
    n_values: int = 32
    n_pairs: int = 8
    n_queries: int = 8
    name: str = "assoc-recall"

    def __post_init__(self) -> None:
        _check_positive(
            n_keys=self.n_keys, n_values=self.n_values, n_pairs=self.n_pairs, n_queries=self.n_queries
        )
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs={self.n_pairs} distinct keys need n_keys >= n_pairs, got {self.n_keys}")
        if self.n_queries > self.n_pairs:
            raise ValueError(f"n_queries={self.n_queries} must be <= n_pairs={self.n_pairs}")

    @property
    def d_vocab(self) -> int:
        return self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.n_pairs + self.n_queries)

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        self._check_batch(batch)
        keys = torch.rand(batch, self.n_keys, generator=generator).argsort(-1)[:, : self.n_pairs]
        values = self.n_keys + torch.randint(self.n_values, (batch, self.n_pairs), generator=generator)
        pick = torch.rand(batch, self.n_pairs, generator=generator).argsort(-1)[:, : self.n_queries]
        queries, answers = keys.gather(1, pick), values.gather(1, pick)
        context = torch.stack([keys, values], dim=2).flatten(1)
        asked = torch.stack([queries, answers], dim=2).flatten(1)
        tokens = torch.cat([context, asked], dim=1)
        on = torch.zeros_like(tokens, dtype=torch.bool)
        on[:, 2 * self.n_pairs + 1 :: 2] = True
        return next_token_batch(tokens, on, on.clone())


@dataclass
class NeedleTask(Task):
    """Needle in a haystack: copy a marked span back after a query token.

    ``BOS, h..h, NEEDLE, n_1..n_k, h..h, QUERY, n_1..n_k``: ``haystack_len``
    random tokens with a needle span of ``needle_len`` tokens inserted at a
    random depth right after the ``NEEDLE`` marker; after ``QUERY`` the model
    copies the needle. Ids: ``BOS=0``, ``NEEDLE=1``, ``QUERY=2``, content
    tokens ``[3, d_vocab)``. Loss and accuracy are on the copied answer.

    ``extras["needle_pos"]`` and ``extras["answer_pos"]`` (``[batch,
    needle_len]``) give the positions of the needle tokens and of their copies:
    the model predicts ``tokens[answer_pos[:, j]]`` at position
    ``answer_pos[:, j] - 1`` by retrieving ``tokens[needle_pos[:, j]]``.
    """

    d_vocab: int = 64
    haystack_len: int = 48
    needle_len: int = 4
    name: str = "needle"

    NEEDLE = 1
    QUERY = 2

    def __post_init__(self) -> None:
        _check_positive(d_vocab=self.d_vocab, haystack_len=self.haystack_len, needle_len=self.needle_len)
        if self.d_vocab < 4:
            raise ValueError(f"d_vocab must be >= 4 (3 special ids + content), got {self.d_vocab}")

    @property
    def seq_len(self) -> int:
        return 1 + self.haystack_len + 1 + self.needle_len + 1 + self.needle_len

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        self._check_batch(batch)
        k, n_content = self.needle_len, self.d_vocab - 3
        hay = 3 + torch.randint(n_content, (batch, self.haystack_len), generator=generator)
        needle = 3 + torch.randint(n_content, (batch, k), generator=generator)
        depth = torch.randint(self.haystack_len + 1, (batch,), generator=generator)
        tokens = torch.empty(batch, self.seq_len, dtype=torch.long)
        tokens[:, 0] = BOS
        # Haystack positions 1..1+haystack_len+1+k, the NEEDLE marker and span at `depth`.
        body = torch.arange(self.haystack_len + 1 + k).expand(batch, -1)
        rel = body - depth[:, None]
        in_span = (rel >= 1) & (rel <= k)
        hay_idx = torch.where(rel < 0, body, body - 1 - k).clamp(0, self.haystack_len - 1)
        body_tokens = hay.gather(1, hay_idx)
        body_tokens = torch.where(rel == 0, self.NEEDLE, body_tokens)
        body_tokens = torch.where(in_span, needle.gather(1, (rel - 1).clamp(0, k - 1)), body_tokens)
        end = 1 + body.shape[1]
        tokens[:, 1:end] = body_tokens
        tokens[:, end] = self.QUERY
        tokens[:, end + 1 :] = needle
        needle_pos = 1 + depth[:, None] + 1 + torch.arange(k)
        answer_pos = (end + 1 + torch.arange(k)).expand(batch, -1).clone()
        on = torch.zeros_like(tokens, dtype=torch.bool)
        on[:, end + 1 :] = True
        extras = {"needle_pos": needle_pos, "answer_pos": answer_pos}
        return next_token_batch(tokens, on, on.clone(), extras)


@dataclass
class BigramBackcopyTask(Task):
    """Bigram-Backcopy (Guo et al. 2024, arXiv 2410.13835, "Active-Dormant Attention Heads").

    Our reading of the task: position 0 is a fixed ``BOS``; every later token
    follows a fixed bigram Markov chain over ``[1, d_vocab)``, except after one
    of ``n_triggers`` *trigger* tokens, where the next token copies the token
    just before the trigger ("back-copy"). The first token after ``BOS`` is a
    uniformly drawn non-trigger token, which (by induction on the sequence)
    means two triggers never follow each other and ``BOS`` is never copied.
    The chain's rows are Dirichlet(``concentration``) draws, fixed by
    ``chain_seed`` (part of the task, not of the sample); triggers are ids
    ``1..n_triggers``. The loss trains on every prediction after ``BOS``; the
    accuracy scores the back-copy predictions, which are deterministic.
    ``extras["bigram_probs"]`` (``[batch, pos, d_vocab]``) is the chain's
    next-token distribution at each position (one-hot at back-copies), so the
    optimal loss is computable.
    """

    d_vocab: int = 64
    seq_len: int = 64
    n_triggers: int = 3
    concentration: float = 0.2
    chain_seed: int = 0
    name: str = "bigram-backcopy"

    def __post_init__(self) -> None:
        _check_positive(d_vocab=self.d_vocab, seq_len=self.seq_len, n_triggers=self.n_triggers)
        if self.n_triggers > self.d_vocab - 3:
            raise ValueError(
                f"n_triggers={self.n_triggers} leaves too few non-trigger tokens in d_vocab={self.d_vocab}"
            )
        g = torch.Generator().manual_seed(self.chain_seed)
        n = self.d_vocab - 1
        probs = torch.zeros(self.d_vocab, self.d_vocab)
        probs[1:, 1:] = dirichlet_rows(n, n, self.concentration, g)
        self.transition: Float[Tensor, "vocab vocab"] = probs
        self.triggers: Int[Tensor, " n_triggers"] = torch.arange(1, self.n_triggers + 1)

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        self._check_batch(batch)
        is_trigger = torch.zeros(self.d_vocab, dtype=torch.bool)
        is_trigger[self.triggers] = True
        tokens = torch.zeros(batch, self.seq_len, dtype=torch.long)
        n_plain = self.d_vocab - 1 - self.n_triggers
        tokens[:, 1] = 1 + self.n_triggers + torch.randint(n_plain, (batch,), generator=generator)
        for t in range(2, self.seq_len):
            drawn = torch.multinomial(self.transition[tokens[:, t - 1]], 1, generator=generator)[:, 0]
            tokens[:, t] = torch.where(is_trigger[tokens[:, t - 1]], tokens[:, t - 2], drawn)
        after_trigger = torch.zeros_like(tokens, dtype=torch.bool)
        after_trigger[:, 2:] = is_trigger[tokens[:, 1:-1]]
        train_on = torch.ones_like(after_trigger)
        train_on[:, 0] = False
        probs = self.transition[tokens]
        copied = F.one_hot(tokens[:, :-1], self.d_vocab).float()
        probs[:, 1:] = torch.where(is_trigger[tokens[:, 1:]][..., None], copied, probs[:, 1:])
        probs[:, 0] = 0.0
        probs[:, 0, 1 + self.n_triggers :] = 1.0 / n_plain
        return next_token_batch(tokens, train_on, after_trigger, {"bigram_probs": probs})


@dataclass
class HMMTask(Task):
    """Emissions of a small hidden Markov model (2-4 states).

    The HMM is fixed by ``hmm_seed``: a sticky transition matrix (each state
    stays with probability ``stay``, else moves uniformly) and emission rows
    ``peak * onehot(s) + (1 - peak) * Dirichlet(concentration)`` over
    ``d_vocab >= n_states`` symbols, so that state ``s`` favours symbol ``s``
    and the best guess depends on the inferred state; the initial state is
    uniform. Tokens are emissions only. The loss trains on
    every next-emission prediction.

    Emissions are random, so the accuracy is measured against the
    Bayes-optimal predictor ``p*(x_{t+1} | x_{<=t})`` (forward filtering,
    returned in ``extras["bayes_probs"]``): the *Bayes-relative accuracy* is
    ``mean_t p*(argmax model_t) / max p*_t``, the expected top-1 accuracy of
    the model's guesses divided by that of the Bayes-optimal guesses. It is 1
    exactly when the model's argmax is a Bayes-optimal one.
    """

    n_states: int = 3
    d_vocab: int = 4
    seq_len: int = 64
    stay: float = 0.9
    peak: float = 0.5
    concentration: float = 1.0
    hmm_seed: int = 0
    name: str = "hmm"

    def __post_init__(self) -> None:
        if self.n_states not in (2, 3, 4):
            raise ValueError(f"n_states must be 2, 3 or 4, got {self.n_states!r}")
        _check_positive(d_vocab=self.d_vocab, seq_len=self.seq_len)
        if self.d_vocab < self.n_states:
            raise ValueError(f"d_vocab must be >= n_states={self.n_states}, got {self.d_vocab}")
        for name in ("stay", "peak"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        g = torch.Generator().manual_seed(self.hmm_seed)
        s = self.n_states
        move = (1.0 - self.stay) / (s - 1)
        self.transition: Float[Tensor, "state state"] = torch.full((s, s), move) + (self.stay - move) * torch.eye(s)
        favoured = F.one_hot(torch.arange(s), self.d_vocab).float()
        spread = dirichlet_rows(s, self.d_vocab, self.concentration, g)
        self.emission: Float[Tensor, "state vocab"] = self.peak * favoured + (1 - self.peak) * spread
        self.initial: Float[Tensor, " state"] = torch.full((s,), 1.0 / s)

    def sample(self, batch: int, generator: torch.Generator) -> TaskBatch:
        self._check_batch(batch)
        state = torch.multinomial(self.initial.expand(batch, -1), 1, generator=generator)[:, 0]
        tokens = torch.empty(batch, self.seq_len, dtype=torch.long)
        for t in range(self.seq_len):
            tokens[:, t] = torch.multinomial(self.emission[state], 1, generator=generator)[:, 0]
            state = torch.multinomial(self.transition[state], 1, generator=generator)[:, 0]
        on = torch.ones_like(tokens, dtype=torch.bool)
        on[:, 0] = False
        return next_token_batch(tokens, on, on.clone(), {"bayes_probs": self.bayes_predictive(tokens)})

    def bayes_predictive(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        """``p*(x_{t+1} | x_{<=t})`` at every position by forward filtering."""
        belief = self.initial.expand(tokens.shape[0], -1)
        out = []
        for t in range(tokens.shape[1]):
            belief = belief * self.emission[:, tokens[:, t]].T  # condition on x_t
            belief = belief / belief.sum(-1, keepdim=True)
            belief = belief @ self.transition  # state at t + 1
            out.append(belief @ self.emission)
        return torch.stack(out, dim=1)

    def accuracy(self, logits: Float[Tensor, "batch pos vocab"], batch: TaskBatch) -> float:
        """Bayes-relative accuracy over the scored positions (see the class docstring)."""
        bayes = batch.extras["bayes_probs"]
        got = bayes.gather(-1, logits.argmax(-1, keepdim=True))[..., 0]
        ratio = got / bayes.max(-1).values
        return ratio[batch.score_mask].mean().item()


TASKS: dict[str, type[Task]] = {
    "induction": InductionTask,
    "assoc-recall": AssocRecallTask,
    "needle": NeedleTask,
    "bigram-backcopy": BigramBackcopyTask,
    "hmm": HMMTask,
}


def make_task(name: str, **kwargs) -> Task:
    """The task called ``name`` (a key of :data:`TASKS`) built with ``kwargs``."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
