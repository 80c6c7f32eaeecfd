"""Directions: diff-in-means by hand, PCA and probe against their definitions, save/load."""

from __future__ import annotations

import pytest
import torch
from dynalens.circuits.directions import Direction, resid_activations
from dynalens.models.io import write_safetensors
from dynalens.models.mamba import HookedMamba, MambaConfig
from dynalens.models.rnn import HookedRNN, RNNConfig
from sklearn.linear_model import LogisticRegression

POSITIVE = ["The cat sat on the mat", "A dog ran in the park", "Birds sing at dawn"]
NEGATIVE = [
    "Stock prices fell sharply",
    "The bond market rallied",
    "Inflation rose again",
]


@pytest.fixture(scope="module")
def recurrent_models():
    torch.manual_seed(0)
    mamba = HookedMamba(
        MambaConfig(d_model=8, n_layers=2, d_vocab=16, d_state=2)
    ).eval()
    rnn = HookedRNN(RNNConfig(d_model=8, n_layers=2, d_vocab=16, cell="lstm")).eval()
    return mamba, rnn


def token_sets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (6, 5), generator=g), torch.randint(
        8, 16, (6, 5), generator=g
    )


def test_diff_in_means_equals_hand_computation(tiny_llama):
    d = Direction.diff_in_means(
        tiny_llama, POSITIVE, NEGATIVE, layers=[1, 0], position=-1
    )

    def last_resid(prompts, layer):
        rows = []
        for text in prompts:
            _, cache = tiny_llama.run_with_cache(text)
            rows.append(cache[f"blocks.{layer}.hook_resid_post"][0, -1])
        return torch.stack(rows).mean(0)

    assert d.layers == [0, 1] and d.method == "diff_in_means" and d.n_positive == 3
    for layer in (0, 1):
        expected = last_resid(POSITIVE, layer) - last_resid(NEGATIVE, layer)
        torch.testing.assert_close(d.vector(layer), expected, rtol=1e-5, atol=1e-5)


def test_mean_position_averages_every_token(tiny_llama):
    acts = resid_activations(tiny_llama, POSITIVE[:1], [1], position="mean")
    _, cache = tiny_llama.run_with_cache(POSITIVE[0])
    torch.testing.assert_close(acts[0, 0], cache["blocks.1.hook_resid_post"][0].mean(0))


@pytest.mark.parametrize("which", [0, 1], ids=["mamba", "rnn"])
def test_recurrent_directions_match_their_definitions(recurrent_models, which):
    model = recurrent_models[which]
    pos, neg = token_sets()
    acts_pos = resid_activations(model, pos, [0, 1])
    acts_neg = resid_activations(model, neg, [0, 1])
    _, cache = model.run_with_cache(pos)
    torch.testing.assert_close(acts_pos[:, 1], cache["blocks.1.hook_resid_post"][:, -1])

    means = Direction.diff_in_means(model, pos, neg)
    torch.testing.assert_close(means.vectors, acts_pos.mean(0) - acts_neg.mean(0))

    pca = Direction.pca(model, pos, neg)
    for i in range(2):
        diffs = (acts_pos - acts_neg)[:, i].double()
        top = (
            torch.linalg.eigh(diffs.T @ diffs).eigenvectors[:, -1].float()
        )  # largest eigenvalue
        assert abs(float(pca.vectors[i] @ top)) == pytest.approx(1.0, abs=1e-4)
        assert (
            float(pca.vectors[i] @ diffs.float().mean(0)) > 0
        )  # points towards positive

    probe = Direction.probe(model, pos, neg, layers=[1])
    x = torch.cat([acts_pos, acts_neg])[:, 1].double().numpy()
    reference = LogisticRegression(max_iter=1000).fit(x, [1] * 6 + [0] * 6).coef_[0]
    torch.testing.assert_close(
        probe.vectors[0], torch.tensor(reference, dtype=torch.float32)
    )
    assert float(probe.project(acts_pos[:, 1], 1).mean()) > float(
        probe.project(acts_neg[:, 1], 1).mean()
    )


def test_cosine_similarity_and_unit():
    vectors = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    d = Direction(vectors, layers=[0, 2, 5]).unit()
    torch.testing.assert_close(d.vectors.norm(dim=-1), torch.ones(3))
    s = 2**-0.5
    torch.testing.assert_close(
        d.cosine_similarity(),
        torch.tensor([[1.0, s, 0.0], [s, 1.0, -s], [0.0, -s, 1.0]]),
    )


def test_save_load_round_trip(tmp_path, recurrent_models):
    pos, neg = token_sets()
    d = Direction.diff_in_means(
        recurrent_models[0], pos, neg, layers=[1], position="mean"
    )
    d.save(tmp_path / "d.safetensors")
    back = Direction.load(tmp_path / "d.safetensors")
    assert torch.equal(back.vectors, d.vectors)
    assert (back.layers, back.method, back.position, back.architecture) == (
        [1],
        "diff_in_means",
        "mean",
        "mamba",
    )


def test_bad_input_is_named(recurrent_models, tmp_path):
    model = recurrent_models[1]
    pos, neg = token_sets()
    with pytest.raises(IndexError, match="valid layers are 0 to 1"):
        Direction.diff_in_means(model, pos, neg, layers=[2])
    with pytest.raises(IndexError, match="position 9 is out of range"):
        Direction.diff_in_means(model, pos, neg, position=9)
    with pytest.raises(ValueError, match="same size"):
        Direction.pca(model, pos, neg[:3])
    with pytest.raises(ValueError, match="len\\(layers\\)"):
        Direction(torch.zeros(2, 4), layers=[0])
    with pytest.raises(KeyError, match="covers layers \\[0\\]"):
        Direction(torch.ones(1, 4), layers=[0]).vector(1)
    write_safetensors(tmp_path / "x.safetensors", {"vectors": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="not a dynalens direction file"):
        Direction.load(tmp_path / "x.safetensors")


def test_from_prompts_dispatches_by_method_and_names_bad_ones(recurrent_models):
    model = recurrent_models[0]
    pos, neg = token_sets()
    for method in ("diff_in_means", "pca", "probe"):
        by_name = Direction.from_prompts(model, pos, neg, method=method, layers=[1])
        named = getattr(Direction, method)(model, pos, neg, layers=[1])
        assert by_name.method == method
        torch.testing.assert_close(by_name.vectors, named.vectors, rtol=0, atol=0)
    with pytest.raises(ValueError, match="method must be one of"):
        Direction.from_prompts(model, pos, neg, method="mean")


@pytest.mark.parametrize("position", [-1, 0, 2, "mean"])
def test_batched_read_equals_one_prompt_at_a_time(tiny_llama, position):
    prompts = ["A short one", "A much longer prompt with many more words in it", "Mid length text"]
    batched = resid_activations(tiny_llama, prompts, [0, 1], position, batch_size=3)
    for i, prompt in enumerate(prompts):
        _, cache = tiny_llama.run_with_cache(prompt)
        resid = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0] for l in (0, 1)])
        expected = resid.mean(1) if position == "mean" else resid[:, position]
        torch.testing.assert_close(batched[i], expected, rtol=1e-4, atol=1e-4)
