"""HookedMamba2 against HF ``Mamba2ForCausalLM`` (its PyTorch path) and TransformerBridge's Mamba-2."""

from __future__ import annotations

import copy

import dynalens as dl  # isort: skip  (before transformers; see tests/conftest.py)
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM, PreTrainedTokenizerFast
from transformers.models.mamba2 import modeling_mamba2
from transformer_lens.model_bridge import TransformerBridge

import dynalens.models.mamba2 as mamba2_module
from dynalens.kernels import ssd_scan
from dynalens.models import HookedMamba2, Mamba2Config, names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from tests.tolerances import assert_close

# Ours and HuggingFace's model run other scan kernels (chunked, fused) over every layer:
# their logits agree to 10x the float32 table.
HF_PATH = 10

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8, state_size=8, n_groups=1,
            chunk_size=8, eos_token_id=None)  # fmt: skip
# (name, HF Mamba2Config overrides): groups 1 and 2, head_dim, d_state, chunk_size, conv kernel, biases, ties.
CONFIGS = {
    "groups2": dict(n_groups=2),
    "groups4-dstate16-conv2": dict(n_groups=4, state_size=16, conv_kernel=2),
    "head_dim4-chunk4-bias": dict(num_heads=8, head_dim=4, chunk_size=4, use_bias=True),
    "expand1-tied-noconvbias": dict(expand=1, num_heads=2, tie_word_embeddings=True, use_conv_bias=False),
}


def hf_mamba2(seed: int = 0, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    return Mamba2ForCausalLM(HFMamba2Config(**(BASE | overrides))).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """An offline tokenizer over the words ``t0 .. t62`` and ``[UNK]``."""
    words = {f"t{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(tokenizer_models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


@pytest.fixture(scope="module")
def pair() -> tuple[Mamba2ForCausalLM, HookedMamba2]:
    hf = hf_mamba2(seed=1, n_groups=2)
    return hf, HookedMamba2.from_hf(hf)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))


def logits_of(hf: Mamba2ForCausalLM, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens, **kwargs).logits


# ------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("overrides", [{}, *CONFIGS.values()], ids=["default", *CONFIGS])
def test_logits_and_greedy_generation_match_hf(overrides):
    hf = hf_mamba2(**overrides)
    ours = HookedMamba2.from_hf(hf)
    tokens = torch.randint(0, VOCAB, (2, 19))  # crosses HF's chunks of 4 and 8 and ours
    with torch.no_grad():
        assert_close(ours(tokens), logits_of(hf, tokens), scale=HF_PATH)
        hf_out = hf.generate(tokens, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(tokens))
    ours_out = ours.generate(tokens, max_new_tokens=12)
    assert ours_out.shape == (2, 31)
    assert torch.equal(ours_out, hf_out)
    assert len(set(ours_out[:, 19:].flatten().tolist())) > 1  # not a degenerate repeat


def decoded_logits(step, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of ``tokens[:, prefix:]`` fed one at a time after the prefix: ``step(tokens, state) -> (logits, state)``."""
    logits, state = step(tokens[:, :prefix], None)
    out = []
    for t in range(prefix, tokens.shape[1]):
        logits, state = step(tokens[:, t : t + 1], state)
        out.append(logits[:, -1])
    return torch.stack(out, dim=1)


def test_time_step_limit_clamps_dt_in_every_call():
    """HF clamps dt to time_step_limit in its chunked path only, not in its one-token decode step
    (nor does mamba_ssm's ``step``), so its decoded logits drift from its own full forward (and
    greedy generation can differ from HF's); ours clamps everywhere: full-forward logits equal
    HF's, and decoding one token at a time equals our full forward."""
    hf = hf_mamba2(time_step_limit=(0.1, 0.2))
    ours = HookedMamba2.from_hf(hf)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))

    def hf_step(x, cache):
        out = hf(x, cache_params=cache, use_cache=True)
        return out.logits, out.cache_params

    def our_step(x, state):
        return ours(x, state=state, return_state=True)

    with torch.no_grad():
        full = ours(tokens)
        assert_close(full, logits_of(hf, tokens), scale=HF_PATH)
        assert_close(decoded_logits(our_step, tokens, 10), full[:, 10:])
        assert (decoded_logits(hf_step, tokens, 10) - full[:, 10:]).abs().max().item() > 1e-3  # HF's unclamped step
        _, cache = ours.run_with_cache(tokens, names_filter=names.mixer(0, "dt"))
    dt = cache[names.mixer(0, "dt")]
    low, high = torch.tensor([0.1, 0.2])  # float32
    assert dt.min() == low and dt.max() <= high  # the clamp is active


