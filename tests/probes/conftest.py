"""Small random Mamba and RNN models, and the HF reference of the shared ``tiny_llama``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from dynalens.models.mamba import HookedMamba, MambaConfig
from dynalens.models.rnn import HookedRNN, RNNConfig

D_VOCAB = 50


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir: Path) -> LlamaForCausalLM:
    """The HF model behind the shared ``tiny_llama`` fixture (eager attention): the reference."""
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def tiny_mamba() -> HookedMamba:
    """A random 2-layer HookedMamba (d_inner 32, d_state 4)."""
    torch.manual_seed(0)
    return HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=D_VOCAB, d_state=4)).eval()


@pytest.fixture(scope="session")
def tiny_rnn() -> HookedRNN:
    """A random 2-layer residual GRU."""
    torch.manual_seed(0)
    return HookedRNN(
        RNNConfig(
            d_model=8, n_layers=2, d_vocab=D_VOCAB, cell="gru", residual=True, final_norm="layernorm"
        )
    ).eval()


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_mamba", "tiny_rnn"])
def any_model(request: pytest.FixtureRequest):
    """Each of the three architectures in turn (``tiny_llama`` is in ``tests/conftest.py``)."""
    return request.getfixturevalue(request.param)


@pytest.fixture()
def tokens() -> torch.Tensor:
    """One random prompt of 7 token ids ``[1, 7]``."""
    return torch.randint(0, D_VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def zoo_model():
    """``zoo_model(name)``: the shipped zoo model through ``dl.load``, loaded once."""
    loaded: dict = {}

    def load(name: str):
        if name not in loaded:
            import dynalens as dl

            loaded[name] = dl.load(name)
        return loaded[name]

    return load
