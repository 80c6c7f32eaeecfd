"""Steering: intended effect on the resid and the logits, positions step by step during
``generate`` with the cache, hooks removed and weights bit-identical, on all three architectures."""

from __future__ import annotations

import pytest
import torch
from dynalens.circuits.directions import Direction, site_width
from dynalens.circuits.steering import SteeringController, pass_mask, steer
from dynalens.models import names
from dynalens.models.prompts import Prompts
from dynalens.probes.results import Saved
from dynalens.models.mamba import HookedMamba, MambaConfig
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.models.zoo import get_entry

import dynalens as dl
from tests.tolerances import assert_close

PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def tiny_mamba():
    torch.manual_seed(0)
    return HookedMamba(MambaConfig(d_model=8, n_layers=2, d_vocab=16, d_state=2)).eval()


@pytest.fixture(scope="module")
def tiny_lstm():
    torch.manual_seed(0)
    return HookedRNN(RNNConfig(d_model=8, n_layers=2, d_vocab=16, cell="lstm")).eval()


@pytest.fixture(scope="module")
def tiny_mamba2():
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    torch.manual_seed(0)
    return HookedMamba2(Mamba2Config(d_model=8, n_layers=2, d_vocab=16, n_heads=2, d_head=8, d_state=4)).eval()


@pytest.fixture(params=["tiny_llama", "tiny_mamba", "tiny_mamba2", "tiny_lstm"])
def model_and_prompt(request):
    model = request.getfixturevalue(request.param)
    prompt = (
        PROMPT if request.param == "tiny_llama" else torch.tensor([[3, 1, 4, 1, 5, 9]])
    )
    return model, prompt


def random_direction(model, layers=None) -> Direction:
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    g = torch.Generator().manual_seed(7)
    return Direction(
        torch.randn(len(layers), model.cfg.d_model, generator=g), layers=layers
    )


def resid_at(model, prompt, layer: int) -> torch.Tensor:
    _, cache = model.run_with_cache(prompt, names_filter=[names.resid_post(layer)])
    return cache[names.resid_post(layer)]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def n_hooks(model) -> int:
    """Hooks on the model's hook points, module pre-hooks, and a wrapped ``forward`` or ``generate``."""
    return (
        sum(len(hp.fwd_hooks) for hp in model.hook_dict.values())
        + len(model._forward_pre_hooks)
        + int("forward" in vars(model))
        + int("generate" in vars(model))
    )


def test_add_and_ablate_move_the_projection(model_and_prompt):
    model, prompt = model_and_prompt
    d = random_direction(model)
    last = model.cfg.n_layers - 1
    base = d.project(resid_at(model, prompt, last), last)
    with steer(model, d, layers=[last], alpha=3.0):
        added = d.project(resid_at(model, prompt, last), last)
    with steer(model, d, layers=[last], mode="ablate"):
        ablated = d.project(resid_at(model, prompt, last), last)
    with steer(model, d, layers=[last], alpha=-2.0, mode="ablate_add"):
        set_to = d.project(resid_at(model, prompt, last), last)
    assert_close(added, base + 3.0)
    assert_close(ablated, torch.zeros_like(base))
    assert_close(set_to, torch.full_like(base, -2.0))


def test_steering_an_early_layer_changes_later_layers_only(model_and_prompt):
    model, prompt = model_and_prompt
    d = random_direction(model, layers=[0])
    before = [resid_at(model, prompt, layer) for layer in (0, 1)]
    with steer(model, d, alpha=4.0):
        after = [resid_at(model, prompt, layer) for layer in (0, 1)]
    torch.testing.assert_close(
        after[0] - before[0], 4.0 * d.unit().vectors[0].expand_as(before[0])
    )
    assert not torch.allclose(after[1], before[1], atol=1e-3)


