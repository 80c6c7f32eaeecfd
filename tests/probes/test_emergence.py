"""Emergence: the curve fit recovers known parameters, checkpoint tracking, features and the regressor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import dynalens as dl
from dynalens.models.prompts import Prompts
from dynalens.models.tasks import BigramBackcopyTask
from dynalens.models.train import build_model, train
from dynalens.probes.emergence import (
    FEATURE_NAMES,
    PARAM_NAMES,
    Checkpoints,
    CheckpointsResult,
    EmergenceFit,
    EmergenceRegressor,
    MassiveEmergence,
    MassiveEmergenceResult,
    architecture_features,
    checkpoint_series,
    emergence_function,
    model_features,
)
from dynalens.probes.massive import MassiveActivations
from dynalens.probes.residual import ResidualNorms
from dynalens.probes.results import Result
from tests.tolerances import assert_close

STEPS = np.concatenate([[0.0], np.geomspace(1, 3000, 39)])

# (A, lambda, gamma, t0, K): a rise then a decay, an inverted one, a sharp early peak.
KNOWN = [(50.0, 0.2, 0.01, 1.5, 5.0), (-3.0, 0.05, 0.002, 2.0, 10.0), (200.0, 0.5, 0.05, 1.1, 1.0)]


def relative_errors(fitted: dict[str, float], true: tuple[float, ...]) -> np.ndarray:
    return np.array([abs(fitted[name] - value) / abs(value) for name, value in zip(PARAM_NAMES, true)])


@pytest.mark.parametrize("true", KNOWN)
def test_fit_recovers_known_parameters(true):
    fit = EmergenceFit().fit(STEPS, emergence_function(STEPS, *true))
    assert relative_errors(fit.params_, true).max() <= 0.05
    assert_close(fit.r2_, 1.0, dtype=torch.float64)
    assert_close(fit.predict(STEPS), emergence_function(STEPS, **_five(fit.params_)), dtype=torch.float64)


def _five(params: dict[str, float]) -> dict[str, float]:
    return {"A": params["A"], "lam": params["lambda"], "gamma": params["gamma"], "t0": params["t0"], "K": params["K"]}


def test_fit_recovers_parameters_under_small_noise():
    true = KNOWN[0]
    clean = emergence_function(STEPS, *true)
    noisy = clean + 1e-3 * np.ptp(clean) * np.random.default_rng(0).standard_normal(len(STEPS))
    fit = EmergenceFit().fit(STEPS, noisy)
    assert relative_errors(fit.params_, true).max() <= 0.05
    assert fit.score(STEPS, clean) > 0.9999


def test_fit_rejects_bad_data():
    with pytest.raises(ValueError, match="at least 6 points"):
        EmergenceFit().fit([0, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="same length"):
        EmergenceFit().fit(STEPS, STEPS[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        EmergenceFit().fit(STEPS - 10, STEPS)
    with pytest.raises(ValueError, match="finite"):
        EmergenceFit().fit(STEPS, np.full_like(STEPS, np.nan))


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama trained 40 steps on a small Bigram-Backcopy, 6 checkpoints."""
    task = BigramBackcopyTask(d_vocab=16, seq_len=12)
    model = build_model("attn-3l", task, seed=0, d_model=16, n_layers=2, n_heads=2, d_mlp=32)
    out = tmp_path_factory.mktemp("run")
    train(model, task, 40, lr=3e-3, batch_size=8, warmup=5, out=out, n_checkpoints=6, eval_size=8, progress=False)
    return out


PROBE = BigramBackcopyTask(d_vocab=16, seq_len=12).sample(3, torch.Generator().manual_seed(5)).tokens


def test_checkpoint_series_from_a_run_and_from_folders(run_dir, tmp_path):
    series = checkpoint_series(run_dir)
    steps = [s for s, _ in series]
    assert steps[0] == 0 and steps[-1] == 40 and steps == sorted(steps) and len(steps) >= 5
    shuffled = [folder for _, folder in reversed(series)]
    assert checkpoint_series(shuffled) == series  # steps read from the folder names, sorted
    plain = [tmp_path / "b", tmp_path / "a"]
    for p in plain:
        p.mkdir()
    assert checkpoint_series(plain) == [(0, plain[0]), (1, plain[1])]  # no number: list order
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint_series(tmp_path)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        checkpoint_series([tmp_path / "missing"])
    with pytest.raises(ValueError, match="empty list"):
        checkpoint_series([])


def test_checkpoints_run_analyses_on_every_checkpoint(run_dir, tmp_path):
    loaded = []
    series = checkpoint_series(run_dir)
    found = Checkpoints(run_dir, [ResidualNorms(), MassiveActivations(k=2)],
                        loader=lambda f: loaded.append(f) or dl.load(f))(dl.load(run_dir), PROBE)  # fmt: skip
    assert found.steps == [s for s, _ in series] and loaded == [f for _, f in series]
    assert found.folders == [str(f) for _, f in series]
    assert list(found.results) == ["residual_norms", "massive_activations"]
    for c in (0, len(series) - 1):
        expected = ResidualNorms()(dl.load(series[c][1]), PROBE)
        torch.testing.assert_close(found.results["residual_norms"][c].norms, expected.norms)
    frame = found.to_frame()
    assert list(frame.columns[:4]) == ["step", "analysis", "prompt", "position"]
    # norms: prompts · tokens · rows; massive: prompts · rows · k
    assert len(frame) == len(series) * (3 * 12 * 3 + 3 * 3 * 2)
    assert found.top(1)["analysis"].tolist() == ["residual_norms", "massive_activations"]
    last = found.results["residual_norms"][-1].metrics()
    assert found.metrics()["residual_norms.max_norm"] == last["max_norm"]
    figure = found.figure(analysis="residual_norms", column="norm", by=["layer"])
    assert len(figure.data) == 3 and list(figure.data[0].x) == found.steps
    found.save(tmp_path / "c.safetensors")
    back = Result.load(tmp_path / "c.safetensors")
    assert isinstance(back, CheckpointsResult) and back.steps == found.steps
    torch.testing.assert_close(back.results["massive_activations"][-1].top_values,
                               found.results["massive_activations"][-1].top_values)  # fmt: skip
    assert back.to_frame().equals(frame)


