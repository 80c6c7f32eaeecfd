"""The activation store: stored activations equal recomputed ones, resume, shuffling, every architecture."""

from __future__ import annotations

import pytest
import torch

from dynalens.models import HookedMamba, HookedRNN, MambaConfig, RNNConfig, names
from dynalens.models.store import TOKENS, ActivationStore, ShardWriter, _per_token_shapes, build_store
from tests.tolerances import assert_close

SEQ, PER_SHARD = 16, 4


@pytest.fixture(scope="module")
def tiny_mamba() -> HookedMamba:
    torch.manual_seed(0)
    return HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=50, d_state=4)).eval()


@pytest.fixture(scope="module")
def tiny_rnn() -> HookedRNN:
    torch.manual_seed(0)
    return HookedRNN(RNNConfig(d_model=8, n_layers=2, d_vocab=50, cell="lstm")).eval()


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    return torch.randint(0, 50, (SEQ * PER_SHARD * 3 + 5,), generator=torch.Generator().manual_seed(0))


def _hooks(model) -> list[str]:
    arch = model.cfg.architecture
    extra = {"mamba": names.mixer(0, "ssm_state"), "rnn": names.cell(0, "hidden")}[arch]
    return [names.resid_post(model.cfg.n_layers - 1), extra]


@pytest.mark.parametrize("fixture", ["tiny_mamba", "tiny_rnn"])
def test_stored_activations_equal_recomputed(fixture, request, corpus, tmp_path):
    model = request.getfixturevalue(fixture)
    hooks = _hooks(model)
    store = build_store(model, hooks, corpus, tmp_path, seq_len=SEQ, shard_sequences=PER_SHARD, batch_size=3,
                        progress=False)  # fmt: skip
    assert store.n_tokens == SEQ * PER_SHARD * 3  # the 5-token tail is dropped
    assert store.manifest["architecture"] == model.cfg.architecture
    sequences = corpus[: store.n_tokens].reshape(-1, SEQ)
    _, cache = model.run_with_cache(sequences, names_filter=hooks)
    for index in range(3):
        shard = store.shard(index)
        rows = slice(index * PER_SHARD, (index + 1) * PER_SHARD)
        assert torch.equal(shard["tokens"], sequences[rows].reshape(-1))
        for name in hooks:
            expected = cache[name][rows].flatten(0, 1)
            assert_close(shard[name], expected)


