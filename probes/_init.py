"""Read-only measurements over caches: token dynamics, mixer matrices, massive activations, fixed points."""

from dynalens.probes.emergence import EmergenceFit, EmergenceRegressor, MassiveEmergence, massive_emergence
from dynalens.probes.fixed_points import (
    FixedPoints,
    KickNeurons,
    TrajectoryPCA,
    find_fixed_points,
    iterate_cell,
    kick_neurons,
    trajectory_pca,
)
from dynalens.probes.logit_lens import LogitLens, logit_lens
from dynalens.probes.massive import (
    MassiveAblation,
    MassiveActivations,
    ablate_massive,
    massive_activations,
    massive_ratio,
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
from dynalens.probes.residual import ResidualNorms, residual_norms
from dynalens.probes.results import Result
from dynalens.probes.sinks import ExtremeTokens, HeadActivity, extreme_tokens, head_activity, sink_scores
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
