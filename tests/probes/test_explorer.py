"""The Explorer analyses against references: the cache, the model's logits, HF, torch.nn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from dynalens.models.rnn import HookedRNN
from dynalens.models.transformer import HookedTransformerBridge
from dynalens.probes import logit_lens, mixer_matrices, residual_norms

D_VOCAB = 50  # the vocabulary of the conftest models


def decoded(model, ids: torch.Tensor) -> list[str]:
    """What the tokenizer makes of each id; the ids as strings for models without one."""
    if model.tokenizer is None:
        return [str(i) for i in ids.tolist()]
    return [model.tokenizer.decode([i]) for i in ids.tolist()]


# ------------------------------------------------------------ residual norms
def test_residual_norms_equal_norms_of_the_cached_stream(any_model, tokens):
    result = residual_norms(any_model, tokens)
    _, cache = any_model.run_with_cache(tokens)
    n_layers = any_model.cfg.n_layers
    expected = [cache["blocks.0.hook_resid_pre"][0].norm(dim=-1)] + [
        cache[f"blocks.{layer}.hook_resid_post"][0].norm(dim=-1) for layer in range(n_layers)
    ]
    assert result.norms.shape == (n_layers + 1, tokens.shape[1])
    torch.testing.assert_close(result.norms, torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert result.architecture == any_model.cfg.architecture
    assert result.tokens.tolist() == tokens[0].tolist()
    assert result.str_tokens == decoded(any_model, tokens[0])


def test_first_row_includes_positional_embeddings():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=D_VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    model = HookedTransformerBridge.from_hf(GPT2LMHeadModel(config).eval(), name="tiny-gpt2")
    tokens = torch.randint(0, D_VOCAB, (1, 5))
    _, cache = model.run_with_cache(tokens, names_filter=["hook_embed", "hook_pos_embed"])
    stream = cache["hook_embed"][0] + cache["hook_pos_embed"][0]
    torch.testing.assert_close(residual_norms(model, tokens).norms[0], stream.norm(dim=-1))


# --------------------------------------------------------------- logit lens
def test_logit_lens_last_layer_is_the_models_own_top_k(any_model, tokens):
    lens = logit_lens(any_model, tokens, k=4)
    probs = any_model(tokens)[0].float().softmax(dim=-1)
    top = probs.topk(4, dim=-1)
    assert lens.top_ids.shape == (any_model.cfg.n_layers + 1, tokens.shape[1], 4)
    assert torch.equal(lens.top_ids[-1], top.indices)
    torch.testing.assert_close(lens.top_probs[-1], top.values, rtol=1e-5, atol=1e-6)
    assert (lens.top_probs[..., :-1] >= lens.top_probs[..., 1:]).all()
    assert lens.top_tokens[-1][0] == decoded(any_model, top.indices[0])


def test_logit_lens_skips_an_embedding_narrower_than_the_stream():
    torch.manual_seed(0)
    model = HookedRNN.from_torch(nn.LSTM(5, 6, batch_first=True), d_vocab=D_VOCAB)
    tokens = torch.randint(0, D_VOCAB, (1, 4))
    lens = logit_lens(model, tokens, k=2)
    assert lens.hook_names == ["blocks.0.hook_resid_post"]
    assert torch.equal(lens.top_ids[0], model(tokens)[0].topk(2, dim=-1).indices)
    assert list(lens.figure().layout.yaxis.ticktext) == ["L0"]


def test_logit_lens_k_is_positive_and_at_most_the_vocabulary(tiny_rnn, tokens):
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        logit_lens(tiny_rnn, tokens, k=0)
    lens = logit_lens(tiny_rnn, tokens, k=D_VOCAB + 10)
    assert lens.top_ids.shape[-1] == D_VOCAB
    torch.testing.assert_close(lens.top_probs.sum(-1), torch.ones(lens.top_probs.shape[:-1]))


def test_smollm2_knows_the_capital_of_france(smollm2):
    prompt = "The capital of France is"
    lens = logit_lens(smollm2, prompt)
    assert lens.str_tokens == smollm2.to_str_tokens(prompt)
    assert lens.top_tokens[-1][-1][0] == " Paris"
    assert residual_norms(smollm2, prompt).norms.shape == (31, len(lens.str_tokens))


# ------------------------------------------------------------ mixer matrices
def test_attention_matrices_are_hf_attention_probabilities(tiny_llama, tiny_llama_hf, tokens):
    result = mixer_matrices(tiny_llama, tokens, layer=1)
    with torch.no_grad():
        expected = tiny_llama_hf(tokens, output_attentions=True).attentions[1][0]
    assert result.group_labels == ["head 0", "head 1", "head 2", "head 3"]
    torch.testing.assert_close(result.matrices, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.matrices.sum(-1), torch.ones(4, tokens.shape[1]))
    assert torch.equal(result.matrices.triu(1), torch.zeros_like(result.matrices))


def test_ssm_matrix_times_u_is_the_layers_y_before_gating(tiny_mamba, tokens):
    layer, d_inner = 1, tiny_mamba.cfg.d_inner
    result = mixer_matrices(tiny_mamba, tokens, layer, channels=range(d_inner), include_skip=True)
    names = [f"blocks.{layer}.mixer.hook_conv", f"blocks.{layer}.mixer.hook_y"]
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter=names)
    u, y = cache[names[0]][0], cache[names[1]][0]  # [pos, d_inner]
    y_from_matrix = torch.einsum("dqk,kd->qd", result.matrices, u)
    torch.testing.assert_close(y_from_matrix, y, rtol=6e-4, atol=2e-5)
    assert result.signed and result.group_labels[3] == "channel 3"
    figure = result.figure(group=3, log=True)  # signed values: log10 of their magnitude
    z = np.array(figure.data[0].z, dtype=float)
    np.testing.assert_allclose(np.tril(10**z), result.matrices[3].abs().numpy(), rtol=1e-5)
    assert figure.data[0].colorbar.title.text == "|M|"


def test_ssm_matrix_leaves_the_skip_off_by_default(tiny_mamba, tokens):
    with_skip = mixer_matrices(tiny_mamba, tokens, 0, channels=[0, 5], include_skip=True).matrices
    without = mixer_matrices(tiny_mamba, tokens, 0, channels=[0, 5]).matrices
    D = tiny_mamba.blocks[0].mixer.D.detach()[[0, 5]]
    eye = torch.eye(tokens.shape[1])
    torch.testing.assert_close(with_skip - without, D[:, None, None] * eye, rtol=1e-5, atol=1e-6)


def test_ssm_channel_groups_are_mean_magnitudes_of_their_channels(tiny_mamba, tokens):
    every = mixer_matrices(tiny_mamba, tokens, 0, channels=range(tiny_mamba.cfg.d_inner)).matrices
    grouped = mixer_matrices(tiny_mamba, tokens, 0, channel_groups=4)
    expected = every.abs().reshape(4, -1, *every.shape[1:]).mean(1)
    torch.testing.assert_close(grouped.matrices, expected)
    assert grouped.group_labels[1] == "channels 8-15" and not grouped.signed


def test_ssm_bad_channel_arguments_say_what_is_accepted(tiny_mamba, tokens):
    with pytest.raises(ValueError, match="divide d_inner = 32"):
        mixer_matrices(tiny_mamba, tokens, 0, channel_groups=5)
    with pytest.raises(IndexError, match="valid channels are 0 to 31"):
        mixer_matrices(tiny_mamba, tokens, 0, channels=[40])


@pytest.mark.parametrize("cell", ["tanh", "gru", "lstm"])
def test_rnn_jacobian_norms_match_torch_nn_jacobian(cell):
    torch.manual_seed(0)
    d_in, d_hidden, pos = 5, 6, 6
    torch_cls = {"tanh": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell]
    rnn = torch_cls(d_in, d_hidden, num_layers=2, batch_first=True)
    model = HookedRNN.from_torch(rnn, nn.Embedding(D_VOCAB, d_in), nn.Linear(d_hidden, D_VOCAB))
    tokens = torch.randint(0, D_VOCAB, (1, pos))
    x = model.embed(tokens).detach()
    for layer in range(2):
        module = _single_layer(rnn, layer)
        # [1, pos, d_hidden, 1, pos, d_in]
        jac = torch.autograd.functional.jacobian(lambda v: module(v)[0], x)
        expected = jac[0, :, :, 0].pow(2).sum(dim=(1, 3)).sqrt()  # ‖∂h_t/∂x_s‖, [t, s]
        result = mixer_matrices(model, tokens, layer)
        torch.testing.assert_close(result.matrices[0], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(result.matrices[0].triu(1), torch.zeros(pos, pos))
        x = module(x)[0].detach()


def _single_layer(rnn: nn.RNNBase, layer: int) -> nn.RNNBase:
    """Layer ``layer`` of a stacked torch RNN as a one-layer module of the same class."""
    d_in = rnn.input_size if layer == 0 else rnn.hidden_size
    single = type(rnn)(d_in, rnn.hidden_size, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(single, f"{name}_l0").copy_(getattr(rnn, f"{name}_l{layer}"))
    return single


# ------------------------------------------------------------------- errors
def test_bad_layer_names_the_valid_range(any_model, tokens):
    with pytest.raises(IndexError, match="valid layers are 0 to 1"):
        mixer_matrices(any_model, tokens, layer=2)


def test_channel_arguments_are_mamba_only(tiny_llama, tokens):
    with pytest.raises(ValueError, match="are for Mamba; this model is a transformer"):
        mixer_matrices(tiny_llama, tokens, 0, channel_groups=2)


def test_analyses_take_one_sequence(tiny_rnn):
    with pytest.raises(ValueError, match="one sequence, got a batch of 2"):
        residual_norms(tiny_rnn, torch.zeros(2, 3, dtype=torch.long))


def test_analyses_leave_weights_and_hooks_as_they_were(any_model, tokens):
    before = {k: v.clone() for k, v in any_model.state_dict().items()}
    residual_norms(any_model, tokens)
    logit_lens(any_model, tokens)
    mixer_matrices(any_model, tokens, 0)
    after = any_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in any_model.hook_dict.values())
    assert all(p.grad is None for p in any_model.parameters())
