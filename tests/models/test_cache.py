"""One cache type: TransformerLens-style cache code runs unchanged on every architecture.

The same code (``accumulated_resid``, ``logit_attrs``, ``decompose_resid``,
``stack_activation``, short names) runs on a transformer (through the Bridge),
a Mamba and an RNN, against references computed from the model itself.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import ActivationCache

from dynalens.models import Cache, CacheMethodError, HookedRNN, RNNConfig, names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import unembed_resid
from tests.tolerances import assert_close


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_mamba", "tiny_mamba2", "tiny_rnn"])
def any_model(request: pytest.FixtureRequest):
    """Every architecture in turn (Mamba-2 too)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def prompts_of():
    def make(model) -> Prompts:
        g = torch.Generator().manual_seed(0)
        return Prompts(model, [torch.randint(3, 50, (n,), generator=g).tolist() for n in (6, 3, 5)])

    return make


def test_every_model_returns_the_one_cache_class(any_model, prompts_of):
    _, cache = any_model.run_with_cache(prompts_of(any_model))
    assert type(cache) is Cache and isinstance(cache, ActivationCache)
    assert cache.model is any_model
    _, filtered = any_model.run_with_cache(prompts_of(any_model)[0].tokens, names_filter=[names.EMBED])
    assert type(filtered) is Cache and names.EMBED in filtered.keys()
    assert all(key == names.EMBED or key.startswith("embed.") for key in filtered.keys())  # Bridge aliases


def test_logit_lens_contract(any_model, prompts_of):
    """``logit_attrs(accumulated_resid(apply_ln=True), tokens)`` is ``unembed_resid`` of each layer's stream."""
    prompts = prompts_of(any_model)
    tokens = prompts.tokens
    logits, cache = any_model.run_with_cache(prompts)
    # --- TransformerLens-style code, unchanged on every architecture ---
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    attrs = cache.logit_attrs(stack, tokens)
    # -------------------------------------------------------------------
    n = any_model.cfg.n_layers
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    assert attrs.shape == (n + 1, *tokens.shape)
    streams = [cache[names.resid_pre(l)] for l in range(n)] + [cache[names.resid_post(n - 1)]]
    bias = any_model.b_U[tokens]
    for l, resid in enumerate(streams):
        lens = unembed_resid(any_model, resid).gather(-1, tokens[..., None])[..., 0] - bias
        assert_close(attrs[l], lens)
    # the last entry is the model's own logits (less the unembedding bias)
    assert_close(attrs[-1], logits.gather(-1, tokens[..., None])[..., 0] - bias)


def test_logit_attrs_token_shapes_and_differences(any_model, prompts_of):
    prompts = prompts_of(any_model)
    _, cache = any_model.run_with_cache(prompts)
    stack = cache.accumulated_resid(apply_ln=True)
    full = stack @ any_model.W_U  # [layers, batch, pos, vocab]
    per_prompt = torch.tensor([7, 8, 9])
    assert_close(cache.logit_attrs(stack, per_prompt), full[..., [7, 8, 9]].diagonal(dim1=1, dim2=-1).movedim(-1, 1))
    assert_close(cache.logit_attrs(stack, 11), full[..., 11])
    diff = cache.logit_attrs(stack, 11, incorrect_tokens=12)
    assert_close(diff, full[..., 11] - full[..., 12])
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, per_prompt, incorrect_tokens=12)


def test_decompose_resid_sums_to_the_final_stream(any_model, prompts_of):
    _, cache = any_model.run_with_cache(prompts_of(any_model))
    n = any_model.cfg.n_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    per_layer = ["attn_out", "mlp_out"] if any_model.cfg.architecture == "transformer" else ["mixer_out"]
    assert labels == ["embed"] + [f"{l}_{part}" for l in range(n) for part in per_layer]
    assert_close(stack.sum(0), cache["resid_post", -1])
    assert_close(cache.decompose_resid(layer=1).sum(0), cache["resid_pre", 1])
    # apply_ln: each part as the unembedding sees it; they sum to the normalised stream less the norm's bias
    normed = cache.decompose_resid(apply_ln=True)
    final = cache["resid_post", -1]
    bias = any_model.ln_final(torch.zeros_like(final))
    assert_close(normed.sum(0) + bias, any_model.ln_final(final))
    mixers = cache.decompose_resid(mode="mixer", incl_embeds=False)
    assert mixers.shape[0] == n


