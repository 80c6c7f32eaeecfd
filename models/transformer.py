"""The transformer adapter: a TransformerLens ``TransformerBridge`` with dynalens' surface.

:class:`HookedTransformerBridge` *is* a ``TransformerBridge`` (the Bridge that
``boot_transformers`` builds, given this class), so every TransformerLens tool
that takes a bridge still takes it. On top it offers what
``models/base.py::HookedSequenceModel`` offers our own models:

- inputs are strings, lists of strings or token tensors, checked by
  ``models/validation.py`` (empty prompt, ids out of range, longer than ``n_ctx``);
- a hook name the model does not have raises ``HookNameError`` naming the
  closest valid names, in ``run_with_cache``, ``run_with_hooks``, ``hooks`` and
  ``add_hook``;
- the shared vocabulary: the Bridge's own ``hook_embed``,
  ``blocks.{l}.hook_resid_pre/post`` and ``ln_final.hook_normalized``, plus
  ``blocks.{l}.hook_mixer_out``, an alias (through the Bridge's alias mechanism)
  of what attention adds to the residual stream, ``blocks.{l}.hook_attn_out``;
- ``generate(input, max_new_tokens, fwd_hooks=..., temperature=0)`` with the
  KV cache and the hooks on, and ``save_pretrained(folder)``.

Weights are the HuggingFace model's own, untouched: logits equal HF's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dynalens.models.base import CheckedHooks
from dynalens.models.prompts import Prompts
from dynalens.models.io import atomic_dir, read_tokenizer, write_safetensors
from dynalens.models.validation import (
    check_generate_args,
    check_prompt,
    check_tokens,
)

TextOrTokens = Union[str, Sequence[str], Tensor]

#: The shared-vocabulary name of each block's sequence mixer output, and the
#: Bridge hook it stands for.
MIXER_OUT, ATTN_OUT = "hook_mixer_out", "hook_attn_out"

_RETURN_TYPES = {"auto": "input", "str": "str", "tokens": "tokens"}


class HookedTransformerBridge(CheckedHooks, TransformerBridge):
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
            bridge = build_bridge_from_module(
                hf_model, type(hf_model).__name__, hf_config=hf_model.config, model_name=name
            )
        bridge.__class__ = cls  # boot builds a TransformerBridge; this class adds no state
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
    ) -> HookedTransformerBridge:
        """Load a HuggingFace causal-LM folder (safetensors only) and its tokenizer if any."""
        folder = Path(folder)
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, use_safetensors=True, attn_implementation="eager"
        )
        return cls.from_hf(hf_model.to(device or "cpu"), read_tokenizer(folder), name=str(folder))

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
        for i, block in enumerate(self.blocks):
            aliases = dict(block.hook_aliases)
            aliases[MIXER_OUT] = aliases.get(ATTN_OUT, ATTN_OUT)
            block.hook_aliases = aliases
            block._register_aliases()
            self._hook_registry[f"blocks.{i}.{MIXER_OUT}"] = getattr(block, MIXER_OUT)
        self._block_alias_cache = None

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
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            raise ValueError("empty prompt: pass a non-empty string or a tensor of token ids")
        for text in texts:
            check_prompt(text)
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer, so it takes token ids only: "
                "pass a LongTensor of shape [batch, pos]"
            )
        tokens = super().to_tokens(
            input, prepend_bos, padding_side, move_to_device=move_to_device, truncate=truncate
        )
        return check_tokens(tokens, self.cfg.d_vocab, self.cfg.n_ctx)

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        """The Bridge's forward, with token-id tensors checked first."""
        if isinstance(input, Prompts):
            input = input.tokens.to(self.cfg.device)
        if isinstance(input, Tensor) and not input.is_floating_point():
            input = check_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx)
        return super().forward(input, *args, **kwargs)

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input: TextOrTokens,
        max_new_tokens: int = 20,
        *,
        fwd_hooks: Sequence[tuple[Any, Callable]] = (),
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        return_type: str = "auto",
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> str | list[str] | Int[Tensor, "batch pos"]:
        """Continue ``input`` by ``max_new_tokens`` tokens with the KV cache.

        ``temperature=0`` is greedy. ``fwd_hooks`` stay on for the prompt and every
        new token (each step after the prompt runs one position). Stops early only
        when every sequence emits ``eos_token_id``. ``return_type``: ``"str"``,
        ``"tokens"`` or ``"auto"`` (str for str input). ``generator`` seeds the
        sampling; other keywords (``top_k``, ``top_p``, ...) go to the Bridge's
        ``generate``.
        """
        check_generate_args(max_new_tokens, return_type, minimum=1)
        n_prompt = self.to_tokens(input).shape[-1]
        if n_prompt + max_new_tokens > self.cfg.n_ctx:
            raise ValueError(
                f"{n_prompt} prompt tokens + {max_new_tokens} new tokens exceed what the model "
                f"accepts (n_ctx = {self.cfg.n_ctx}); lower max_new_tokens"
            )
        with self.hooks(fwd_hooks=fwd_hooks), _sampling_rng(generator):
            return super().generate(
                input,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
                stop_at_eos=eos_token_id is not None,
                eos_token_id=eos_token_id,
                use_past_kv_cache=True,
                return_type=_RETURN_TYPES[return_type],
                verbose=False,
                **kwargs,
            )

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a HuggingFace folder (config, safetensors, tokenizer) atomically.

        ``dynalens.load(folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)``
        both read it back.
        """
        hf_model = self.original_model
        config = copy.deepcopy(hf_model.config)
        with torch.device("meta"):
            names = type(hf_model)._from_config(copy.deepcopy(config)).state_dict().keys()
        # The Bridge re-homes HF modules under ``_original_component``; strip it back off.
        state = {
            key.replace("._original_component", "").removeprefix("_original_component."): value
            for key, value in hf_model.state_dict().items()
        }
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


@contextmanager
def _sampling_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Draw the Bridge's sampling (global RNG) from ``generator``'s stream, advancing it."""
    if generator is None:
        yield
        return
    cuda = generator.device.type == "cuda"
    with torch.random.fork_rng(devices=[generator.device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(generator.get_state(), generator.device)
        else:
            torch.set_rng_state(generator.get_state())
        yield
        generator.set_state(
            torch.cuda.get_rng_state(generator.device) if cuda else torch.get_rng_state()
        )
