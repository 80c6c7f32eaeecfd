"""Head ablation and masking: against hand-computed outputs and the known heads of attn2l-induction."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from dynalens.circuits import HeadAblation, HeadAblationResult, HeadScores, head_hooks, logit_metric
from dynalens.models import names
from dynalens.probes.analysis import AnalysisError
from dynalens.probes.results import Result
from tests.tolerances import assert_close


def ablate_heads(model, heads, task, **options):
    return HeadAblation(heads, task, **options)(model)


def _all_heads(model):
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


@pytest.fixture(scope="module")
def circuit(attn2l, induction_task):
    """attn2l-induction's previous-token head (layer 0) and top induction head (layer 1), from their scores."""
    scores = HeadScores()(attn2l, induction_task.sample(16, torch.Generator().manual_seed(3)).tokens)
    previous = (0, int(scores.prev_token[0].argmax()))
    top = tuple(int(x) for x in scores.top(1).loc[0, ["layer", "head"]])
    assert top[0] == 1 and scores.prev_token[previous] > 0.5  # two-layer composition, as test_heads checks
    return previous, top


def _z(model, tokens, hooks=(), layer=0):
    name = names.attn(layer, "z")
    seen = {}
    with model.hooks(fwd_hooks=list(hooks) + [(name, lambda z, hook: seen.setdefault("z", z.clone()))]):
        model(tokens)
    return seen["z"]


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_hooks_replace_only_the_chosen_heads(attn2l, induction_task, method):
    batch = induction_task.sample(4, torch.Generator().manual_seed(0))
    reference = induction_task.sample(6, torch.Generator().manual_seed(1)).tokens
    clean = _z(attn2l, batch.tokens)
    head = attn2l.cfg.n_heads - 1
    ablated = _z(attn2l, batch.tokens, head_hooks(attn2l, [(0, head)], method, reference=reference))
    others = [h for h in range(attn2l.cfg.n_heads) if h != head]
    torch.testing.assert_close(ablated[:, :, others], clean[:, :, others])
    ref_z = _z(attn2l, reference)[:, :, head].flatten(0, 1)  # every (sequence, position) of the head
    if method == "zero":
        assert (ablated[:, :, head] == 0).all()
    elif method == "mean":
        torch.testing.assert_close(ablated[:, :, head], ref_z.mean(0).expand_as(ablated[:, :, head]))
    else:  # every replaced vector is one of the reference vectors
        dist = torch.cdist(ablated[:, :, head].flatten(0, 1), ref_z, compute_mode="donot_use_mm_for_euclid_dist")
        assert dist.min(-1).values.max() < 1e-5


def test_mask_makes_attention_uniform_over_visible_keys(attn2l, induction_task):
    tokens = induction_task.sample(2, torch.Generator().manual_seed(0)).tokens
    name = names.pattern(1)
    head = attn2l.cfg.n_heads - 1
    hooks = head_hooks(attn2l, [(1, head)], "mask")
    _, cache = attn2l.run_with_cache(tokens, names_filter=[name])
    clean = cache[name]
    seen = {}
    with attn2l.hooks(fwd_hooks=hooks + [(name, lambda p, hook: seen.setdefault("p", p.clone()))]):
        attn2l(tokens)
    pos = tokens.shape[1]
    expected = torch.ones(pos, pos).tril() / torch.arange(1, pos + 1)[:, None]
    torch.testing.assert_close(seen["p"][:, head], expected.expand(2, -1, -1))
    torch.testing.assert_close(seen["p"][:, :head], clean[:, :head])


def test_mask_last_queries_leaves_earlier_queries_alone(attn2l, induction_task):
    tokens = induction_task.sample(2, torch.Generator().manual_seed(0)).tokens
    name = names.pattern(0)
    _, cache = attn2l.run_with_cache(tokens, names_filter=[name])
    seen = {}
    hooks = head_hooks(attn2l, [(0, 1)], "mask", last_queries=3)
    with attn2l.hooks(fwd_hooks=hooks + [(name, lambda p, hook: seen.setdefault("p", p.clone()))]):
        attn2l(tokens)
    pos = tokens.shape[1]
    torch.testing.assert_close(seen["p"][:, :, : pos - 3], cache[name][:, :, : pos - 3])
    last = torch.ones(3, pos).tril(pos - 3) / torch.arange(pos - 2, pos + 1)[:, None]
    torch.testing.assert_close(seen["p"][:, 1, pos - 3 :], last.expand(2, -1, -1))
    with pytest.raises(ValueError, match="last_queries must be a positive integer"):
        head_hooks(attn2l, [(0, 1)], "zero", last_queries=3)