def _norm_before_gate(self, hidden_states, gate=None):
    """HF's gated norm with mamba_ssm's ``norm_before_gate=True``: ``norm(y) * silu(z)``."""
    y = hidden_states.float()
    grouped = y.view(*y.shape[:-1], -1, self.group_size)
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).view(y.shape)
    return self.weight * y.to(hidden_states.dtype) * F.silu(gate)


@pytest.mark.parametrize(
    "options, hf_norm",
    [
        (dict(norm_before_gate=True), _norm_before_gate),
        (dict(rmsnorm=False), lambda self, y, gate=None: y * F.silu(gate)),
    ],
    ids=["norm_before_gate", "no-rmsnorm"],
)
def test_gated_norm_options_match_hf_with_that_norm(options, hf_norm, monkeypatch):
    hf = hf_mamba2(n_groups=2)
    ours = HookedMamba2.from_hf(hf)
    ours.cfg.rmsnorm = options.get("rmsnorm", True)
    ours.cfg.norm_before_gate = options.get("norm_before_gate", False)
    for block in ours.blocks:
        block.mixer.norm.rmsnorm, block.mixer.norm.norm_before_gate = ours.cfg.rmsnorm, ours.cfg.norm_before_gate
    tokens = torch.randint(0, VOCAB, (2, 13))
    default = logits_of(hf, tokens)
    monkeypatch.setattr(modeling_mamba2.MambaRMSNormGated, "forward", hf_norm)
    expected = logits_of(hf, tokens)
    assert (expected - default).abs().max().item() > 1e-2  # the option changes the model
    with torch.no_grad():
        assert_close(ours(tokens), expected, scale=HF_PATH)
    with pytest.raises(ValueError, match=r"HF's Mamba2 has one gated norm.*cannot be written in its format"):
        ours.cfg.to_hf()


def test_float64_matches_hf_float64_closely(pair, tokens):
    hf, ours = pair
    expected = logits_of(copy.deepcopy(hf).double(), tokens)
    got = copy.deepcopy(ours).double()(tokens)
    assert got.dtype == torch.float64
    assert_close(got, expected)  # HF keeps A, D, dt bias in float32


def test_left_padded_batch_matches_hf_with_its_attention_mask(pair):
    hf, ours = pair
    prompts = Prompts.from_ids([[3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17]])
    expected = logits_of(hf, prompts.tokens, attention_mask=prompts.mask.long())
    with torch.no_grad():
        got = ours(prompts)
    assert_close(got[prompts.mask], expected[prompts.mask], scale=HF_PATH)


def test_matches_transformer_bridge_on_shared_hooks(pair, tokens, tmp_path):
    hf, ours = pair
    hf.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=copy.deepcopy(hf))
    per_layer = ["hook_resid_pre", "norm.hook_scale", "norm.hook_normalized", "mixer.hook_in_proj",
                 "mixer.hook_ssm_out", "hook_mixer_out", "hook_resid_post"]  # fmt: skip
    hooks = [names.EMBED, names.FINAL_NORMALIZED] + [names.block(l, h) for l in range(2) for h in per_layer]
    bridge_logits, bridge_cache = bridge.run_with_cache(tokens, names_filter=hooks)
    logits, cache = ours.run_with_cache(tokens, names_filter=hooks)
    for name in hooks:
        assert cache[name].shape == bridge_cache[name].shape, name
        assert_close(cache[name], bridge_cache[name], msg=name)
    assert_close(logits, bridge_logits, scale=HF_PATH)


# --------------------------------------------------------- state and generation
def test_continuing_from_the_state_equals_one_call(pair, tokens):
    _, ours = pair
    with torch.no_grad():
        full = ours(tokens)
        first, state = ours(tokens[:, :6], return_state=True)
        rest, state = ours(tokens[:, 6:9], state=state, return_state=True)
        last = ours(tokens[:, 9:], state=state)
    assert state.pos == 9
    assert_close(torch.cat([first, rest, last], dim=1), full)


