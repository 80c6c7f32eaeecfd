"""Read-only measurements over caches: token dynamics, mixer matrices, massive activations, fixed points."""

from dynalens.probes.emergence import EmergenceFit, EmergenceRegressor, MassiveEmergence, massive_emergence
from dynalens.probes.logit_lens import LogitLens, logit_lens
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveActivations,
    ablate_massive,
    massive_activations,
    massive_ratio,
)
from dynalens.probes.mixer import MixerMatrices, mixer_matrices
from dynalens.probes.residual import ResidualNorms, residual_norms
from dynalens.probes.results import Result
from dynalens.probes.sinks import ExtremeTokens, HeadActivity, extreme_tokens, head_activity, sink_scores

__all__ = [
    "EmergenceFit",
    "EmergenceRegressor",
    "ExtremeTokens",
    "HeadActivity",
    "MassiveAblation",
    "MassiveActivations",
    "MassiveEmergence",
    "ablate_massive",
    "extreme_tokens",
    "head_activity",
    "massive_activations",
    "massive_emergence",
    "massive_ratio",
    "sink_scores",
    "LogitLens",
    "MixerMatrices",
    "ResidualNorms",
    "Result",
    "logit_lens",
    "mixer_matrices",
    "residual_norms",
]
