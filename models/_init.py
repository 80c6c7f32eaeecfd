"""Hooked models of every architecture, their loaders and the model zoo."""

from dynalens.models.base import HookedSequenceModel, SequenceConfig
from dynalens.models.mamba import HookedMamba, MambaConfig
from dynalens.models.rnn import HookedRNN, RNNConfig

__all__ = ["HookedSequenceModel", "SequenceConfig", "HookedMamba", "MambaConfig", "HookedRNN", "RNNConfig"]
