"""HookedHybrid against HF on tiny random Bamba, Nemotron-H, GraniteMoeHybrid, Zamba2, Falcon-H1 and Jamba."""

from __future__ import annotations

import dynalens as dl  # isort: skip  (before transformers; see tests/conftest.py)
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformer_lens.model_bridge import TransformerBridge

from dynalens.models import names
from dynalens.models.hybrid import HookedHybrid, HybridBridge
from dynalens.models.hybrid_archs import hf_layer_types
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from tests.tolerances import assert_close

# Ours and HuggingFace's model run other scan kernels (chunked, fused) over every layer:
# their logits agree to 10x the float32 table.
HF_PATH = 10
# A recurrence resumed from its carried state, or run in a padded batch, sums the same terms in
# another order through attention and SSM layers: 10x the float32 table.
CHUNKED = 10

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, bos_token_id=None, eos_token_id=None)
# (HF config class, HF model class, tiny config, layer_types we expect)
ARCHS = {
    "bamba": (T.BambaConfig, T.BambaForCausalLM, dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8, attn_layer_indices=[1],
    ), ["mamba2", "attention", "mamba2"]),
    "nemotron_h": (T.NemotronHConfig, T.NemotronHForCausalLM, dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8,
        mamba_num_heads=4, mamba_head_dim=16, n_groups=2, chunk_size=8, n_routed_experts=4, moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=24, num_experts_per_tok=2,
    ), ["mamba2", "moe", "attention", "mlp", "mamba2"]),
    "granitemoehybrid": (T.GraniteMoeHybridConfig, T.GraniteMoeHybridForCausalLM, dict(
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
        shared_intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"],
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8, embedding_multiplier=2.0,
        logits_scaling=3.0, residual_multiplier=0.5, attention_multiplier=0.3, position_embedding_type="rope",
    ), ["mamba2", "attention", "mamba2"]),
    "zamba2": (T.Zamba2Config, T.Zamba2ForCausalLM, dict(
        num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=8, n_mamba_heads=4,
        chunk_size=8, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
        use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True,
    ), ["mamba2", "attention+mamba2", "mamba2", "attention+mamba2"]),
    "falcon_h1": (T.FalconH1Config, T.FalconH1ForCausalLM, dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_d_ssm=48,
        mamba_n_heads=4, mamba_d_head=12, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8, mamba_rms_norm=True,
        mamba_norm_before_gate=False, lm_head_multiplier=0.7, embedding_multiplier=1.5, mlp_multipliers=[0.8, 1.2],
        key_multiplier=0.9, attention_out_multiplier=1.1, attention_in_multiplier=0.6,
        ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.3], ssm_in_multiplier=0.7, ssm_out_multiplier=1.4,
    ), ["attention+mamba2", "attention+mamba2"]),
    "jamba": (T.JambaConfig, T.JambaForCausalLM, dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
    ), ["mamba", "attention", "mamba", "attention"]),
}  # fmt: skip
# Further configs of some architectures for the parity test: options that change the computation.
VARIANTS = {
    "bamba-tied-1group-bias": ("bamba", dict(tie_word_embeddings=True, mamba_n_groups=1, attention_bias=True)),
    "granite-nope-dense": ("granitemoehybrid", dict(position_embedding_type=None, num_local_experts=0)),
    "zamba2-2blocks-noadapter-norope": ("zamba2", dict(num_mem_blocks=2, use_shared_attention_adapter=False,
                                                       use_mem_rope=False)),  # fmt: skip
    "falconh1-nonorm": ("falcon_h1", dict(mamba_rms_norm=False)),
    "falconh1-norm-before-gate-biases": ("falcon_h1", dict(
        mamba_norm_before_gate=True, projectors_bias=True, mamba_proj_bias=True, mamba_d_ssm=64, mamba_d_head=16,
    )),  # fmt: skip
}


def build_hf(arch: str, seed: int = 0, **overrides):
    """A tiny random HF model of ``arch``, every parameter jittered so no path is left at its initial value."""
    config_cls, model_cls, base, _ = ARCHS[arch]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**COMMON, **(base | overrides))).eval()
    hf.set_attn_implementation("eager")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return hf


_PAIRS: dict = {}


