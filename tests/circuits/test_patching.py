"""Activation patching against hand-patched runs, attribution patching against activation patching."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from dynalens.circuits import (
    Patching,
    attribution_graph,
    graph_from_json,
    graph_to_json,
    head_effects,
    logit_metric,
    patch_heads,
    patch_residual,
)
from scipy.stats import spearmanr


@pytest.fixture(scope="module")
def pair(induction_task):
    """Clean induction sequences, and the same with the first repeat replaced (nothing to copy)."""
    clean = induction_task.sample(8, torch.Generator().manual_seed(0))
    corrupt = clean.tokens.clone()
    corrupt[:, 1:17] = induction_task.sample(8, torch.Generator().manual_seed(1)).tokens[:, 1:17]
    return clean.tokens, corrupt, logit_metric(clean.targets, clean.score_mask)


def test_patch_heads_matches_a_hand_patched_run(attn2l, pair):
    clean, corrupt, metric = pair
    result = patch_heads(attn2l, clean, corrupt, metric)
    assert isinstance(result, Patching) and result.effects.shape == (2, 4)
    _, cache = attn2l.run_with_cache(clean, names_filter=["blocks.0.attn.hook_z"])

    def patch(z, hook):
        z = z.clone()
        z[:, :, 2] = cache["blocks.0.attn.hook_z"][:, :, 2]
        return z

    with torch.no_grad():
        value = metric(attn2l.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.attn.hook_z", patch)])).item()
    expected = (value - result.corrupt_metric) / (result.clean_metric - result.corrupt_metric)
    assert result.effects[0, 2].item() == pytest.approx(expected, abs=1e-5)
    assert result.clean_metric > result.corrupt_metric + 5


def test_patch_residual_known_answers(attn2l, pair):
    clean, corrupt, _ = pair
    metric = lambda logits: logits[:, 5].log_softmax(-1)[:, 0].mean()
    result = patch_residual(attn2l, clean[:2, :12], corrupt[:2, :12], metric)
    assert result.effects.shape == (2, 12)
    # Later positions cannot change position 5 (causal), nor can the shared BOS at layer 0.
    torch.testing.assert_close(result.effects[:, 6:], torch.zeros(2, 6), atol=1e-6, rtol=0)
    assert result.effects[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    _, cache = attn2l.run_with_cache(clean[:2, :12], names_filter=["blocks.1.hook_resid_pre"])

    def patch(resid, hook):
        resid = resid.clone()
        resid[:, 5] = cache["blocks.1.hook_resid_pre"][:, 5]
        return resid

    with torch.no_grad():
        value = metric(attn2l.run_with_hooks(corrupt[:2, :12], fwd_hooks=[("blocks.1.hook_resid_pre", patch)])).item()
    expected = (value - result.corrupt_metric) / (result.clean_metric - result.corrupt_metric)
    assert result.effects[1, 5].item() == pytest.approx(expected, abs=1e-5)
    assert result.top(1)["position"].item() <= 5


def test_attribution_agrees_with_activation_patching(attn2l, pair):
    clean, corrupt, metric = pair
    graph = attribution_graph(attn2l, clean, corrupt, metric)
    activation = patch_heads(attn2l, clean, corrupt, metric).effects
    span = graph.graph["clean_metric"] - graph.graph["corrupt_metric"]
    attribution = head_effects(graph, 2, 4) / span
    rho = spearmanr(attribution.flatten(), activation.flatten()).statistic
    print(f"attn2l-induction heads: Spearman rho(attribution, activation) = {rho:.3f}")
    assert rho > 0.5
    top3 = lambda t: set(t.flatten().topk(3).indices.tolist())
    assert top3(attribution) == top3(activation)


def test_attribution_graph_structure_pruning_and_json(tiny_llama, tmp_path):
    tokens = torch.randint(100, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    corrupt = tokens.clone()
    corrupt[:, 3] = 5
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 42].mean()
    graph = attribution_graph(tiny_llama, tokens, corrupt, metric)
    assert {"embed", "L0H0", "L1H3", "L0.mlp", "L1.mlp", "L1.attn_in", "L1.mlp_in", "logits"} <= set(graph)
    assert nx.is_directed_acyclic_graph(graph)
    assert not graph.has_edge("L1H0", "L0.attn_in") and graph.has_edge("L0H0", "L1.attn_in")
    # Edge weights into the logits sum to the linear estimate of the whole change (embedding + all writers).
    total = sum(w for _, _, w in graph.in_edges("logits", data="weight"))
    assert total == pytest.approx(graph.graph["clean_metric"] - graph.graph["corrupt_metric"], rel=0.5)
    pruned = attribution_graph(tiny_llama, tokens, corrupt, metric, threshold=0.3)
    assert 0 < pruned.number_of_edges() < graph.number_of_edges()
    cut = 0.3 * max(abs(w) for _, _, w in graph.edges(data="weight"))
    assert all(abs(w) > cut for _, _, w in pruned.edges(data="weight"))
    graph_to_json(pruned, tmp_path / "circuit.json")
    loaded = graph_from_json(tmp_path / "circuit.json")
    assert set(loaded.edges) == set(pruned.edges) and loaded.graph == pruned.graph


def test_patching_checks_inputs(attn2l, pair):
    clean, corrupt, metric = pair
    with pytest.raises(ValueError, match="same shape"):
        patch_heads(attn2l, clean, corrupt[:, :-1], metric)
    with pytest.raises(ValueError, match="nothing to patch"):
        patch_heads(attn2l, clean, clean, metric)
    with pytest.raises(ValueError, match="threshold must be a fraction"):
        attribution_graph(attn2l, clean, corrupt, metric, threshold=2.0)
