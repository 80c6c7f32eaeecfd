"""HookedMamba against HF ``MambaForCausalLM`` and TransformerBridge's Mamba."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import dynalens as dl
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM, PreTrainedTokenizerFast
from transformer_lens.model_bridge import TransformerBridge

import dynalens.models.mamba as mamba_module
from dynalens.kernels import mixer_matrix, selective_scan
from dynalens.models import HookedMamba, MambaConfig
from dynalens.models.validation import HookNameError
from tests.tolerances import assert_close

# Ours and HuggingFace's model run other scan kernels (chunked, fused) over every layer:
# their logits agree to 10x the float32 table.
HF_PATH = 10

VOCAB = 64

# (name, HF MambaConfig overrides): d_state 4 and 16, odd dt_rank, use_bias on/off, conv kernel 2 and 4.
CONFIGS = {
    "d_state4-conv4": dict(hidden_size=32, state_size=4, conv_kernel=4),
    "d_state16-conv2-bias-rank3": dict(hidden_size=32, state_size=16, conv_kernel=2, use_bias=True, time_step_rank=3),
    "untied-noconvbias-expand1": dict(
        hidden_size=48, state_size=8, expand=1, use_conv_bias=False, tie_word_embeddings=False
    ),
}
MAMBA_130M = dict(hidden_size=768, num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2)


def hf_mamba(seed: int = 0, **overrides) -> MambaForCausalLM:
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4) | overrides
    torch.manual_seed(seed)
    return MambaForCausalLM(HFMambaConfig(**kwargs)).eval()


def word_tokenizer(n: int = VOCAB) -> PreTrainedTokenizerFast:
    """An offline tokenizer: words ``w0 .. w{n-2}`` and ``[UNK]``."""
    vocab = {f"w{i}": i for i in range(n - 1)} | {"[UNK]": n - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def pair() -> tuple[MambaForCausalLM, HookedMamba]:
    hf = hf_mamba(seed=1, num_hidden_layers=3)
    return hf, HookedMamba.from_hf(hf, tokenizer=word_tokenizer())


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_and_greedy_generation_match_hf(overrides):
    hf = hf_mamba(**overrides)
    ours = HookedMamba.from_hf(hf)
    tokens = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert_close(ours(tokens), expected, scale=HF_PATH)

    with torch.no_grad():
        hf_out = hf.generate(tokens, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(tokens))
    ours_out = ours.generate(tokens, max_new_tokens=20)
    assert hf_out.shape == ours_out.shape == (2, 36)
    assert torch.equal(ours_out, hf_out)
    assert len(set(ours_out[:, 16:].flatten().tolist())) > 1  # not a degenerate repeat


def test_mamba_130m_shape_matches_hf_as_closely_as_hf_matches_float64():
    """The mamba-130m shape (d_model 768, 24 layers): random init puts the residual at ~800,
    so float32 itself is ~1e-3 from the float64 answer; ours must be as close as HF's own."""
    hf = hf_mamba(vocab_size=1000, **MAMBA_130M)
    ours = HookedMamba.from_hf(hf)
    tokens = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        truth = copy.deepcopy(hf).double()(tokens).logits
        hf_err = (hf(tokens).logits - truth).abs().max().item()
        ours_logits = ours(tokens)
    ours_err = (ours_logits - truth).abs().max().item()
    assert ours_err <= max(1e-4, 2 * hf_err), (ours_err, hf_err)
    assert torch.equal(ours_logits.argmax(-1), truth.argmax(-1))


@pytest.mark.slow
def test_mamba_130m_greedy_generation_matches_hf():
    hf = hf_mamba(vocab_size=50280, **MAMBA_130M)
    ours = HookedMamba.from_hf(hf)
    tokens = torch.randint(0, 50280, (1, 16))
    with torch.no_grad():
        expected = hf.generate(tokens, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours.generate(tokens, max_new_tokens=20), expected)


def test_float64_matches_hf_float64_closely(pair, tokens):
    hf, ours = pair
    with torch.no_grad():
        expected = copy.deepcopy(hf).double()(tokens).logits
    got = copy.deepcopy(ours).double()(tokens)
    assert got.dtype == torch.float64
    assert_close(got, expected)  # HF keeps A, D, dt bias in float32


