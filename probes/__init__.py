"""Read-only measurements over caches: token dynamics, mixer matrices, massive activations, fixed points."""

from dynalens.probes.logit_lens import LogitLens, logit_lens
from dynalens.probes.mixer import MixerMatrices, mixer_matrices
from dynalens.probes.residual import ResidualNorms, residual_norms
from dynalens.probes.results import Result

__all__ = [
    "LogitLens",
    "MixerMatrices",
    "ResidualNorms",
    "Result",
    "logit_lens",
    "mixer_matrices",
    "residual_norms",
]
