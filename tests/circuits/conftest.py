"""The zoo's ``attn2l-induction`` model and its task, shared by the circuits tests."""

from __future__ import annotations

import pytest
import torch
from dynalens.models.zoo import get_entry

import dynalens as dl


@pytest.fixture(scope="session")
def attn2l():
    """The 2-layer attention-only induction model, shipped with the zoo."""
    return dl.load("attn2l-induction")


@pytest.fixture(scope="session")
def induction_task():
    """The repeated-random-tokens task ``attn2l-induction`` was trained on."""
    return get_entry("attn2l-induction").make_task()


@pytest.fixture(scope="session")
def tiny_mamba_model():
    """A random 1-layer HookedMamba (seeded: the same weights whichever test builds it first)."""
    from dynalens.models.mamba import HookedMamba, MambaConfig

    torch.manual_seed(0)
    return HookedMamba(MambaConfig(d_model=8, n_layers=1, d_vocab=16, d_state=2)).eval()


@pytest.fixture(scope="session")
def tiny_rnn_model():
    """A random 1-layer GRU."""
    from dynalens.models.rnn import HookedRNN, RNNConfig

    return HookedRNN(RNNConfig(d_model=8, n_layers=1, d_vocab=16, cell="gru")).eval()