# ------------------------------------------------------- TransformerBridge parity
SHARED_WITH_BRIDGE = [
    "hook_embed",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.norm.hook_scale",
    "blocks.{l}.norm.hook_normalized",
    "blocks.{l}.mixer.hook_in_proj",
    "blocks.{l}.mixer.hook_x_proj",
    "blocks.{l}.mixer.hook_ssm_out",
    "blocks.{l}.hook_mixer_out",
    "blocks.{l}.hook_resid_post",
    "ln_final.hook_normalized",
]


def test_matches_transformer_bridge_on_shared_hooks(pair, tokens, tmp_path):
    hf, ours = pair
    hf.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=copy.deepcopy(hf))  # it rewires the model
    names = sorted({n.format(l=l) for n in SHARED_WITH_BRIDGE for l in range(ours.cfg.n_layers)})
    bridge_logits, bridge_cache = bridge.run_with_cache(tokens, names_filter=names)
    logits, cache = ours.run_with_cache(tokens, names_filter=names)
    for name in names:
        assert cache[name].shape == bridge_cache[name].shape, name
        assert_close(cache[name], bridge_cache[name], msg=name)
    assert_close(logits, bridge_logits, scale=HF_PATH)


# --------------------------------------------------------------------- hooks
def hook_shapes(cfg: MambaConfig, batch: int, pos: int) -> dict[str, tuple[int, ...]]:
    d, n = cfg.d_inner, cfg.d_state
    shapes = {"hook_embed": (batch, pos, cfg.d_model), "ln_final.hook_scale": (batch, pos, 1)}
    shapes["ln_final.hook_normalized"] = (batch, pos, cfg.d_model)
    for l in range(cfg.n_layers):
        block = {
            "hook_resid_pre": cfg.d_model,
            "norm.hook_normalized": cfg.d_model,
            "norm.hook_scale": 1,
            "mixer.hook_in_proj": 2 * d,
            "mixer.hook_conv": d,
            "mixer.hook_x_proj": cfg.dt_rank + 2 * n,
            "mixer.hook_delta": d,
            "mixer.hook_B": n,
            "mixer.hook_C": n,
            "mixer.hook_y": d,
            "mixer.hook_gate": d,
            "mixer.hook_ssm_out": cfg.d_model,
            "hook_mixer_out": cfg.d_model,
            "hook_resid_post": cfg.d_model,
        }
        shapes |= {f"blocks.{l}.{k}": (batch, pos, v) for k, v in block.items()}
        shapes[f"blocks.{l}.mixer.hook_ssm_state"] = (batch, pos, d, n)
    return shapes


def test_every_hook_has_its_documented_shape(pair, tokens):
    _, ours = pair
    expected = hook_shapes(ours.cfg, *tokens.shape)
    assert set(ours.hook_dict) == set(expected)
    _, cache = ours.run_with_cache(tokens)
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected


