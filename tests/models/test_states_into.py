"""Every SSM state formed where a caller puts it (``states_into``), and Mamba-1 state edits reaching ``y``."""

from __future__ import annotations

import dynalens as dl  # noqa: F401  isort: skip  (before transformers; see tests/conftest.py)
import pytest
import torch

from dynalens.models import names
from dynalens.models.state_buffer import states_into
from tests.models.test_state_buffer import EDITED, MODES, halve_in_place, halve_returned
from tests.tolerances import assert_close



@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(5))


def state_shape(model, tokens) -> tuple[int, ...]:
    cfg = model.cfg
    per_position = (cfg.n_heads, cfg.d_head) if cfg.architecture == "mamba2" else (cfg.d_inner,)
    return (*tokens.shape, *per_position, cfg.d_state)


@pytest.mark.parametrize("model_name", ["tiny_mamba", "tiny_mamba2"])
def test_states_are_formed_in_the_given_tensor(request, model_name, tokens):
    """The cached states are the destination itself and equal those of a run without one; the other layer's
    states never go there, and the forward's output is unchanged."""
    model = request.getfixturevalue(model_name)
    name = names.mixer(0, "ssm_state")
    is_state = lambda n: n.endswith("hook_ssm_state")  # noqa: E731
    with torch.no_grad():
        logits, plain = model.run_with_cache(tokens, names_filter=is_state)
        dest = torch.full(state_shape(model, tokens), torch.nan)
        seen = []
        with states_into({name: dest}), model.hooks(fwd_hooks=[(is_state, lambda s, hook: seen.append(s.data_ptr()))]):
            into_logits, cache = model.run_with_cache(tokens, names_filter=is_state)
    assert seen[0] == dest.data_ptr() and seen[1] != dest.data_ptr()
    assert cache[name].data_ptr() == dest.data_ptr()
    assert_close(dest, plain[name])
    assert_close(cache[names.mixer(1, "ssm_state")], plain[names.mixer(1, "ssm_state")])
    assert_close(into_logits, logits)


@pytest.mark.parametrize("model_name", ["tiny_mamba", "tiny_mamba2"])
def test_the_destination_is_never_handed_to_a_later_layer(request, model_name, tokens):
    """A hook that keeps nothing lets a layer's own buffer pass on to the next layer, never the caller's tensor."""
    model = request.getfixturevalue(model_name)
    dest = torch.full(state_shape(model, tokens), torch.nan)
    where = []
    hooks = [(lambda n: n.endswith("hook_ssm_state"), lambda s, hook: where.append(s.data_ptr()))]
    with torch.inference_mode():
        _, plain = model.run_with_cache(tokens, names_filter=names.mixer(0, "ssm_state"))
        with states_into({names.mixer(0, "ssm_state"): dest}), model.hooks(fwd_hooks=hooks):
            model(tokens)
    assert where[0] == dest.data_ptr() and where[1] != dest.data_ptr()
    assert_close(dest, plain[names.mixer(0, "ssm_state")])  # not overwritten by layer 1


@pytest.mark.parametrize("model_name", ["tiny_mamba", "tiny_mamba2"])
@pytest.mark.parametrize(
    "misfit", [lambda t: t.double(), lambda t: t[:, :-1], lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)],
    ids=["dtype", "shape", "not-contiguous"],
)  # fmt: skip
def test_a_destination_that_does_not_fit_is_left_alone(request, model_name, misfit, tokens):
    model = request.getfixturevalue(model_name)
    name = names.mixer(0, "ssm_state")
    dest = misfit(torch.full(state_shape(model, tokens), torch.nan))
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, names_filter=name)
        with states_into({name: dest}):
            _, cache = model.run_with_cache(tokens, names_filter=name)
    assert cache[name].untyped_storage().data_ptr() != dest.untyped_storage().data_ptr()
    assert torch.isnan(dest).all()
    assert_close(cache[name], plain[name])


def capture(model, tokens, fwd_hooks=()):
    """Logits, carried state and layer 1's mixer hooks (``conv``, ``C``, ``y``, ``ssm_state``) as they were seen."""
    seen = {}

    def keep(x, hook):
        seen[hook.name.rsplit("hook_", 1)[1]] = x.detach().clone()

    parts = [(names.mixer(1, part), keep) for part in ("conv", "C", "y", "ssm_state")]
    with model.hooks(fwd_hooks=[*fwd_hooks, *parts]):
        logits, state = model(tokens, return_state=True)
    return logits, state, seen


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("edit", [halve_in_place, halve_returned], ids=["in-place", "returned"])
def test_a_mamba_state_edit_reaches_y_and_the_carried_state(tiny_mamba, tokens, mode, edit):
    """By hand: y_t = C_t (h_t / 2) + D u_t at the edited positions, the rest as unedited; the carried state halved."""
    mixer = tiny_mamba.blocks[1].mixer
    with MODES[mode]():
        _, clean_state, clean = capture(tiny_mamba, tokens)
        _, carried, edited = capture(tiny_mamba, tokens, [(names.mixer(1, "ssm_state"), edit)])
    h, C, u = clean["ssm_state"][:, EDITED], clean["C"][:, EDITED], clean["conv"][:, EDITED]
    expected = clean["y"].clone()
    expected[:, EDITED] = torch.einsum("bkdn,bkn->bkd", 0.5 * h, C) + mixer.D.detach() * u
    assert_close(edited["y"], expected)
    assert (edited["y"] - clean["y"]).abs()[:, EDITED].amin() > 0  # the edit did change y there
    assert_close(carried.ssm[1], 0.5 * clean_state.ssm[1])


@pytest.mark.parametrize("mode", list(MODES))
def test_a_hook_that_reads_mamba_states_leaves_the_forward_as_it_was(tiny_mamba, tokens, mode, monkeypatch):
    """A reading hook costs no read-out (the scan's y and last state stand) and changes nothing; an in-place
    edit is seen."""
    read_outs = []
    einsum = torch.einsum
    read_out = "bldn,bln->bld"  # y = C h from the states
    monkeypatch.setattr(torch, "einsum", lambda *a: read_outs.append(a[0] == read_out) or einsum(*a))
    with MODES[mode]():
        plain, plain_state = tiny_mamba(tokens, return_state=True)
        read, read_state, _ = capture(tiny_mamba, tokens)
        assert not any(read_outs)
        capture(tiny_mamba, tokens, [(names.mixer(1, "ssm_state"), halve_in_place)])
    assert sum(read_outs) == 1
    assert_close(read, plain)
    for a, b in zip(read_state.ssm, plain_state.ssm):
        assert_close(a, b)
