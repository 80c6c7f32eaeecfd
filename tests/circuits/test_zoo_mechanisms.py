"""The mechanisms the zoo's transformers are known to learn, found with the circuits and probes tools.

- ``attn2l-induction`` (issue 8): the top induction score is a layer-1 head; ablating it alone
  (zero or mean) destroys in-context copying, while ablating a head outside the induction
  circuit does not.
- ``attn3l-bbc`` (issue 11): sink heads on ordinary bigram positions, a head that is dormant
  (a sink) on non-trigger queries and active on trigger queries, where it attends to the
  back-copy source (the Active-Dormant paper's split), and the emergence fit over its
  checkpoint series.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynalens as dl
from dynalens.models import names
from dynalens.models.zoo import get_entry

SEED = 2024  # neither the training seed (0) nor the trainer's held-out seed


@pytest.fixture(scope="module")
def induction_batch(induction_task):
    return induction_task.sample(64, torch.Generator().manual_seed(SEED))


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_induction_circuit_top_head_and_single_head_ablations(attn2l, induction_task, induction_batch, method):
    """The top induction score is the head whose ablation destroys copying; heads outside the circuit do nothing.

    Measured (3 trials of 64 sequences, zero / mean ablation): clean 1.0; ablating the top
    induction head L1H1 drops second-repeat accuracy to 0.018 / 0.016 (chance: about 1 in the
    ~35 tokens not yet seen), ablating the previous-token head L0H1 feeding it to 0.038 / 0.041,
    and either other head leaves 1.000: the recipe's group lasso pruned them to zero weights.
    """
    scores = dl.circuits.HeadScores()(attn2l, induction_batch.tokens)
    layer, head = (int(v) for v in scores.top(1).loc[0, ["layer", "head"]])
    prev = int(scores.prev_token[0].argmax())
    print(f"\ninduction scores:\n{scores.induction}\nprevious-token scores:\n{scores.prev_token}")
    assert (layer, head) == (1, 1) and scores.induction[1, 1] > 0.7
    assert scores.induction[0].max() < 0.1 and scores.induction[1, 0] < 0.1
    assert prev == 1 and scores.prev_token[0, 1] > 0.5
    accuracy = {}
    for candidate in [(L, H) for L in range(2) for H in range(2)]:
        ablation = dl.circuits.HeadAblation(
            [candidate], induction_task, method=method, trials=2, batch_size=64
        )(attn2l)
        assert ablation.scores[:, 0].min() > 0.95  # clean
        accuracy[candidate] = ablation.scores[:, 1].mean().item()
    print(f"second-repeat accuracy with one head {method}-ablated: {accuracy}")
    assert accuracy[(layer, head)] <= 0.1  # the top induction head: copying destroyed
    assert accuracy[(0, prev)] <= 0.1  # the previous-token head it reads: destroyed too
    assert accuracy[(1, 0)] >= 0.95 and accuracy[(0, 0)] >= 0.95  # heads outside the circuit: no effect


@pytest.fixture(scope="module")
def bbc():
    return dl.load("attn3l-bbc")


@pytest.fixture(scope="module")
def bbc_domains():
    """Held-out Bigram-Backcopy tokens, split into trigger and non-trigger queries."""
    task = get_entry("attn3l-bbc").make_task()
    tokens = task.sample(64, torch.Generator().manual_seed(SEED)).tokens
    trigger = torch.isin(tokens, task.triggers)
    return tokens, trigger


def test_bbc_has_sink_heads_and_an_active_dormant_head(bbc, bbc_domains):
    tokens, trigger = bbc_domains
    activity = dl.probes.HeadActivity({"non-trigger": ~trigger, "trigger": trigger})(bbc, tokens)
    print(f"\n{activity.to_frame()}")
    plain = activity.mean_sink_scores[0]
    assert (plain > 0.5).sum() >= 2  # several sink heads on ordinary bigram positions
    switching = activity.switching()
    row = switching[switching["dormant_on"].apply(lambda d: d == ["non-trigger"])].iloc[0]
    layer, head = int(row["layer"]), int(row["head"])
    assert row["sink_score[non-trigger]"] > 0.5 and row["sink_score[trigger]"] < 0.2
    # Active on a trigger, it attends to the token before the trigger: the one to copy.
    name = names.pattern(layer)
    _, cache = bbc.run_with_cache(tokens, names_filter=[name])
    batch_idx, query = trigger.nonzero(as_tuple=True)
    on_source = cache[name][batch_idx, head, query, query - 1].mean().item()
    print(f"L{layer}H{head}: attention from triggers to the back-copy source {on_source:.3f}")
    assert on_source > 0.7


def test_bbc_checkpoints_show_the_emergence_fit(bbc, bbc_domains):
    """Massive activation (residual-state peak) and sink score over the 16 checkpoints, both fitted.

    One forward per checkpoint measures the massive ratio after layer 0 (what
    ``MassiveEmergence`` tracks) and the mean sink score of the layer-0 heads on non-trigger
    queries. Measured: the ratio grows from ~6 to ~280 (R² 0.9997), the sink score from 0.10
    to ~0.8 (R² 0.987).
    """
    tokens, trigger = bbc_domains
    analyses = [dl.probes.MassiveActivations(k=1), dl.probes.SinkScores(query_mask=~trigger)]
    series = dl.probes.Checkpoints("attn3l-bbc", analyses)(bbc, tokens)
    steps = series.steps
    ratios = [r.ratio[1].item() for r in series.results["massive_activations"]]  # blocks.0.hook_resid_post
    sinks = [r.mean[0].mean().item() for r in series.results["sink_scores"]]
    for name, values in (("massive ratio after layer 0", ratios), ("layer-0 sink score", sinks)):
        fit = dl.probes.EmergenceFit().fit(steps, values)
        print(f"\n{name} per checkpoint: {np.round(values, 2)}; emergence fit R^2 = {fit.r2_:.4f}")
        assert fit.r2_ > 0.95
    assert ratios[-1] > 20 * ratios[0]  # a massive activation emerged
    assert sinks[0] < 0.15 and sinks[-1] > 0.6  # and the sinks with it
