"""The Explorer analyses (residual norms, logit lens) against references: the cache, the model's logits.

The mixer-matrix references that once lived here are in ``test_mixers.py``;
batched == per-prompt and save/load are in ``test_protocol.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import dynalens as dl
from dynalens.models import names
from dynalens.models.rnn import HookedRNN
from dynalens.models.transformer import HookedTransformerBridge
from dynalens.probes import LogitLens, ResidualNorms
from dynalens.probes.logit_lens import _top_k
from tests.tolerances import assert_close

D_VOCAB = 50  # the vocabulary of the conftest models


def decoded(model, ids: torch.Tensor) -> list[str]:
    """What the tokenizer makes of each id; the ids as strings for models without one."""
    if model.tokenizer is None:
        return [str(i) for i in ids.tolist()]
    return [model.tokenizer.decode([i]) for i in ids.tolist()]


# ------------------------------------------------------------ residual norms
def test_residual_norms_equal_norms_of_the_cached_stream(any_model, tokens):
    result = ResidualNorms()(any_model, tokens)
    _, cache = any_model.run_with_cache(tokens)
    n_layers = any_model.cfg.n_layers
    expected = [cache["blocks.0.hook_resid_pre"][0].norm(dim=-1)] + [
        cache[f"blocks.{layer}.hook_resid_post"][0].norm(dim=-1) for layer in range(n_layers)
    ]
    assert result.norms.shape == (1, tokens.shape[1], n_layers + 1)
    assert_close(result.norms[0].T, torch.stack(expected))
    assert result.architecture == any_model.cfg.architecture
    assert result.prompts.tokens.tolist() == tokens.tolist()
    assert result.str_tokens() == decoded(any_model, tokens[0])


def test_first_row_includes_positional_embeddings():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=D_VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = HookedTransformerBridge.from_hf(GPT2LMHeadModel(config).eval(), name="tiny-gpt2")
    tokens = torch.randint(0, D_VOCAB, (1, 5))
    _, cache = model.run_with_cache(tokens, names_filter=[names.EMBED, names.POS_EMBED])
    stream = cache[names.EMBED][0] + cache[names.POS_EMBED][0]
    torch.testing.assert_close(ResidualNorms()(model, tokens).norms[0, :, 0], stream.norm(dim=-1))


# --------------------------------------------------------------- logit lens
def test_logit_lens_last_layer_is_the_models_own_top_k(any_model, tokens):
    lens = LogitLens(k=4)(any_model, tokens)
    probs = any_model(tokens)[0].float().softmax(dim=-1)
    top = probs.topk(4, dim=-1)
    assert lens.top_ids.shape == (1, tokens.shape[1], any_model.cfg.n_layers + 1, 4)
    assert torch.equal(lens.top_ids[0, :, -1], top.indices)
    assert_close(lens.top_probs[0, :, -1], top.values)
    assert (lens.top_probs[..., :-1] >= lens.top_probs[..., 1:]).all()
    assert lens.top_tokens[0][0][-1] == decoded(any_model, top.indices[0])
    assert_close(lens.metrics()["top1_prob"], top.values[:, 0].mean().item())


def test_logit_lens_of_a_batch_is_each_rows_own_prediction(tiny_llama):
    prompts = ["The capital of France is", "One two three four five"]  # equal lengths in SmolLM2's tokenizer
    lens = LogitLens(k=2)(tiny_llama, prompts)
    assert not lens.prompts.is_padded
    logits = tiny_llama(lens.prompts.tokens).float()
    assert torch.equal(lens.top_ids[:, -1, -1], logits[:, -1].topk(2, dim=-1).indices)
    assert lens.prompts.texts == prompts and lens.top(1, prompt=1)["prompt"].unique().tolist() == [1]


def test_logit_lens_skips_an_embedding_narrower_than_the_stream():
    torch.manual_seed(0)
    model = HookedRNN.from_torch(nn.LSTM(5, 6, batch_first=True), d_vocab=D_VOCAB)
    tokens = torch.randint(0, D_VOCAB, (1, 4))
    lens = LogitLens(k=2)(model, tokens)
    assert lens.hook_names == ["blocks.0.hook_resid_post"]
    assert torch.equal(lens.top_ids[0, :, 0], model(tokens)[0].topk(2, dim=-1).indices)
    assert list(lens.figure().layout.yaxis.ticktext) == ["L0"]
    assert ResidualNorms()(model, tokens).norms.shape == (1, 4, 2)  # norms keep the narrower embedding row


@pytest.mark.parametrize("vocab, k", [(49152, 5), (50257, 5), (12000, 6), (300, 5)],
                         ids=["whole_blocks", "partial_block", "few_blocks", "topk_direct"])
def test_two_stage_top_k_equals_torch_topk(vocab, k):
    torch.manual_seed(vocab)
    x = torch.randn(9, vocab)
    x[0, -1] = 10.0  # the largest entry in the partial block (or the last block)
    x[1, :k] = torch.arange(20.0, 20.0 + k)  # all of a row's top-k in one block
    values, ids = _top_k(x, k)
    top = x.topk(k, dim=-1)
    assert torch.equal(ids, top.indices)
    assert_close(values, top.values)


def test_logit_lens_k_is_positive_and_at_most_the_vocabulary(tiny_rnn, tokens):
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        LogitLens(k=0)(tiny_rnn, tokens)
    lens = LogitLens(k=D_VOCAB + 10)(tiny_rnn, tokens)
    assert lens.top_ids.shape[-1] == D_VOCAB
    torch.testing.assert_close(lens.top_probs.sum(-1), torch.ones(lens.top_probs.shape[:-1]))


def test_smollm2_knows_the_capital_of_france(smollm2):
    prompt = "The capital of France is"
    run = dl.run(smollm2, prompt, [LogitLens(), ResidualNorms()])
    lens = run["logit_lens"]
    assert lens.str_tokens() == smollm2.to_str_tokens(prompt)
    assert lens.top_tokens[0][-1][-1][0] == " Paris"
    assert run["residual_norms"].norms.shape == (1, len(lens.str_tokens()), 31)


# ------------------------------------------------------------------- errors
def test_analyses_leave_weights_and_hooks_as_they_were(any_model, tokens):
    before = {k: v.clone() for k, v in any_model.state_dict().items()}
    dl.run(any_model, tokens, [ResidualNorms(), LogitLens()])
    after = any_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in any_model.hook_dict.values())
    assert all(p.grad is None for p in any_model.parameters())
