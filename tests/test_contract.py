"""The analysis contract: every public analysis, on a transformer, Mamba, Mamba-2, a hybrid and an RNN.

Each public analysis of ``dl.probes`` and ``dl.circuits`` is listed in
``ANALYSES`` (a new one that is not fails ``test_every_public_analysis_is_listed``).
On each architecture it either applies — it runs on a ragged batch, and the
rows of each prompt in its ``to_frame()`` equal the frame of that prompt run
alone (1e-5) — or ``check`` raises the clear ``AnalysisError`` that says what
it needs, before any forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import dynalens as dl
from dynalens.circuits import patching
from dynalens.probes.analysis import Analysis, AnalysisError
from dynalens.probes.layers import ssm_layers

D_VOCAB = 50
RAGGED = [[3, 9, 4, 3, 9, 4, 7], [5, 6, 7, 5], [8, 2, 11, 8, 2]]


def _corrupt(model: Any) -> list[list[int]]:
    return [[(t + 1) % model.cfg.d_vocab for t in row] for row in RAGGED]


def _recurrent_layer(model: Any) -> int:
    """The first layer with a state recurrence: a hybrid's first SSM layer, else layer 0."""
    return min(ssm_layers(model), default=0)


METRIC = patching.logit_diff_metric(1, 2)
#: Analyses of the weights alone: their Results have no prompts.
WEIGHT_ONLY = ("CopyingScores", "FixedPoints", "KickNeurons", "MambaRegimes")


#: Every public analysis → how to build it for a model (``None``: weight-only or not batched per prompt).
ANALYSES: dict[str, Callable[[Any], Analysis]] = {
    "LogitLens": lambda m: dl.probes.LogitLens(k=3),
    "ResidualNorms": lambda m: dl.probes.ResidualNorms(),
    "MassiveActivations": lambda m: dl.probes.MassiveActivations(k=3),
    "MassiveAblation": lambda m: dl.probes.MassiveAblation(mode="zero"),
    "SinkScores": lambda m: dl.probes.SinkScores(),
    "ExtremeTokens": lambda m: dl.probes.ExtremeTokens(),
    "HeadActivity": lambda m: dl.probes.HeadActivity(),
    "MixerMatrix": lambda m: dl.probes.MixerMatrix(layer=0),
    "MixerComparison": lambda m: dl.probes.MixerComparison(layer=0),
    "RecurrenceJacobian": lambda m: dl.probes.RecurrenceJacobian(layer=0),
    "LyapunovExponents": lambda m: dl.probes.LyapunovExponents(layer=_recurrent_layer(m)),
    "PrecisionDrift": lambda m: dl.probes.PrecisionDrift(),
    "FixedPoints": lambda m: dl.probes.FixedPoints(layer=0, n_starts=4, max_iter=20),
    "KickNeurons": lambda m: dl.probes.KickNeurons(layer=0),
    "TrajectoryPCA": lambda m: dl.probes.TrajectoryPCA(layer=0),
    "MambaRegimes": lambda m: dl.probes.MambaRegimes(),
    "TokenTrajectories": lambda m: dl.probes.TokenTrajectories(),
    "TokenImportance": lambda m: dl.probes.TokenImportance(layer=_recurrent_layer(m)),
    "HeadScores": lambda m: dl.circuits.HeadScores(),
    "CopyingScores": lambda m: dl.circuits.CopyingScores(),
    "MixerRetrievalScores": lambda m: dl.circuits.MixerRetrievalScores(),
    "ActivationPatching": lambda m: dl.circuits.ActivationPatching(corrupt=_corrupt(m), metric=METRIC),
    "AttributionGraph": lambda m: dl.circuits.AttributionGraph(corrupt=_corrupt(m), metric=METRIC),
    "EdgePatching": lambda m: dl.circuits.EdgePatching(
        corrupt=_corrupt(m), metric=METRIC, edges=[("embed", "logits")]
    ),
}

#: Analyses whose run needs data a random tiny model cannot give (checkpoint series, chat
#: decoding, needle retrieval): only their applicability check is part of this contract;
#: their own test files run them (tests/probes/test_emergence.py, tests/circuits/...).
CHECK_ONLY: dict[str, Callable[[Any], Analysis]] = {
    "Checkpoints": lambda m: dl.probes.Checkpoints("attn2l-induction", [dl.probes.ResidualNorms()]),
    "MassiveEmergence": lambda m: dl.probes.MassiveEmergence("attn2l-induction"),
    "RetrievalScores": lambda m: dl.circuits.RetrievalScores(haystacks=1),
    "HeadAblation": lambda m: dl.circuits.HeadAblation(heads=[(0, 0)]),
    "ResponseContrast": lambda m: dl.circuits.ResponseContrast(),
    "RefusalEvaluation": lambda m: dl.circuits.RefusalEvaluation(),
}


