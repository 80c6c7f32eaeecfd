"""What analyses need from a model, whatever its architecture, in one place.

Every dynalens model offers ``to_tokens``, ``run_with_cache``, ``cfg.n_layers``
and a tokenizer (or none); the few things that differ by architecture (the
architecture's name, how a residual vector becomes logits) are dispatched
here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor


ARCHITECTURES = ("transformer", "mamba", "mamba2", "hybrid", "rnn")


def architecture_of(model: Any) -> str:
    """``"transformer"``, ``"mamba"`` or ``"rnn"``, from ``model.cfg.architecture``."""
    arch = getattr(model.cfg, "architecture", None)
    if arch in ARCHITECTURES:
        return arch
    raise TypeError(
        f"{type(model).__name__} is not a dynalens model: cfg.architecture is {arch!r}, "
        f"accepted: {', '.join(ARCHITECTURES)} (load models with dl.load)"
    )


def model_name_of(model: Any) -> str:
    """The name or path a model was loaded from, else its class name."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def decode_tokens(model: Any, ids: Tensor) -> list[str]:
    """One string per token id (the id itself when the model has no tokenizer)."""
    flat = ids.reshape(-1).tolist()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(i) for i in flat]
    return tokenizer.batch_decode([[i] for i in flat])


def unembed_resid(model: Any, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits of residual-stream vectors: the model's final norm, then its unembedding.

    Transformers (the Bridge) and our own models name these ``ln_final`` and
    ``unembed``; a model may instead define ``unembed_resid(resid)`` itself.
    """
    if hasattr(model, "unembed_resid"):
        return model.unembed_resid(resid)
    if hasattr(model, "ln_final") and hasattr(model, "unembed"):
        return model.unembed(model.ln_final(resid))
    raise TypeError(
        f"{type(model).__name__} has neither unembed_resid(resid) nor ln_final + unembed: "
        "the logit lens cannot map its residual stream to logits"
    )
