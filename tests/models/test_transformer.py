"""The transformer adapter against plain HuggingFace models of the same weights."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from dynalens.models import smollm2 as smollm2_builtin
from dynalens.models.transformer import HookedTransformerBridge
from dynalens.models.validation import HookNameError
from tests.tolerances import assert_close

PROMPT = "The capital of France is"
SHARED = ("hook_embed", "blocks.{l}.hook_resid_pre", "blocks.{l}.hook_resid_post",
          "blocks.{l}.hook_mixer_out", "ln_final.hook_normalized")


@pytest.fixture(scope="module")
def smollm2_hf_reference() -> LlamaForCausalLM:
    """Plain HF Llama dequantised from the same GGUF (not through dynalens' cache)."""
    path = smollm2_builtin.gguf_path()
    model = LlamaForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama_dir) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()


def _state(model: HookedTransformerBridge) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


# ---------------------------------------------------------------------- parity
@pytest.mark.xdist_group("smollm2")
def test_smollm2_logits_match_hf_from_gguf(smollm2, smollm2_hf_reference):
    tokens = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        ours = smollm2(tokens)
        ref = smollm2_hf_reference(tokens).logits
    err = (ours - ref).abs().max().item()
    print(f"smollm2 vs HF LlamaForCausalLM (GGUF): max |logits diff| = {err:.3g}")
    assert err <= 1e-4


@pytest.mark.xdist_group("smollm2")
def test_smollm2_greedy_continuation_names_paris(smollm2):
    text = smollm2.generate(PROMPT, max_new_tokens=6)
    assert text.startswith(PROMPT)
    assert "Paris" in text[len(PROMPT):]
    # Every cached step, not only the first (which the prompt pass decides), equals a full recompute.
    tokens = smollm2.to_tokens(PROMPT)
    torch.testing.assert_close(smollm2.generate(tokens, 6), _greedy_without_cache(smollm2, tokens, 6))


def test_is_a_transformer_bridge_with_cfg(tiny_llama, tiny_hf):
    assert isinstance(tiny_llama, TransformerBridge)
    cfg, hf_cfg = tiny_llama.cfg, tiny_hf.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_vocab, cfg.n_ctx) == (
        hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads,
        hf_cfg.vocab_size, hf_cfg.max_position_embeddings,
    )
    assert cfg.d_head == hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert cfg.architecture == "transformer" == tiny_llama.architecture


def test_transformer_lens_tools_take_it(tiny_llama):
    from transformer_lens.head_detector import detect_head

    scores = detect_head(tiny_llama, "one two three one two three", "previous_token_head")
    assert scores.shape == (tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads)
    assert torch.isfinite(scores).all()


# ----------------------------------------------------------------- hook names
def test_shared_hook_names_match_hf_hidden_states(tiny_llama, tiny_hf):
    n_layers, d_model = tiny_llama.cfg.n_layers, tiny_llama.cfg.d_model
    names = [s.format(l=l) for s in SHARED for l in range(n_layers)]
    names = list(dict.fromkeys(names))
    assert set(names) <= set(tiny_llama.hook_dict)
    tokens = tiny_llama.to_tokens(PROMPT)
    _, cache = tiny_llama.run_with_cache(tokens, names_filter=names + ["blocks.0.hook_attn_out"])
    for name in names:
        assert cache[name].shape == (1, tokens.shape[1], d_model), name
    with torch.no_grad():
        hidden = tiny_hf(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cache["hook_embed"], hidden[0])
    for l in range(n_layers):
        torch.testing.assert_close(cache[f"blocks.{l}.hook_resid_pre"], hidden[l])
    torch.testing.assert_close(
        cache["ln_final.hook_normalized"] * tiny_hf.model.norm.weight, hidden[-1]
    )
    # the mixer output is what attention adds: resid_mid - resid_pre
    torch.testing.assert_close(cache["blocks.0.hook_mixer_out"], cache["blocks.0.hook_attn_out"])
    layer0 = tiny_hf.model.layers[0]
    with torch.no_grad():
        attn_in = layer0.input_layernorm(hidden[0])
        pos = torch.arange(tokens.shape[1])[None]
        cos_sin = tiny_hf.model.rotary_emb(hidden[0], pos)
        attn_out = layer0.self_attn(attn_in, position_embeddings=cos_sin, attention_mask=None)[0]
    # HF's attention without a mask is not causal: compare the last position only
    torch.testing.assert_close(cache["blocks.0.hook_mixer_out"][:, -1], attn_out[:, -1])


