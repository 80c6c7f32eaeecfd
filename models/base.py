"""The surface every dynalens model shares, whatever its architecture.

``HookedSequenceModel`` is the base of our own models (``HookedRNN``,
``HookedMamba``): a TransformerLens ``HookedRootModule`` whose hook calls
check their names, whose inputs are strings or token tensors, and whose
``generate`` carries a recurrent state so one new token costs O(1).
The transformer adapter (``models/transformer.py``) offers the same surface
over a TransformerBridge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule

from dynalens.models.prompts import Prompts
from dynalens.models.validation import (
    check_generate_args,
    check_hook_names,
    check_prompt,
    check_tokens,
    filter_names,
    named_hooks,
)

TextOrTokens = Union[str, Sequence[str], Tensor]


@dataclass
class SequenceConfig:
    """Sizes every architecture has. Subclasses add their own fields."""

    d_model: int
    n_layers: int
    d_vocab: int
    n_ctx: int | None = None  # longest accepted sequence; None: unbounded (recurrent)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} fields {sorted(unknown)}; accepted: {sorted(names)}"
            )
        return cls(**d)


class CheckedHooks:
    """Mixin for hooked models: every hook call checks its names against ``hook_dict``.

    A name the model does not have raises :class:`HookNameError` naming the
    closest valid names, before any hook is added, in ``run_with_hooks``,
    ``run_with_cache``, ``hooks`` and ``add_hook``. Filters given as callables
    cannot be checked and pass through.
    """

    hook_dict: dict

    def check_hook_names(self, names: Sequence[str]) -> None:
        """Raise a ``HookNameError`` naming the closest valid names for any unknown name."""
        check_hook_names(names, self.hook_dict)

    def run_with_hooks(self, *model_args: Any, fwd_hooks=(), bwd_hooks=(), **kwargs: Any):
        self.check_hook_names(named_hooks(fwd_hooks) + named_hooks(bwd_hooks))
        return super().run_with_hooks(
            *model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **kwargs
        )

    def run_with_cache(self, *model_args: Any, names_filter: Any = None, **kwargs: Any):
        self.check_hook_names(filter_names(names_filter))
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        if isinstance(cache, dict):
            cache = ActivationCache(cache, self)
        return out, cache

    def hooks(self, fwd_hooks=(), bwd_hooks=(), *args: Any, **kwargs: Any):
        # TransformerLens' run_with_hooks passes reset_hooks_end, clear_contexts positionally.
        self.check_hook_names(named_hooks(fwd_hooks) + named_hooks(bwd_hooks))
        return super().hooks(list(fwd_hooks), list(bwd_hooks), *args, **kwargs)

    def add_hook(self, name: Any, hook: Callable, *args: Any, **kwargs: Any) -> None:
        if isinstance(name, str):
            self.check_hook_names([name])
        return super().add_hook(name, hook, *args, **kwargs)


class HookedSequenceModel(CheckedHooks, HookedRootModule):
    """Base of dynalens' own hooked models.

    Subclasses build their modules, call ``self.setup()``, and implement
    ``forward(tokens, state=None, return_state=False)``: with
    ``return_state=True`` it returns ``(logits, state)`` where ``state`` lets
    the next call continue the sequence (positions included).
    """

    architecture: ClassVar[str] = "sequence"
    cfg: SequenceConfig

    def __init__(self, cfg: SequenceConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, input: TextOrTokens) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` for a string, a list of strings, ids or a ``Prompts``."""
        if isinstance(input, Prompts):
            return input.tokens.to(self._device())
        if isinstance(input, Tensor):
            return check_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx).to(self._device())
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            raise ValueError("empty prompt: pass a non-empty string or a tensor of token ids")
        for text in texts:
            check_prompt(text)
        if self.tokenizer is None:
            raise ValueError(
                f"this {type(self).__name__} has no tokenizer, so it takes token ids only: "
                "pass a LongTensor of shape [batch, pos]"
            )
        enc = self.tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
        return check_tokens(enc["input_ids"], self.cfg.d_vocab, self.cfg.n_ctx).to(
            self._device()
        )

    def to_string(self, tokens: Tensor) -> str | list[str]:
        """Decode ids back to text (needs a tokenizer)."""
        if self.tokenizer is None:
            raise ValueError(f"this {type(self).__name__} has no tokenizer to decode with")
        if tokens.ndim == 1:
            return self.tokenizer.decode(tokens.tolist())
        return [self.tokenizer.decode(t.tolist()) for t in tokens]

    def to_str_tokens(self, input: TextOrTokens) -> list[str]:
        """One string per token of a single sequence (ids as strings without a tokenizer)."""
        tokens = self.to_tokens(input)[0]
        if self.tokenizer is None:
            return [str(t) for t in tokens.tolist()]
        return [self.tokenizer.decode([t]) for t in tokens.tolist()]

    def _device(self) -> torch.device:
        return next(self.parameters()).device

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
    ) -> str | list[str] | Int[Tensor, "batch pos"]:
        """Continue ``input`` by ``max_new_tokens`` tokens carrying the recurrent state.

        ``temperature=0`` is greedy. ``fwd_hooks`` stay on for the prompt and every
        new token; each new token is one step of O(1) cost in the sequence length.
        ``return_type``: ``"str"``, ``"tokens"`` or ``"auto"`` (str for str input).
        """
        check_generate_args(max_new_tokens, return_type)
        tokens = self.to_tokens(input)
        with self.hooks(fwd_hooks=fwd_hooks):
            logits, state = self(tokens, return_state=True)
            out = [tokens]
            for _ in range(max_new_tokens):
                nxt = self._sample(logits[:, -1], temperature, generator)
                out.append(nxt)
                if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                    break
                logits, state = self(nxt, state=state, return_state=True)
        result = torch.cat(out, dim=1)
        want_str = return_type == "str" or (return_type == "auto" and not isinstance(input, Tensor))
        if want_str:
            text = self.to_string(result)
            return text[0] if isinstance(input, str) else text
        return result

    @staticmethod
    def _sample(
        logits: Float[Tensor, "batch vocab"], temperature: float, generator: torch.Generator | None
    ) -> Int[Tensor, "batch 1"]:
        if temperature <= 0:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)
