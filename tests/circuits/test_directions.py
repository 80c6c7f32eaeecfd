"""Directions: diff-in-means by hand, PCA and probe against their definitions, batched reads
against one prompt at a time, save/load through the one record format."""

from __future__ import annotations

import pytest
import torch
from dynalens.circuits.directions import Direction, pool, resid_activations
from dynalens.models import names
from dynalens.models.io import write_safetensors
from dynalens.models.mamba import HookedMamba, MambaConfig
from dynalens.models.mamba2 import HookedMamba2, Mamba2Config
from dynalens.models.prompts import Prompts
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.probes.results import Saved
from sklearn.linear_model import LogisticRegression
from tests.tolerances import assert_close

POSITIVE = ["The cat sat on the mat", "A dog ran in the park", "Birds sing at dawn"]
NEGATIVE = ["Stock prices fell sharply", "The bond market rallied", "Inflation rose again"]


@pytest.fixture(scope="module")
def recurrent_models():
    torch.manual_seed(0)
    mamba = HookedMamba(MambaConfig(d_model=8, n_layers=2, d_vocab=16, d_state=2)).eval()
    rnn = HookedRNN(RNNConfig(d_model=8, n_layers=2, d_vocab=16, cell="lstm")).eval()
    mamba2 = HookedMamba2(Mamba2Config(d_model=8, n_layers=2, d_vocab=16, n_heads=2, d_head=8, d_state=4)).eval()
    return mamba, rnn, mamba2


def token_sets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (6, 5), generator=g), torch.randint(8, 16, (6, 5), generator=g)


def alone(model, prompt, layer: int) -> torch.Tensor:
    """``names.resid_post(layer)`` of one prompt run by itself, ``[pos, d_model]``."""
    _, cache = model.run_with_cache(prompt, names_filter=[names.resid_post(layer)])
    return cache[names.resid_post(layer)][0]


def test_diff_in_means_equals_hand_computation(tiny_llama):
    d = Direction.from_prompts(tiny_llama, POSITIVE, NEGATIVE, layers=[1, 0], position=-1)
    assert d.layers == [0, 1] and d.method == "diff_in_means" and d.n_positive == 3
    assert (d.model_name, d.architecture) == (tiny_llama.cfg.model_name, "transformer")
    for layer in (0, 1):
        expected = torch.stack([alone(tiny_llama, p, layer)[-1] for p in POSITIVE]).mean(0) - torch.stack(
            [alone(tiny_llama, p, layer)[-1] for p in NEGATIVE]
        ).mean(0)
        assert_close(d.vector(layer), expected)


def test_mean_position_averages_every_real_token(tiny_llama):
    acts = resid_activations(tiny_llama, POSITIVE[:1], [1], position="mean")
    torch.testing.assert_close(acts[0, 0], alone(tiny_llama, POSITIVE[0], 1).mean(0))


def test_pool_reads_real_positions_only():
    prompts = Prompts.from_ids([[1, 2, 3], [4]])
    x = torch.arange(6.0).reshape(2, 3, 1)
    x[1, :2] = float("nan")  # pads: never read
    torch.testing.assert_close(pool(x, prompts, "mean"), torch.tensor([[1.0], [5.0]]))
    torch.testing.assert_close(pool(x, prompts, 0), torch.tensor([[0.0], [5.0]]))
    torch.testing.assert_close(pool(x, prompts, -1), torch.tensor([[2.0], [5.0]]))
    with pytest.raises(IndexError, match="position 1 is out of range for prompt 1"):
        pool(x, prompts, 1)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["mamba", "rnn", "mamba2"])
def test_recurrent_directions_match_their_definitions(recurrent_models, which):
    model = recurrent_models[which]
    pos, neg = token_sets()
    acts_pos = resid_activations(model, pos, [0, 1])
    acts_neg = resid_activations(model, neg, [0, 1])
    _, cache = model.run_with_cache(pos)
    torch.testing.assert_close(acts_pos[:, 1], cache[names.resid_post(1)][:, -1])

    means = Direction.from_prompts(model, pos, neg)
    torch.testing.assert_close(means.vectors, acts_pos.mean(0) - acts_neg.mean(0))
    assert means.architecture == ("mamba", "rnn", "mamba2")[which]

    pca = Direction.from_prompts(model, pos, neg, method="pca")
    for i in range(2):
        diffs = (acts_pos - acts_neg)[:, i].double()
        top = torch.linalg.eigh(diffs.T @ diffs).eigenvectors[:, -1].float()  # largest eigenvalue
        assert_close(abs(float(pca.vectors[i] @ top)), 1.0)
        assert float(pca.vectors[i] @ diffs.float().mean(0)) > 0  # points towards positive

    probe = Direction.from_prompts(model, pos, neg, method="probe", layers=[1])
    x = torch.cat([acts_pos, acts_neg])[:, 1].double().numpy()
    reference = LogisticRegression(max_iter=1000).fit(x, [1] * 6 + [0] * 6).coef_[0]
    torch.testing.assert_close(probe.vectors[0], torch.tensor(reference, dtype=torch.float32))
    assert float(probe.project(acts_pos[:, 1], 1).mean()) > float(probe.project(acts_neg[:, 1], 1).mean())