def test_ablating_the_previous_token_head_destroys_copying_random_heads_do_not(attn2l, induction_task, circuit):
    """attn2l-induction's previous-token head feeds every induction head: without it, no copying. The
    control draws outside the circuit (the top induction head is excluded)."""
    previous, top = circuit
    effect = ablate_heads(attn2l, [previous], induction_task, method="zero", trials=3, batch_size=16, exclude=[top])
    assert isinstance(effect, HeadAblationResult) and effect.scores.shape == (3, 3) and effect.prompts is None
    frame = effect.to_frame().set_index("condition")
    assert frame.loc["clean", "mean"] > 0.95
    assert frame.loc["ablated", "mean"] < 0.2
    assert frame.loc["control", "mean"] > 0.9
    assert all(tuple(c[0]) not in (previous, top) for c in effect.control_heads)
    assert frame.loc["effect", "ci_low"] > frame.loc["control_effect", "ci_high"]


def test_single_head_ablation(attn2l, induction_task, circuit):
    """The previous-token head and the top induction head are each necessary on their own; no head
    outside the two matters."""
    previous, top = circuit
    necessary = ablate_heads(attn2l, [previous], induction_task, trials=2, batch_size=16)
    assert necessary.scores[:, 1].max() < 0.2
    destroyed = ablate_heads(attn2l, [top], induction_task, trials=2, batch_size=16)
    assert destroyed.scores[:, 1].max() < 0.2
    for head in set(_all_heads(attn2l)) - {previous, top}:
        spare = ablate_heads(attn2l, [head], induction_task, trials=1, batch_size=16)
        assert spare.scores[0, 1] > 0.95, head


def test_ablate_heads_accepts_a_frame_and_checks_arguments(attn2l, induction_task):
    frame = pd.DataFrame({"layer": [1], "head": [1], "induction": [0.1]})
    effect = ablate_heads(attn2l, frame, induction_task, method="mask", trials=2, batch_size=8, exclude=[(1, 0)])
    assert effect.heads == [[1, 1]] and all(c[0] not in ([1, 1], [1, 0]) for c in effect.control_heads)
    assert effect.figure().data[0].y.shape == (3,)
    n_heads = attn2l.cfg.n_heads
    with pytest.raises(IndexError, match=f"heads 0 to {n_heads - 1}"):
        ablate_heads(attn2l, [(0, n_heads)], induction_task)
    with pytest.raises(ValueError, match="method must be one of"):
        ablate_heads(attn2l, [(0, 1)], induction_task, method="noise")
    with pytest.raises(ValueError, match="needs reference prompts"):
        head_hooks(attn2l, [(0, 1)], "mean")
    with pytest.raises(ValueError, match=f"control needs {len(_all_heads(attn2l))} heads"):
        ablate_heads(attn2l, _all_heads(attn2l), induction_task)


def test_ablation_result_round_trip_and_frame(attn2l, induction_task, circuit, tmp_path):
    previous, _ = circuit
    effect = HeadAblation(pd.DataFrame({"layer": [previous[0]], "head": [previous[1]]}), induction_task,
                          trials=2, batch_size=8)(attn2l)  # fmt: skip
    assert effect.params["heads"] == [list(previous)] and effect.params["method"] == "zero"
    effect.save(tmp_path / "ablation.safetensors")
    loaded = Result.load(tmp_path / "ablation.safetensors")
    assert isinstance(loaded, HeadAblationResult) and torch.equal(loaded.scores, effect.scores)
    assert loaded.control_heads == effect.control_heads and loaded.metric == "accuracy"
    assert loaded.to_frame().equals(effect.to_frame())


