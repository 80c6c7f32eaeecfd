"""One analysis, every architecture: the shared hook vocabulary is a contract.

The same code caches the shared names, checks their shapes, patches the
residual stream and provokes errors on a transformer (through the Bridge), an
RNN and a Mamba model. A new architecture joins by adding a fixture here.
"""

from __future__ import annotations

import pytest
import torch

import dynalens as dl
from dynalens.models import HookedMamba, HookedRNN, MambaConfig, RNNConfig

BATCH, POS = 2, 7


def shared_names(n_layers: int) -> list[str]:
    per_layer = ["hook_resid_pre", "hook_mixer_out", "hook_resid_post"]
    return (
        ["hook_embed"]
        + [f"blocks.{l}.{name}" for l in range(n_layers) for name in per_layer]
        + ["ln_final.hook_normalized"]
    )


@pytest.fixture(scope="module", params=["transformer", "rnn", "mamba"])
def model(request, tiny_llama):
    torch.manual_seed(0)
    if request.param == "transformer":
        return tiny_llama
    if request.param == "rnn":
        return HookedRNN(RNNConfig(d_model=32, n_layers=2, d_vocab=50, cell="lstm")).eval()
    return HookedMamba(MambaConfig(d_model=32, n_layers=2, d_vocab=50, d_state=4)).eval()


@pytest.fixture
def tokens(model):
    return torch.randint(0, min(model.cfg.d_vocab, 50), (BATCH, POS), generator=torch.Generator().manual_seed(1))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_no_hooks(model) -> None:
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_architecture_is_named(model):
    assert model.cfg.architecture in {"transformer", "rnn", "mamba"}


def test_shared_names_cache_with_shapes(model, tokens):
    names = shared_names(model.cfg.n_layers)
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    assert logits.shape == (BATCH, POS, model.cfg.d_vocab)
    assert set(names) <= set(cache.keys())
    for name in names:
        if name == "hook_embed" or name == "blocks.0.hook_resid_pre":
            assert cache[name].shape[:2] == (BATCH, POS)
        else:
            assert cache[name].shape == (BATCH, POS, model.cfg.d_model), name


def test_patching_resid_post_changes_logits(model, tokens):
    layer = model.cfg.n_layers - 1
    name = f"blocks.{layer}.hook_resid_post"
    clean = model(tokens)
    same = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x)])
    torch.testing.assert_close(same, clean)

    def zero_last(x, hook):
        x = x.clone()
        x[:, -1] = 0.0
        return x

    patched = model.run_with_hooks(tokens, fwd_hooks=[(name, zero_last)])
    assert not torch.allclose(patched[:, -1], clean[:, -1])
    torch.testing.assert_close(patched[:, :-1], clean[:, :-1])  # causal: earlier positions untouched
    assert_no_hooks(model)


def test_unknown_hook_name_names_the_closest(model, tokens):
    with pytest.raises(dl.HookNameError, match=r"blocks\.0\.hook_resid_post"):
        model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pots"])
    with pytest.raises(dl.HookNameError, match=r"hook_mixer_out"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mixr_out", lambda x, hook: x)])
    assert_no_hooks(model)


def test_exception_inside_hook_removes_hooks_and_keeps_weights(model, tokens):
    before = snapshot(model)

    def boom(x, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", boom)])
    assert_no_hooks(model)
    for key, value in snapshot(model).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("bad", ["empty", "out_of_range"])
def test_bad_tokens_are_clear_errors(model, bad):
    tokens = torch.zeros(1, 0, dtype=torch.long) if bad == "empty" else torch.tensor([[model.cfg.d_vocab]])
    with pytest.raises(ValueError, match="empty prompt" if bad == "empty" else "out of range"):
        model(model.to_tokens(tokens))


# ------------------------------------------------- bad input, the same everywhere
def wrong_shape(x, hook):
    return x[..., :-1]


@pytest.mark.parametrize("entry", ["run_with_hooks", "hooks", "add_hook", "generate", "run_with_cache"])
def test_a_hook_returning_another_shape_names_hook_and_shapes(model, tokens, entry):
    name = "blocks.0.hook_resid_post"
    d = model.cfg.d_model
    match = rf"hook '{name}' returned a tensor of shape \[{BATCH}, {POS}, {d - 1}\]; expected \[{BATCH}, {POS}, {d}\]"
    with pytest.raises(dl.models.HookShapeError, match=match):
        if entry == "run_with_hooks":
            model.run_with_hooks(tokens, fwd_hooks=[(name, wrong_shape)])
        elif entry == "hooks":
            with model.hooks(fwd_hooks=[(name, wrong_shape)]):
                model(tokens)
        elif entry == "run_with_cache":
            with model.hooks(fwd_hooks=[(name, wrong_shape)]):
                model.run_with_cache(tokens, names_filter=[name])
        elif entry == "generate":
            model.generate(tokens, 2, fwd_hooks=[(name, wrong_shape)])
        else:
            model.add_hook(name, wrong_shape)
            try:
                model(tokens)
            finally:
                model.reset_hooks()
    assert_no_hooks(model)
    model(tokens)  # and the model runs clean afterwards


def test_a_hook_added_by_filter_is_checked_too(model, tokens):
    # the Bridge names the hook point the filter matched by its canonical name (blocks.0.attn.hook_out)
    with pytest.raises(dl.models.HookShapeError, match=r"hook 'blocks\.0\.[\w.]+' returned a tensor of shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_mixer_out"), wrong_shape)])
    assert_no_hooks(model)


