"""Read-only measurements over caches: token dynamics, mixer matrices, massive activations, fixed points."""

from dynalens.probes.emergence import (
    Checkpoints,
    CheckpointsResult,
    EmergenceFit,
    EmergenceRegressor,
    MassiveEmergence,
    MassiveEmergenceResult,
    checkpoint_series,
)
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
from dynalens.probes.logit_lens import LogitLens, LogitLensResult
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveAblationResult,
    MassiveActivations,
    MassiveActivationsResult,
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
from dynalens.probes.residual import ResidualNorms, ResidualNormsResult
from dynalens.probes.results import Result
from dynalens.probes.sinks import (
    ExtremeTokens,
    ExtremeTokensResult,
    HeadActivity,
    HeadActivityResult,
    SinkScores,
    SinkScoresResult,
)
from dynalens.probes.stability import (
    LyapunovExponents,
    LyapunovExponentsResult,
    PrecisionDrift,
    PrecisionDriftResult,
)
from dynalens.probes.ssd_dynamics import SSDSystem
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
    "Result",
    # logit lens, residual norms, massive activations, sinks, emergence
    "Checkpoints",
    "CheckpointsResult",
    "EmergenceFit",
    "EmergenceRegressor",
    "ExtremeTokens",
    "ExtremeTokensResult",
    "HeadActivity",
    "HeadActivityResult",
    "LogitLens",
    "LogitLensResult",
    "MassiveAblation",
    "MassiveAblationResult",
    "MassiveActivations",
    "MassiveActivationsResult",
    "MassiveEmergence",
    "MassiveEmergenceResult",
    "ResidualNorms",
    "ResidualNormsResult",
    "SinkScores",
    "SinkScoresResult",
    "checkpoint_series",
    # mixer matrices
    "MixerMatrix",
    "MixerMatrixResult",
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
    "SSDSystem",
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
