"""Hooked models of every architecture, their loaders and the model zoo."""

from dynalens.models.base import HookedSequenceModel, SequenceConfig

__all__ = ["HookedSequenceModel", "SequenceConfig"]