def test_generation_takes_one_scan_step_per_token(pair, tokens, monkeypatch):
    _, ours = pair
    lengths = []

    def spy(x, *args, **kwargs):
        lengths.append(x.shape[1])
        return ssd_scan(x, *args, **kwargs)

    monkeypatch.setattr(mamba2_module, "ssd_scan", spy)
    ours.generate(tokens, max_new_tokens=5)
    assert lengths == [11] * 2 + [1] * 2 * 4  # the prompt, then one step per new token but the last


# ---------------------------------------------------------------------- hooks
def hook_shapes(cfg: Mamba2Config, batch: int, pos: int) -> dict[str, tuple[int, ...]]:
    h, p, g, n = cfg.n_heads, cfg.d_head, cfg.n_groups, cfg.d_state
    shapes = {names.EMBED: (batch, pos, cfg.d_model), names.FINAL_SCALE: (batch, pos, 1)}
    shapes[names.FINAL_NORMALIZED] = (batch, pos, cfg.d_model)
    for l in range(cfg.n_layers):
        block = {
            "hook_resid_pre": (cfg.d_model,), "norm.hook_scale": (1,), "norm.hook_normalized": (cfg.d_model,),
            "mixer.hook_in_proj": (cfg.d_inner + cfg.conv_dim + h,), "mixer.hook_conv": (cfg.conv_dim,),
            "mixer.hook_x": (h, p), "mixer.hook_B": (g, n), "mixer.hook_C": (g, n), "mixer.hook_dt": (h,),
            "mixer.hook_ssm_state": (h, p, n), "mixer.hook_y": (h, p), "mixer.hook_gate": (cfg.d_inner,),
            "mixer.hook_norm": (cfg.d_inner,), "mixer.hook_ssm_out": (cfg.d_model,),
            "hook_mixer_out": (cfg.d_model,), "hook_resid_post": (cfg.d_model,),
        }  # fmt: skip
        shapes |= {names.block(l, k): (batch, pos, *v) for k, v in block.items()}
    return shapes


def test_every_hook_has_its_documented_shape(pair, tokens):
    _, ours = pair
    expected = hook_shapes(ours.cfg, *tokens.shape)
    assert set(ours.hook_dict) == set(expected)
    _, cache = ours.run_with_cache(tokens)
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected


def test_hooks_hold_what_the_scan_reads(pair, tokens):
    """x, B, C are the conv output split; dt is softplus(dt + bias) of in_proj's last columns; y is the scan's."""
    _, ours = pair
    cfg, mixer = ours.cfg, ours.blocks[1].mixer
    _, c = ours.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.mixer"))
    conv, b, pos = c[names.mixer(1, "conv")], *tokens.shape
    assert torch.equal(c[names.mixer(1, "x")], conv[..., : cfg.d_inner].reshape(b, pos, cfg.n_heads, cfg.d_head))
    assert torch.equal(c[names.mixer(1, "C")].flatten(2), conv[..., -cfg.n_groups * cfg.d_state :])
    dt = F.softplus(c[names.mixer(1, "in_proj")][..., -cfg.n_heads :] + mixer.dt_bias)
    assert_close(dt, c[names.mixer(1, "dt")])
    y = ssd_scan(c[names.mixer(1, "x")], dt, mixer.A, c[names.mixer(1, "B")], c[names.mixer(1, "C")], mixer.D,
                 backend="ref")  # fmt: skip
    assert_close(y, c[names.mixer(1, "y")])


def test_ssm_state_is_formed_only_when_asked_and_only_where(pair, tokens, monkeypatch):
    _, ours = pair
    asked = []

    def spy(*args, **kwargs):
        asked.append((kwargs["return_states"], kwargs["state_positions"]))
        return ssd_scan(*args, **kwargs)

    monkeypatch.setattr(mamba2_module, "ssd_scan", spy)
    _, cache = ours.run_with_cache(tokens, names_filter=lambda n: "ssm_state" not in n, state_positions=[-1])
    assert asked == [(False, None)] * 2 and not any("ssm_state" in k for k in cache)
    asked.clear()
    state = names.mixer(1, "ssm_state")
    _, every = ours.run_with_cache(tokens, names_filter=state)
    assert [a[0] for a in asked] == [False, True] and every[state].shape == (2, 11, 4, 8, 8)
    asked.clear()
    _, some = ours.run_with_cache(tokens, names_filter=state, state_positions=[-1, 3, 3])
    assert asked[0] == (False, None) and asked[1][1].tolist() == [[10, 3, 3]] * 2
    assert_close(some[state], every[state][:, [10, 3, 3]])


