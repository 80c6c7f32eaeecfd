"""Models across devices: half the blocks offloaded to disk give the logits and caches of the model in memory."""

from __future__ import annotations

import pytest
import torch

from dynalens.models import HookedMamba, HookedMamba2, HookedRNN, Mamba2Config, MambaConfig, RNNConfig
from dynalens.models.hybrid import HookedHybrid
from dynalens.models.placement import auto_device_map, place



def _hybrid() -> HookedHybrid:
    """A random 4-layer Bamba (Mamba-2, attention, Mamba-2, Mamba-2) as a HookedHybrid."""
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=24, mamba_n_heads=2, mamba_d_head=16, mamba_d_state=4, mamba_n_groups=1,
        mamba_chunk_size=4, attn_layer_indices=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf = BambaForCausalLM(config).eval()
    hf.set_attn_implementation("eager")
    return HookedHybrid.from_hf(hf)


BUILDERS = {
    "mamba": lambda: HookedMamba(MambaConfig(d_model=16, n_layers=4, d_vocab=50, d_state=4)),
    "mamba2": lambda: HookedMamba2(Mamba2Config(
        d_model=16, n_layers=4, d_vocab=50, n_heads=4, d_head=8, d_state=4, chunk_size=4)),  # fmt: skip
    "hybrid": _hybrid,
    "rnn": lambda: HookedRNN(RNNConfig(d_model=8, n_layers=4, d_vocab=50, cell="lstm")),
}


def _pair(kind: str):
    torch.manual_seed(0)
    reference = BUILDERS[kind]().eval()
    torch.manual_seed(0)
    return reference, BUILDERS[kind]().eval()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_disk_offload_equals_in_memory(kind, tmp_path):
    reference, model = _pair(kind)
    half = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    place(model, "auto", max_memory={"cpu": half}, offload_folder=tmp_path)
    on_disk = [name for name, device in model.hf_device_map.items() if device == "disk"]
    assert any(name.startswith("blocks.") for name in on_disk)
    assert any(device == "cpu" for name, device in model.hf_device_map.items() if name.startswith("blocks."))
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    keep = lambda name: "resid" in name or "hook_mixer_out" in name  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=keep)
        ref_logits, ref_cache = reference.run_with_cache(tokens, names_filter=keep)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-6)
    assert sorted(cache.keys()) == sorted(ref_cache.keys())
    for name in ref_cache.keys():
        torch.testing.assert_close(cache[name], ref_cache[name], atol=1e-6, rtol=1e-6)
    assert torch.equal(model.generate(tokens, 4), reference.generate(tokens, 4))


def test_auto_map_keeps_tied_weights_together_and_fills_in_order():
    _, model = _pair("mamba")
    assert model.unembed.weight is model.embed.weight
    device_map = auto_device_map(model, {"cpu": 10**9})
    assert set(device_map.values()) == {"cpu"}
    device_map = auto_device_map(model, {"cpu": 1})  # nothing fits: all on disk
    assert device_map["unembed"] == device_map["embed"] == "disk"


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_everything_on_disk(kind, tmp_path):
    reference, model = _pair(kind)
    place(model, "auto", max_memory={"cpu": 1}, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"disk"}
    tokens = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-6, rtol=1e-6)


def test_bad_device_maps_are_clear(tmp_path):
    _, model = _pair("rnn")
    with pytest.raises(ValueError, match="pass offload_folder"):
        place(model, {"embed": "cpu", "blocks": "disk"})
    with pytest.raises(ValueError, match="does not have"):
        place(model, {"blokcs.0": "cpu"})
    with pytest.raises(ValueError, match="needs max_memory"):
        place(model, "auto")


def test_smollm2_half_on_disk_equals_in_memory(smollm2, tmp_path):
    """SmolLM2 with max_memory forcing half its layers to disk: the same logits and caches."""
    import dynalens as dl

    half = sum(p.numel() * p.element_size() for p in smollm2.parameters()) // 2
    offloaded = dl.load("smollm2-135m", device_map="auto", max_memory={"cpu": half}, offload_folder=tmp_path)
    on_disk = [n for n, d in offloaded.original_model.hf_device_map.items() if d == "disk" and ".layers." in n]
    assert 10 <= len(on_disk) <= 20
    tokens = smollm2.to_tokens("The Eiffel Tower is in the city of")
    keep = lambda name: name.endswith(("hook_resid_post", "attn.hook_pattern"))  # noqa: E731
    with torch.no_grad():
        logits, cache = offloaded.run_with_cache(tokens, names_filter=keep)
        ref_logits, ref_cache = smollm2.run_with_cache(tokens, names_filter=keep)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert sorted(cache.keys()) == sorted(ref_cache.keys())
    for name in ref_cache.keys():
        torch.testing.assert_close(cache[name], ref_cache[name], atol=1e-5, rtol=1e-5)


def test_load_places_our_models(tmp_path):
    import dynalens as dl

    reference = dl.load("mamba-ar")
    half = sum(p.numel() * p.element_size() for p in reference.parameters()) // 2
    model = dl.load("mamba-ar", device_map="auto", max_memory={"cpu": half}, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    tokens = torch.randint(0, reference.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-5, rtol=1e-5)