def test_cosine_similarity_and_unit():
    vectors = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    d = Direction(vectors, layers=[0, 2, 5]).unit()
    torch.testing.assert_close(d.vectors.norm(dim=-1), torch.ones(3))
    s = 2**-0.5
    torch.testing.assert_close(
        d.cosine_similarity(), torch.tensor([[1.0, s, 0.0], [s, 1.0, -s], [0.0, -s, 1.0]])
    )


def test_save_load_round_trip(tmp_path, recurrent_models):
    pos, neg = token_sets()
    d = Direction.from_prompts(recurrent_models[0], pos, neg, layers=[1], position="mean")
    d.save(tmp_path / "d.safetensors")
    for back in (Direction.load(tmp_path / "d.safetensors"), Saved.load(tmp_path / "d.safetensors")):
        assert isinstance(back, Direction)
        assert torch.equal(back.vectors, d.vectors)
        assert back._fields().keys() == d._fields().keys()
        assert {k: v for k, v in back._fields().items() if k != "vectors"} == {
            k: v for k, v in d._fields().items() if k != "vectors"
        }
    assert (back.layers, back.method, back.position, back.architecture, back.n_positive) == (
        [1], "diff_in_means", "mean", "mamba", 6,
    )  # fmt: skip


def test_bad_input_is_named(recurrent_models, tmp_path):
    model = recurrent_models[1]
    pos, neg = token_sets()
    with pytest.raises(IndexError, match="valid layers are 0 to 1"):
        Direction.from_prompts(model, pos, neg, layers=[2])
    with pytest.raises(IndexError, match="position 9 is out of range for prompt 0"):
        Direction.from_prompts(model, pos, neg, position=9)
    with pytest.raises(ValueError, match="position must be an int or 'mean'"):
        Direction.from_prompts(model, pos, neg, position="last")
    with pytest.raises(ValueError, match="same size"):
        Direction.from_prompts(model, pos, neg[:3], method="pca")
    with pytest.raises(ValueError, match="len\\(layers\\)"):
        Direction(torch.zeros(2, 4), layers=[0])
    with pytest.raises(KeyError, match="covers layers \\[0\\]"):
        Direction(torch.ones(1, 4), layers=[0]).vector(1)
    with pytest.raises(ValueError, match="must be \\[prompt, layer, d_model\\]"):
        Direction.from_activations(torch.ones(3, 1, 4), torch.ones(3, 1, 5), [0])
    write_safetensors(tmp_path / "x.safetensors", {"vectors": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="not a dynalens record"):
        Direction.load(tmp_path / "x.safetensors")


def test_load_names_the_type_a_file_holds(tmp_path):
    from dynalens.circuits.refusal import RefusalClassifier

    RefusalClassifier(layer=0).save(tmp_path / "clf.safetensors")
    with pytest.raises(TypeError, match="holds a RefusalClassifier, not a Direction"):
        Direction.load(tmp_path / "clf.safetensors")


def test_from_prompts_dispatches_by_method_and_names_bad_ones(recurrent_models):
    model = recurrent_models[0]
    pos, neg = token_sets()
    acts = resid_activations(model, pos, [1]), resid_activations(model, neg, [1])
    for method in ("diff_in_means", "pca", "probe"):
        by_name = Direction.from_prompts(model, pos, neg, method=method, layers=[1])
        fitted = Direction.from_activations(*acts, [1], method)
        assert by_name.method == fitted.method == method
        assert_close(by_name.vectors, fitted.vectors)
    with pytest.raises(ValueError, match="method must be one of"):
        Direction.from_prompts(model, pos, neg, method="mean")


RAGGED = ["A short one", "A much longer prompt with many more words in it", "Mid length text", "Hi"]


@pytest.mark.parametrize("position", [-1, 0, 1, "mean"])
def test_batched_read_equals_one_prompt_at_a_time(tiny_llama, position):
    """A ragged, left-padded batch (with sub-batches) reads what each prompt gives alone."""
    batched = resid_activations(tiny_llama, RAGGED, [0, 1], position, batch_size=3)
    assert batched.shape == (4, 2, tiny_llama.cfg.d_model) and batched.dtype == torch.float32
    for i, prompt in enumerate(RAGGED):
        resid = torch.stack([alone(tiny_llama, prompt, layer) for layer in (0, 1)])
        expected = resid.mean(1) if position == "mean" else resid[:, position]
        assert_close(batched[i], expected)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["mamba", "rnn", "mamba2"])
@pytest.mark.parametrize("position", [-1, 0, 1, "mean"])
def test_recurrent_batched_read_equals_one_prompt_at_a_time(recurrent_models, which, position):
    """Ragged id rows on Mamba, Mamba-2 and an LSTM: pads leave the state as it was, so each row
    reads what the prompt gives alone."""
    model = recurrent_models[which]
    rows = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9], [7, 9, 3, 2, 3], [8, 4]]
    batched = resid_activations(model, rows, [0, 1], position, batch_size=4)
    for i, row in enumerate(rows):
        resid = torch.stack([alone(model, torch.tensor([row]), layer) for layer in (0, 1)])
        expected = resid.mean(1) if position == "mean" else resid[:, position]
        assert_close(batched[i], expected)
