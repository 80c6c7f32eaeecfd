"""Massive activations: the criterion on a model with planted ones, the ratio, the intervention, every site."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dynalens.models.transformer import HookedTransformerBridge
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveActivations,
    ablate_massive,
    massive_activations,
    massive_ratio,
    site_hook_names,
)
from dynalens.probes.results import Result

VOCAB, HUGE_TOKEN, HUGE_CHANNEL, HUGE = 32, 5, 7, 5000.0
BIG_TOKEN, BIG_CHANNEL, BIG = 9, 3, 50.0


@pytest.fixture(scope="module")
def planted_hf() -> LlamaForCausalLM:
    """A random 3-layer Llama whose embedding of token 5 holds 5000 in channel 7 and of token 9 holds 50 in channel 3.

    Everything else is ~0.02 (the init), so the stream of token 5 carries a
    massive activation in channel 7 through every layer, while token 9's 50
    is far above the median but below the absolute threshold of 100.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight[HUGE_TOKEN, HUGE_CHANNEL] = HUGE
        hf.model.embed_tokens.weight[BIG_TOKEN, BIG_CHANNEL] = BIG
    hf.set_attn_implementation("eager")
    return hf


@pytest.fixture(scope="module")
def planted(planted_hf: LlamaForCausalLM) -> HookedTransformerBridge:
    return HookedTransformerBridge.from_hf(copy.deepcopy(planted_hf), name="planted")


PROMPT = torch.tensor([[1, 2, HUGE_TOKEN, 4, BIG_TOKEN, 11, 12]])
HUGE_POS, BIG_POS = 2, 4


def test_criterion_finds_the_planted_activation_and_only_it(planted):
    found = massive_activations(planted, PROMPT, k=4)
    assert found.found
    carriers = found.carriers()
    assert carriers[["position", "channel"]].values.tolist() == [[HUGE_POS, HUGE_CHANNEL]]
    assert carriers.loc[0, "n_layers"] == planted.cfg.n_layers + 1  # embed and every layer
    layers = found.layers()
    assert (layers["n_massive"] == 1).all()
    assert layers["top"].between(0.9 * HUGE, 1.1 * HUGE).all()
    # Token 9's 50 is ≥ 1000× the median but not > 100: the absolute threshold rejects it.
    second = found.to_frame().query("rank == 1")
    assert (second["position"] == BIG_POS).all() and (second["channel"] == BIG_CHANNEL).all()
    assert (second["ratio"] >= 1000).all() and not second["massive"].any()


def test_thresholds_are_parameters(planted):
    low = massive_activations(planted, PROMPT, k=4, min_magnitude=10.0)
    assert set(map(tuple, low.carriers()[["position", "channel"]].values.tolist())) == {
        (HUGE_POS, HUGE_CHANNEL), (BIG_POS, BIG_CHANNEL)
    }
    strict = massive_activations(planted, PROMPT, k=4, min_ratio=1e9)
    assert not strict.found and strict.carriers().empty
    with pytest.raises(ValueError, match="min_magnitude"):
        massive_activations(planted, PROMPT, min_magnitude=-1.0)