def pair(arch: str):
    if arch not in _PAIRS:
        hf = build_hf(arch, seed=1)
        _PAIRS[arch] = hf, HookedHybrid.from_hf(hf)
    return _PAIRS[arch]


def word_tokenizer() -> T.PreTrainedTokenizerFast:
    words = {f"t{i}": i for i in range(1, VOCAB)} | {"[PAD]": 0}
    tok = Tokenizer(tokenizer_models.WordLevel(words, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[PAD]", pad_token="[PAD]")


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 19), generator=torch.Generator().manual_seed(7))


def hf_run(hf, tokens: torch.Tensor, **kwargs):
    with torch.no_grad():
        return hf(tokens, **kwargs)


# ------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_generation_match_hf(arch, tokens):
    hf, ours = pair(arch)
    assert architecture_of(ours) == "hybrid" and ours.layer_types == ARCHS[arch][3]
    with torch.no_grad():
        assert_close(ours(tokens), hf_run(hf, tokens).logits, scale=HF_PATH)
        expected = hf.generate(tokens, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(tokens))
    got = ours.generate(tokens, max_new_tokens=6)
    assert torch.equal(got, expected)
    assert len(set(got[:, 19:].flatten().tolist())) > 2  # not a degenerate repeat


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_hf_across_options(name, tokens):
    arch, overrides = VARIANTS[name]
    hf = build_hf(arch, **overrides)
    with torch.no_grad():
        assert_close(HookedHybrid.from_hf(hf)(tokens), hf_run(hf, tokens).logits, scale=HF_PATH)