def test_ssm_state_is_materialised_only_when_asked(pair, tokens, monkeypatch):
    _, ours = pair
    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs.get("return_states", False))
        return selective_scan(*args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    _, cache = ours.run_with_cache(tokens, names_filter=lambda n: "ssm_state" not in n)
    assert not any(asked) and not any("ssm_state" in k for k in cache)
    asked.clear()
    ours.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_ssm_state")
    assert asked == [False, True, False]


def test_ssm_state_reads_out_to_y(pair, tokens):
    """``y_t = C_t h_t + D u_t`` from the cached states recovers ``hook_y`` of a run without them."""
    _, ours = pair
    mixer = ours.blocks[1].mixer
    _, plain = ours.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.") and "ssm_state" not in n)
    _, with_states = ours.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_ssm_state")
    h = with_states["blocks.1.mixer.hook_ssm_state"]
    y = torch.einsum("bldn,bln->bld", h, plain["blocks.1.mixer.hook_C"]) + mixer.D * plain["blocks.1.mixer.hook_conv"]
    assert_close(y, plain["blocks.1.mixer.hook_y"])
    # h_1 = Δ_1 B_1 u_1 from a zero initial state
    delta, B, u = (plain[f"blocks.1.mixer.hook_{k}"] for k in ("delta", "B", "conv"))
    h1 = delta[:, 0, :, None] * B[:, 0, None, :] * u[:, 0, :, None]
    assert_close(h[:, 0], h1)


def test_mixer_matrix_from_cache_reproduces_y(pair, tokens):
    _, ours = pair
    mixer = ours.blocks[0].mixer
    _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.mixer."))
    delta, B, C, u = (cache[f"blocks.0.mixer.hook_{k}"] for k in ("delta", "B", "C", "conv"))
    M = mixer_matrix(delta.transpose(1, 2), mixer.A, B.transpose(1, 2), C.transpose(1, 2), D=mixer.D)
    y = torch.einsum("bdij,bjd->bid", M, u)
    assert_close(y, cache["blocks.0.mixer.hook_y"])


def test_patching_delta_changes_the_scan_causally(pair, tokens):
    _, ours = pair
    clean = ours(tokens)
    same = ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_delta", lambda x, hook: x.clone())])
    assert torch.equal(same, clean)

    def double_from_5(delta, hook):
        delta = delta.clone()
        delta[:, 5:] *= 2
        return delta

    patched = ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_delta", double_from_5)])
    assert torch.equal(patched[:, :5], clean[:, :5])
    assert (patched[:, 5:] - clean[:, 5:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["blocks.1.mixer.hook_B", "blocks.0.mixer.hook_conv", "blocks.1.hook_resid_post"])
def test_patching_any_hook_changes_logits(pair, tokens, name):
    _, ours = pair
    patched = ours.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x * 1.5)])
    assert (patched - ours(tokens)).abs().max().item() > 1e-3


def _zero_after_3(in_place: bool):
    def edit(x, hook):
        x = x if in_place else x.clone()
        x[:, 3:] = 0
        return x

    return edit


def test_in_place_edits_never_reach_values_cached_before_them(pair, tokens):
    """Each hook gets its own tensor: editing one in place acts like editing a copy."""
    _, ours = pair
    names = ["blocks.0.mixer.hook_B", "blocks.1.hook_resid_pre", "blocks.1.hook_mixer_out", "blocks.2.mixer.hook_C"]
    caches = []
    for in_place in (True, False):
        with ours.hooks(fwd_hooks=[(name, _zero_after_3(in_place)) for name in names]):
            caches.append(ours.run_with_cache(tokens)[1])
    assert caches[0].keys() == caches[1].keys()
    for name in caches[0]:
        assert torch.equal(caches[0][name], caches[1][name]), name


def test_unknown_hook_name_lists_the_closest_names(pair, tokens):
    _, ours = pair
    with pytest.raises(HookNameError, match="blocks.0.mixer.hook_delta"):
        ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_dleta", lambda x, hook: x)])
    with pytest.raises(HookNameError, match="blocks.1.mixer.hook_ssm_state"):
        ours.run_with_cache(tokens, names_filter=["blocks.1.mixer.hook_ssm_states"])


def test_hooks_are_removed_and_weights_unchanged_after_an_error(pair, tokens):
    _, ours = pair
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    def boom(x, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        ours.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_y", boom)])
    ours.generate(tokens, max_new_tokens=3, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x + 1)])
    assert not any(hp.has_hooks() for hp in ours.hook_dict.values())
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# ------------------------------------------------------------ recurrent state
@pytest.mark.parametrize("split", [1, 7, 11])
def test_continuing_from_a_state_equals_the_full_forward(pair, tokens, split):
    _, ours = pair
    first, state = ours(tokens[:, :split], return_state=True)
    rest, state = ours(tokens[:, split:], state=state, return_state=True)
    assert state.pos == tokens.shape[1]
    assert_close(torch.cat([first, rest], dim=1), ours(tokens))


def test_one_new_token_scans_one_position(pair, tokens, monkeypatch):
    _, ours = pair
    _, state = ours(tokens, return_state=True)
    lengths = []

    def spy(u, *args, **kwargs):
        lengths.append(u.shape[-1])
        return selective_scan(u, *args, **kwargs)

    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    ours(tokens[:, :1], state=state)
    assert lengths == [1] * ours.cfg.n_layers


