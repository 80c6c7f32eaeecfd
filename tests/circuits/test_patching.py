"""Activation patching against hand-patched runs, attribution patching against activation patching."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch
from dynalens.circuits import (
    Patching,
    attribution_graph,
    graph_from_json,
    graph_to_json,
    head_effects,
    induction_scores,
    logit_diff_metric,
    logit_metric,
    node_top_tokens,
    patch_edges,
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


def test_patch_heads_matches_a_hand_patched_run(attn2l, pair, induction_task):
    clean, corrupt, metric = pair
    result = patch_heads(attn2l, clean, corrupt, metric)
    assert isinstance(result, Patching) and result.effects.shape == (attn2l.cfg.n_layers, attn2l.cfg.n_heads)
    _, cache = attn2l.run_with_cache(clean, names_filter=["blocks.0.attn.hook_z"])
    head = attn2l.cfg.n_heads - 1

    def patch(z, hook):
        z = z.clone()
        z[:, :, head] = cache["blocks.0.attn.hook_z"][:, :, head]
        return z

    with torch.no_grad():
        value = metric(attn2l.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.attn.hook_z", patch)])).item()
    expected = (value - result.corrupt_metric) / (result.clean_metric - result.corrupt_metric)
    assert result.effects[0, head].item() == pytest.approx(expected, abs=1e-5)
    # Clean: the repeats are copied with near certainty; corrupt: nothing to copy, no better than chance.
    assert result.clean_metric > -0.5 and result.corrupt_metric < -math.log(induction_task.d_vocab) + 0.5


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


def _logit_metric(targets, mask):
    """Mean centred logit of the targets: nearly linear, unlike a saturated log-probability."""

    def metric(logits):
        logits = logits.float()
        return (logits.gather(-1, targets[..., None])[..., 0] - logits.mean(-1))[mask].mean()

    return metric


def test_edge_attribution_agrees_with_edge_patching(attn2l, pair, induction_task):
    clean, corrupt, _ = pair
    sample = induction_task.sample(8, torch.Generator().manual_seed(0))
    metric = _logit_metric(sample.targets, sample.score_mask)
    graph = attribution_graph(attn2l, clean, corrupt, metric)
    top = sorted(graph.edges(data="weight"), key=lambda e: -abs(e[2]))[:20]
    activation = patch_edges(attn2l, clean, corrupt, metric, [(u, v) for u, v, _ in top])
    rho = spearmanr([w for _, _, w in top], activation).statistic
    print(f"attn2l-induction, top {len(top)} edges: Spearman rho(attribution, edge patching) = {rho:.3f}")
    # Both methods single out the same edge: the top induction head's write to the logits.
    assert int(activation.abs().argmax()) == 0 and top[0][1] == "logits"
    # Into the logits the path is linear but for the final norm, and the two agree. Edges into the
    # heads of the retrained model go through saturated attention (the previous-token head's q/k
    # and the induction head's keys), where the gradient misjudges the patch: measured rho = 0.37
    # over the 6 edges that touch no pruned head, so no threshold is asserted there.
    direct = [i for i, (_, v, _) in enumerate(top) if v == "logits"]
    assert len(direct) == attn2l.cfg.n_layers * attn2l.cfg.n_heads + 1  # every head and the embedding
    rho = spearmanr([top[i][2] for i in direct], activation[direct]).statistic
    assert rho > 0.8
    # A last-layer head only writes to the logits: its edge there is patching the head itself.
    heads = patch_heads(attn2l, clean, corrupt, metric)
    span = heads.clean_metric - heads.corrupt_metric
    last = attn2l.cfg.n_layers - 1
    edges = [(f"L{last}H{h}", "logits") for h in range(attn2l.cfg.n_heads)]
    torch.testing.assert_close(patch_edges(attn2l, clean, corrupt, metric, edges) / span, heads.effects[last])


def test_node_effects_are_their_out_edges_and_heads_read_q_k_v(attn2l, pair):
    clean, corrupt, metric = pair
    graph = attribution_graph(attn2l, clean, corrupt, metric)
    assert {n for n, kind in graph.nodes(data="kind") if kind == "mlp"} == set()  # attention-only: no MLP writes
    n_kv = getattr(attn2l.cfg, "n_key_value_heads", None) or attn2l.cfg.n_heads
    for node, data in graph.nodes(data=True):
        # The residual stream is a sum: a node's gradient is its readers' (with one key/value input per head).
        if data["kind"] != "logits" and n_kv == attn2l.cfg.n_heads:
            out = sum(w for _, _, w in graph.out_edges(node, data="weight"))
            assert out == pytest.approx(data["effect"], rel=1e-3, abs=1e-4)
    effects = head_effects(graph, attn2l.cfg.n_layers, attn2l.cfg.n_heads)
    assert effects[1, 0].item() == pytest.approx(graph.nodes["L1H0"]["effect"])
    edge = graph.edges["embed", "L1H0"]
    assert edge["weight"] == pytest.approx(edge["q"] + edge["k"] + edge["v"], rel=1e-5)
    assert attn2l.cfg.use_split_qkv_input is False  # the split inputs are switched off again


def test_attribution_graph_structure_pruning_and_json(tiny_llama, tmp_path):
    tokens = torch.randint(100, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    corrupt = tokens.clone()
    corrupt[:, 3] = 5
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 42].mean()
    with torch.no_grad():
        before = tiny_llama(tokens)
    graph = attribution_graph(tiny_llama, tokens, corrupt, metric)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(tokens), before)
    heads = {f"L{layer}H{head}" for layer in range(2) for head in range(4)}
    assert set(graph) == heads | {"embed", "L0.mlp", "L1.mlp", "logits"}
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.has_edge("L0H0", "L1H2") and graph.has_edge("L0H0", "L0.mlp") and graph.has_edge("L0.mlp", "L1H0")
    assert not graph.has_edge("L0H0", "L0H1") and not graph.has_edge("L0.mlp", "L0H1")
    assert not graph.has_edge("L1H0", "L0.mlp")
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
    with pytest.raises(ValueError, match="not an edge"):
        patch_edges(attn2l, clean, corrupt, metric, [("L1H0", "L0H1")])


def test_node_top_tokens(attn2l, pair):
    clean, _, _ = pair
    logits = node_top_tokens(attn2l, clean, "logits", k=5)
    assert logits["token_id"].tolist() == attn2l(clean[:1])[0, -1].topk(5).indices.tolist()
    _, cache = attn2l.run_with_cache(clean[:1], names_filter=["blocks.1.attn.hook_z", "ln_final.hook_scale"])
    top = induction_scores(attn2l, clean).top(1).loc[0]  # the top induction head, in layer 1
    layer, index = int(top["layer"]), int(top["head"])
    assert layer == 1
    out = cache["blocks.1.attn.hook_z"][0, -1, index] @ attn2l.W_O[layer, index]
    # the final norm with the run's scale frozen (LayerNorm also centres), bias left out
    centred = out - out.mean() if attn2l.cfg.normalization_type.startswith("LN") else out
    normed = centred / cache["ln_final.hook_scale"][0, -1] * attn2l.ln_final.original_component.weight
    by_hand = (normed @ attn2l.W_U).topk(3)
    head = node_top_tokens(attn2l, clean, f"L{layer}H{index}", k=3)
    assert head["token_id"].tolist() == by_hand.indices.tolist()
    assert head["logit"].to_numpy() == pytest.approx(by_hand.values.detach().numpy(), rel=1e-5)
    assert head["token"].tolist() == [str(i) for i in by_hand.indices.tolist()]  # no tokenizer: ids
    with pytest.raises(ValueError, match="no node 'L9H0'"):
        node_top_tokens(attn2l, clean, "L9H0")


def test_logit_diff_metric_known_answer():
    logits = torch.zeros(2, 3, 5)
    logits[0, -1, 1], logits[1, -1, 1], logits[1, -1, 4] = 3.0, 1.0, 2.0
    assert logit_diff_metric(1, 4)(logits).item() == pytest.approx(((3 - 0) + (1 - 2)) / 2)