@pytest.mark.parametrize("arch", ARCHS)
def test_hooks_hold_hf_hidden_states_and_attention_patterns(arch, tokens):
    hf, ours = pair(arch)
    n = ours.cfg.n_layers
    attn_layers = [layer for layer, kind in enumerate(ours.layer_types) if "attention" in kind]
    wanted = [names.EMBED, names.FINAL_NORMALIZED, *(names.resid_post(layer) for layer in range(n)),
              *(names.pattern(layer) for layer in attn_layers)]  # fmt: skip
    logits, cache = ours.run_with_cache(tokens, names_filter=wanted)
    out = hf_run(hf, tokens, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == n + 1
    assert_close(cache[names.EMBED], out.hidden_states[0])
    for layer in range(n - 1):  # HF's last hidden state is after the final norm in some of the six
        assert_close(cache[names.resid_post(layer)], out.hidden_states[layer + 1], msg=layer, scale=HF_PATH)
    assert len(out.attentions) == len(attn_layers)
    for layer, hf_pattern in zip(attn_layers, out.attentions):
        assert_close(cache[names.pattern(layer)], hf_pattern, msg=layer)
    assert_close(ours.unembed_resid(cache[names.resid_post(n - 1)]), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_has_the_shared_names_and_its_type_s_hooks(arch, tokens):
    hf, ours = pair(arch)
    assert hf_layer_types(hf) == ours.layer_types  # what the Bridge fallback reports
    b, length = tokens.shape
    for layer, kind in enumerate(ours.layer_types):
        shared = [names.resid_pre(layer), names.mixer_out(layer), names.resid_post(layer)]
        assert all(name in ours.hook_dict for name in shared), layer
        assert (names.pattern(layer) in ours.hook_dict) == ("attention" in kind), layer
        assert (names.mixer(layer, "ssm_state") in ours.hook_dict) == ("mamba" in kind), layer
    assert names.FINAL_NORMALIZED in ours.hook_dict
    _, cache = ours.run_with_cache(tokens)
    d = ours.cfg.d_model
    for layer, kind in enumerate(ours.layer_types):
        assert cache[names.mixer_out(layer)].shape == (b, length, d)
        if "attention" in kind:
            h, kv, p = ours.cfg.n_heads, ours.cfg.n_key_value_heads, ours.cfg.d_head
            assert cache[names.attn(layer, "q")].shape == (b, length, h, p)
            assert cache[names.attn(layer, "k")].shape == (b, length, kv, p)
            assert cache[names.attn(layer, "z")].shape == (b, length, h, p)
            assert cache[names.pattern(layer)].shape == (b, h, length, length)
            assert_close(cache[names.pattern(layer)].sum(-1), torch.ones(b, h, length))
        if kind.endswith("mamba2"):
            mixer = ours.blocks[layer].mixer.cfg
            assert cache[names.mixer(layer, "dt")].shape == (b, length, mixer.n_heads)
            assert cache[names.mixer(layer, "ssm_state")].shape == (b, length, mixer.n_heads, mixer.d_head,
                                                                    mixer.d_state)  # fmt: skip
        if kind == "mamba":
            mixer = ours.blocks[layer].mixer.cfg
            assert cache[names.mixer(layer, "delta")].shape == (b, length, mixer.d_inner)
            assert cache[names.mixer(layer, "ssm_state")].shape == (b, length, mixer.d_inner, mixer.d_state)
        total = cache[names.resid_pre(layer)] + cache[names.mixer_out(layer)]
        if names.resid_mid(layer) in ours.hook_dict:
            total = total + cache[names.mlp_out(layer)]
        assert_close(total, cache[names.resid_post(layer)], msg=layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_editing_attention_and_ssm_hooks_changes_the_logits(arch, tokens):
    _, ours = pair(arch)
    kinds = ours.layer_types
    attn_layer = next(layer for layer, kind in enumerate(kinds) if "attention" in kind)
    ssm_layer = next(layer for layer, kind in enumerate(kinds) if "mamba" in kind)
    delta = "dt" if kinds[ssm_layer].endswith("mamba2") else "delta"
    uniform = lambda x, hook: torch.where(x > 0, torch.ones_like(x), x) / (x > 0).sum(-1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        clean = ours(tokens)
        for name, edit in [(names.pattern(attn_layer), uniform), (names.mixer(ssm_layer, delta), lambda x, hook: 3 * x),
                           (names.mixer_out(ssm_layer), lambda x, hook: 0 * x)]:  # fmt: skip
            edited = ours.run_with_hooks(tokens, fwd_hooks=[(name, edit)])
            assert (edited - clean).abs().max().item() > 1e-3, name


# -------------------------------------------------------- padding and state
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_its_unpadded_runs(arch):
    _, ours = pair(arch)
    rows = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19, 20]]
    prompts = Prompts.from_ids(rows)
    ssm = [layer for layer, kind in enumerate(ours.layer_types) if kind.endswith("mamba2")]
    hooks = [names.mixer_out(layer) for layer in range(ours.cfg.n_layers)]
    states = [names.mixer(layer, "ssm_state") for layer in ssm]
    dts = [names.mixer(layer, "dt") for layer in ssm]
    logits, cache = ours.run_with_cache(prompts, names_filter=hooks + states + dts, state_positions=[0, -1])
    for i, row in enumerate(rows):
        alone, single = ours.run_with_cache(torch.tensor([row]), names_filter=hooks + states, state_positions=[0, -1])
        assert_close(prompts.real(logits, i), alone[0], scale=CHUNKED)
        for name in hooks:
            assert_close(prompts.real(cache[name], i), single[name][0], msg=name, scale=CHUNKED)
        for name in states:
            assert_close(cache[name][i], single[name][0], msg=name, scale=CHUNKED)
    for name in dts:
        assert torch.equal(cache[name][~prompts.mask], torch.zeros_like(cache[name][~prompts.mask]))


@pytest.mark.parametrize("arch", ["bamba", "zamba2", "jamba"])
def test_ragged_generation_continues_each_row_from_its_own_end(arch):
    _, ours = pair(arch)
    rows = [[3, 4, 5, 6, 7, 8, 9], [12, 13, 14]]
    batched = ours.generate(rows, max_new_tokens=6)
    for i, row in enumerate(rows):
        assert torch.equal(batched[i, -6:], ours.generate(torch.tensor([row]), max_new_tokens=6)[0, -6:])


@pytest.mark.parametrize("arch", ["granitemoehybrid", "falcon_h1", "nemotron_h"])
def test_continuing_from_the_state_equals_one_call(arch, tokens):
    _, ours = pair(arch)
    with torch.no_grad():
        full = ours(tokens)
        first, state = ours(tokens[:, :6], return_state=True)
        rest, state = ours(tokens[:, 6:9], state=state, return_state=True)
        last = ours(tokens[:, 9:], state=state)
    assert state.pos == 9
    assert_close(torch.cat([first, rest, last], dim=1), full, scale=CHUNKED)


# ------------------------------------------------------------ names, loading
def test_attention_hooks_equal_the_bridge_s_on_bamba(tokens):
    _, ours = pair("bamba")
    # the Bridge takes over the HF model it boots on: its own copy (same seed, same weights), not the shared pair's
    bridge = TransformerBridge.boot_transformers("bamba", hf_model=build_hf("bamba", seed=1), tokenizer=word_tokenizer())
    parts = ["q", "k", "v", "rot_q", "rot_k", "pattern", "z"]
    hooks = [names.attn(1, part) for part in parts] + [names.attn_out(1), names.resid_post(1)]
    _, theirs = bridge.run_with_cache(tokens, names_filter=hooks)
    _, cache = ours.run_with_cache(tokens, names_filter=hooks)
    for name in hooks:
        assert cache[name].shape == theirs[name].shape, name
        assert_close(cache[name], theirs[name], msg=name)


def test_dl_load_opens_a_hybrid_folder(tokens, tmp_path):
    hf, ours = pair("falcon_h1")
    hf.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    loaded = dl.load(tmp_path)
    assert isinstance(loaded, HookedHybrid) and architecture_of(loaded) == "hybrid"
    assert loaded.layer_types == ours.layer_types
    with torch.no_grad():
        assert_close(loaded(tokens), hf_run(hf, tokens).logits, scale=HF_PATH)
    assert loaded.to_str_tokens("t1 t5 t9") == ["t1", "t5", "t9"]
    assert loaded.generate(["t1 t2 t3", "t4"], max_new_tokens=3)[1].startswith("t4")


def test_a_config_it_cannot_open_loads_through_the_bridge_with_a_warning(tokens, tmp_path):
    hf = build_hf("bamba", hidden_act="gelu")  # the Mamba mixers' activation too: ours applies SiLU
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"layers \[0, 2\] stay opaque .*activation 'gelu'"):
        model = dl.load(tmp_path)
    assert isinstance(model, HybridBridge) and architecture_of(model) == "hybrid"
    assert model.layer_types == ["mamba2", "attention", "mamba2"]
    hooks = [names.mixer_out(layer) for layer in range(3)] + [names.pattern(1)]
    logits, cache = model.run_with_cache(tokens, names_filter=hooks)
    assert all(cache[name].shape[:2] == tokens.shape or name == hooks[-1] for name in hooks)
    assert_close(logits, hf_run(hf, tokens).logits, scale=HF_PATH)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_decompose_resid_sums_to_the_stream(arch, tokens):
    _, model = pair(arch)
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.decompose_resid(return_labels=True)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert_close(stack.sum(0), final)
    assert labels[0] == "embed" and all(f"{l}_mixer_out" in labels for l in range(model.cfg.n_layers))


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - {"falcon_h1"}))
def test_save_pretrained_writes_a_folder_dl_load_and_hf_read_back(arch, tokens, tmp_path):
    hf = build_hf(arch, seed=1)  # not pair()'s: the Bridge test wraps that HF model's modules
    ours, edited = HookedHybrid.from_hf(hf), HookedHybrid.from_hf(hf)
    with torch.no_grad():  # weights that differ from HF's: the folder must hold ours
        for p in edited.parameters():
            p.add_(0.01)
    edited.save_pretrained(tmp_path)
    back = dl.load(tmp_path)
    theirs = getattr(T, type(hf).__name__).from_pretrained(tmp_path).eval()
    assert isinstance(back, HookedHybrid) and back.layer_types == ours.layer_types
    with torch.no_grad():
        expected = edited(tokens)
        assert (expected - ours(tokens)).abs().max().item() > 1e-3
        assert_close(back(tokens), expected)
        assert_close(hf_run(theirs, tokens).logits, expected, scale=HF_PATH)


def test_save_pretrained_refuses_weights_hf_does_not_hold_as_such(tmp_path):
    _, ours = pair("falcon_h1")  # its multipliers are folded into the SSM's in_proj
    with pytest.raises(ValueError, match=r"falcon_h1: .*in_proj.* cannot be written in HF's format"):
        ours.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
