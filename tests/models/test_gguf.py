"""``dl.load`` of GGUF files of several architectures, against transformers' model from the same file.

Each test writes a small GGUF (random float32 weights, a byte-level BPE
vocabulary in the metadata) the way llama.cpp's converter lays one out: its
tensor names (gguf-py's name map) and its per-architecture rewrites (Llama's
q/k row order, GPT-2's transposed Conv1D weights, Mamba's ``A = -exp(A_log)``
and squeezed convolution). ``dl.load`` of the file must give the logits of
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` and of the
model the file was written from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dynalens as dl
import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from dynalens.models.mamba import HookedMamba
from dynalens.models.transformer import HookedTransformerBridge
from tests.tolerances import assert_close

# A byte-level BPE vocabulary: the 256 byte symbols, a few merges, one control token.
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at"]
TOKENS = [*bytes_to_unicode().values(), *(m.replace(" ", "") for m in MERGES), "<|endoftext|>"]
VOCAB = len(TOKENS)
EOS = VOCAB - 1
TEXT = "the cat sat on the mat"
GGUF_ARCH = {"gemma3_text": "gemma3"}  # llama.cpp's name where it differs from the model_type


def llama() -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ))


def qwen2() -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ))


def gpt2() -> PreTrainedModel:
    # n_positions 1024: transformers reads the GGUF context length into GPT-2's n_ctx, not n_positions
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=32, n_layer=2, n_head=4))


def gemma3() -> PreTrainedModel:
    # model_type "gemma3_text", which TransformerBridge cannot map to an adapter without `architectures`
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16, rms_norm_eps=1e-6,
    ))


def mamba() -> PreTrainedModel:
    return MambaForCausalLM(MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    ))


def metadata(writer: gguf.GGUFWriter, config) -> None:
    """The hyperparameters under llama.cpp's keys for ``config.model_type``."""
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    elif config.model_type == "mamba":
        writer.add_context_length(2**20)  # what llama.cpp writes: Mamba has no context limit
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_ssm_conv_kernel(config.conv_kernel)
        writer.add_ssm_inner_size(config.intermediate_size)
        writer.add_ssm_state_size(config.state_size)
        writer.add_ssm_time_step_rank(config.time_step_rank)
        writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    else:  # llama, qwen2, gemma3_text
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        if config.model_type == "gemma3_text":
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
            writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
            writer.add_sliding_window(config.sliding_window)
        else:
            writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
            writer.add_rope_freq_base(config.rope_parameters["rope_theta"])


def to_gguf(config, name: str, w: np.ndarray) -> np.ndarray:
    """llama.cpp's rewrite of one tensor (the inverse of what transformers' reader undoes)."""
    if config.model_type == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if config.model_type == "gemma3_text" and "norm.weight" in name:
        return w + 1  # Gemma scales by 1 + weight; llama.cpp stores the sum
    if config.model_type == "gpt2" and name.endswith((
        "attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"
    )):
        return np.ascontiguousarray(w.T)  # HF's Conv1D stores [in, out]
    if config.model_type == "mamba" and name.endswith("ssm_a"):
        return -np.exp(w)
    if config.model_type == "mamba" and name.endswith("ssm_conv1d.weight"):
        return np.ascontiguousarray(w.squeeze(1))
    return w


def write_gguf(path: Path, model: PreTrainedModel) -> Path:
    """``model`` as a float32 GGUF file with a byte-level BPE tokenizer."""
    config = model.config
    arch_name = GGUF_ARCH.get(config.model_type, config.model_type)
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_name(f"tiny-{arch_name}")
    writer.add_vocab_size(VOCAB)
    metadata(writer, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * (VOCAB - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(EOS)
    writer.add_eos_token_id(EOS)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # a tied model's GGUF has no output.weight
        base, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = hf_name, ""
        gguf_name = names.get_name(base)
        assert gguf_name is not None, f"no GGUF name for {hf_name}"
        gguf_name += f".{suffix}" if suffix else ""
        writer.add_tensor(gguf_name, to_gguf(config, gguf_name, tensor.detach().float().numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("build", "cls"),
    [(llama, HookedTransformerBridge), (qwen2, HookedTransformerBridge), (gpt2, HookedTransformerBridge),
     (gemma3, HookedTransformerBridge), (mamba, HookedMamba)],
    ids=["llama", "qwen2", "gpt2", "gemma3", "mamba"],
)
def test_gguf_loads_with_the_logits_of_transformers_from_the_same_file(
    tmp_path: Path, build: Callable[[], PreTrainedModel], cls: type
) -> None:
    torch.manual_seed(0)
    source = build().eval()
    path = write_gguf(tmp_path / "tiny.gguf", source)

    model = dl.load(path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()

    assert type(model) is cls
    assert model.cfg.model_name == str(path)
    ids = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)(TEXT)["input_ids"]
    assert model.tokenizer(TEXT)["input_ids"] == ids and len(ids) < len(TEXT)  # the file's merges apply
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens)
        assert_close(logits, reference(tokens).logits)
        assert_close(logits, source(tokens).logits)