def test_adding_an_unembedding_direction_raises_its_logit(tiny_llama):
    token = tiny_llama.to_tokens(" fox", prepend_bos=False)[0, 0].item()
    last = tiny_llama.cfg.n_layers - 1
    d = Direction(tiny_llama.W_U[:, token].detach().float().cpu()[None], layers=[last])
    base = tiny_llama(PROMPT)[0, -1]
    with steer(tiny_llama, d, alpha=30.0):
        steered = tiny_llama(PROMPT)[0, -1]
    assert steered[token] - base[token] > 1.0
    assert steered.argmax().item() == token != base.argmax().item()


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_positions_step_by_step_during_generate(model_and_prompt, positions):
    """Ablate-then-add sets the projection to alpha exactly at the steered positions, pass by pass."""
    model, prompt = model_and_prompt
    d = random_direction(model)
    name = names.resid_post(1)
    passes: list[torch.Tensor] = []

    def record(resid, hook):
        passes.append(d.project(resid, 1))

    with steer(model, d, layers=[1], alpha=5.0, mode="ablate_add", positions=positions):
        model.generate(prompt, 4, fwd_hooks=[(name, record)])
    n_prompt = model.to_tokens(prompt).shape[-1]
    # The cache is used: one pass over the prompt, then one position per pass (the
    # recurrent models also run the last new token, so they make one pass more).
    assert [p.shape[-1] for p in passes[:4]] == [n_prompt, 1, 1, 1] and len(passes) in (
        4,
        5,
    )
    assert all(p.shape[-1] == 1 for p in passes[1:])
    for i, projection in enumerate(passes):
        steered = positions == "all" or (positions == "prompt") == (i == 0)
        gap = (projection - 5.0).abs()
        if steered:
            assert gap.max() < 1e-4, f"pass {i} should be steered"
        else:
            assert gap.min() > 1.0, f"pass {i} should be untouched"


def test_generated_only_leaves_the_first_new_token_and_changes_later_ones(
    model_and_prompt,
):
    """The first new token comes from the prompt pass, so 'generated' cannot change it."""
    model, prompt = model_and_prompt
    d = random_direction(model)
    plain = model.generate(prompt, 6, return_type="tokens")
    n_prompt = model.to_tokens(prompt).shape[-1]
    with steer(model, d, alpha=50.0, positions="generated"):
        gen = model.generate(prompt, 6, return_type="tokens")
    with steer(model, d, alpha=50.0, positions="prompt"):
        prompt_only = model.generate(prompt, 6, return_type="tokens")
    assert gen[0, n_prompt] == plain[0, n_prompt]
    assert not torch.equal(gen, plain)
    assert not torch.equal(prompt_only[0, n_prompt:], gen[0, n_prompt:])


def test_one_token_prompt_is_still_a_prompt(tiny_mamba):
    d = random_direction(tiny_mamba)
    passes = []
    with steer(
        tiny_mamba, d, layers=[1], alpha=5.0, mode="ablate_add", positions="prompt"
    ):
        tiny_mamba.generate(
            torch.tensor([[5]]),
            2,
            fwd_hooks=[
                (
                    names.resid_post(1),
                    lambda r, hook: passes.append(d.project(r, 1)),
                )
            ],
        )
    assert (passes[0] - 5.0).abs().max() < 1e-4 and (passes[1] - 5.0).abs().min() > 1.0


