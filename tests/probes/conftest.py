"""Small random models of the three architectures, shared by the probes tests."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dynalens.models.mamba import HookedMamba, MambaConfig
from dynalens.models.rnn import HookedRNN, RNNConfig
from dynalens.models.transformer import HookedTransformerBridge

D_VOCAB = 50


@pytest.fixture(scope="session")
def tiny_llama_hf() -> LlamaForCausalLM:
    """A random 2-layer HF Llama (4 heads, eager attention): the reference."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=D_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_hf: LlamaForCausalLM) -> HookedTransformerBridge:
    """A copy of ``tiny_llama_hf`` behind the Bridge (no tokenizer)."""
    return HookedTransformerBridge.from_hf(copy.deepcopy(tiny_llama_hf), name="tiny-llama")


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
        RNNConfig(d_model=8, n_layers=2, d_vocab=D_VOCAB, cell="gru", residual=True, final_norm="layernorm")
    ).eval()


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_mamba", "tiny_rnn"])
def any_model(request: pytest.FixtureRequest):
    """Each of the three architectures in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture()
def tokens() -> torch.Tensor:
    """One random prompt of 7 token ids ``[1, 7]``."""
    return torch.randint(0, D_VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
