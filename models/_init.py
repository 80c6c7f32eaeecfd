"""Hooked models of every architecture, their loaders and the model zoo."""

from typing import TYPE_CHECKING

from dynalens._lazy import attach

if TYPE_CHECKING:
    from dynalens.models.base import HookedSequenceModel, SequenceConfig
    from dynalens.models.cache import Cache, CacheMethodError
    from dynalens.models.hybrid import HookedHybrid, HybridConfig
    from dynalens.models.mamba import HookedMamba, MambaConfig
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config
    from dynalens.models.rnn import HookedRNN, RNNConfig
    from dynalens.models.validation import HookShapeError

__all__ = [
    "Cache",
    "CacheMethodError",
    "HookShapeError",
    "HookedSequenceModel",
    "SequenceConfig",
    "HookedMamba",
    "MambaConfig",
    "HookedMamba2",
    "Mamba2Config",
    "HookedHybrid",
    "HybridConfig",
    "HookedRNN",
    "RNNConfig",
]

__getattr__, __dir__ = attach(__name__, __file__)