def test_weights_identical_and_hooks_removed_after_steering_and_errors(
    model_and_prompt,
):
    model, prompt = model_and_prompt
    d = random_direction(model)
    before, hooks_before = snapshot(model), n_hooks(model)
    with steer(model, d, alpha=5.0, mode="ablate_add"):
        model.generate(prompt, 3)

    def explode(resid, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), steer(model, d, alpha=5.0):
        model.generate(prompt, 3, fwd_hooks=[(names.resid_post(0), explode)])
    with pytest.raises(RuntimeError, match="boom"), steer(model, d, mode="ablate"):
        raise RuntimeError("boom")
    after = snapshot(model)
    assert n_hooks(model) == hooks_before
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def zoo_prompt_sets(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """32 paired prompts of the zoo model ``name`` whose next token should differ.

    lstm-hmm: random emissions ending in token 0 vs token 1. mamba-ar: its
    key-value pairs and a query of the first key, bound to the first value vs the second.
    """
    g = torch.Generator().manual_seed(0)
    if name == "lstm-hmm":
        body = torch.randint(0, 4, (32, 11), generator=g)
        ends = torch.zeros(32, 1, dtype=torch.long)
        return torch.cat([body, ends], 1), torch.cat([body, ends + 1], 1)
    task = get_entry(name).make_task()
    query = 2 * task.n_pairs
    tokens = task.sample(32, g).tokens[:, : query + 1].clone()
    tokens[:, query] = tokens[:, 0]  # query the first key
    positive, negative = tokens.clone(), tokens.clone()
    positive[:, 1], negative[:, 1] = task.n_keys, task.n_keys + 1
    return positive, negative


@pytest.mark.parametrize("name", ["lstm-hmm", "mamba-ar"])
def test_zoo_direction_steers_towards_the_positive_set(name):
    """On a zoo RNN and Mamba: the direction read from the positive vs negative prompts,
    added to the negative prompts, moves their next-token distribution towards the positives'."""
    model = dl.load(name)
    positive, negative = zoo_prompt_sets(name)
    d = Direction.from_prompts(model, positive, negative)
    target = model(positive)[:, -1].log_softmax(-1)

    def distance(logits):
        return torch.nn.functional.kl_div(
            logits[:, -1].log_softmax(-1),
            target,
            log_target=True,
            reduction="batchmean",
        ).item()

    base = distance(model(negative))
    last = model.cfg.n_layers - 1
    with steer(model, d, layers=[last], alpha=d.vector(last).norm().item()):
        steered = distance(model(negative))
    assert steered < 0.5 * base


def test_bad_arguments_are_named(tiny_mamba):
    d = random_direction(tiny_mamba, layers=[0])
    with (
        pytest.raises(ValueError, match="mode must be one of"),
        steer(tiny_mamba, d, mode="multiply"),
    ):
        pass
    with (
        pytest.raises(ValueError, match="positions must be one of"),
        steer(tiny_mamba, d, positions="first"),
    ):
        pass
    with (
        pytest.raises(KeyError, match="covers layers \\[0\\], not layer 1"),
        steer(tiny_mamba, d, layers=[1]),
    ):
        pass
    with (
        pytest.raises(ValueError, match="d_model 3"),
        steer(tiny_mamba, Direction(torch.ones(1, 3), layers=[0])),
    ):
        pass
    with (
        pytest.raises(ValueError, match="alpha has 2 values but 1 layers"),
        steer(tiny_mamba, d, alpha=[1.0, 2.0]),
    ):
        pass
    assert n_hooks(tiny_mamba) == 0


def separable_sets(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of low tokens (positive) and high tokens (negative): separable at any layer."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (n, 6), generator=g), torch.randint(
        8, 16, (n, 6), generator=g
    )


@pytest.fixture(scope="module")
def fitted(tiny_mamba):
    pos, neg = separable_sets(24, seed=1)
    d = Direction.from_prompts(tiny_mamba, pos, neg, position="mean")
    before = snapshot(tiny_mamba)
    ctrl = SteeringController(d, read_layer=0, position="mean", alpha=6.0).fit(
        tiny_mamba, pos, neg
    )
    return ctrl, before


def test_controller_separates_held_out_sets_and_leaves_weights(tiny_mamba, fitted):
    ctrl, before = fitted
    after = snapshot(tiny_mamba)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert 0 < ctrl.n_epochs_ <= ctrl.max_epochs and ctrl.layers_ == [0, 1]
    pos, neg = separable_sets(16, seed=2)
    assert ctrl.score(tiny_mamba, pos, neg) > 0.95
    out_pos, out_neg = ctrl.predict(tiny_mamba, pos), ctrl.predict(tiny_mamba, neg)
    assert out_pos.scale.shape == (16,) and out_pos.weights.shape == (16, 2)
    assert out_pos.scale.mean() > 0.8 and out_neg.scale.mean() < 0.2
    assert ((out_pos.weights > 0) & (out_pos.weights < 1)).all()


def generate_recording(
    model, prompt, context
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate 5 tokens inside ``context``, recording ``names.resid_post(1)`` at every pass."""
    seen: list[torch.Tensor] = []
    with context:
        tokens = model.generate(
            prompt,
            5,
            fwd_hooks=[
                (names.resid_post(1), lambda r, hook: seen.append(r.clone()))
            ],
        )
    return tokens, seen


def test_attach_equals_steering_with_the_predicted_alphas(tiny_mamba, fitted):
    """Closed loop: generate under attach equals generate under steer with the
    alphas the controller predicts for that prompt, positive and negative alike."""
    ctrl, _ = fitted
    pos, neg = separable_sets(2, seed=3)
    for prompt, strong in ((pos[:1], True), (neg[:1], False)):
        alphas = ctrl.predict(tiny_mamba, prompt).alphas(ctrl.alpha)
        assert (alphas.min() > 3.0) if strong else (alphas.max() < 1.0)
        closed, closed_resid = generate_recording(
            tiny_mamba, prompt, ctrl.attach(tiny_mamba)
        )
        reference, reference_resid = generate_recording(
            tiny_mamba,
            prompt,
            steer(tiny_mamba, ctrl.direction, layers=ctrl.layers_, alpha=alphas),
        )
        assert torch.equal(closed, reference)
        # attach reads the prompt before generate runs, so generate's own hooks see only its passes
        assert [r.shape[1] for r in closed_resid] == [prompt.shape[1], 1, 1, 1, 1]
        for a, b in zip(closed_resid, reference_resid, strict=True):
            torch.testing.assert_close(a, b)
    assert n_hooks(tiny_mamba) == 0


def test_controller_bad_input(tiny_mamba):
    d = random_direction(tiny_mamba, layers=[0])
    pos, neg = separable_sets(4, seed=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        SteeringController(d, read_layer=0).predict(tiny_mamba, pos)
    with pytest.raises(IndexError, match="valid read_layers are 0 to 1"):
        SteeringController(d, read_layer=5).fit(tiny_mamba, pos, neg)
    with pytest.raises(ValueError, match="mode must be 'add' or 'ablate_add'"):
        SteeringController(d, read_layer=0, mode="ablate").fit(tiny_mamba, pos, neg)


def test_controller_save_load_round_trip(tiny_mamba, fitted, tmp_path):
    ctrl, _ = fitted
    ctrl.save(tmp_path / "ctrl.safetensors")
    for back in (SteeringController.load(tmp_path / "ctrl.safetensors"), Saved.load(tmp_path / "ctrl.safetensors")):
        assert isinstance(back, SteeringController)
        params = {k: v for k, v in ctrl.get_params().items() if k != "direction"}
        assert {k: v for k, v in back.get_params().items() if k != "direction"} == params
        assert (back.layers_, back.n_epochs_, back.validation_loss_) == (ctrl.layers_, ctrl.n_epochs_, ctrl.validation_loss_)
        assert torch.equal(back.direction.vectors, ctrl.direction.vectors)
        assert back.direction.position == "mean" and back.direction.architecture == "mamba"
        pos, neg = separable_sets(4, seed=5)
        prompts = torch.cat([pos, neg])
        a, b = ctrl.predict(tiny_mamba, prompts), back.predict(tiny_mamba, prompts)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.weights, b.weights)
    Direction(torch.ones(1, 8), layers=[0]).save(tmp_path / "d.safetensors")
    with pytest.raises(TypeError, match="holds a Direction, not a SteeringController"):
        SteeringController.load(tmp_path / "d.safetensors")


def test_unfitted_controller_round_trips_unfitted(tmp_path):
    d = Direction(torch.ones(2, 8), layers=[0, 1])
    SteeringController(d, read_layer=1, layers=range(2), alpha=2.5, position="mean").save(tmp_path / "c.safetensors")
    back = SteeringController.load(tmp_path / "c.safetensors")
    assert (back.read_layer, back.layers, back.alpha, back.position) == (1, [0, 1], 2.5, "mean")
    assert not hasattr(back, "net_")
    with pytest.raises(RuntimeError, match="not fitted"):
        back.predict_activations(torch.zeros(1, 8))


def test_controller_params_are_scikit_learn_style():
    d = Direction(torch.ones(1, 8), layers=[0])
    ctrl = SteeringController(d, read_layer=0)
    assert ctrl.get_params()["direction"] is d and ctrl.get_params()["alpha"] == 4.0
    assert ctrl.set_params(alpha=2.0, hidden=8) is ctrl and (ctrl.alpha, ctrl.hidden) == (2.0, 8)
    assert repr(ctrl).startswith("SteeringController(direction=Direction(layers=[0], d_model=8")
    with pytest.raises(ValueError, match="no parameter 'alfa'"):
        ctrl.set_params(alfa=1.0)


class TakesState(torch.nn.Module):
    """Forward's signature only: a recurrent ``state`` or a transformer's cache keywords."""

    def forward(self, input, state=None, **kwargs):
        return input


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
def test_sequence_phase_reads_the_cache_argument(cache_name):
    """transformers >= 5.24 passes the KV cache as `cache`, earlier versions as `past_key_values`."""
    from dynalens.circuits.steering import SequencePhase
    from transformers import DynamicCache

    phase, empty, module = SequencePhase(), DynamicCache(), TakesState()
    phase(module, (torch.zeros(1, 4),), {cache_name: empty})
    assert (
        not phase.generating
        and phase.steers("prompt")
        and not phase.steers("generated")
    )
    empty.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), layer_idx=0)
    phase(module, (torch.zeros(1, 1),), {cache_name: empty})
    assert phase.generating and phase.steers("generated") and not phase.steers("prompt")
    phase(module, (torch.zeros(1, 1), "a recurrent state"), {})
    assert phase.generating
    phase(module, (torch.zeros(1, 5),), {"state": None})
    assert not phase.generating and phase.steers("all")


def test_sequence_phase_reads_the_mask_and_cache_position(tiny_llama):
    """A one-token pass whose mask covers earlier tokens, or whose cache_position is past 0,
    continues a sequence; a positional argument that is not a cache (the Bridge's
    return_type) does not."""
    from dynalens.circuits.steering import SequencePhase

    phase, one = SequencePhase(), torch.tensor([[5]])
    phase(tiny_llama, (one,), {"attention_mask": torch.ones(1, 6, dtype=torch.long)})
    assert phase.generating
    phase(tiny_llama, (one,), {"attention_mask": torch.ones(1, 1, dtype=torch.long)})
    assert not phase.generating
    phase(tiny_llama, (one,), {"cache_position": torch.tensor([5])})
    assert phase.generating
    phase(tiny_llama, (torch.tensor([[5, 6, 7]]), "logits"), {"cache_position": torch.arange(3)})
    assert not phase.generating


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_generate_under_steer_equals_steering_the_whole_sequence(tiny_llama, positions):
    """The cached generate under steer gives the tokens of a greedy loop that re-runs the
    whole sequence each step (no cache) and adds alpha * u at the steered positions."""
    d = random_direction(tiny_llama, layers=[0])
    u = d.vectors[0] / d.vectors[0].norm()
    tokens = tiny_llama.to_tokens(PROMPT)
    n_prompt, alpha = tokens.shape[-1], 8.0

    def add_at_positions(resid, hook):
        where = torch.zeros(resid.shape[1], 1)
        where[{"prompt": slice(None, n_prompt), "generated": slice(n_prompt, None)}.get(
            positions, slice(None))] = 1.0
        return resid + alpha * where * u

    expected = tokens
    for _ in range(6):
        logits = tiny_llama.run_with_hooks(
            expected, fwd_hooks=[(names.resid_post(0), add_at_positions)]
        )
        expected = torch.cat([expected, logits[:, -1:].argmax(-1)], dim=1)
    with steer(tiny_llama, d, alpha=alpha, positions=positions):
        generated = tiny_llama.generate(tokens, 6, return_type="tokens")
    assert torch.equal(generated, expected)
    assert not torch.equal(generated, tiny_llama.generate(tokens, 6, return_type="tokens"))


RAGGED = ["I love the sea and the hills", "Rain fell", "We love the sunny sea on a Sunday"]


def test_pass_mask_takes_the_last_columns_of_a_longer_mask(tiny_llama):
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(
        pass_mask(tiny_llama, {"input": torch.zeros(2, 1, dtype=torch.long), "attention_mask": mask}),
        torch.ones(2, 1, dtype=torch.bool),
    )
    assert torch.equal(pass_mask(tiny_llama, {"input": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}), mask.bool())
    prompts = Prompts.from_ids([[1, 2], [3]])
    assert pass_mask(tiny_llama, {"input": prompts}) is prompts.mask
    assert pass_mask(tiny_llama, {"input": torch.zeros(1, 3, 64)}) is None  # embeddings


@pytest.fixture(scope="module")
def tiny_hybrid():
    """A random 3-layer Bamba (Mamba-2, attention, Mamba-2) as a HookedHybrid."""
    import transformers
    from dynalens.models.hybrid import HookedHybrid

    torch.manual_seed(0)
    config = transformers.BambaConfig(
        vocab_size=16, hidden_size=32, pad_token_id=0, bos_token_id=None, eos_token_id=None, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_n_heads=4, mamba_d_head=16,
        mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8, attn_layer_indices=[1],
    )  # fmt: skip
    hf = transformers.BambaForCausalLM(config).eval()
    hf.set_attn_implementation("eager")
    return HookedHybrid.from_hf(hf).eval()


@pytest.fixture(params=["tiny_llama", "tiny_mamba", "tiny_mamba2", "tiny_lstm", "tiny_hybrid"])
def model_and_ragged(request):
    """Each architecture with a ragged list of prompts (lengths differ)."""
    model = request.getfixturevalue(request.param)
    if request.param == "tiny_llama":
        return model, RAGGED
    return model, [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]]


@pytest.mark.parametrize("mode", ["add", "ablate", "ablate_add"])
def test_steer_never_touches_pads_and_a_padded_row_equals_its_run_alone(model_and_ragged, mode):
    """A ragged batch under steer: each prompt's real positions and logits equal that prompt
    steered alone (1e-5), and the steered layer's pad positions keep their unsteered values."""
    model, ragged = model_and_ragged
    d = random_direction(model)
    prompts = Prompts(model, ragged)
    hooks = [names.resid_post(0), names.resid_post(1)]
    _, base = model.run_with_cache(prompts, names_filter=hooks)
    with steer(model, d, alpha=3.0, mode=mode):
        logits, cache = model.run_with_cache(prompts, names_filter=hooks)
        alone = [model.run_with_cache(p, names_filter=hooks) for p in prompts]
    for i, (single_logits, single) in enumerate(alone):
        assert_close(prompts.real(logits, i), single_logits[0])
        for layer, name in enumerate(hooks):
            real = prompts.real(cache[name], i)
            assert_close(real, single[name][0])
            if mode != "add":
                expected = torch.full((real.shape[0],), 0.0 if mode == "ablate" else 3.0)
                assert_close(d.project(real, layer), expected)
    # Steering the last layer alone: its input is unchanged, so pads must come out unchanged.
    with steer(model, d, layers=[1], alpha=3.0, mode=mode):
        _, cache = model.run_with_cache(prompts, names_filter=hooks)
    pads = ~prompts.mask
    assert bool(pads.any())
    assert_close(cache[hooks[1]][pads], base[hooks[1]][pads], equal_nan=True)
    assert not torch.allclose(cache[hooks[1]][prompts.mask], base[hooks[1]][prompts.mask])


@pytest.mark.parametrize("positions", ["prompt", "generated", "all"])
def test_ragged_generate_under_steer_equals_one_prompt_at_a_time(model_and_ragged, positions):
    model, ragged = model_and_ragged
    d = random_direction(model)
    prompts = Prompts(model, ragged)
    with steer(model, d, alpha=20.0, positions=positions):
        batched = model.generate(prompts, 5, return_type="tokens")[:, prompts.tokens.shape[1] :]
        alone = [model.generate(p, 5, return_type="tokens")[0, -5:] for p in prompts]
    plain = model.generate(prompts, 5, return_type="tokens")[:, prompts.tokens.shape[1] :]
    assert torch.equal(batched, torch.stack(alone))
    assert not torch.equal(batched, plain)


def test_run_with_cache_after_generate_is_a_new_prompt(tiny_llama):
    """The Bridge's run_with_cache calls forward directly: it still starts a sequence, so
    under positions="generated" it is not steered, even right after a generate."""
    d = random_direction(tiny_llama)
    prompts = Prompts(tiny_llama, RAGGED)
    base = resid_at(tiny_llama, PROMPT, 1)
    with steer(tiny_llama, d, alpha=10.0, positions="generated"):
        tiny_llama.generate(prompts, 3)
        assert_close(resid_at(tiny_llama, PROMPT, 1), base)
    with steer(tiny_llama, d, alpha=10.0, positions="prompt"):
        tiny_llama.generate(prompts, 3)
        assert not torch.allclose(resid_at(tiny_llama, PROMPT, 1), base)
    assert n_hooks(tiny_llama) == 0


def fitted_on(model, positive, negative, **options) -> SteeringController:
    d = Direction.from_prompts(model, positive, negative)
    return SteeringController(d, read_layer=1, **options).fit(model, positive, negative)


def sets_for(model) -> tuple[list, list]:
    """Two small ragged prompt sets for ``model`` (text for the transformer, ids otherwise)."""
    if model.tokenizer is not None:
        return (
            ["I love cats and dogs", "We love the sunny sea", "They love green hills", "Love it"],
            ["The tax form is due", "Rain fell on the roof", "A train left at noon today", "Taxes"],
        )
    return ([[1, 2, 3, 1], [2, 3], [1, 1, 2, 3, 2], [3, 1, 2]], [[9, 10, 11], [12, 9, 10, 11], [14], [10, 13, 9]])


def test_controller_predicts_a_ragged_batch_as_one_prompt_at_a_time(model_and_ragged):
    model, ragged = model_and_ragged
    ctrl = fitted_on(model, *sets_for(model), max_epochs=20)
    batched = ctrl.predict(model, ragged)
    for i, prompt in enumerate(ragged):
        single = ctrl.predict(model, [prompt])
        assert_close(batched.scale[i : i + 1], single.scale)
        assert_close(batched.weights[i : i + 1], single.weights)


def test_attach_reads_a_padded_batch_without_its_padding(model_and_ragged):
    """generate on a left-padded batch under attach gives each prompt the tokens it gets
    alone: the controller never reads the padding, pads are never steered."""
    model, ragged = model_and_ragged
    ctrl = fitted_on(model, *sets_for(model), alpha=20.0, max_epochs=30)
    prompts = Prompts(model, ragged)
    before = snapshot(model)
    with ctrl.attach(model):
        batched = model.generate(prompts, 4, return_type="tokens")
        alone = [model.generate(p, 4, return_type="tokens") for p in prompts]
        steered_logits = model(prompts)
        alone_logits = [model(p)[0] for p in prompts]
    for i, single in enumerate(alone):
        assert torch.equal(batched[i, prompts.tokens.shape[1] :], single[0, -4:])
        assert_close(prompts.real(steered_logits, i), alone_logits[i])
    assert not torch.allclose(steered_logits, model(prompts))
    assert n_hooks(model) == 0
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_controller_fits_inside_no_grad(tiny_mamba):
    pos, neg = separable_sets(12, seed=4)
    d = Direction.from_prompts(tiny_mamba, pos, neg, position="mean")
    with torch.no_grad():
        ctrl = SteeringController(d, read_layer=0, position="mean", max_epochs=40).fit(tiny_mamba, pos, neg)
    assert ctrl.n_epochs_ > 1 and ctrl.score(tiny_mamba, pos, neg) > 0.9


def test_controller_with_a_range_of_layers_saves(tiny_mamba, tmp_path):
    pos, neg = separable_sets(8, seed=6)
    d = Direction.from_prompts(tiny_mamba, pos, neg, position="mean")
    ctrl = SteeringController(d, read_layer=0, layers=range(2), max_epochs=5).fit(tiny_mamba, pos, neg)
    ctrl.save(tmp_path / "ctrl.safetensors")
    assert SteeringController.load(tmp_path / "ctrl.safetensors").layers == [0, 1]


# ----------------------------------------------------------------- the SSM state
@pytest.fixture(params=["tiny_mamba", "tiny_mamba2", "tiny_hybrid"])
def ssm_model(request):
    return request.getfixturevalue(request.param)


def state_direction(model, layer: int = 0) -> Direction:
    """A random direction in the flattened SSM state of ``layer``."""
    g = torch.Generator().manual_seed(11)
    return Direction(torch.randn(1, site_width(model, layer, "state"), generator=g), layers=[layer], site="state")


def state_readout(states: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``y`` without the skip, ``C_t · h_t``: Mamba-2 ``[b, pos, h, p, n]`` with ``C [b, pos, g, n]``, Mamba
    ``[b, pos, d, n]`` with ``C [b, pos, n]``."""
    if states.ndim == 5:
        C = C.repeat_interleave(states.shape[2] // C.shape[2], dim=2)
        return torch.einsum("bthpn,bthn->bthp", states, C)
    return torch.einsum("btdn,btn->btd", states, C)


def test_state_steering_sets_the_projection_at_real_positions_and_the_output_reads_it(ssm_model):
    model, layer = ssm_model, 0
    d = state_direction(model, layer)
    u = d.unit().vector(layer)
    prompts = Prompts(model, [[3, 1, 4, 1, 5, 9], [2, 6], [5, 3, 5, 8]])
    hooks = [names.mixer(layer, part) for part in ("ssm_state", "y", "C")]
    _, clean = model.run_with_cache(prompts, names_filter=hooks)
    with steer(model, d, alpha=3.0, mode="ablate_add"):
        _, edited = model.run_with_cache(prompts, names_filter=hooks)
    before, after = clean[hooks[0]], edited[hooks[0]]
    real = prompts.mask
    assert_close(after.flatten(2)[real] @ u, torch.full((int(real.sum()),), 3.0))
    assert_close(after[~real], before[~real])  # pads are never steered
    change = state_readout(after - before, clean[hooks[2]])
    assert_close((edited[hooks[1]] - clean[hooks[1]])[real], change[real])


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_state_steering_in_generate_carries_the_steered_state_token_by_token(ssm_model, positions):
    """``generate`` under state steering equals a loop of single-token calls, each editing the state it
    hands on: the steered state is the one the next token starts from."""
    model, layer, alpha = ssm_model, 0, 4.0
    d = state_direction(model, layer)
    u = d.unit().vector(layer)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])

    def ablate_add(state, hook):
        flat = state.flatten(2)
        return (flat - (flat @ u)[..., None] * u + alpha * u).view_as(state)

    edit = [(names.mixer(layer, "ssm_state"), ablate_add)]
    with model.hooks(fwd_hooks=edit if positions == "all" else []):
        logits, carried = model(prompt, return_state=True)
    tokens = [prompt]
    with model.hooks(fwd_hooks=edit):
        for _ in range(5):
            tokens.append(logits[:, -1:].argmax(-1))
            logits, carried = model(tokens[-1], state=carried, return_state=True)
    expected = torch.cat(tokens, dim=1)
    with steer(model, d, alpha=alpha, mode="ablate_add", positions=positions):
        generated = model.generate(prompt, 5, return_type="tokens")
        steered_logits = model(expected)
    assert torch.equal(generated, expected)
    assert n_hooks(model) == 0
    # a new sequence is a prompt pass: steered under "all" (the edit matters, and is gone after), not under "generated"
    assert torch.allclose(model(expected), steered_logits) == (positions == "generated")


def test_state_directions_read_the_state_and_steer_it_with_weights_untouched(ssm_model, tmp_path):
    model = ssm_model
    pos, neg = [[3, 1, 4, 1], [5, 9, 2, 6]], [[8, 8, 7, 7], [9, 9, 8, 1]]
    layers = [0] if model.cfg.architecture != "mamba" else [0, 1]
    d = Direction.from_prompts(model, pos, neg, layers=layers, site="state")
    name = names.mixer(layers[-1], "ssm_state")
    states = [model.run_with_cache(torch.tensor([p]), names_filter=[name])[1][name][0, -1].flatten() for p in pos + neg]
    assert_close(d.vector(layers[-1]), torch.stack(states[:2]).mean(0) - torch.stack(states[2:]).mean(0))
    d.save(tmp_path / "d.safetensors")
    assert Saved.load(tmp_path / "d.safetensors").site == "state"
    before = snapshot(model)
    with steer(model, d, alpha=2.0):
        model.generate(torch.tensor([pos[0]]), 3)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items()) and n_hooks(model) == 0


def test_state_steering_needs_an_ssm_layer_of_the_right_width(tiny_hybrid, tiny_lstm, tiny_mamba2):
    with pytest.raises(ValueError, match="layer 1 of this hybrid has none; layers with one: \\[0, 2\\]"):
        Direction.from_prompts(tiny_hybrid, [[1, 2]], [[3, 4]], layers=[1], site="state")
    with pytest.raises(ValueError, match="layers with one: \\[\\]"):
        Direction.from_prompts(tiny_lstm, [[1, 2]], [[3, 4]], site="state")
    wrong = Direction(torch.ones(1, 5), layers=[0], site="state")
    with pytest.raises(ValueError, match="d_model 5 but the model has a state of layer 0 flattened to 64"), \
            steer(tiny_mamba2, wrong):  # fmt: skip
        pass
    with pytest.raises(ValueError, match="site must be one of"):
        Direction(torch.ones(1, 5), layers=[0], site="cell")
    assert n_hooks(tiny_mamba2) == 0
