"""Fixtures shared by every test file.

- ``smollm2``: the built-in SmolLM2-135M-Instruct through ``dl.load`` (the first
  run on a machine dequantises the GGUF once, ~20 s; later runs read the cache).
- ``tiny_llama_dir``: a random 2-layer HuggingFace Llama folder with SmolLM2's
  tokenizer and ``n_ctx = 64``; ``tiny_llama``: that folder through ``dl.load``.
- ``tiny_mamba``, ``tiny_mamba2``, ``tiny_rnn``: random 2-layer HookedMamba,
  HookedMamba2 (d_model 16) and residual GRU (d_model 8) over 50 token ids; ``any_model``: each of the three
  architectures in turn; ``tiny_gpt2``: a 2-layer GPT-2 (learned absolute
  positions, LayerNorm, biases) without a tokenizer, through the Bridge.
- ``tiny_hybrid_hf``: a random 3-layer HF Bamba (Mamba-2 with 8 heads,
  attention with 4, Mamba-2) over 50 token ids; ``tiny_hybrid``: it as a HookedHybrid.

Session-scoped models are shared: tests must leave no hooks behind (use the
context managers) and never change weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import dynalens as dl
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dynalens.models import HookedMamba, HookedRNN, MambaConfig, RNNConfig
from dynalens.models import smollm2 as smollm2_builtin

if "PYTEST_XDIST_WORKER" in os.environ:
    # `make test` runs two workers on two cores: one thread each, and one for what they start (notebook
    # kernels, CLI subprocesses), so that no core runs two spinning torch thread pools at once.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

TINY_N_CTX = 64
TINY_VOCAB = 50


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    return dl.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_builtin.cached_folder())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_N_CTX,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path):
    return dl.load(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_mamba() -> HookedMamba:
    """A random 2-layer HookedMamba (d_inner 32, d_state 4)."""
    torch.manual_seed(0)
    return HookedMamba(MambaConfig(d_model=16, n_layers=2, d_vocab=TINY_VOCAB, d_state=4)).eval()


@pytest.fixture(scope="session")
def tiny_rnn() -> HookedRNN:
    """A random 2-layer residual GRU with a final LayerNorm."""
    torch.manual_seed(0)
    cfg = RNNConfig(d_model=8, n_layers=2, d_vocab=TINY_VOCAB, cell="gru", residual=True, final_norm="layernorm")
    return HookedRNN(cfg).eval()


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_mamba", "tiny_rnn"])
def any_model(request: pytest.FixtureRequest):
    """Each of the three architectures in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory):
    """A random 2-layer GPT-2 over 50 token ids (n_ctx 32), through the Bridge, without a tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    config = GPT2Config(vocab_size=TINY_VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return dl.load(folder)


@pytest.fixture(scope="session")
def tiny_mamba2():
    """A random 2-layer HookedMamba2 (4 heads of 8, d_state 4, chunks of 4)."""
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=16, n_layers=2, d_vocab=TINY_VOCAB, n_heads=4, d_head=8, d_state=4, chunk_size=4)
    return HookedMamba2(cfg).eval()


@pytest.fixture(scope="session")
def tiny_hybrid_hf():
    """A random 3-layer HF Bamba over 50 token ids: Mamba-2 (8 heads of 8), attention (4 heads), Mamba-2; eager."""
    from transformers import BambaConfig, BambaForCausalLM

    config = BambaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2,
        mamba_chunk_size=8, attn_layer_indices=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = BambaForCausalLM(config).eval()
    hf.set_attn_implementation("eager")
    return hf


@pytest.fixture(scope="session")
def tiny_hybrid(tiny_hybrid_hf):
    """``tiny_hybrid_hf`` opened up as a HookedHybrid (``layer_types`` mamba2, attention, mamba2)."""
    from dynalens.models.hybrid import HookedHybrid

    return HookedHybrid.from_hf(tiny_hybrid_hf).eval()
