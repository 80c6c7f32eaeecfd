"""``hook_ssm_state`` on Mamba-2 layers: edits reach ``y`` and the carried state, reads cost no read-out, and
the layers of a forward share one states buffer without ever overwriting states that a hook kept."""

from __future__ import annotations

import dynalens as dl  # noqa: F401  isort: skip  (before transformers; see tests/conftest.py)
import pytest
import torch

from dynalens.kernels import ssd_scan_ref
from dynalens.models import names
from dynalens.models.mamba2 import Mamba2Mixer
from tests.tolerances import assert_close

MODES = {"inference": torch.inference_mode, "no-grad": torch.no_grad, "grad": torch.enable_grad}
LAYER = 1
EDITED = [3, -1]  # positions whose states the edits halve


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(5))


def capture(model, tokens, layer: int, parts, fwd_hooks=(), **kwargs):
    """The forward's output and the mixer hooks ``parts`` of ``layer`` as they were seen, with ``fwd_hooks`` on."""
    seen = {}

    def keep(x, hook):
        seen[hook.name.rsplit("hook_", 1)[1]] = x.detach().clone()

    hooks = [*fwd_hooks, *((names.mixer(layer, part), keep) for part in parts)]
    with model.hooks(fwd_hooks=hooks):
        out = model(tokens, **kwargs)
    return out, seen


def halve_in_place(states, hook):
    states[:, EDITED] *= 0.5


def halve_returned(states, hook):
    edited = states.clone()
    edited[:, EDITED] *= 0.5
    return edited


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("edit", [halve_in_place, halve_returned], ids=["in-place", "returned"])
def test_an_edit_of_the_states_reaches_y_and_the_carried_state(tiny_mamba2, tokens, mode, edit):
    """By hand: y_t = C_t (h_t / 2) + D x_t at the edited positions, the rest as unedited; the carried state halved."""
    mixer = tiny_mamba2.blocks[LAYER].mixer
    with MODES[mode]():
        (_, clean_state), clean = capture(tiny_mamba2, tokens, LAYER, ["x", "C", "y", "ssm_state"], return_state=True)
        edit_hook = [(names.mixer(LAYER, "ssm_state"), edit)]
        (_, carried), edited = capture(tiny_mamba2, tokens, LAYER, ["y"], edit_hook, return_state=True)
    r = mixer.cfg.n_heads // mixer.cfg.n_groups
    h, C, x = clean["ssm_state"][:, EDITED], clean["C"][:, EDITED].repeat_interleave(r, dim=2), clean["x"][:, EDITED]
    expected = clean["y"].clone()
    expected[:, EDITED] = torch.einsum("bkhpn,bkhn->bkhp", 0.5 * h, C) + mixer.D.detach()[:, None] * x
    assert_close(edited["y"], expected)
    assert (edited["y"] - clean["y"]).abs()[:, EDITED].amin() > 0  # the edit did change y there
    assert_close(carried.ssm[LAYER], 0.5 * clean_state.ssm[LAYER])


@pytest.mark.parametrize("mode", list(MODES))
def test_a_hook_that_only_reads_the_states_leaves_the_forward_as_it_was(tiny_mamba2, tokens, mode, monkeypatch):
    read_outs = []
    original = Mamba2Mixer._read_out
    monkeypatch.setattr(Mamba2Mixer, "_read_out", lambda self, *a: read_outs.append(1) or original(self, *a))
    norms = []
    hooks = [(names.mixer(layer, "ssm_state"), lambda s, hook: norms.append(s.norm())) for layer in range(2)]
    with MODES[mode]():
        plain, plain_state = tiny_mamba2(tokens, return_state=True)
        with tiny_mamba2.hooks(fwd_hooks=hooks):
            read, read_state = tiny_mamba2(tokens, return_state=True)
            assert len(norms) == 2 and not read_outs  # the scan's own y and final state stand
            tiny_mamba2(tokens, state_positions=[2, -1])
    # states at chosen positions made in inference mode have no version counter: always read out (they are few)
    assert len(norms) == 4 and len(read_outs) == (2 if mode == "inference" else 0)
    read_outs.clear()
    assert_close(read, plain)
    for a, b in zip(read_state.ssm, plain_state.ssm):
        assert_close(a, b)
    with MODES[mode](), tiny_mamba2.hooks(fwd_hooks=[(names.mixer(0, "ssm_state"), halve_in_place)]):
        tiny_mamba2(tokens)
    assert read_outs == [1]  # an in-place edit is seen


def layer_inputs(model, tokens, layers):
    """Per layer, the scan's inputs as hooked and the states of the sequential reference on them."""
    parts = ["x", "dt", "B", "C"]
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x.detach().clone()

    hooks = [(names.mixer(layer, part), keep) for layer in layers for part in parts]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    states = {}
    for layer in layers:
        mixer = model.blocks[layer].mixer
        x, dt, B, C = (seen[names.mixer(layer, part)] for part in parts)
        states[layer] = ssd_scan_ref(x, dt, mixer.A.detach(), B, C, return_states=True)[1]
    return states


KEEPS = {
    "the tensor": lambda s: s,
    "a view": lambda s: s[:, 1:],
    "a detached alias": lambda s: s.detach(),
    "a numpy array": lambda s: s.numpy(),
}


@pytest.mark.parametrize("model_name", ["tiny_mamba2", "tiny_hybrid"])
@pytest.mark.parametrize("keep", list(KEEPS))
def test_states_a_hook_keeps_are_never_overwritten_by_later_layers(request, model_name, keep, tokens):
    model = request.getfixturevalue(model_name)
    layers = [i for i, kind in enumerate(getattr(model, "layer_types", ["mamba2"] * 2)) if kind == "mamba2"]
    kept = {}
    hooks = [(names.mixer(layer, "ssm_state"), lambda s, hook: kept.update({hook.name: KEEPS[keep](s)}))
             for layer in layers]  # fmt: skip
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    reference = layer_inputs(model, tokens, layers)
    for layer in layers:
        got = torch.as_tensor(kept[names.mixer(layer, "ssm_state")])
        expected = reference[layer][:, 1:] if keep == "a view" else reference[layer]
        assert_close(got, expected)


@pytest.mark.parametrize("model_name", ["tiny_mamba2", "tiny_hybrid"])
def test_layers_share_one_states_buffer_unless_something_holds_it(request, model_name, tokens):
    model = request.getfixturevalue(model_name)
    is_state = lambda name: name.endswith("hook_ssm_state")  # noqa: E731
    where = []
    with torch.inference_mode(), model.hooks(fwd_hooks=[(is_state, lambda s, hook: where.append(s.data_ptr()))]):
        model(tokens)
    assert len(where) == 2 and len(set(where)) == 1
    where.clear()
    with torch.inference_mode(), model.hooks(fwd_hooks=[(is_state, lambda s, hook: where.append(s.data_ptr()))]):
        _, cache = model.run_with_cache(tokens, names_filter=is_state)
    assert len(where) == 2 and len(set(where)) == 2  # the cache holds each layer's states
    reference = layer_inputs(model, tokens, [i for i, kind in enumerate(getattr(model, "layer_types", ["mamba2"] * 2))
                                             if kind == "mamba2"])  # fmt: skip
    for layer, expected in reference.items():
        assert_close(cache[names.mixer(layer, "ssm_state")], expected)