def test_metric_on_prompts(attn2l, induction_task, circuit):
    """With a metric, the experiment scores the prompts it runs on: the batch mean of the metric, and the
    prompts are the reference of mean ablation."""
    previous, top = circuit
    batch = induction_task.sample(6, torch.Generator().manual_seed(5))
    metric = logit_metric(batch.targets, batch.score_mask)
    effect = HeadAblation([top], metric=metric, method="mean", trials=2)(attn2l, batch.tokens)
    assert effect.prompts is not None and torch.equal(effect.prompts.tokens, batch.tokens)
    with torch.no_grad():
        clean = metric(attn2l(batch.tokens)).mean().item()
        hooks = head_hooks(attn2l, [top], "mean", reference=batch.tokens)
        ablated = metric(attn2l.run_with_hooks(batch.tokens, fwd_hooks=hooks)).mean().item()
    assert_close(effect.scores[:, 0], torch.full((2,), clean))
    assert_close(effect.scores[:, 1], torch.full((2,), ablated))
    assert ablated < clean - 1.0  # the induction head carries the copying the metric reads
    with pytest.raises(ValueError, match="pass prompts"):
        HeadAblation([top], metric=metric)(attn2l)
    with pytest.raises(ValueError, match="either task .* or metric"):
        HeadAblation([top], induction_task, metric=metric)(attn2l, batch.tokens)


def test_ablation_needs_attention_heads(tiny_mamba_model, tiny_rnn_model, induction_task):
    for model, arch in ((tiny_mamba_model, "mamba"), (tiny_rnn_model, "rnn")):
        with pytest.raises(AnalysisError, match=f"HeadAblation needs attention heads.*this model is a {arch}"):
            HeadAblation([(0, 0)], induction_task)(model)


def test_mask_spreads_attention_over_real_keys_only(attn2l, induction_task):
    """With a left-padded batch's key mask, masking ignores the pad keys of each row."""
    tokens = induction_task.sample(2, torch.Generator().manual_seed(0)).tokens
    key_mask = torch.ones_like(tokens, dtype=torch.bool)
    key_mask[1, :3] = False  # row 1: three pad keys
    seen = {}
    hooks = head_hooks(attn2l, [(1, 0)], "mask", key_mask=key_mask)
    with attn2l.hooks(fwd_hooks=hooks + [(names.pattern(1), lambda p, hook: seen.setdefault("p", p.clone()))]):
        attn2l(tokens)
    pos = tokens.shape[1]
    visible = torch.ones(pos, pos).tril()
    torch.testing.assert_close(seen["p"][0, 0], visible / visible.sum(-1, keepdim=True))
    padded = visible * key_mask[1].float()
    torch.testing.assert_close(seen["p"][1, 0, 3:], (padded / padded.sum(-1, keepdim=True))[3:])
    assert (seen["p"][1, 0, :, :3] == 0).all()


def test_metric_on_a_ragged_batch_is_the_mean_of_its_prompts(tiny_llama):
    """Zero, mean and mask ablation on left-padded prompts: with a per-prompt metric, the batch's score is the
    mean of each prompt's own (pads neither read nor averaged: mean ablation draws from real positions)."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(100, 1000, (n,), generator=gen).tolist() for n in (6, 3, 9)]
    metric = lambda logits: logits[:, -1].float().log_softmax(-1)[:, 42]
    heads = [(0, 0), (0, 1), (0, 2), (1, 2)]
    for method in ("zero", "mask"):
        together = HeadAblation(heads, metric=metric, method=method, trials=1)(tiny_llama, rows)
        alone = [HeadAblation(heads, metric=metric, method=method, trials=1)(tiny_llama, [row]) for row in rows]
        expected = torch.stack([a.scores[0, :2] for a in alone]).mean(0)
        assert_close(together.scores[0, :2], expected)
        assert (together.scores[0, 1] - together.scores[0, 0]).abs() > 1e-4  # the ablation changed the metric (random model: little)
    mean_of_real = head_hooks(tiny_llama, heads, "mean", reference=rows)
    by_hand = torch.cat([_z(tiny_llama, torch.tensor([row]), layer=1)[0, :, 2] for row in rows]).mean(0)
    z = _z(tiny_llama, torch.tensor([rows[0]]), mean_of_real, layer=1)
    assert_close(z[0, :, 2], by_hand.expand(6, -1))