def test_a_shorter_last_shard_and_a_narrower_dtype(tiny_mamba, corpus, tmp_path):
    hooks = _hooks(tiny_mamba)
    store = build_store(tiny_mamba, hooks, corpus, tmp_path, seq_len=SEQ, shard_sequences=5, batch_size=2,
                        dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert [s["n_tokens"] for s in store.manifest["shards"]] == [5 * SEQ, 5 * SEQ, 2 * SEQ]
    sequences = corpus[: store.n_tokens].reshape(-1, SEQ)
    _, cache = tiny_mamba.run_with_cache(sequences, names_filter=hooks)
    for name in hooks:
        stored = torch.cat([store.shard(i)[name] for i in range(3)])
        assert stored.dtype == torch.bfloat16
        assert_close(stored, cache[name].flatten(0, 1))


def test_the_mamba_state_is_formed_in_the_shard_bytes_and_each_hook_reports_as_it_fires(tiny_mamba, corpus, tmp_path):
    """The scan writes the states straight into the shard's image (the hook sees memory inside it), and the
    rows of each tensor are reported final as its hook fires, the state (layer 0) before resid_post (layer 1)."""
    resid, state = _hooks(tiny_mamba)
    writer = ShardWriter(tiny_mamba, _per_token_shapes(tiny_mamba, [resid, state], SEQ), str(tmp_path), 3,
                         torch.float32)  # fmt: skip
    sequences = corpus[: 4 * SEQ].reshape(4, SEQ)
    image = writer.image_for(sequences)
    start = image.tensors[TOKENS].untyped_storage().data_ptr()
    seen, reports = [], []
    with tiny_mamba.hooks(fwd_hooks=[(state, lambda s, hook: seen.append(s.data_ptr()))]):
        writer.fill(image, sequences, reports.append)
    assert len(seen) == 2 and all(start <= ptr < start + image.tensors[TOKENS].untyped_storage().nbytes() for ptr in seen)
    n = 4 * SEQ
    assert reports == [{TOKENS: n, resid: 0, state: 3 * SEQ}, {TOKENS: n, resid: 3 * SEQ, state: 3 * SEQ},
                       {TOKENS: n, resid: 3 * SEQ, state: n}, {TOKENS: n, resid: n, state: n}]  # fmt: skip
    _, cache = tiny_mamba.run_with_cache(sequences, names_filter=[resid, state])
    for name in (resid, state):
        assert_close(image.tensors[name], cache[name].flatten(0, 1))


def test_transformer_store_from_text(tiny_llama, tmp_path):
    from dynalens.models.corpus import python_reference

    text = python_reference()[:4000]
    hook = names.resid_post(1)
    store = build_store(tiny_llama, [hook], text, tmp_path, seq_len=32, shard_sequences=8, progress=False)
    shard = store.shard(0)
    _, cache = tiny_llama.run_with_cache(shard["tokens"][:32][None], names_filter=[hook])
    assert_close(shard[hook][:32], cache[hook][0])


def test_resume_skips_finished_shards_and_rejects_another_corpus(tiny_mamba, corpus, tmp_path):
    hooks = _hooks(tiny_mamba)
    kwargs = dict(seq_len=SEQ, shard_sequences=PER_SHARD, progress=False)
    build_store(tiny_mamba, hooks, corpus, tmp_path, **kwargs)
    first = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*")}
    (tmp_path / "shard_00001.safetensors").unlink()  # as if the build had stopped before shard 1
    store = build_store(tiny_mamba, hooks, corpus, tmp_path, **kwargs)
    again = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*")}
    assert set(again) == set(first)
    assert again["shard_00000.safetensors"] == first["shard_00000.safetensors"]  # not rewritten
    assert len(store.manifest["shards"]) == 3
    with pytest.raises(ValueError, match="another model, corpus or hook set"):
        build_store(tiny_mamba, hooks, corpus.flip(0), tmp_path, **kwargs)


def test_iteration_shuffles_every_token_once(tiny_mamba, corpus, tmp_path):
    hooks = _hooks(tiny_mamba)
    store = build_store(tiny_mamba, hooks, corpus, tmp_path, seq_len=SEQ, shard_sequences=PER_SHARD,
                        progress=False)  # fmt: skip
    shuffled = ActivationStore(tmp_path, batch_size=50, buffer_shards=2, seed=1)
    batches = list(shuffled)
    seen = torch.cat([b["tokens"] for b in batches])
    ordered = torch.cat([store.shard(i)["tokens"] for i in range(3)])
    assert torch.equal(seen.sort().values, ordered.sort().values)
    assert not torch.equal(seen, ordered)
    rows = torch.cat([b[hooks[0]] for b in batches])
    assert rows.shape == (store.n_tokens, tiny_mamba.cfg.d_model)
    loader = torch.utils.data.DataLoader(ActivationStore(tmp_path, shuffle=False), batch_size=None)
    assert torch.equal(torch.cat([b["tokens"] for b in loader]), ordered)


def test_bad_hooks_are_clear_errors(tiny_llama, tiny_mamba, corpus, tmp_path):
    with pytest.raises(ValueError, match="not \\[batch, pos, ...\\]"):
        build_store(tiny_llama, [names.pattern(0)], corpus, tmp_path / "a", seq_len=SEQ, progress=False)
    with pytest.raises(KeyError, match="Unknown hook name"):
        build_store(tiny_mamba, ["blocks.0.hook_resid_psot"], corpus, tmp_path / "b", seq_len=SEQ, progress=False)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_store(tiny_mamba, _hooks(tiny_mamba), corpus[:5], tmp_path / "c", seq_len=SEQ, progress=False)