def test_mixer_out_patch_changes_logits_like_attn_out(tiny_llama):
    tokens = tiny_llama.to_tokens(PROMPT)
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    clean = tiny_llama(tokens)
    by_mixer = tiny_llama.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mixer_out", zero)])
    by_attn = tiny_llama.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out", zero)])
    assert not torch.allclose(by_mixer, clean)
    torch.testing.assert_close(by_mixer, by_attn)
    torch.testing.assert_close(tiny_llama(tokens), clean)  # hooks gone


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.run_with_cache(PROMPT, names_filter=["hook_embed", "blocks.0.hook_resid_pots"]),
        lambda m: m.run_with_cache(PROMPT, names_filter="blocks.0.hook_resid_pots"),
        lambda m: m.run_with_hooks(PROMPT, fwd_hooks=[("blocks.0.hook_resid_pots", lambda x, hook: x)]),
        lambda m: m.hooks(fwd_hooks=[("blocks.0.hook_resid_pots", lambda x, hook: x)]).__enter__(),
        lambda m: m.add_hook("blocks.0.hook_resid_pots", lambda x, hook: x),
        lambda m: m.generate(PROMPT, 2, fwd_hooks=[("blocks.0.hook_resid_pots", lambda x, hook: x)]),
    ],
    ids=["cache-list", "cache-str", "run_with_hooks", "hooks", "add_hook", "generate"],
)
def test_unknown_hook_name_lists_closest(tiny_llama, call):
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post") as err:
        call(tiny_llama)
    assert "Unknown hook name 'blocks.0.hook_resid_pots'" in str(err.value)
    assert all(not hp.fwd_hooks for hp in tiny_llama.hook_dict.values())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "empty prompt"),
        ("   ", "empty prompt"),
        ([], "empty prompt"),
        (torch.zeros(1, 0, dtype=torch.long), "empty prompt"),
        (torch.tensor([[1, 49152]]), r"token id 49152 is out of range.*\[0, 49151\]"),
        (torch.tensor([[-1, 2]]), "token id -1 is out of range"),
        (torch.ones(1, 65, dtype=torch.long), r"longer than the model accepts \(n_ctx = 64\)"),
        ("word " * 80, r"longer than the model accepts \(n_ctx = 64\)"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_llama, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_llama(bad)
    with pytest.raises(ValueError, match=match):
        tiny_llama.run_with_cache(bad, names_filter="hook_embed")


def test_float_tokens_rejected(tiny_llama):
    with pytest.raises(TypeError, match="integer tensor"):
        tiny_llama.to_tokens(torch.ones(1, 3))


def test_generation_past_n_ctx_rejected(tiny_llama):
    with pytest.raises(ValueError, match=r"exceed what the model accepts \(n_ctx = 64\)"):
        tiny_llama.generate(torch.ones(1, 60, dtype=torch.long), max_new_tokens=5)


def test_hooks_removed_and_weights_unchanged_after_exception_in_hook(tiny_llama):
    before = _state(tiny_llama)
    clean = tiny_llama(PROMPT)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_llama.run_with_hooks(PROMPT, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llama.hooks(fwd_hooks=[("blocks.0.hook_mixer_out", boom)]):
            tiny_llama(PROMPT)
    with pytest.raises(RuntimeError, match="boom"):
        tiny_llama.generate(PROMPT, 3, fwd_hooks=[("hook_embed", boom)])
    assert all(not hp.fwd_hooks for hp in tiny_llama.hook_dict.values())
    torch.testing.assert_close(tiny_llama(PROMPT), clean, rtol=0, atol=0)
    after = _state(tiny_llama)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------- generation
def _greedy_without_cache(model, tokens, n, fwd_hooks=()):
    """Reference: n greedy steps, each a full forward over the whole sequence."""
    for _ in range(n):
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_generate_with_kv_cache_and_hooks_matches_full_recompute(tiny_llama):
    tokens = tiny_llama.to_tokens(PROMPT)
    direction = 10 * torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(0))
    steer = [("blocks.1.hook_resid_post", lambda x, hook: x + direction)]
    seen = []
    record = [("hook_embed", lambda x, hook: seen.append(x.shape[1]))]
    plain = tiny_llama.generate(tokens, 6, fwd_hooks=record)
    assert seen == [tokens.shape[1]] + [1] * 5  # prompt once, then one position per step
    torch.testing.assert_close(plain, _greedy_without_cache(tiny_llama, tokens, 6))
    steered = tiny_llama.generate(tokens, 6, fwd_hooks=steer)
    torch.testing.assert_close(steered, _greedy_without_cache(tiny_llama, tokens, 6, steer))
    assert not torch.equal(plain, steered)


def test_generate_return_types_and_seeded_sampling(tiny_llama):
    text = tiny_llama.generate(PROMPT, 3)
    assert isinstance(text, str) and text.startswith(PROMPT)
    tokens = tiny_llama.generate(PROMPT, 3, return_type="tokens")
    assert tokens.shape == (1, tiny_llama.to_tokens(PROMPT).shape[1] + 3)
    draws = [
        tiny_llama.generate(PROMPT, 8, temperature=2.0, generator=torch.Generator().manual_seed(s),
                            return_type="tokens")
        for s in (7, 7, 8)
    ]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


# --------------------------------------------------------------------- saving
def test_save_pretrained_round_trips_through_plain_hf(tiny_llama, tiny_hf, tmp_path):
    folder = tiny_llama.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tokens = tiny_llama.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, tiny_hf(tokens).logits, rtol=0, atol=0)
    assert HookedTransformerBridge.from_pretrained(folder).to_str_tokens(PROMPT) == (
        tiny_llama.to_str_tokens(PROMPT)
    )


def test_folder_without_tokenizer_takes_tokens_only(tiny_hf, tmp_path):
    tiny_hf.save_pretrained(tmp_path)
    model = HookedTransformerBridge.from_pretrained(tmp_path)
    assert model.tokenizer is None
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tiny_hf(tokens).logits)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "mixer" in n)
    assert set(cache.keys()) == {"blocks.0.hook_mixer_out", "blocks.1.hook_mixer_out"}
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens(PROMPT)


def test_gpt2_folder_with_learned_positions(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    model = HookedTransformerBridge.from_pretrained(tmp_path)
    tokens = torch.randint(0, 50, (2, 10))
    names = ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_mixer_out"]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    with torch.no_grad():
        assert_close(logits, hf(tokens).logits)
    torch.testing.assert_close(cache["hook_embed"], hf.transformer.wte(tokens))
    torch.testing.assert_close(
        cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"]
    )
    assert cache["blocks.1.hook_mixer_out"].shape == (2, 10, 32)
    with pytest.raises(ValueError, match=r"n_ctx = 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
