"""Massive activations: the criterion on a model with planted ones, the ratio, the intervention, every site.

Batched == per-prompt, compute == call and save/load of every analysis here
are in ``test_protocol.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from dynalens.kernels import ssd_scan_ref
from dynalens.models.transformer import HookedTransformerBridge
from dynalens.probes.analysis import AnalysisError
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveAblationResult,
    MassiveActivations,
    MassiveActivationsResult,
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
    found = MassiveActivations(k=4)(planted, PROMPT)
    assert found.found
    carriers = found.carriers()
    assert carriers[["prompt", "position", "channel"]].values.tolist() == [[0, HUGE_POS, HUGE_CHANNEL]]
    assert carriers.loc[0, "n_layers"] == planted.cfg.n_layers + 1  # embed and every layer
    layers = found.layers()
    assert (layers["n_massive"] == 1).all()
    metrics = found.metrics()
    assert metrics["n_massive"] == planted.cfg.n_layers + 1 and 0.9 * HUGE < metrics["max_magnitude"] < 1.1 * HUGE
    assert layers["top"].between(0.9 * HUGE, 1.1 * HUGE).all()
    # Token 9's 50 is ≥ 1000× the median but not > 100: the absolute threshold rejects it.
    second = found.to_frame().query("rank == 1")
    assert (second["position"] == BIG_POS).all() and (second["channel"] == BIG_CHANNEL).all()
    assert (second["ratio"] >= 1000).all() and not second["massive"].any()


def test_thresholds_are_parameters(planted):
    low = MassiveActivations(k=4, min_magnitude=10.0)(planted, PROMPT)
    assert set(map(tuple, low.carriers()[["position", "channel"]].values.tolist())) == {
        (HUGE_POS, HUGE_CHANNEL), (BIG_POS, BIG_CHANNEL)
    }
    strict = MassiveActivations(k=4, min_ratio=1e9)(planted, PROMPT)
    assert not strict.found and strict.carriers().empty
    with pytest.raises(ValueError, match="min_magnitude"):
        MassiveActivations(min_magnitude=-1.0)(planted, PROMPT)


def test_magnitudes_and_medians_match_huggingface_hidden_states(planted, planted_hf):
    found = MassiveActivations(k=3)(planted, PROMPT)
    with torch.no_grad():
        hidden = planted_hf(PROMPT, output_hidden_states=True).hidden_states
    # HF's last hidden state is after the final norm; the others are embed, then each layer's output.
    for row in range(planted.cfg.n_layers):
        mags = hidden[row][0].abs()
        torch.testing.assert_close(found.top_values[0, row], mags.flatten().topk(3).values, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(found.medians[0, row], mags.median(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(found.channel_max[0, row], mags.max(0).values, rtol=1e-4, atol=1e-4)


def test_ratio_is_mean_max_over_mean_median(planted, planted_hf):
    prompts = torch.tensor([[1, HUGE_TOKEN, 3, 4], [6, 7, 8, 10]])
    found = MassiveActivations(k=1)(planted, prompts)
    with torch.no_grad():
        hidden = planted_hf(prompts, output_hidden_states=True).hidden_states
    for row in range(planted.cfg.n_layers):
        mags = hidden[row].abs().flatten(1)
        expected = mags.max(1).values.mean() / mags.median(1).values.mean()
        torch.testing.assert_close(found.ratio[row], expected, rtol=1e-4, atol=0)
    np.testing.assert_allclose(found.layers()["ratio"].to_numpy(), found.ratio.numpy(), rtol=1e-6)
    # One massive sequence out of two: the ratio is still far above that of the plain ones alone.
    assert found.ratio[0] > 100 * MassiveActivations(k=1)(planted, prompts[1:]).ratio[0]


def _hf_loss_with_zeroed(planted_hf, tokens, position):
    """HF's per-sequence next-token loss with channel HUGE_CHANNEL of ``position`` zeroed in every layer's output."""

    def zero(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, position, HUGE_CHANNEL] = 0.0
        return output

    modules = [planted_hf.model.embed_tokens, *planted_hf.model.layers]
    handles = [m.register_forward_hook(zero) for m in modules] if position is not None else []
    try:
        with torch.no_grad():
            logits = planted_hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


def test_zeroing_matches_the_same_edit_done_in_huggingface(planted, planted_hf):
    result = MassiveAblation(mode="zero")(planted, PROMPT)
    assert result.n_entries.tolist() == [planted.cfg.n_layers + 1]
    assert result.channels == [HUGE_CHANNEL]
    assert result.metrics()["ablated"] == result.loss_ablated.item()
    expected = _hf_loss_with_zeroed(planted_hf, PROMPT, HUGE_POS)
    torch.testing.assert_close(result.loss_ablated, expected, rtol=1e-4, atol=0)
    clean = _hf_loss_with_zeroed(planted_hf, PROMPT, None)
    torch.testing.assert_close(result.loss_clean, clean, rtol=1e-4, atol=0)
    assert abs(result.loss_ablated.item() - clean.item()) > 1e-3  # the edit did something
    assert result.loss_random.item() != result.loss_ablated.item()


def test_zeroing_a_batch_edits_only_the_prompts_that_carry_them(planted, planted_hf):
    batch = torch.cat([PROMPT, torch.tensor([[1, 2, 3, 4, 6, 11, 12]])])
    result = MassiveAblation(mode="zero")(planted, batch)
    assert result.n_entries.tolist() == [planted.cfg.n_layers + 1, 0]
    torch.testing.assert_close(result.loss_ablated[:1], _hf_loss_with_zeroed(planted_hf, PROMPT, HUGE_POS),
                               rtol=1e-4, atol=0)  # fmt: skip
    torch.testing.assert_close(result.loss_ablated[1], result.loss_clean[1])  # nothing to replace
    torch.testing.assert_close(result.loss_clean, _hf_loss_with_zeroed(planted_hf, batch, None), rtol=1e-4, atol=0)
    assert result.to_frame()["n_entries"].tolist() == [planted.cfg.n_layers + 1, 0]


def test_mean_of_one_prompt_is_its_own_value(planted):
    # With one prompt each massive entry's mean is its own value: the loss is unchanged.
    result = MassiveAblation(mode="mean")(planted, PROMPT)
    assert result.loss_ablated.item() == pytest.approx(result.loss_clean.item(), rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        MassiveAblation(mode="one")(planted, PROMPT)
    with pytest.raises(ValueError, match="at least two tokens"):
        MassiveAblation()(planted, PROMPT[:, :1])


def test_state_sites_of_mamba_and_rnn(tiny_mamba, tiny_rnn, tokens):
    assert site_hook_names(tiny_mamba, "state") == ["blocks.0.mixer.hook_ssm_state", "blocks.1.mixer.hook_ssm_state"]
    assert site_hook_names(tiny_rnn, "state") == ["blocks.0.cell.hook_hidden", "blocks.1.cell.hook_hidden"]
    found = MassiveActivations(site="state", k=5)(tiny_mamba, tokens)
    _, cache = tiny_mamba.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_ssm_state")
    state = cache["blocks.1.mixer.hook_ssm_state"][0].abs().flatten(1)  # [pos, d_inner * d_state]
    assert found.channel_max.shape[2] == state.shape[1]
    torch.testing.assert_close(found.top_values[0, 1], state.flatten().topk(5).values)
    torch.testing.assert_close(found.medians[0, 1], state.median())
    pos, ch = found.top_positions[0, 1, 0], found.top_channels[0, 1, 0]
    assert state[pos, ch] == found.top_values[0, 1, 0]
    rnn = MassiveActivations(site="state")(tiny_rnn, tokens)
    assert rnn.hook_names == ["blocks.0.cell.hook_hidden", "blocks.1.cell.hook_hidden"]
    assert rnn.layers()["layer"].tolist() == ["L0 hidden", "L1 hidden"]


PLANT_POS, PLANT_HEAD, PLANT_P, PLANT_X = 3, 2, 5, 1e7


@pytest.mark.parametrize(("fixture", "layer", "rows"), [("tiny_mamba2", 1, [0, 1]), ("tiny_hybrid", 2, [0, 2])])
def test_a_planted_ssd_state_value_is_found_where_the_reference_scan_puts_it(fixture, layer, rows, request, tokens):
    """``hook_x`` of one head channel set to 1e7 at one position: the state of that (head, p) row
    (``dt x Bᵀ`` added, then decaying) is massive, as the sequential reference scan computes it."""
    model = request.getfixturevalue(fixture)
    assert site_hook_names(model, "state") == [f"blocks.{r}.mixer.hook_ssm_state" for r in rows]

    def plant(x, hook):
        x = x.clone()
        x[:, PLANT_POS, PLANT_HEAD, PLANT_P] = PLANT_X
        return x

    parts = [f"blocks.{layer}.mixer.hook_{part}" for part in ("x", "dt", "B", "C")]
    with model.hooks(fwd_hooks=[(parts[0], plant)]):
        found = MassiveActivations(site="state", k=4)(model, tokens)
        _, cache = model.run_with_cache(tokens, names_filter=parts)
    mixer = model.blocks[layer].mixer
    _, states = ssd_scan_ref(*(cache[name] for name in parts[:2]), mixer.A, *(cache[name] for name in parts[2:]),
                             return_states=True)  # fmt: skip
    magnitude = states[0].abs().flatten(1)  # [pos, h * p * n]
    row = rows.index(layer)
    torch.testing.assert_close(found.top_values[0, row], magnitude.flatten().topk(4).values, rtol=1e-4, atol=0)
    torch.testing.assert_close(found.medians[0, row], magnitude.median(), rtol=1e-3, atol=1e-6)
    p, n = mixer.cfg.d_head, mixer.cfg.d_state
    channels = found.top_channels[0, row]
    assert (channels // (p * n) == PLANT_HEAD).all() and (channels // n % p == PLANT_P).all()
    assert (found.top_positions[0, row] >= PLANT_POS).all() and bool(found.massive[0, row, 0])
    assert not found.massive[0, 1 - row].any()  # the earlier SSM layer runs before the edit
    assert found.layers()["layer"].tolist() == [f"L{r} ssm_state" for r in rows]


@pytest.mark.parametrize("fixture", ["tiny_mamba2", "tiny_hybrid"])
def test_ssd_state_site_of_a_ragged_batch_equals_each_prompt_alone(fixture, request):
    model = request.getfixturevalue(fixture)
    ragged = [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]]
    analysis = MassiveActivations(site="state", k=6)
    together = analysis(model, ragged).to_frame()
    for i, row in enumerate(ragged):
        alone = analysis(model, [row]).to_frame()
        mine = together[together["prompt"] == i].reset_index(drop=True)
        assert mine[["layer", "rank", "position", "channel"]].equals(alone[["layer", "rank", "position", "channel"]])
        np.testing.assert_allclose(mine["magnitude"], alone["magnitude"], rtol=1e-5)
        np.testing.assert_allclose(mine["median"], alone["median"], rtol=1e-5, atol=1e-9)


def test_resid_site_on_every_architecture(any_model, tokens):
    found = MassiveActivations(k=3)(any_model, tokens)
    assert len(found.hook_names) == any_model.cfg.n_layers + 1
    assert found.top_values.shape == (1, any_model.cfg.n_layers + 1, 3)
    assert (found.top_values[..., :-1] >= found.top_values[..., 1:]).all()
    assert torch.isfinite(found.ratio).all()


def test_short_prompts_leave_their_missing_entries_empty(tiny_rnn):
    found = MassiveActivations(site="state", k=20)(tiny_rnn, torch.tensor([[3]]))  # 1 token × 8 channels
    assert found.top_values.shape == (1, 2, 20)
    assert torch.isfinite(found.top_values[..., :8]).all() and found.top_values[..., 8:].isnan().all()
    assert (found.top_positions[..., 8:] == -1).all() and len(found.to_frame()) == 2 * 8


def test_bad_sites_are_named(tiny_llama, tiny_rnn, tokens):
    with pytest.raises(AnalysisError, match="recurrent state, which a transformer model does not have"):
        site_hook_names(tiny_llama, "state")
    with pytest.raises(ValueError, match="'resid', 'state'"):
        site_hook_names(tiny_rnn, "stat")


def test_results_save_load_and_draw(planted, tmp_path):
    found = MassiveActivations(k=4)(planted, PROMPT)
    found.save(tmp_path / "m.safetensors")
    back = Result.load(tmp_path / "m.safetensors")
    assert isinstance(back, MassiveActivationsResult)
    torch.testing.assert_close(back.top_values, found.top_values)
    assert back.carriers().equals(found.carriers())
    fig = found.figure()
    assert fig.data[-1].name == "massive" and list(fig.data[-1].x) == [HUGE_CHANNEL] * (planted.cfg.n_layers + 1)
    assert len(found.figure(kind="layers").data) == 5
    assert len(found.figure(prompt=0).data) == 2
    with pytest.raises(ValueError, match="kind must be"):
        found.figure(kind="bars")
    ablation = MassiveAblation()(planted, PROMPT)
    ablation.save(tmp_path / "a.safetensors")
    assert MassiveAblationResult.load(tmp_path / "a.safetensors").mean_losses() == ablation.mean_losses()
    assert ablation.top(1).loc[0, "n_entries"] == planted.cfg.n_layers + 1
