"""Head discovery, ablation, patching, circuit graphs and steering."""

from dynalens.circuits.ablation import HeadAblation, TaskScorer, ablate_heads, head_hooks
from dynalens.circuits.heads import HeadScores, copying_scores, induction_scores, repeated_tokens

__all__ = [
    "HeadAblation",
    "HeadScores",
    "TaskScorer",
    "ablate_heads",
    "copying_scores",
    "head_hooks",
    "induction_scores",
    "repeated_tokens",
]
