"""Head discovery, ablation, patching, circuit graphs and steering."""

from typing import TYPE_CHECKING

from dynalens._lazy import attach

if TYPE_CHECKING:
    from dynalens.circuits.ablation import (
        HeadAblation,
        HeadAblationResult,
        PromptScorer,
        Scorer,
        TaskScorer,
        head_hooks,
    )
    from dynalens.circuits.directions import Direction
    from dynalens.circuits.heads import (
        CopyingScores,
        CopyingScoresResult,
        HeadScores,
        HeadScoresResult,
        channel_patterns,
        repeated_tokens,
    )
    from dynalens.circuits.patching import (
        ActivationPatching,
        ActivationPatchingResult,
        AttributionGraph,
        AttributionGraphResult,
        EdgePatching,
        EdgePatchingResult,
        Node,
        circuit_nodes,
        final_norm,
        logit_diff_metric,
        logit_metric,
        prune,
        split_qkv_inputs,
    )
    from dynalens.circuits.refusal import (
        RefusalClassifier,
        RefusalEvaluation,
        RefusalReport,
        ResponseContrast,
        ResponseContrastResult,
        chat,
        chat_prompts,
        is_refusal,
        prompt_set,
        shipped_controller,
    )
    from dynalens.circuits.retrieval import (
        NEEDLES,
        RETRIEVAL_THRESHOLD,
        Haystack,
        MixerRetrievalScores,
        MixerRetrievalScoresResult,
        Needle,
        NeedleScorer,
        RetrievalScores,
        RetrievalScoresResult,
        copy_paste_scores,
        make_haystack,
        make_haystacks,
        rouge1_recall,
    )
    from dynalens.circuits.steering import ControllerOutput, SteeringController, steer

__all__ = [
    "ControllerOutput",
    "Direction",
    "SteeringController",
    "steer",
    "RefusalClassifier",
    "RefusalEvaluation",
    "RefusalReport",
    "ResponseContrast",
    "ResponseContrastResult",
    "chat",
    "chat_prompts",
    "is_refusal",
    "prompt_set",
    "shipped_controller",
    "NEEDLES",
    "RETRIEVAL_THRESHOLD",
    "Haystack",
    "Needle",
    "NeedleScorer",
    "ActivationPatching",
    "ActivationPatchingResult",
    "AttributionGraph",
    "AttributionGraphResult",
    "EdgePatching",
    "EdgePatchingResult",
    "Node",
    "circuit_nodes",
    "final_norm",
    "logit_diff_metric",
    "logit_metric",
    "prune",
    "split_qkv_inputs",
    "MixerRetrievalScores",
    "MixerRetrievalScoresResult",
    "RetrievalScores",
    "RetrievalScoresResult",
    "copy_paste_scores",
    "make_haystack",
    "make_haystacks",
    "rouge1_recall",
    "CopyingScores",
    "CopyingScoresResult",
    "HeadAblation",
    "HeadAblationResult",
    "HeadScores",
    "HeadScoresResult",
    "PromptScorer",
    "Scorer",
    "TaskScorer",
    "channel_patterns",
    "head_hooks",
    "repeated_tokens",
]

__getattr__, __dir__ = attach(__name__, __file__)