def test_checkpoints_need_prompts_of_the_checkpoints_vocabulary(run_dir):
    model = dl.load(run_dir)
    with pytest.raises(ValueError, match="needs prompts"):
        Checkpoints(run_dir, [ResidualNorms()])(model)
    too_large = Prompts.from_ids([[1, 2, 40]])  # built without a model: d_vocab is 16 here
    with pytest.raises(ValueError, match="d_vocab 16, too small for token id 40"):
        Checkpoints(run_dir, [ResidualNorms()])(model, too_large)


def test_massive_emergence_measures_each_checkpoint(run_dir, tmp_path):
    found = MassiveEmergence(run_dir)(dl.load(run_dir), PROBE)
    series = checkpoint_series(run_dir)
    assert found.steps.tolist() == [s for s, _ in series]
    assert found.ratios.shape == (len(series), 3) and found.fit_params.shape == (3, len(PARAM_NAMES))
    assert found.maxima.shape == (len(series), 3, 3)  # checkpoints × prompts × hooks
    for c in (0, len(series) - 1):
        expected = MassiveActivations(k=1)(dl.load(series[c][1]), PROBE).ratio.double()
        torch.testing.assert_close(found.ratios[c], expected)
    fits = found.fits()
    assert fits["hook"].tolist() == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert len(found.to_frame()) == 3 * 3 * len(series) and len(found.curves()) == 3 * len(series)
    assert found.curves()["ratio"].tolist() == pytest.approx(found.ratios.reshape(-1).tolist())
    assert len(found.figure().data) >= 3
    assert found.metrics()["final_max_ratio"] == found.ratios[-1].max().item()
    found.save(tmp_path / "e.safetensors")
    back = Result.load(tmp_path / "e.safetensors")
    assert isinstance(back, MassiveEmergenceResult) and back.fits().equals(fits)


def test_massive_emergence_of_a_ragged_batch_equals_each_prompt_alone(run_dir):
    model = dl.load(run_dir)
    ragged = [PROBE[0, :5].tolist(), PROBE[1].tolist(), PROBE[2, :8].tolist()]
    batched = MassiveEmergence(run_dir)(model, ragged)
    assert batched.prompts.is_padded
    for i, row in enumerate(ragged):
        alone = MassiveEmergence(run_dir)(model, [row])
        assert_close(batched.maxima[:, i], alone.maxima[:, 0])
        assert_close(batched.medians[:, i], alone.medians[:, 0])
    torch.testing.assert_close(batched.ratios, batched.maxima.mean(1) / batched.medians.mean(1))


# ------------------------------------------------------- architecture → parameters
def test_architecture_features_known_values(tiny_llama):
    f = dict(zip(FEATURE_NAMES, architecture_features(1, 4, 8, 256, 1024)))
    assert f == pytest.approx({
        "l/L": 0.5, "(l/L)^2": 0.25, "(l/L)^3": 0.125, "sqrt(l/L)": 0.5**0.5, "H/d": 8 / 256,
        "d_ff/d": 4.0, "d/L": 64.0, "H/L": 2.0, "log d": np.log(256), "l*L": 8.0,
    })  # fmt: skip
    X = model_features(tiny_llama)  # 2 layers, 4 heads, d_model 64, d_mlp 128
    np.testing.assert_allclose(X, np.stack([architecture_features(layer, 2, 4, 64, 128) for layer in (0, 1)]))
    with pytest.raises(IndexError, match="layer 4"):
        architecture_features(4, 4, 8, 256, 1024)


def test_regressor_learns_a_known_map():
    rng = np.random.default_rng(0)
    archs = [(int(rng.integers(L)), int(L), int(rng.choice([2, 4, 8])), int(d), int(rng.choice([2, 4, 8]) * d))
             for L, d in zip(rng.integers(2, 24, 120), rng.choice([64, 128, 256, 512], 120))]  # fmt: skip
    X = np.stack([architecture_features(*a) for a in archs])
    # Targets whose signed log1p is linear in the features: exactly what the default model can represent.
    W = rng.normal(size=(X.shape[1], len(PARAM_NAMES))) / X.std(0)[:, None] * 0.3
    Z = (X - X.mean(0)) @ W
    Y = np.sign(Z) * np.expm1(np.abs(Z))
    model = EmergenceRegressor().fit(X[:90], Y[:90])
    assert model.predict(X[90:]).shape == (30, len(PARAM_NAMES))
    assert model.score(X[90:], Y[90:]) > 0.95
    with pytest.raises(ValueError, match="finite"):
        EmergenceRegressor().fit(X[:3], np.full((3, 5), np.nan))
