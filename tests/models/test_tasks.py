"""Synthetic tasks: shapes, masks, determinism, and the metrics on known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from dynalens.models.tasks import (
    BOS,
    TASKS,
    AssocRecallTask,
    BigramBackcopyTask,
    HMMTask,
    InductionTask,
    NeedleTask,
    make_task,
)
from tests.tolerances import assert_close

SMALL = {
    "induction": {"d_vocab": 20, "half_len": 6},
    "assoc-recall": {"n_keys": 8, "n_values": 8, "n_pairs": 4, "n_queries": 3},
    "needle": {"d_vocab": 16, "haystack_len": 12, "needle_len": 3},
    "bigram-backcopy": {"d_vocab": 16, "seq_len": 40, "n_triggers": 3},
    "hmm": {"n_states": 3, "d_vocab": 4, "seq_len": 30},
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one_hot_logits(tokens: torch.Tensor, d_vocab: int) -> torch.Tensor:
    return F.one_hot(tokens, d_vocab).float() * 50.0


@pytest.mark.parametrize("name", list(TASKS))
def test_shapes_masks_and_targets(name):
    task = make_task(name, **SMALL[name])
    b = task.sample(5, gen())
    assert b.tokens.shape == b.targets.shape == b.loss_mask.shape == (5, task.seq_len)
    assert b.tokens.dtype == torch.long and b.loss_mask.dtype == torch.bool
    assert 0 <= b.tokens.min() and b.tokens.max() < task.d_vocab
    # targets are the next tokens; the last position predicts nothing
    assert torch.equal(b.targets[:, :-1], b.tokens[:, 1:])
    assert not b.loss_mask[:, -1].any() and not b.score_mask[:, -1].any()
    assert b.score_mask.any(dim=1).all()  # every sequence is scored somewhere


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_batch_other_seed_other_batch(name):
    task = make_task(name, **SMALL[name])
    a, b, c = task.sample(4, gen(3)), task.sample(4, gen(3)), task.sample(4, gen(4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("name", ["induction", "assoc-recall", "needle", "bigram-backcopy"])
def test_accuracy_perfect_and_random(name):
    task = make_task(name, **SMALL[name])
    b = task.sample(64, gen())
    assert task.accuracy(one_hot_logits(b.targets, task.d_vocab), b) == 1.0
    random_acc = task.accuracy(torch.randn(64, task.seq_len, task.d_vocab, generator=gen(1)), b)
    assert random_acc < 0.3
    assert task.loss(one_hot_logits(b.targets, task.d_vocab), b).item() < 1e-6
    uniform = task.loss(torch.zeros(64, task.seq_len, task.d_vocab), b).item()
    assert_close(uniform, math.log(task.d_vocab))


def test_induction_second_half_repeats_distinct_first_half():
    task = InductionTask(d_vocab=20, half_len=6)
    b = task.sample(8, gen())
    half = b.tokens[:, 1:7]
    assert (b.tokens[:, 0] == BOS).all() and torch.equal(b.tokens[:, 7:], half)
    assert all(len(set(row.tolist())) == 6 for row in half) and (half > 0).all()
    # scored: predictions of the repeat's tokens 2..L, made at positions L+1..2L-1
    assert b.score_mask[0].nonzero().flatten().tolist() == list(range(7, 12))
    with pytest.raises(ValueError, match="d_vocab"):
        InductionTask(d_vocab=5, half_len=6)


def test_induction_with_min_len_repeats_a_segment_at_a_random_offset():
    task = InductionTask(d_vocab=40, half_len=8, min_len=3)
    b = task.sample(64, gen())
    assert b.tokens.shape == (64, task.seq_len) and (b.tokens[:, 0] == BOS).all()
    start, length = b.extras["repeat_start"], b.extras["repeat_len"]
    assert set(length.tolist()) == set(range(3, 9)) and len(set(start.tolist())) > 5
    for row, s, n, scored in zip(b.tokens, start.tolist(), length.tolist(), b.score_mask):
        assert len(set(row[1:].tolist())) == 16 - n and (row[1:] > 0).all()  # distinct but for the repeat
        assert torch.equal(row[s : s + n], row[s + n : s + 2 * n])
        # scored: the predictions of the repeat's tokens 2..n, made one position earlier
        assert scored.nonzero().flatten().tolist() == list(range(s + n, s + 2 * n - 1))
    fixed = InductionTask(d_vocab=40, half_len=8, min_len=8).sample(4, gen())
    assert torch.equal(fixed.tokens, InductionTask(d_vocab=40, half_len=8).sample(4, gen()).tokens)
    with pytest.raises(ValueError, match="min_len=9 must be <= half_len=8"):
        InductionTask(d_vocab=40, half_len=8, min_len=9)
    with pytest.raises(ValueError, match="need 13 distinct tokens"):
        InductionTask(d_vocab=12, half_len=8, min_len=3)


def test_assoc_recall_answers_are_the_bound_values():
    task = AssocRecallTask(n_keys=8, n_values=8, n_pairs=4, n_queries=3)
    b = task.sample(16, gen())
    for row, mask in zip(b.tokens.tolist(), b.score_mask):
        bound = dict(zip(row[0:8:2], row[1:8:2]))
        assert len(bound) == 4 and all(k < 8 <= v for k, v in bound.items())
        for pos in mask.nonzero().flatten().tolist():
            assert row[pos + 1] == bound[row[pos]]
    with pytest.raises(ValueError, match="n_queries"):
        AssocRecallTask(n_pairs=2, n_queries=3)


def test_needle_positions_point_at_the_needle_and_its_copy():
    task = NeedleTask(d_vocab=16, haystack_len=12, needle_len=3)
    b = task.sample(32, gen())
    needle, answer = b.extras["needle_pos"], b.extras["answer_pos"]
    assert torch.equal(b.tokens.gather(1, needle), b.tokens.gather(1, answer))
    assert (b.tokens.gather(1, needle[:, :1] - 1) == task.NEEDLE).all()
    assert (b.tokens.gather(1, answer[:, :1] - 1) == task.QUERY).all()
    assert len(set(needle[:, 0].tolist())) > 1  # the depth varies
    # markers appear exactly once; the content never uses special ids
    assert ((b.tokens == task.NEEDLE).sum(1) == 1).all() and ((b.tokens == task.QUERY).sum(1) == 1).all()
    assert torch.equal(b.score_mask.nonzero()[:, 1].view(32, 3), answer - 1)


def test_bigram_backcopy_follows_its_definition():
    task = BigramBackcopyTask(d_vocab=16, seq_len=200, n_triggers=3)
    b = task.sample(64, gen())
    tok = b.tokens
    trig = torch.isin(tok, task.triggers)
    assert (tok[:, 0] == BOS).all() and (tok[:, 1:] != BOS).all() and not trig[:, 1].any()
    # after a trigger, the token before it is copied; two triggers never touch
    copied = trig[:, 1:-1]
    assert torch.equal(tok[:, 2:][copied], tok[:, :-2][copied])
    assert not (trig[:, 1:] & trig[:, :-1]).any()
    assert torch.equal(b.score_mask[:, 1:-1], copied)
    # elsewhere the transitions follow the chain: empirical rows match the matrix
    plain = ~trig[:, 1:-1]
    prev, nxt = tok[:, 1:-1][plain], tok[:, 2:][plain]
    counts = torch.zeros(16, 16).index_put_((prev, nxt), torch.ones(len(prev)), accumulate=True)
    busiest = counts.sum(1).argmax()
    empirical = counts[busiest] / counts[busiest].sum()
    assert (empirical - task.transition[busiest]).abs().max() < 0.08
    # the shipped chain probabilities give the perfect back-copy score
    assert task.accuracy(b.extras["bigram_probs"].log(), b) == 1.0


def test_hmm_bayes_predictor_matches_brute_force_enumeration():
    task = HMMTask(n_states=2, d_vocab=3, seq_len=5, hmm_seed=1)
    tokens = task.sample(3, gen()).tokens
    bayes = task.bayes_predictive(tokens)
    T, E, pi = task.transition, task.emission, task.initial
    for b in range(3):
        for t in range(4):
            # p(x_{<=t}, x_{t+1} = v) by summing over every state path
            joint = torch.zeros(3)
            for path in torch.cartesian_prod(*[torch.arange(2)] * (t + 2)).tolist():
                p = pi[path[0]] * math.prod(T[path[i], path[i + 1]] for i in range(t + 1))
                p = p * math.prod(E[path[i], tokens[b, i]] for i in range(t + 1))
                joint += p * E[path[t + 1]]
            torch.testing.assert_close(bayes[b, t], joint / joint.sum())


def test_hmm_bayes_relative_accuracy():
    task = HMMTask(n_states=3, d_vocab=4, seq_len=40)
    b = task.sample(128, gen())
    bayes = b.extras["bayes_probs"]
    assert task.accuracy(bayes.log(), b) == 1.0
    unigram = task.emission.mean(0).log().expand(128, 40, 4)
    assert task.accuracy(unigram, b) < 0.8  # the best guess depends on the hidden state
    # a model that always guesses the Bayes-worst symbol scores min p*/max p*
    worst = -bayes
    expected = (bayes.min(-1).values / bayes.max(-1).values)[b.score_mask].mean().item()
    assert task.accuracy(worst, b) == pytest.approx(expected)
    with pytest.raises(ValueError, match="n_states"):
        HMMTask(n_states=5)


def test_unknown_task_and_bad_batch_are_clear_errors():
    with pytest.raises(KeyError, match="accepted: induction"):
        make_task("inductoin")
    with pytest.raises(ValueError, match="batch"):
        TASKS["induction"]().sample(0, gen())
