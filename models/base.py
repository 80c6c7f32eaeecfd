"""The surface every dynalens model shares, whatever its architecture.

- :func:`as_batch`: every input (a string, a list of strings or id rows, ids
  with an optional left-padded ``attention_mask``, a ``Prompts``) becomes
  token ids and a mask.
- :class:`CheckedHooks`: the one hook-adding path (names checked, hook
  outputs shape-checked, hooks removed on exit) and ``run_with_cache``
  returning the one :class:`~dynalens.models.cache.Cache`.
- :class:`Generates`: ``generate`` with the same arguments everywhere; each
  row of a ragged batch continues from its own last real token.
- :class:`HookedSequenceModel`: the base of our own models (``HookedRNN``,
  ``HookedMamba``), a TransformerLens ``HookedRootModule`` whose ``generate``
  carries a recurrent state so one new token costs O(1).

The transformer adapter (``models/transformer.py``) takes the first three over
a TransformerBridge.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedRootModule

from dynalens.models.cache import Cache
from dynalens.models.prompts import Prompts, input_device
from dynalens.models.validation import (
    check_generate_args,
    check_hook_names,
    check_hook_output,
    check_mask,
    check_prompt,
    check_tokens,
    filter_names,
    named_hooks,
)

TextOrTokens = Union[str, Sequence[str], Tensor, Prompts, Sequence[Sequence[int]]]
_ATTENTION_MASK_HELP = "a Prompts brings its own mask: pass attention_mask only with a token tensor"


def as_batch(
    model: Any, input: TextOrTokens, attention_mask: Tensor | None = None
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"] | None]:
    """Token ids and mask (``None``: every token real) of any input a model accepts.

    A ``Prompts`` brings its own mask; a list of strings or of id rows becomes
    one (left-padded); a token tensor is all real unless ``attention_mask``
    (bool or 0/1, left padding) says otherwise; a string is one prompt.
    """
    device = input_device(model)
    if isinstance(input, (list, tuple)):
        input = prompts_of(model, input)
    if isinstance(input, Prompts):
        if attention_mask is not None:
            raise ValueError(_ATTENTION_MASK_HELP)
        tokens = input.tokens.to(device)
        return tokens, (input.mask.to(device) if input.is_padded else None)
    if isinstance(input, Tensor):
        tokens = check_tokens(input, model.cfg.d_vocab, getattr(model.cfg, "n_ctx", None)).to(device)
        return tokens, check_mask(attention_mask, tokens)
    if isinstance(input, str):
        if attention_mask is not None:
            raise ValueError("a string is one unpadded prompt: pass attention_mask only with a token tensor")
        return model.to_tokens(input), None
    raise TypeError(
        f"input must be a str, a list of str, token ids (LongTensor [batch, pos] or lists of ids) "
        f"or a Prompts, got {type(input).__name__}"
    )


def prompts_of(model: Any, inputs: Sequence[Any]) -> Prompts:
    """A ``Prompts`` of a list of strings or id rows (an empty list is an empty-prompt error)."""
    if len(inputs) == 0:
        raise ValueError("empty prompt: pass a non-empty string, a list of prompts or token ids")
    return Prompts(model, inputs)


def checked_hook(fn: Callable, name: str | None = None) -> Callable:
    """``fn`` wrapped so that returning a tensor of another shape raises :class:`HookShapeError`.

    The error names the hook (``name``, else the hook point's name), the shape
    it received and the shape returned. Wrapping twice wraps once.
    """
    if getattr(fn, "_dynalens_checked", False):
        return fn

    @functools.wraps(fn)
    def checked(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        out = fn(tensor, *args, **kwargs)
        if out is not None:
            hook = kwargs.get("hook", args[0] if args else None)
            check_hook_output(name or getattr(hook, "name", None) or "?", tensor, out)
        return out

    checked._dynalens_checked = True  # type: ignore[attr-defined]
    return checked


def _checked_pairs(hooks: Sequence[tuple[Any, Callable]]) -> list[tuple[Any, Callable]]:
    return [(name, checked_hook(fn, name if isinstance(name, str) else None)) for name, fn in hooks]


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
    """Mixin for hooked models: the one hook-adding path every architecture shares.

    - A name the model does not have raises :class:`HookNameError` naming the
      closest valid names, before any hook is added (``run_with_hooks``,
      ``run_with_cache``, ``hooks``, ``add_hook``; ``generate``'s ``fwd_hooks``
      go through ``hooks``). Filters given as callables pass through.
    - Every hook function is wrapped by :func:`checked_hook`: returning a tensor
      of another shape than it received raises :class:`HookShapeError` naming the
      hook and both shapes.
    - Hooks added by these context managers are removed on exit, exceptions included.
    - ``run_with_cache`` returns a :class:`~dynalens.models.cache.Cache`.
    """

    hook_dict: dict

    def check_hook_names(self, names: Sequence[str]) -> None:
        """Raise a ``HookNameError`` naming the closest valid names for any unknown name."""
        check_hook_names(names, self.hook_dict)

    def run_with_hooks(self, *model_args: Any, fwd_hooks=(), bwd_hooks=(), **kwargs: Any):
        self.check_hook_names(named_hooks(fwd_hooks) + named_hooks(bwd_hooks))
        return super().run_with_hooks(
            *model_args, fwd_hooks=_checked_pairs(fwd_hooks), bwd_hooks=_checked_pairs(bwd_hooks), **kwargs
        )

    def run_with_cache(self, *model_args: Any, names_filter: Any = None, **kwargs: Any):
        self.check_hook_names(filter_names(names_filter))
        model_args = list(model_args)
        prompts = None
        if model_args and isinstance(model_args[0], (list, tuple)):
            model_args[0] = prompts_of(self, model_args[0])
        if model_args and isinstance(model_args[0], Prompts):
            prompts = model_args[0]
        out, cache = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        has_batch_dim = getattr(cache, "has_batch_dim", True)
        cache_dict = cache.cache_dict if isinstance(cache, ActivationCache) else cache
        if not isinstance(cache, (dict, ActivationCache)):
            return out, cache
        return out, Cache(cache_dict, self, has_batch_dim=has_batch_dim, prompts=prompts)

    def hooks(self, fwd_hooks=(), bwd_hooks=(), *args: Any, **kwargs: Any):
        # TransformerLens' run_with_hooks passes reset_hooks_end, clear_contexts positionally.
        self.check_hook_names(named_hooks(fwd_hooks) + named_hooks(bwd_hooks))
        return super().hooks(_checked_pairs(fwd_hooks), _checked_pairs(bwd_hooks), *args, **kwargs)

    def add_hook(self, name: Any, hook: Callable, *args: Any, **kwargs: Any) -> None:
        if isinstance(name, str):
            self.check_hook_names([name])
        return super().add_hook(name, checked_hook(hook, name if isinstance(name, str) else None), *args, **kwargs)


class Generates:
    """Mixin: ``generate`` with the same arguments and semantics on every architecture.

    A model provides ``_generation_start(tokens, mask) -> (logits, state)`` (the
    prompt's forward) and ``_generation_step(new_tokens [batch, 1], state) ->
    (logits, state)`` (one new position), plus ``_max_positions()`` (``None``:
    unbounded).
    """

    @torch.no_grad()
    def generate(
        self,
        input: TextOrTokens,
        max_new_tokens: int = 20,
        *,
        attention_mask: Tensor | None = None,
        fwd_hooks: Sequence[tuple[Any, Callable]] = (),
        temperature: float = 0.0,
        do_sample: bool | None = None,
        top_k: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_when: Callable[[Tensor], Tensor] | None = None,
        return_type: str = "auto",
        generator: torch.Generator | None = None,
        **unknown: Any,
    ) -> str | list[str] | Int[Tensor, "batch pos"]:
        """Continue each prompt by up to ``max_new_tokens`` tokens, each new token one cached step.

        Parameters
        ----------
        input : str, list of str, ids ``[batch, pos]``, ragged id lists or Prompts
            Ragged batches are left-padded with a mask: every row continues from
            its own last real token.
        max_new_tokens : int
            Tokens to add (``>= 0``).
        attention_mask : Tensor ``[batch, pos]``, optional
            With a token tensor: True/1 at real tokens, pads on the left (as ``forward``).
        fwd_hooks : list of (name, fn)
            On for the prompt and every new token (each step after the prompt
            runs one position).
        temperature : float
            ``0`` (the default) is greedy; ``> 0`` samples from ``softmax(logits / temperature)``.
        do_sample : bool, optional
            HuggingFace's switch: ``False`` is greedy whatever the temperature;
            ``True`` samples (at temperature 1 when ``temperature`` is 0);
            ``None`` samples exactly when ``temperature > 0``.
        top_k : int, optional
            When sampling, only from the ``top_k`` most likely tokens.
        eos_token_id : int or list of int, optional
            A row that emits it (any of them, for a list: e.g. every token that
            holds a newline) is finished: its later positions hold
            ``eos_token_id`` (the first of the list); generation stops when
            every row has finished.
        stop_when : callable, optional
            Called after each step with the new tokens so far ``[batch, n_new]``;
            returns ``[batch]`` bools: a row for which it says True is finished
            (generation stops when every row has finished). A stopping rule
            that depends on what came before, e.g. a newline once the answer began.
        return_type : {"auto", "str", "tokens"}
            ``"auto"``: strings for text input (a str for a str), else ids.
            Strings are each prompt's real tokens and its new tokens up to and
            including its EOS, decoded with ``skip_special_tokens=True`` (no pads).
            Ids are the left-padded batch ``[batch, pos + n_new]``: the prompt
            columns exactly as the input's padded tokens, then the new tokens.
        generator : torch.Generator, optional
            Seeds the sampling.

        Raises
        ------
        TypeError
            For any other keyword (the same on every architecture).
        """
        if unknown:
            raise TypeError(
                f"generate() got unexpected keyword argument(s) {sorted(unknown)}; it accepts "
                "max_new_tokens, attention_mask, fwd_hooks, temperature, do_sample, top_k, "
                "eos_token_id, stop_when, return_type and generator, on every architecture"
            )
        check_generate_args(
            max_new_tokens, return_type, temperature=temperature, do_sample=do_sample,
            top_k=top_k, eos_token_id=eos_token_id,
        )  # fmt: skip
        tokens, mask = as_batch(self, input, attention_mask)
        limit = self._max_positions()
        if limit is not None and tokens.shape[1] + max_new_tokens > limit:
            raise ValueError(
                f"{tokens.shape[1]} prompt tokens + {max_new_tokens} new tokens exceed what the model "
                f"accepts (n_ctx = {limit}); lower max_new_tokens"
            )
        sample = temperature > 0 if do_sample is None else do_sample
        temperature = temperature if temperature > 0 else 1.0
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        stops = None if eos_token_id is None else torch.tensor(eos_token_id, device=tokens.device).reshape(-1)
        new: list[Tensor] = []
        with self.hooks(fwd_hooks=fwd_hooks):
            if max_new_tokens > 0:
                logits, state = self._generation_start(tokens, mask)
            for step in range(max_new_tokens):
                nxt = _next_tokens(logits[:, -1], sample, temperature, top_k, generator).to(tokens.device)
                if stops is not None:
                    nxt = torch.where(finished, stops[0], nxt)
                    finished |= torch.isin(nxt, stops)
                new.append(nxt)
                if stop_when is not None:
                    finished |= stop_when(torch.stack(new, dim=1)).to(finished.device)
                if step + 1 == max_new_tokens or bool(finished.all()):
                    break
                logits, state = self._generation_step(nxt[:, None], state)
        result = torch.cat([tokens, torch.stack(new, dim=1) if new else tokens[:, :0]], dim=1)
        if not _wants_text(input, return_type):
            return result
        texts = self._decode_generated(result, mask, tokens.shape[1], stops)
        return texts[0] if isinstance(input, str) else texts

    def _decode_generated(
        self, result: Tensor, mask: Tensor | None, n_prompt: int, stops: Tensor | None
    ) -> list[str]:
        """Each row's real prompt tokens and new tokens up to its EOS, decoded."""
        if getattr(self, "tokenizer", None) is None:
            raise ValueError(
                f"this {type(self).__name__} has no tokenizer to decode with: pass return_type='tokens'"
            )
        texts = []
        for i, row in enumerate(result):
            prompt = row[:n_prompt] if mask is None else row[:n_prompt][mask[i]]
            tail = row[n_prompt:]
            ended = torch.isin(tail, stops) if stops is not None else None
            if ended is not None and bool(ended.any()):
                tail = tail[: int(ended.nonzero()[0]) + 1]
            ids = torch.cat([prompt, tail]).tolist()
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return texts

    def _max_positions(self) -> int | None:
        return getattr(self.cfg, "n_ctx", None)


def _wants_text(input: Any, return_type: str) -> bool:
    if return_type != "auto":
        return return_type == "str"
    if isinstance(input, Prompts):
        return input.texts is not None
    if isinstance(input, (list, tuple)):
        return bool(input) and all(isinstance(x, str) for x in input)
    return isinstance(input, str)


def _next_tokens(
    logits: Float[Tensor, "batch vocab"],
    sample: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    """Greedy (``sample=False``) or sampled next tokens, one per row."""
    if not sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class HookedSequenceModel(CheckedHooks, Generates, HookedRootModule):
    """Base of dynalens' own hooked models.

    Subclasses build their modules, call ``self.setup()``, and implement
    ``forward(input, *, attention_mask=None, state=None, return_state=False)``:
    ``input`` is anything :func:`as_batch` takes (a ``Prompts`` brings its own
    mask); a pad position leaves the recurrent state exactly as it was, so a
    padded row equals its unpadded run. With ``return_state=True`` it returns
    ``(logits, state)`` where ``state`` lets the next call continue the
    sequence (positions included).
    """

    architecture: ClassVar[str] = "sequence"
    cfg: SequenceConfig

    def __init__(self, cfg: SequenceConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, input: TextOrTokens) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch, pos]`` for a string, ids or a ``Prompts``.

        A list of strings (or of id rows) is left-padded, exactly as
        ``Prompts(model, input).tokens``.
        """
        if isinstance(input, Prompts):
            return input.tokens.to(self._device())
        if isinstance(input, Tensor):
            return check_tokens(input, self.cfg.d_vocab, self.cfg.n_ctx).to(self._device())
        if isinstance(input, (list, tuple)):
            return prompts_of(self, input).tokens
        check_prompt(input)
        if self.tokenizer is None:
            raise ValueError(
                f"this {type(self).__name__} has no tokenizer, so it takes token ids only: "
                "pass a LongTensor of shape [batch, pos]"
            )
        enc = self.tokenizer([input], return_tensors="pt")
        return check_tokens(enc["input_ids"], self.cfg.d_vocab, self.cfg.n_ctx).to(self._device())

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

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token."""
        tokens = self.to_tokens(string)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one")
        return int(tokens[0])

    def _device(self) -> torch.device:
        return input_device(self)

    # ------------------------------------------------------------ unembedding
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_embed"]:
        """The embedding matrix."""
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding matrix (TransformerLens layout): logits = ``ln_final(x) @ W_U + b_U``."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias (zeros when the unembedding has none)."""
        bias = self.unembed.bias
        return bias if bias is not None else self.unembed.weight.new_zeros(self.cfg.d_vocab)

    def tokens_to_residual_directions(self, tokens: Any) -> Float[Tensor, "... d_model"]:
        """``W_U[:, tokens]`` with the model axis last (ids, a tensor of ids or a single-token string)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, ids].movedim(0, -1)

    # -------------------------------------------------------------- generation
    def _generation_start(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Any]:
        return self(tokens, attention_mask=mask, return_state=True)

    def _generation_step(self, new: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self(new, state=state, return_state=True)
