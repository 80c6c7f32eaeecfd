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
    KickNeurons,
    TrajectoryPCA,
    find_fixed_points,
    iterate_cell,
    kick_neurons,
    trajectory_pca,
)
from dynalens.probes.logit_lens import LogitLens, LogitLensResult
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveAblationResult,
    MassiveActivations,
    MassiveActivationsResult,
)
from dynalens.probes.mixer import MixerMatrices, mixer_matrices
from dynalens.probes.mixers import (
    MixerComparison,
    compare_mixers,
    effective_rank,
    linear_attention_ssm_gap,
    offdiagonal_rank,
    rnn_input_output_map,
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
from dynalens.probes.stability import LyapunovExponents, PrecisionDrift, lyapunov_exponents, precision_drift
from dynalens.probes.token_dynamics import (
    MambaRegimes,
    SelectiveSystem,
    TokenFlow,
    TokenImportance,
    TokenTrajectories,
    mamba_regimes,
    reorder_tokens,
    simulate_tokens,
    soft_sort,
    token_importance,
    token_trajectories,
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
    "MixerMatrices",
    "mixer_matrices",
    # token dynamics, DSF mixers, stability, RNN fixed points
    "FixedPoints",
    "KickNeurons",
    "LyapunovExponents",
    "MambaRegimes",
    "MixerComparison",
    "PrecisionDrift",
    "SelectiveSystem",
    "TokenFlow",
    "TokenImportance",
    "TokenTrajectories",
    "TrajectoryPCA",
    "compare_mixers",
    "effective_rank",
    "find_fixed_points",
    "iterate_cell",
    "kick_neurons",
    "linear_attention_ssm_gap",
    "lyapunov_exponents",
    "mamba_regimes",
    "offdiagonal_rank",
    "precision_drift",
    "reorder_tokens",
    "rnn_input_output_map",
    "simulate_tokens",
    "soft_sort",
    "token_importance",
    "token_trajectories",
    "trajectory_pca",
]