def test_magnitudes_and_medians_match_huggingface_hidden_states(planted, planted_hf):
    found = massive_activations(planted, PROMPT, k=3)
    with torch.no_grad():
        hidden = planted_hf(PROMPT, output_hidden_states=True).hidden_states
    # HF's last hidden state is after the final norm; the others are embed, then each layer's output.
    for row in range(planted.cfg.n_layers):
        mags = hidden[row][0].abs()
        torch.testing.assert_close(found.top_values[row], mags.flatten().topk(3).values, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(found.medians[row], mags.median(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(found.channel_max[row], mags.max(0).values, rtol=1e-4, atol=1e-4)


def test_ratio_is_mean_max_over_mean_median(planted, planted_hf):
    prompts = torch.tensor([[1, HUGE_TOKEN, 3, 4], [6, 7, 8, 10]])
    ratio = massive_ratio(planted, prompts)
    with torch.no_grad():
        hidden = planted_hf(prompts, output_hidden_states=True).hidden_states
    for row in range(planted.cfg.n_layers):
        mags = hidden[row].abs().flatten(1)
        expected = mags.max(1).values.mean() / mags.median(1).values.mean()
        torch.testing.assert_close(ratio[row], expected, rtol=1e-4, atol=0)
    # One massive sequence out of two: the ratio is still far above that of the plain ones alone.
    assert ratio[0] > 100 * massive_ratio(planted, prompts[1:])[0]


def test_zeroing_matches_the_same_edit_done_in_huggingface(planted, planted_hf):
    result = ablate_massive(planted, PROMPT, mode="zero")
    assert result.n_entries.tolist() == [planted.cfg.n_layers + 1]
    assert result.channels == [HUGE_CHANNEL]

    def zero(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, HUGE_POS, HUGE_CHANNEL] = 0.0
        return output

    modules = [planted_hf.model.embed_tokens, *planted_hf.model.layers]
    handles = [m.register_forward_hook(zero) for m in modules]
    try:
        with torch.no_grad():
            logits = planted_hf(PROMPT).logits
    finally:
        for h in handles:
            h.remove()
    expected = F.cross_entropy(logits[0, :-1], PROMPT[0, 1:]).item()
    assert result.loss_ablated.item() == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():
        clean = F.cross_entropy(planted_hf(PROMPT).logits[0, :-1], PROMPT[0, 1:]).item()
    assert result.loss_clean.item() == pytest.approx(clean, rel=1e-4)
    assert abs(result.loss_ablated.item() - clean) > 1e-3  # the edit did something
    assert result.loss_random.item() != result.loss_ablated.item()


def test_mean_of_one_prompt_is_its_own_value(planted):
    # With one prompt each massive entry's mean is its own value: the loss is unchanged.
    result = ablate_massive(planted, PROMPT, mode="mean")
    assert result.loss_ablated.item() == pytest.approx(result.loss_clean.item(), rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        ablate_massive(planted, PROMPT, mode="one")


def test_state_sites_of_mamba_and_rnn(tiny_mamba, tiny_rnn, tokens):
    assert site_hook_names(tiny_mamba, "state") == ["blocks.0.mixer.hook_ssm_state", "blocks.1.mixer.hook_ssm_state"]
    assert site_hook_names(tiny_rnn, "state") == ["blocks.0.cell.hook_hidden", "blocks.1.cell.hook_hidden"]
    found = massive_activations(tiny_mamba, tokens, site="state", k=5)
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_ssm_state")
    state = cache["blocks.1.mixer.hook_ssm_state"][0].abs().flatten(1)  # [pos, d_inner * d_state]
    assert found.channel_max.shape[1] == state.shape[1]
    torch.testing.assert_close(found.top_values[1], state.flatten().topk(5).values)
    torch.testing.assert_close(found.medians[1], state.median())
    pos, ch = found.top_positions[1, 0], found.top_channels[1, 0]
    assert state[pos, ch] == found.top_values[1, 0]
    rnn = massive_activations(tiny_rnn, tokens, site="state")
    assert rnn.hook_names == ["blocks.0.cell.hook_hidden", "blocks.1.cell.hook_hidden"]


def test_resid_site_on_every_architecture(any_model, tokens):
    found = massive_activations(any_model, tokens, k=3)
    assert len(found.hook_names) == any_model.cfg.n_layers + 1
    assert found.top_values.shape == (any_model.cfg.n_layers + 1, 3)
    assert (found.top_values[:, :-1] >= found.top_values[:, 1:]).all()
    assert torch.isfinite(massive_ratio(any_model, tokens)).all()


def test_bad_sites_are_named(tiny_llama, tiny_rnn, tokens):
    with pytest.raises(ValueError, match="recurrent state"):
        site_hook_names(tiny_llama, "state")
    with pytest.raises(ValueError, match="'resid', 'state'"):
        site_hook_names(tiny_rnn, "stat")


def test_results_save_load_and_draw(planted, tmp_path):
    found = massive_activations(planted, PROMPT, k=4)
    found.save(tmp_path / "m.safetensors")
    back = Result.load(tmp_path / "m.safetensors")
    assert isinstance(back, MassiveActivations)
    torch.testing.assert_close(back.top_values, found.top_values)
    assert back.carriers().equals(found.carriers())
    fig = found.figure()
    assert fig.data[-1].name == "massive" and list(fig.data[-1].x) == [HUGE_CHANNEL] * (planted.cfg.n_layers + 1)
    assert len(found.figure(kind="layers").data) == 5
    ablation = ablate_massive(planted, PROMPT)
    ablation.save(tmp_path / "a.safetensors")
    assert MassiveAblation.load(tmp_path / "a.safetensors").mean_losses() == ablation.mean_losses()
    assert ablation.top(1).loc[0, "n_entries"] == planted.cfg.n_layers + 1
