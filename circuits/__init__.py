"""Head discovery, ablation, patching, circuit graphs and steering."""

from dynalens.circuits.ablation import HeadAblation, TaskScorer, ablate_heads, head_hooks
from dynalens.circuits.directions import Direction
from dynalens.circuits.heads import HeadScores, copying_scores, induction_scores, repeated_tokens
from dynalens.circuits.patching import (
    Patching,
    attribution_graph,
    graph_from_json,
    graph_to_json,
    head_effects,
    logit_metric,
    patch_heads,
    patch_residual,
    prune,
)
from dynalens.circuits.retrieval import (
    NEEDLES,
    RETRIEVAL_THRESHOLD,
    Haystack,
    Needle,
    NeedleScorer,
    RetrievalScores,
    copy_paste_scores,
    make_haystack,
    make_haystacks,
    retrieval_scores,
)
from dynalens.circuits.steering import ControllerOutput, SteeringController, steer

__all__ = [
    "ControllerOutput",
    "Direction",
    "SteeringController",
    "steer",
    "NEEDLES",
    "RETRIEVAL_THRESHOLD",
    "Haystack",
    "Needle",
    "NeedleScorer",
    "Patching",
    "attribution_graph",
    "graph_from_json",
    "graph_to_json",
    "head_effects",
    "logit_metric",
    "patch_heads",
    "patch_residual",
    "prune",
    "RetrievalScores",
    "copy_paste_scores",
    "make_haystack",
    "make_haystacks",
    "retrieval_scores",
    "HeadAblation",
    "HeadScores",
    "TaskScorer",
    "ablate_heads",
    "copying_scores",
    "head_hooks",
    "induction_scores",
    "repeated_tokens",
]
