"""Read-only measurements over caches: token dynamics, mixer matrices, massive activations, fixed points."""

from dynalens.probes.emergence import EmergenceFit, EmergenceRegressor, MassiveEmergence, massive_emergence
from dynalens.probes.fixed_points import (
    FixedPoints,
    FixedPointsResult,
    KickNeurons,
    KickNeuronsResult,
    TrajectoryPCA,
    TrajectoryPCAResult,
    find_fixed_points,
    iterate_cell,
)
from dynalens.probes.logit_lens import LogitLens, logit_lens
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveActivations,
    ablate_massive,
    massive_activations,
    massive_ratio,
)
from dynalens.probes.mixer import MixerMatrix, MixerMatrixResult
from dynalens.probes.mixers import (
    MixerComparison,
    MixerComparisonResult,
    RecurrenceJacobian,
    RecurrenceJacobianResult,
    effective_rank,
    linear_attention_ssm_gap,
    offdiagonal_rank,
)
from dynalens.probes.residual import ResidualNorms, residual_norms
from dynalens.probes.results import Result
from dynalens.probes.sinks import ExtremeTokens, HeadActivity, extreme_tokens, head_activity, sink_scores
from dynalens.probes.stability import (
    LyapunovExponents,
    LyapunovExponentsResult,
    PrecisionDrift,
    PrecisionDriftResult,
)
from dynalens.probes.token_dynamics import (
    MambaRegimes,
    MambaRegimesResult,
    SelectiveSystem,
    TokenFlow,
    TokenImportance,
    TokenImportanceResult,
    TokenTrajectories,
    TokenTrajectoriesResult,
    reorder_tokens,
    simulate_tokens,
    soft_sort,
)

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
    "MixerMatrix",
    "MixerMatrixResult",
    "ResidualNorms",
    "Result",
    "logit_lens",
    "residual_norms",
    # token dynamics, DSF mixers, stability, RNN fixed points
    "FixedPoints",
    "FixedPointsResult",
    "KickNeurons",
    "KickNeuronsResult",
    "LyapunovExponents",
    "LyapunovExponentsResult",
    "MambaRegimes",
    "MambaRegimesResult",
    "MixerComparison",
    "MixerComparisonResult",
    "PrecisionDrift",
    "PrecisionDriftResult",
    "RecurrenceJacobian",
    "RecurrenceJacobianResult",
    "SelectiveSystem",
    "TokenFlow",
    "TokenImportance",
    "TokenImportanceResult",
    "TokenTrajectories",
    "TokenTrajectoriesResult",
    "TrajectoryPCA",
    "TrajectoryPCAResult",
    "effective_rank",
    "find_fixed_points",
    "iterate_cell",
    "linear_attention_ssm_gap",
    "offdiagonal_rank",
    "reorder_tokens",
    "simulate_tokens",
    "soft_sort",
]