def test_float_tokens_are_a_type_error_everywhere(model):
    floats = torch.ones(1, 3)
    for call in (model, model.to_tokens, lambda x: model.run_with_cache(x), lambda x: model.generate(x, 2),
                 lambda x: model.run_with_hooks(x, fwd_hooks=[])):  # fmt: skip
        with pytest.raises(TypeError, match="integer tensor of ids, got dtype torch.float32"):
            call(floats)
    assert_no_hooks(model)


# ----------------------------------------------- generate's shared arguments
def test_generate_takes_the_same_arguments_everywhere(model, tokens):
    greedy = model.generate(tokens, 4)
    assert greedy.shape == (BATCH, POS + 4) and torch.equal(greedy[:, :POS], tokens)
    recomputed = tokens
    for _ in range(4):
        recomputed = torch.cat([recomputed, model(recomputed)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, recomputed)
    # HuggingFace's habit: do_sample=False is greedy, whatever the temperature
    assert torch.equal(model.generate(tokens, 4, do_sample=False), greedy)
    assert torch.equal(model.generate(tokens, 4, temperature=5.0, do_sample=False), greedy)
    # top_k=1 sampling can only pick the argmax
    assert torch.equal(model.generate(tokens, 4, do_sample=True, top_k=1), greedy)
    seeded = [model.generate(tokens, 6, temperature=2.0, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    assert torch.equal(model.generate(tokens, 0), tokens)
    assert_no_hooks(model)


def test_generate_stops_rows_at_eos(model, tokens):
    greedy = model.generate(tokens, 5)
    eos = int(greedy[0, POS + 1])  # row 0 emits it at its second new token
    out = model.generate(tokens, 5, eos_token_id=eos)
    first = (greedy[:, POS:] == eos).int().argmax(-1)
    for row in range(BATCH):
        if bool((greedy[row, POS:] == eos).any()):
            end = POS + int(first[row]) + 1
            assert torch.equal(out[row, :end], greedy[row, :end])
            assert (out[row, end:] == eos).all()  # finished rows hold eos
        else:
            assert torch.equal(out[row], greedy[row, : out.shape[1]])


def test_unknown_generate_keywords_are_the_same_type_error(model, tokens):
    for kwargs in ({"top_p": 0.9}, {"use_past_kv_cache": False}, {"stop_at_eos": True}):
        with pytest.raises(TypeError, match=rf"unexpected keyword argument\(s\) \['{next(iter(kwargs))}'\]; it accepts"):
            model.generate(tokens, 2, **kwargs)
    for bad, match in (
        (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"), (dict(return_type="text"), "return_type"), (dict(do_sample="yes"), "do_sample"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model.generate(tokens, **({"max_new_tokens": 2} | bad))
    assert_no_hooks(model)


def test_generate_takes_a_mask_with_token_ids(model):
    rows = [[5, 6, 7, 8], [9, 10]]
    prompts = dl.models.prompts.Prompts(model, rows)
    by_mask = model.generate(prompts.tokens, 3, attention_mask=prompts.mask)
    assert torch.equal(by_mask, model.generate(prompts, 3))
    assert torch.equal(by_mask[1, -5:], model.generate(torch.tensor([rows[1]]), 3)[0])


def test_generate_stops_at_any_of_several_eos_ids(model, tokens):
    greedy = model.generate(tokens, 5)
    stops = [int(greedy[0, POS + 1]), int(greedy[1, POS])]  # row 0 at its 2nd new token, row 1 at its 1st
    out = model.generate(tokens, 5, eos_token_id=stops)
    for row in range(BATCH):
        tail = greedy[row, POS:]
        end = POS + int(torch.isin(tail, torch.tensor(stops)).int().argmax()) + 1
        assert torch.equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == stops[0]).all()
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(tokens, 2, eos_token_id=[])