def test_short_names_and_stacks(any_model, prompts_of):
    _, cache = any_model.run_with_cache(prompts_of(any_model))
    n = any_model.cfg.n_layers
    assert cache["resid_post", -1] is cache[names.resid_post(n - 1)]
    assert cache["mixer_out", 0] is cache[names.mixer_out(0)]
    assert cache["embed"] is cache[names.EMBED]
    assert cache["scale"] is cache[names.FINAL_SCALE]
    state = ("ssm_state", lambda l: names.mixer(l, "ssm_state"))
    part = {"transformer": ("pattern", names.pattern), "mamba": state, "mamba2": state,
            "rnn": ("hidden", lambda l: names.cell(l, "hidden"))}[any_model.cfg.architecture]  # fmt: skip
    assert cache[part[0], -1] is cache[part[1](n - 1)]
    assert ("resid_post", 0) in cache and ("resid_post", 0, "nowhere") not in cache
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (n, *cache[names.resid_post(0)].shape)
    torch.testing.assert_close(stacked[1], cache["resid_post", 1], rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range"):
        cache["resid_post", n]
    with pytest.raises(KeyError, match="not cached"):
        any_model.run_with_cache(prompts_of(any_model), names_filter=[names.EMBED])[1]["resid_post", 0]
    with pytest.raises(KeyError, match="names no hook"):
        cache["no_such_part", 0]


def test_methods_without_meaning_raise_clear_errors(tiny_mamba, tiny_mamba2, tiny_rnn, prompts_of):
    for model in (tiny_mamba, tiny_mamba2, tiny_rnn):
        _, cache = model.run_with_cache(prompts_of(model))
        arch = model.cfg.architecture
        for method in ("stack_head_results", "compute_head_results", "stack_neuron_results"):
            with pytest.raises(CacheMethodError, match=rf"{method} needs .* {arch} model .* transformer"):
                getattr(cache, method)()
        with pytest.raises(CacheMethodError, match=r"incl_mid=True.*resid_mid.*transformer"):
            cache.accumulated_resid(incl_mid=True)
        with pytest.raises(CacheMethodError, match=r"mode='mlp'.*transformer"):
            cache.decompose_resid(mode="mlp")
        with pytest.raises(ValueError, match="pass layer=None"):
            cache.decompose_resid(layer=1, apply_ln=True)
    plain = HookedRNN(RNNConfig(d_model=8, n_layers=2, d_vocab=50, cell="gru", residual=False)).eval()
    _, cache = plain.run_with_cache(torch.tensor([[1, 2, 3]]))
    with pytest.raises(CacheMethodError, match="residual=False"):
        cache.decompose_resid()


def test_the_bridges_other_cache_behaviour_is_kept(tiny_llama, prompts_of):
    prompts = prompts_of(tiny_llama)
    _, cache = tiny_llama.run_with_cache(prompts)
    heads, labels = cache.stack_head_results(return_labels=True)
    assert labels[:2] == ["L0H0", "L0H1"] and heads.shape[0] == 2 * tiny_llama.cfg.n_heads
    # the heads' results sum to each layer's attention output (less the output bias, zero in Llama)
    assert_close(heads[: tiny_llama.cfg.n_heads].sum(0), cache["attn_out", 0])
    one = cache.apply_slice_to_batch_dim(1)
    assert type(one) is Cache and one["resid_post", 0].shape == cache["resid_post", 0].shape[1:]


def test_learned_positions_and_layernorm_decompose_too(tiny_gpt2, prompts_of):
    """GPT-2: ``pos_embed`` is a component, and the LayerNorm's centring and bias are handled."""
    logits, cache = tiny_gpt2.run_with_cache(prompts_of(tiny_gpt2))
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels[:3] == ["embed", "pos_embed", "0_attn_out"]
    final = cache["resid_post", -1]
    assert_close(stack.sum(0), final)
    normed = cache.decompose_resid(apply_ln=True).sum(0)
    assert_close(normed + tiny_gpt2.ln_final(torch.zeros_like(final)), tiny_gpt2.ln_final(final))
    tokens = cache.prompts.tokens
    lens = cache.logit_attrs(cache.accumulated_resid(apply_ln=True), tokens)
    assert_close(lens[-1], logits.gather(-1, tokens[..., None])[..., 0] - tiny_gpt2.b_U[tokens])


def test_hooks_for_names_exactly_what_the_methods_read(any_model, prompts_of):
    from dynalens.models.cache import hooks_for

    prompts = prompts_of(any_model)
    _, full = any_model.run_with_cache(prompts)
    for method, options in (("accumulated_resid", {"apply_ln": True}), ("decompose_resid", {"apply_ln": True})):
        _, cache = any_model.run_with_cache(prompts, names_filter=hooks_for(any_model, method, **options))
        # (caching every hook may take another path, e.g. materialised SSM states: equal within rounding)
        assert_close(getattr(cache, method)(**options), getattr(full, method)(**options))
