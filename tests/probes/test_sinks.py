"""Sinks, value drains, residual peaks, active/dormant heads: HF references and a hand-built model.

Batched == per-prompt, compute == call and save/load of every analysis here
are in ``test_protocol.py``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dynalens.models.prompts import Prompts
from dynalens.models.transformer import HookedTransformerBridge
from dynalens.probes.analysis import AnalysisError
from dynalens.probes.results import Result
from dynalens.probes.sinks import (
    ExtremeTokens,
    ExtremeTokensResult,
    HeadActivity,
    HeadActivityResult,
    SinkScores,
    pooled_sink_scores,
    sink_attention,
    sink_query_mask,
)
from tests.tolerances import assert_close

TRIGGER = 1


@pytest.fixture(scope="module")
def gated() -> HookedTransformerBridge:
    """A hand-built 1-layer GPT-2: head 0 is dormant unless the query is the trigger token; head 1 is uniform.

    Embeddings: token 1 (the trigger) is ``-e0 + e1``, every other token
    ``e0 - e1``; position 0 adds ``e2 - e3``. Head 0's query reads ``e0``
    and its key reads ``e2``, scaled so that softmax saturates: a non-trigger
    query puts all its attention on position 0, a trigger query none.
    Head 1 has zero query and key weights, so its causal attention is uniform
    and query ``q`` puts exactly ``1 / (q + 1)`` on position 0.
    """
    cfg = GPT2Config(vocab_size=10, n_positions=16, n_embd=8, n_layer=1, n_head=2, n_inner=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        tr.wte.weight[:, 0], tr.wte.weight[:, 1] = 1.0, -1.0
        tr.wte.weight[TRIGGER, 0], tr.wte.weight[TRIGGER, 1] = -1.0, 1.0
        tr.wpe.weight[0, 2], tr.wpe.weight[0, 3] = 1.0, -1.0
        for ln in (tr.h[0].ln_1, tr.h[0].ln_2, tr.ln_f):
            ln.weight.fill_(1.0)
        attn = tr.h[0].attn.c_attn.weight  # [d_model, 3 * d_model]: q | k | v
        attn[0, 0] = 4.0  # head 0 query <- e0
        attn[2, 8] = 4.0  # head 0 key <- e2
        attn[:, 16:] = torch.eye(8)  # values: identity
        model.lm_head.weight.normal_()
    return HookedTransformerBridge.from_hf(model, name="gated")


TOKENS = torch.tensor([[0, 3, TRIGGER, 4, 5, TRIGGER, 6, 7], [0, 8, 9, TRIGGER, 2, 3, TRIGGER, 4]])


def test_built_model_known_scores(gated):
    found = SinkScores()(gated, TOKENS)
    q = torch.arange(1, TOKENS.shape[1])
    uniform = (1.0 / (q + 1)).mean().item()  # head 1's attention on position 0, averaged over queries 1..7
    assert_close(found.mean[0, 1].item(), uniform)
    torch.testing.assert_close(found.scores[:, 0, 1], torch.full((2,), uniform))
    assert found.n_queries.tolist() == [7, 7]
    is_trigger = TOKENS == TRIGGER
    on_triggers = SinkScores(query_mask=is_trigger)(gated, TOKENS)
    assert on_triggers.mean[0, 0] < 0.01 and on_triggers.n_queries.tolist() == [2, 2]
    expected = (1.0 / (torch.nonzero(is_trigger)[:, 1] + 1)).mean()
    assert_close(on_triggers.mean[0, 1].item(), expected.item())
    assert SinkScores(query_mask=~is_trigger)(gated, TOKENS).mean[0, 0] > 0.99
    assert on_triggers.top(1)[["layer", "head"]].values.tolist() == [[0, 1]]


def test_sink_queries_and_scores_of_a_padded_batch():
    prompts = Prompts.from_ids([[5, 6, 7, 8], [9, 10]])  # the second row padded by two
    queries = sink_query_mask(prompts, None, 0)
    assert queries.tolist() == [[False, True, True, True], [False, False, False, True]]
    keep = torch.tensor([[True, True, False, True], [True, True, True, False]])
    assert sink_query_mask(prompts, keep, 0).tolist() == [[False, True, False, True], [False] * 4]
    # One head; query q of row 0 puts q / 10 on key 0; row 1's sink is column 2 and gets 0.5 from its query.
    pattern = torch.zeros(2, 1, 4, 4)
    pattern[0, 0, :, 0] = torch.arange(4) / 10
    pattern[1, 0, 3, 2] = 0.5
    scores, n = sink_attention([pattern], queries, prompts.offsets)
    assert n.tolist() == [3, 1]
    torch.testing.assert_close(scores[:, 0, 0], torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(pooled_sink_scores(scores, n), torch.tensor([[(3 * 0.2 + 0.5) / 4]]))
    with pytest.raises(ValueError, match="sink_position 1 leaves no later query in prompt 1 of 2 tokens"):
        sink_query_mask(prompts, None, 1)


def test_head_activity_finds_the_switching_head(gated):
    is_trigger = TOKENS == TRIGGER
    activity = HeadActivity({"trigger": is_trigger, "plain": ~is_trigger})(gated, TOKENS)
    assert activity.domains == ["trigger", "plain"]
    assert activity.dormant[:, 0, 0].tolist() == [False, True]  # active on triggers, dormant elsewhere
    assert not activity.dormant[:, 0, 1].any()  # the uniform head is never a sink
    switching = activity.switching()
    assert switching[["layer", "head"]].values.tolist() == [[0, 0]]
    assert switching.loc[0, "dormant_on"] == ["plain"] and switching.loc[0, "active_on"] == ["trigger"]
    assert activity.metrics() == {"n_switching": 1.0, "n_dormant": 1.0}
    assert activity.top(1)[["layer", "head"]].values.tolist() == [[0, 0]]
    frame = activity.to_frame()
    assert len(frame) == 2 * 2 * 2  # domains × prompts × heads
    head0 = frame.query("head == 0")
    assert head0["state"].tolist() == ["active", "active", "dormant", "dormant"]
    assert activity.n_queries.tolist() == [[2, 2], [5, 5]]


def test_a_domain_a_prompt_lacks_has_no_score_there(gated):
    only_first = torch.zeros_like(TOKENS, dtype=torch.bool)
    only_first[0] = True
    activity = HeadActivity({"first": only_first})(gated, TOKENS)
    assert activity.n_queries.tolist() == [[7, 0]] and activity.sink_scores[0, 1].isnan().all()
    torch.testing.assert_close(activity.mean_sink_scores[0], activity.sink_scores[0, 0])
    assert activity.to_frame().query("prompt == 1")["state"].eq("none").all()


def test_extreme_tokens_on_the_built_model(gated):
    is_plain = TOKENS != TRIGGER
    found = ExtremeTokens(query_mask=is_plain)(gated, TOKENS)
    assert found.sink_heads() == [(0, 0)] and found.metrics()["n_sink_heads"] == 1.0
    assert len(found.prompts) == 2 and found.str_tokens(1) == [str(t) for t in TOKENS[1].tolist()]
    # Identity values of the layer-normed stream: head 0 sees dims 0-3, which hold all of it (norm sqrt(8)).
    layernorm_eps = 100  # LayerNorm's eps shortens the normed vector below sqrt(8) by about eps / (2 var)
    assert_close(found.value_norms[:, :, 0, 0], torch.full((2, 8), 8**0.5), scale=layernorm_eps)
    torch.testing.assert_close(found.value_norms[:, :, 0, 1], torch.zeros(2, 8))


def test_scores_and_norms_match_huggingface(tiny_llama, tiny_llama_hf):
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    found = ExtremeTokens()(tiny_llama, tokens)
    with torch.no_grad():
        out = tiny_llama_hf(tokens, output_attentions=True, output_hidden_states=True)
    for layer, attn in enumerate(out.attentions):
        assert_close(found.mean_sink_scores[layer], attn[:, :, 1:, 0].mean((0, 2)))
        assert_close(found.sink_scores[:, layer], attn[:, :, 1:, 0].mean(2))
        block = tiny_llama_hf.model.layers[layer]
        with torch.no_grad():
            v = block.self_attn.v_proj(block.input_layernorm(out.hidden_states[layer]))
        v = v.unflatten(-1, (-1, block.self_attn.head_dim))  # [batch, pos, kv_head, d_head]
        assert_close(found.value_norms[:, :, layer], v.norm(dim=-1))
    for row in range(tiny_llama.cfg.n_layers):  # HF's last hidden state is after the final norm
        expected = out.hidden_states[row].norm(dim=-1)
        assert_close(found.resid_norms[:, :, row], expected)
    assert found.value_drain().shape == (2, 2) and found.resid_peak().shape == (3,)
    norms = found.resid_norms[1, :, 0]
    torch.testing.assert_close(found.resid_peak(prompt=1)[0], norms[0] / norms[1:].mean())
    torch.testing.assert_close(found.resid_peak(), (found.resid_peak(0) + found.resid_peak(1)) / 2)


def test_errors_name_what_is_accepted(gated, tiny_mamba, tokens):
    with pytest.raises(AnalysisError, match="needs attention patterns: .* this model is a mamba"):
        SinkScores()(tiny_mamba, tokens)
    with pytest.raises(ValueError, match="sink_position"):
        SinkScores(sink_position=7)(gated, TOKENS)
    with pytest.raises(ValueError, match="query_mask must be booleans of the tokens' shape"):
        SinkScores(query_mask=torch.ones(1, 8, dtype=torch.bool))(gated, TOKENS)
    with pytest.raises(ValueError, match="selects no query"):
        SinkScores(query_mask=torch.zeros_like(TOKENS, dtype=torch.bool))(gated, TOKENS)
    with pytest.raises(ValueError, match="threshold"):
        HeadActivity({"a": TOKENS > 0}, threshold=2.0)(gated, TOKENS)
    with pytest.raises(ValueError, match="domains must map names"):
        HeadActivity({})(gated, TOKENS)


def test_results_save_load_and_draw(gated, tmp_path):
    found = ExtremeTokens()(gated, TOKENS)
    found.save(tmp_path / "e.safetensors")
    back = Result.load(tmp_path / "e.safetensors")
    assert isinstance(back, ExtremeTokensResult) and back.top(2).equals(found.top(2))
    for kind in ("sinks", "values", "resid"):
        assert len(found.figure(kind=kind).data) == 1
    assert found.figure(kind="values", prompt=1).data[0].z.shape == (2, 8)
    activity = HeadActivity()(gated, TOKENS)
    activity.save(tmp_path / "h.safetensors")
    assert HeadActivityResult.load(tmp_path / "h.safetensors").to_frame().equals(activity.to_frame())
    assert activity.figure().data[0].z.shape == (2, 1)


@pytest.mark.slow
def test_bigram_backcopy_head_becomes_dormant_off_triggers(tmp_path):
    """Guo et al.'s picture on a 1-layer, 1-head Llama trained on Bigram-Backcopy (~3 CPU minutes).

    The head copies on trigger queries (active) and sinks into BOS elsewhere
    (dormant), BOS's value state drains, and the sink grows over training.
    """
    import dynalens as dl
    from dynalens.models.tasks import BigramBackcopyTask
    from dynalens.models.train import build_model, train
    from dynalens.probes.emergence import Checkpoints

    task = BigramBackcopyTask(d_vocab=32, seq_len=32)
    trained = build_model("attn-3l", task, seed=0, d_model=32, n_layers=1, n_heads=1, d_mlp=64)
    train(trained, task, 12000, lr=3e-3, batch_size=32, warmup=100, out=tmp_path, n_checkpoints=8, progress=False)
    model = dl.load(tmp_path)
    tokens = task.sample(64, torch.Generator().manual_seed(123)).tokens
    is_trigger = torch.isin(tokens, task.triggers)
    activity = HeadActivity({"trigger": is_trigger, "other": ~is_trigger})
    found = activity(model, tokens)
    assert found.mean_sink_scores[0, 0, 0] < 0.1 and found.mean_sink_scores[1, 0, 0] > 0.5
    assert found.switching()[["layer", "head"]].values.tolist() == [[0, 0]]
    assert ExtremeTokens()(model, tokens).value_drain()[0, 0] < 0.2
    series = Checkpoints(tmp_path, [activity])(model, tokens)
    scores = [r.mean_sink_scores[1, 0, 0].item() for r in series.results["head_activity"]]
    assert scores[0] < 0.15 < 0.5 < scores[-1]
