"""Hooked models of every architecture, their loaders and the model zoo."""

from dynalens.models.base import HookedSequenceModel, SequenceConfig
from dynalens.models.mamba import HookedMamba, MambaConfig

__all__ = ["HookedSequenceModel", "SequenceConfig", "HookedMamba", "MambaConfig"]