def _public_analyses() -> set[str]:
    return {
        name
        for module in (dl.probes, dl.circuits)
        for name in module.__all__
        if isinstance(obj := getattr(module, name), type) and issubclass(obj, Analysis)
    }


def test_every_public_analysis_is_listed():
    assert _public_analyses() == set(ANALYSES) | set(CHECK_ONLY)


ARCHITECTURES = ["transformer", "mamba", "mamba2", "hybrid", "rnn"]


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_hybrid) -> dict[str, Any]:
    torch.manual_seed(0)
    mamba = dl.models.HookedMamba(dl.models.MambaConfig(d_model=16, n_layers=2, d_vocab=D_VOCAB, d_state=4))
    mamba2 = dl.models.HookedMamba2(dl.models.Mamba2Config(
        d_model=16, n_layers=2, d_vocab=D_VOCAB, n_heads=4, d_head=8, d_state=4, chunk_size=4))  # fmt: skip
    rnn = dl.models.HookedRNN(dl.models.RNNConfig(d_model=8, n_layers=2, d_vocab=D_VOCAB, cell="gru"))
    return {"transformer": tiny_llama, "mamba": mamba.eval(), "mamba2": mamba2.eval(), "hybrid": tiny_hybrid,
            "rnn": rnn.eval()}  # fmt: skip


def _applies(analysis: Analysis, model: Any) -> bool:
    try:
        analysis.check(model)
    except AnalysisError as err:
        assert "needs" in str(err) and model.cfg.architecture in str(err)
        return False
    return True


def _frames_equal(batched: pd.DataFrame, alone: pd.DataFrame, prompt: int) -> None:
    rows = batched[batched["prompt"] == prompt].reset_index(drop=True).drop(columns="prompt")
    alone = alone.drop(columns="prompt").reset_index(drop=True)
    assert list(rows.columns) == list(alone.columns)
    assert len(rows) == len(alone), f"prompt {prompt}: {len(rows)} rows batched, {len(alone)} alone"
    for column in alone.columns:
        a, b = rows[column], alone[column]
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            np.testing.assert_allclose(a.to_numpy(float), b.to_numpy(float), atol=1e-5, rtol=1e-5,
                                       err_msg=f"column {column!r}, prompt {prompt}")  # fmt: skip
        else:
            assert a.tolist() == b.tolist(), f"column {column!r}, prompt {prompt}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_analysis_contract(name, arch, models):
    model = models[arch]
    build = ANALYSES[name]
    if not _applies(build(model), model):
        return
    weight_only = name in WEIGHT_ONLY
    result = build(model)(model, None if weight_only else RAGGED)
    assert isinstance(result, dl.probes.Result)
    assert result.architecture == arch and result.params == build(model).provenance(model, None)["params"]
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    if weight_only or "prompt" not in frame.columns:
        return
    assert sorted(frame["prompt"].unique()) == list(range(len(RAGGED)))
    for i, row in enumerate(RAGGED):
        analysis = build(model)
        if isinstance(analysis, (dl.circuits.ActivationPatching, dl.circuits.AttributionGraph,
                                 dl.circuits.EdgePatching)):  # fmt: skip
            analysis.set_params(corrupt=[_corrupt(model)[i]])
        _frames_equal(frame, analysis(model, [row]).to_frame(), i)


#: Analyses of an SSM's state or weights: they apply to every architecture with one.
SSM_ANALYSES = ("LyapunovExponents", "MambaRegimes", "TokenImportance")


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "hybrid"])
def test_ssm_analyses_apply_to_every_architecture_with_an_ssm(arch, models):
    model = models[arch]
    assert all(_applies(ANALYSES[name](model), model) for name in SSM_ANALYSES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(CHECK_ONLY))
def test_analysis_applies_or_says_what_it_needs(name, arch, models):
    model = models[arch]
    analysis = CHECK_ONLY[name](model)
    if analysis.architectures is None or arch in analysis.architectures:
        analysis.check(model)
    else:
        with pytest.raises(AnalysisError, match="needs"):
            analysis.check(model)
