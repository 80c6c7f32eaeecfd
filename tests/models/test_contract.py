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