def test_ssm_state_reads_out_to_y_and_the_final_state(pair, tokens):
    _, ours = pair
    state = names.mixer(1, "ssm_state")
    _, plain = ours.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.mixer"))
    _, cache = ours.run_with_cache(tokens, names_filter=state)
    r = ours.cfg.n_heads // ours.cfg.n_groups
    C = plain[names.mixer(1, "C")].repeat_interleave(r, dim=2)
    y = torch.einsum("blhpn,blhn->blhp", cache[state], C) + ours.blocks[1].mixer.D[:, None] * plain[names.mixer(1, "x")]
    assert_close(y, plain[names.mixer(1, "y")])
    with torch.no_grad():
        _, carried = ours(tokens, return_state=True)
    assert_close(carried.ssm[1], cache[state][:, -1])


MIXER_HOOKS = ["in_proj", "conv", "x", "B", "C", "dt", "y", "gate", "norm", "ssm_out"]


@pytest.mark.parametrize(
    "hook",
    [names.EMBED, names.resid_pre(0), names.block(0, "norm.hook_normalized"), names.mixer_out(0), names.resid_post(0),
     *(names.mixer(0, h) for h in MIXER_HOOKS), names.mixer(0, "ssm_state"), names.FINAL_NORMALIZED],
)  # fmt: skip
def test_editing_a_hook_changes_everything_downstream(pair, tokens, hook):
    _, ours = pair
    downstream = names.FINAL_NORMALIZED if hook != names.FINAL_NORMALIZED else None
    with torch.no_grad():
        clean, clean_cache = ours.run_with_cache(tokens, names_filter=[downstream] if downstream else [])
        noise = torch.Generator().manual_seed(3)

        def edit(x, hook):
            return x + 0.5 * torch.randn(x.shape, generator=noise)

        patched = ours.run_with_hooks(tokens, fwd_hooks=[(hook, edit)])
    assert (patched - clean).abs().amax(-1).min().item() > 1e-4  # every position changes
    if downstream:
        with ours.hooks(fwd_hooks=[(hook, edit)]):
            _, cache = ours.run_with_cache(tokens, names_filter=downstream)
        assert (cache[downstream] - clean_cache[downstream]).abs().amax(-1).min().item() > 1e-4


def test_editing_the_state_at_chosen_positions(pair, tokens):
    """An edit of h_t changes y_t and, at the last position, the state carried to generation."""
    _, ours = pair
    state = names.mixer(1, "ssm_state")

    def zero(x, hook):
        return torch.zeros_like(x)

    with torch.no_grad():
        clean = ours(tokens)
        with ours.hooks(fwd_hooks=[(state, zero)]):
            edited, carried = ours(tokens, return_state=True, state_positions=[4, -1])
    changed = (edited - clean).abs().amax(-1) > 1e-5  # [batch, pos]
    assert changed[:, [4, 10]].all() and not changed[:, [0, 3, 5, 9]].any()
    assert torch.equal(carried.ssm[1], torch.zeros_like(carried.ssm[1]))


# -------------------------------------------------------------------- padding
def test_padded_batch_equals_its_unpadded_runs_for_logits_hooks_and_states(pair):
    _, ours = pair
    rows = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19, 20]]
    prompts = Prompts.from_ids(rows)
    hooks = [names.mixer(1, "dt"), names.mixer(1, "ssm_state"), names.resid_post(1)]
    logits, cache = ours.run_with_cache(prompts, names_filter=hooks, state_positions=[0, -1, 1])
    for i, row in enumerate(rows):
        single_logits, single = ours.run_with_cache(torch.tensor([row]), names_filter=hooks, state_positions=[0, -1, 1])
        assert_close(prompts.real(logits, i), single_logits[0])
        for name in hooks[::2]:
            assert_close(prompts.real(cache[name], i), single[name][0], msg=name)
        assert_close(cache[hooks[1]][i], single[hooks[1]][0])
    assert torch.equal(cache[hooks[0]][~prompts.mask], torch.zeros_like(cache[hooks[0]][~prompts.mask]))


