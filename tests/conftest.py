"""Fixtures shared by every test file.

- ``smollm2``: the built-in SmolLM2-135M-Instruct through ``dl.load`` (the first
  run on a machine dequantises the GGUF once, ~20 s; later runs read the cache).
- ``tiny_llama_dir``: a random 2-layer HuggingFace Llama folder with SmolLM2's
  tokenizer and ``n_ctx = 64``; ``tiny_llama``: that folder through ``dl.load``.

Session-scoped models are shared: tests must leave no hooks behind (use the
context managers) and never change weights.
"""

from __future__ import annotations

from pathlib import Path

import dynalens as dl
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dynalens.models import smollm2 as smollm2_builtin

TINY_N_CTX = 64


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