def test_generate_hooks_fire_on_each_new_token_at_its_position(pair, tokens):
    _, ours = pair
    seen = []
    name = "blocks.1.mixer.hook_ssm_state"
    out = ours.generate(tokens, max_new_tokens=5, fwd_hooks=[(name, lambda x, hook: seen.append(x.clone()))])
    # the prompt once, then each new token but the last (nothing reads its logits)
    assert [s.shape[1] for s in seen] == [tokens.shape[1]] + [1] * 4
    # each new token's state equals the full forward's state at that absolute position
    _, cache = ours.run_with_cache(out, names_filter=name)
    for i, s in enumerate(seen[1:]):
        pos = tokens.shape[1] + i
        assert_close(s[:, 0], cache[name][:, pos])


def test_a_hook_during_generate_steers_later_tokens(pair, tokens):
    _, ours = pair
    plain = ours.generate(tokens, max_new_tokens=8)
    steered = ours.generate(
        tokens, max_new_tokens=8, fwd_hooks=[("blocks.2.mixer.hook_ssm_state", lambda x, hook: x * 10)]
    )
    assert not torch.equal(plain, steered)


def test_generate_from_text_with_a_tokenizer(pair):
    _, ours = pair
    text = ours.generate("w1 w2 w3", max_new_tokens=4)
    assert isinstance(text, str) and text.startswith("w1 w2 w3") and len(text.split()) == 7


# ------------------------------------------------------------ loading/saving
def test_save_pretrained_loads_in_hf_and_back_bit_exact(pair, tokens, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mamba"
    hf = MambaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(hf(tokens).logits, ours(tokens), scale=HF_PATH)
    back = HookedMamba.from_pretrained(tmp_path)
    assert back.cfg == ours.cfg and back.tokenizer is not None
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())
    assert back.unembed.weight is back.embed.weight  # still tied


def test_untied_round_trip_and_dl_load(tokens, tmp_path):
    hf = hf_mamba(**CONFIGS["untied-noconvbias-expand1"])
    hf.save_pretrained(tmp_path)
    ours = dl.load(tmp_path)
    assert isinstance(ours, HookedMamba) and ours.cfg.architecture == "mamba"
    assert ours.unembed.weight is not ours.embed.weight
    with torch.no_grad():
        assert_close(hf(tokens).logits, ours(tokens), scale=HF_PATH)
    ours.save_pretrained(tmp_path / "again")
    again = HookedMamba.from_pretrained(tmp_path / "again")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_sharded_folder_loads(tokens, tmp_path):
    hf = hf_mamba(seed=1, num_hidden_layers=3)  # its own model: other tests hand `pair`'s to the Bridge
    ours = HookedMamba.from_hf(hf)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = HookedMamba.from_pretrained(tmp_path)
    assert torch.equal(sharded(tokens), ours(tokens))


def test_from_hf_copies_weights(pair):
    hf, ours = pair
    assert all(
        p.data_ptr() != q.data_ptr() for p in hf.parameters() for q in ours.parameters()
    )


def test_cfg_exposes_the_sizes(pair):
    hf, ours = pair
    cfg = ours.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.d_vocab) == (32, 3, VOCAB)
    assert (cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv) == (64, 4, 2, 4)
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    assert ours.blocks[0].mixer.A.shape == (64, 4) and (ours.blocks[0].mixer.A < 0).all()


def test_bad_folders_and_configs_give_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HookedMamba.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HFMambaConfig(vocab_size=8).to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        HookedMamba.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        MambaConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="d_state"):
        MambaConfig(d_model=8, n_layers=1, d_vocab=8, d_state=0)


def test_bad_tokens_and_state_give_clear_errors(pair, tokens):
    _, ours = pair
    with pytest.raises(ValueError, match="out of range"):
        ours(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match="empty prompt"):
        ours("   ")
    _, state = ours(tokens, return_state=True)
    with pytest.raises(ValueError, match="batch of 2"):
        ours(tokens[:1], state=state)
