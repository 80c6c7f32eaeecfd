"""The transformer adapter: a TransformerLens ``TransformerBridge`` with dynalens' surface.

:class:`HookedTransformerBridge` *is* a ``TransformerBridge`` (the Bridge that
``boot_transformers`` builds, given this class), so every TransformerLens tool
that takes a bridge still takes it. On top it offers what
``models/base.py::HookedSequenceModel`` offers our own models:

- inputs are strings, lists of strings, token tensors (with an optional
  left-padded ``attention_mask``) or a ``Prompts``, checked by
  ``models/validation.py`` (empty prompt, ids out of range, longer than
  ``n_ctx``, float ids); lists become a left-padded ``Prompts`` and the mask
  goes to the model as its attention mask, positions counting real tokens;
- a hook name the model does not have raises ``HookNameError`` naming the
  closest valid names, and a hook returning another shape raises
  ``HookShapeError``, in ``run_with_cache``, ``run_with_hooks``, ``hooks`` and
  ``add_hook`` (``models/base.py::CheckedHooks``); ``run_with_cache`` returns
  a :class:`~dynalens.models.cache.Cache`;
- the shared vocabulary: the Bridge's own ``hook_embed``,
  ``blocks.{l}.hook_resid_pre/post`` and ``ln_final.hook_normalized``, plus
  ``blocks.{l}.hook_mixer_out``, an alias (through the Bridge's alias mechanism)
  of what attention adds to the residual stream, ``blocks.{l}.hook_attn_out``;
- ``generate`` with the arguments every architecture shares
  (``models/base.py::Generates``), through the KV cache with the hooks on and
  the mask extended by each new token; and ``save_pretrained(folder)``.

Weights are the HuggingFace model's own, untouched: logits equal HF's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dynalens.models.base import CheckedHooks, Generates, TextOrTokens, as_batch, prompts_of
from dynalens.models.compat_transformer_lens import adopt, alias_block_hooks, bridge_from_module, hf_state_dict
from dynalens.models.io import atomic_dir, read_tokenizer, write_safetensors
from dynalens.models.prompts import Prompts
from dynalens.models.validation import check_prompt, check_tokens
from dynalens.models.building import on_meta

#: The shared-vocabulary name of each block's sequence mixer output, and the
#: Bridge hook it stands for.
MIXER_OUT, ATTN_OUT = "hook_mixer_out", "hook_attn_out"


class HookedTransformerBridge(CheckedHooks, Generates, TransformerBridge):
    """A HuggingFace causal LM behind TransformerLens' Bridge and dynalens' hook names.

    Build one with :meth:`from_pretrained` (a HuggingFace folder), :meth:`from_gguf`
    or :meth:`from_hf` (a loaded model), or simply ``dynalens.load(...)``.

    Examples
    --------
    >>> import dynalens as dl
    >>> model = dl.load("smollm2-135m")                                   # doctest: +SKIP
    >>> logits, cache = model.run_with_cache("Hello", names_filter="blocks.0.hook_mixer_out")  # doctest: +SKIP
    >>> model.generate("The capital of France is", 5)                     # doctest: +SKIP
    """

    architecture: ClassVar[str] = "transformer"

    # ------------------------------------------------------------ construction
    @classmethod
    def from_hf(
        cls, hf_model: PreTrainedModel, tokenizer: Any = None, *, name: str = "transformer"
    ) -> HookedTransformerBridge:
        """Wrap a loaded HuggingFace causal LM (moved into the bridge, weights unchanged).

        With a tokenizer the model is booted by ``TransformerBridge.boot_transformers``;
        without one (models of synthetic tasks) it takes token tensors only.
        """
        if not isinstance(hf_model, PreTrainedModel):
            raise TypeError(
                f"hf_model must be a transformers PreTrainedModel, got {type(hf_model).__name__}"
            )
        if tokenizer is not None:
            bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
        else:
            hf_model.set_attn_implementation("eager")  # attention patterns need eager attention
            bridge = bridge_from_module(hf_model, name)
        bridge = adopt(bridge, cls)  # boot builds a TransformerBridge; this class adds no state
        bridge._add_mixer_aliases()
        bridge.cfg.architecture = cls.architecture
        return bridge.eval()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **placement: Any,
    ) -> HookedTransformerBridge:
        """Load a HuggingFace causal-LM folder (safetensors only) and its tokenizer if any.

        ``placement`` (``device_map``, ``max_memory``, ``offload_folder``) spreads
        the model over devices through transformers and accelerate, disk included.
        """
        folder = Path(folder)
        placement = {k: v for k, v in placement.items() if v is not None}
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, use_safetensors=True, attn_implementation="eager",
            **placement,
        )  # fmt: skip
        if "device_map" not in placement:
            hf_model = hf_model.to(device or "cpu")
        return cls.from_hf(hf_model, read_tokenizer(folder), name=str(folder))

    @classmethod
    def from_gguf(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> HookedTransformerBridge:
        """Load a GGUF file, dequantised to ``dtype`` (float32 by default)."""
        hf_model, tokenizer = hf_from_gguf(path, dtype=dtype or torch.float32)
        return cls.from_hf(hf_model.to(device or "cpu"), tokenizer, name=str(path))

    def _add_mixer_aliases(self) -> None:
        """Alias ``blocks.{l}.hook_mixer_out`` to whatever ``hook_attn_out`` is on each block."""
        alias_block_hooks(self, [{MIXER_OUT: block.hook_aliases.get(ATTN_OUT, ATTN_OUT)} for block in self.blocks])

    # ------------------------------------------------------------------ tokens
    def to_tokens(
        self,
        input: TextOrTokens,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = False,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` for a string, a list of strings or ids, checked.

        Unlike the Bridge, a prompt longer than ``cfg.n_ctx`` is an error, not
        silently truncated (pass ``truncate=True`` to cut it).
        """
        if isinstance(input, Prompts):
            return input.tokens.to(self.cfg.device)
        if isinstance(input, Tensor):
            return check_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx).to(self.cfg.device)
        if isinstance(input, (list, tuple)):
            return prompts_of(self, input).tokens  # left-padded, each prompt tokenised on its own
        check_prompt(input)
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer, so it takes token ids only: "
                "pass a LongTensor of shape [batch, pos]"
            )
        tokens = super().to_tokens(
            input, prepend_bos, padding_side, move_to_device=move_to_device, truncate=truncate
        )
        return check_tokens(tokens, self.cfg.d_vocab, self.cfg.n_ctx)

    def forward(self, input: Any, *args: Any, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """The Bridge's forward on any input every dynalens model takes.

        A ``Prompts`` (or a list of prompts, which becomes one) brings its mask;
        with a token tensor pass ``attention_mask`` (left padding). The mask
        reaches the model as its attention mask, and the Bridge gives
        position ids that count real tokens (learned absolute positions read
        the same positions as the unpadded prompt). Float tensors are a
        ``TypeError`` unless ``start_at_layer`` says they are a residual stream.
        """
        if isinstance(input, Tensor) and input.is_floating_point():
            if kwargs.get("start_at_layer") is None:
                raise TypeError(
                    f"tokens must be an integer tensor of ids, got dtype {input.dtype} (a residual "
                    "stream goes in with start_at_layer=...)"
                )
            return super().forward(input, *args, attention_mask=attention_mask, **kwargs)
        if kwargs.get("past_key_values") is not None and isinstance(input, Tensor):
            # a continuation: the mask covers the cached positions as well as these tokens
            input = check_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx)
            return super().forward(input, *args, attention_mask=attention_mask, **kwargs)
        if isinstance(input, (Tensor, Prompts, list, tuple)):
            input, mask = as_batch(self, input, attention_mask)
            attention_mask = None if mask is None else mask.long()
        return super().forward(input, *args, attention_mask=attention_mask, **kwargs)

    # -------------------------------------------------------------- generation
    def _generation_start(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Any]:
        """The prompt's forward with the KV cache on; the state is the cache and the mask so far."""
        mask = torch.ones_like(tokens) if mask is None else mask.long()
        logits, kv = self(tokens, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
        return logits, (kv, mask)

    def _generation_step(self, new: Tensor, state: tuple[Any, Tensor]) -> tuple[Tensor, Any]:
        """One new position through the KV cache, the mask extended by it (positions from the mask)."""
        kv, mask = state
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        logits, kv = self(new, attention_mask=mask, past_key_values=kv, return_type="logits_and_cache")
        return logits, (kv, mask)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a HuggingFace folder (config, safetensors, tokenizer) atomically.

        ``dynalens.load(folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)``
        both read it back.
        """
        hf_model = self.original_model
        config = copy.deepcopy(hf_model.config)
        with on_meta():
            names = type(hf_model)(copy.deepcopy(config)).state_dict().keys()
        state = hf_state_dict(hf_model)
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"cannot map the bridge's weights back to HF names: {missing[:5]}")
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            config.save_pretrained(tmp)
            if hf_model.generation_config is not None:
                hf_model.generation_config.save_pretrained(tmp)
            write_safetensors(
                tmp / "model.safetensors", {n: state[n] for n in names}, metadata={"format": "pt"}
            )
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
        return folder


def hf_from_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """Dequantise a GGUF file into a plain HuggingFace model and its tokenizer.

    The returned model has no quantisation left (``quantization_config`` and
    ``hf_quantizer`` dropped), so ``save_pretrained`` writes ordinary safetensors,
    and its config names its class in ``architectures`` (transformers leaves that
    empty for a GGUF; TransformerBridge picks its adapter by it).
    """
    path = Path(path)
    if path.suffix != ".gguf" or not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r} (expected an existing *.gguf file)")
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="eager"
    )
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.hf_quantizer = None
    hf_model.config.architectures = [type(hf_model).__name__]
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf_model, tokenizer