def test_ragged_generation_continues_each_row_from_its_own_end(pair):
    _, ours = pair
    rows = [[3, 4, 5, 6, 7, 8, 9], [12, 13, 14]]
    batched = ours.generate(rows, max_new_tokens=6)
    for i, row in enumerate(rows):
        alone = ours.generate(torch.tensor([row]), max_new_tokens=6)
        assert torch.equal(batched[i, -6:], alone[0, -6:])


def test_pads_after_a_carried_state_are_skipped(pair):
    """A continuation with left pads equals continuing each row with its real tokens only."""
    _, ours = pair
    first = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    more = torch.tensor([[11, 12, 13, 14, 15], [0, 0, 16, 17, 18]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        _, state = ours(first, return_state=True)
        logits, after = ours(more, attention_mask=mask, state=state, return_state=True)
        for i in range(2):
            row_state = mamba2_module.Mamba2State([c[i : i + 1] for c in state.conv], [h[i : i + 1] for h in state.ssm], 4)
            real = more[i : i + 1, mask[i].bool()]
            alone, alone_after = ours(real, state=row_state, return_state=True)
            assert_close(logits[i, mask[i].bool()], alone[0])
            for got, want in zip(after.conv + after.ssm, alone_after.conv + alone_after.ssm):
                assert_close(got[i], want[0])


def test_state_positions_out_of_range_name_the_prompt(pair):
    _, ours = pair
    prompts = Prompts.from_ids([[3, 4, 5, 6], [7, 8]])
    with pytest.raises(ValueError, match=r"out of range for prompt 1: its positions are 0 to 1"):
        ours.run_with_cache(prompts, names_filter=names.mixer(0, "ssm_state"), state_positions=[2])


# ------------------------------------------------------------ loading/saving
def test_save_load_round_trip_through_hf_and_dl_load(pair, tokens, tmp_path):
    hf, _ = pair
    ours = HookedMamba2.from_hf(hf, tokenizer=word_tokenizer())
    ours.save_pretrained(tmp_path / "ours")
    reloaded_hf = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert_close(logits_of(reloaded_hf, tokens), logits_of(hf, tokens))
    loaded = dl.load(tmp_path / "ours")
    assert isinstance(loaded, HookedMamba2) and architecture_of(loaded) == "mamba2"
    with torch.no_grad():
        assert_close(loaded(tokens), ours(tokens))
    assert loaded.to_str_tokens("t1 t5 t9") == ["t1", "t5", "t9"]


def test_reads_hf_folders_with_tied_embeddings(tokens, tmp_path):
    hf = hf_mamba2(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    ours = HookedMamba2.from_pretrained(tmp_path)
    assert ours.unembed.weight is ours.embed.weight
    with torch.no_grad():
        assert_close(ours(tokens), logits_of(hf, tokens), scale=HF_PATH)
    ours.save_pretrained(tmp_path / "again")
    assert_close(logits_of(Mamba2ForCausalLM.from_pretrained(tmp_path / "again"), tokens), ours(tokens))


def test_bad_configs_are_errors():
    with pytest.raises(ValueError, match=r"n_heads \* d_head \(4 \* 4\) must equal expand \* d_model \(2 \* 16\)"):
        Mamba2Config(d_model=16, n_layers=1, d_vocab=8, n_heads=4, d_head=4)
    with pytest.raises(ValueError, match=r"n_groups \(3\) must divide n_heads \(4\)"):
        Mamba2Config(d_model=16, n_layers=1, d_vocab=8, n_heads=4, d_head=8, n_groups=3)
    with pytest.raises(ValueError, match=r"expected an HF config with model_type 'mamba2', got 'mamba'"):
        Mamba2Config.from_hf({"model_type": "mamba"})


def test_a_fresh_model_starts_with_mamba_ssm_step_sizes():
    torch.manual_seed(0)
    model = HookedMamba2(Mamba2Config(d_model=32, n_layers=1, d_vocab=8, n_heads=64, d_head=1))
    dt = F.softplus(model.blocks[0].mixer.dt_bias)
    assert dt.min().item() >= 1e-3 - 1e-6 and dt.max().item() <= 0.1 + 1e-6 and dt.max() / dt.min() > 10
    assert_close(model.blocks[0].mixer.A, -torch.arange(1, 65, dtype=torch.float32))
