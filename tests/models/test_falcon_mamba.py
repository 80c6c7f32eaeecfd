"""Falcon-Mamba folders in ``HookedMamba``: Mamba-1 with RMS-normalised B, C and Δ, against HF."""

from __future__ import annotations

import dynalens as dl  # isort: skip  (before transformers; see tests/conftest.py)
import pytest
import torch
from transformers import FalconMambaConfig, FalconMambaForCausalLM

from dynalens.models import HookedMamba, names
from dynalens.models.prompts import Prompts
from dynalens.models.surface import architecture_of
from tests.tolerances import assert_close

# Ours and HuggingFace's model run other scan kernels (chunked, fused) over every layer:
# their logits agree to 10x the float32 table.
HF_PATH = 10

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
            pad_token_id=0, bos_token_id=0, eos_token_id=None, mixer_rms_eps=1e-6)  # fmt: skip


def hf_falcon_mamba(seed: int = 0, **overrides) -> FalconMambaForCausalLM:
    torch.manual_seed(seed)
    return FalconMambaForCausalLM(FalconMambaConfig(**(BASE | overrides))).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[FalconMambaForCausalLM, HookedMamba]:
    hf = hf_falcon_mamba(seed=1)
    return hf, HookedMamba.from_hf(hf)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize(
    "overrides", [{}, dict(tie_word_embeddings=False, use_bias=True, time_step_rank=3, mixer_rms_eps=1e-3)],
    ids=["default", "untied-bias-rank3-eps"],
)  # fmt: skip
def test_logits_and_greedy_generation_match_hf(overrides, tokens):
    hf = hf_falcon_mamba(**overrides)
    ours = HookedMamba.from_hf(hf)
    assert ours.cfg.bcdt_norm and ours.cfg.bcdt_eps == hf.config.mixer_rms_eps
    with torch.no_grad():
        assert_close(ours(tokens), hf_logits(hf, tokens), scale=HF_PATH)
        hf_out = hf.generate(tokens, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(tokens))
    assert torch.equal(ours.generate(tokens, max_new_tokens=10), hf_out)


def test_the_norms_differ_from_plain_mamba(pair, tokens):
    """Turning the B, C, Δ norms off changes the logits: the parity above depends on them."""
    hf, ours = pair
    plain = HookedMamba.from_hf(hf)
    plain.cfg.bcdt_norm = False
    with torch.no_grad():
        assert (plain(tokens) - hf_logits(hf, tokens)).abs().max().item() > 1e-2


def test_norm_hooks_hold_what_the_scan_reads(pair, tokens):
    _, ours = pair
    layer = 1
    hooks = [names.mixer(layer, part) for part in ("x_proj", "B", "C", "delta")] + [
        names.block(layer, "mixer.b_layernorm.hook_normalized"),
        names.block(layer, "mixer.c_layernorm.hook_scale"),
        names.block(layer, "mixer.dt_layernorm.hook_normalized"),
    ]
    _, cache = ours.run_with_cache(tokens, names_filter=hooks)
    cfg, mixer = ours.cfg, ours.blocks[layer].mixer
    dt, B, C = cache[hooks[0]].split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.bcdt_eps)  # noqa: E731
    assert_close(cache[hooks[1]], rms(B))
    assert_close(cache[hooks[4]], rms(B))
    assert_close(cache[hooks[2]], rms(C))
    assert_close(cache[hooks[5]], C.pow(2).mean(-1, keepdim=True).add(cfg.bcdt_eps).sqrt())
    assert_close(cache[hooks[6]], rms(dt))
    delta = torch.nn.functional.softplus(mixer.dt_proj(rms(dt)))
    assert_close(cache[hooks[3]], delta)


def test_editing_the_b_norm_changes_the_output(pair, tokens):
    _, ours = pair
    with torch.no_grad():
        clean = ours(tokens)
        edited = ours.run_with_hooks(
            tokens, fwd_hooks=[(names.block(0, "mixer.b_layernorm.hook_normalized"), lambda x, hook: 2 * x)]
        )
    assert (edited - clean).abs().max().item() > 1e-3


def test_padded_batch_equals_its_unpadded_runs(pair):
    _, ours = pair
    rows = [[3, 4, 5, 6, 7, 8, 9], [12, 13, 14], [15, 16, 17, 18, 19]]
    prompts = Prompts.from_ids(rows)
    with torch.no_grad():
        logits = ours(prompts)
        for i, row in enumerate(rows):
            assert_close(prompts.real(logits, i), ours(torch.tensor([row]))[0])


def test_dl_load_and_save_round_trip(pair, tokens, tmp_path):
    hf, ours = pair
    hf.save_pretrained(tmp_path / "hf")
    loaded = dl.load(tmp_path / "hf")
    assert isinstance(loaded, HookedMamba) and architecture_of(loaded) == "mamba" and loaded.cfg.bcdt_norm
    with torch.no_grad():
        assert_close(loaded(tokens), hf_logits(hf, tokens), scale=HF_PATH)
    ours.save_pretrained(tmp_path / "ours")
    again = FalconMambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again.config) is FalconMambaConfig
    assert_close(hf_logits(again, tokens), hf_logits(hf, tokens))
