"""Train any next-token model on a synthetic task, with a checkpoint series.

``train`` runs AdamW (or SGD) under a linear-warmup cosine schedule, logs the
loss of every step, and at ~20 log-spaced steps measures held-out loss and
accuracy and saves the model as a loadable folder (``save_pretrained``:
safetensors + config). The optimizer, data and RNG state at the latest
checkpoint go to ``out/train_state/`` (safetensors + JSON, never pickle), so an
interrupted run resumes and ends exactly where an uninterrupted one would.

Command line: ``dynalens train --task induction --arch attn-only-2l --steps 3000 --out DIR``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from dynalens.models.io import read_json, read_safetensors, write_json, write_safetensors
from dynalens.models.tasks import TASKS, Task, TaskBatch
from dynalens.models.zoo import CHECKPOINT_DIR, CHECKPOINT_PREFIX, CURVE_FILE

TRAIN_STATE_DIR = "train_state"
EVAL_SEED_OFFSET = 1_000_003  # held-out data: a generator seeded apart from the training one
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainResult:
    """What a run produced: the per-step loss and the held-out metrics per checkpoint."""

    steps: list[int]
    loss: list[float]
    lr: list[float]
    checkpoints: list[dict[str, float]]
    out: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        """Held-out accuracy at the last checkpoint."""
        return self.checkpoints[-1]["eval_accuracy"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "steps": self.steps,
            "loss": self.loss,
            "lr": self.lr,
            "checkpoints": self.checkpoints,
        }


# ---------------------------------------------------------------- model plumbing
def logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, an object with ``.logits``, or a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"model(tokens) returned {type(output).__name__}; expected logits as a tensor, "
        "an output with `.logits`, or a tuple whose first item is the logits"
    )


def save_model(model: nn.Module, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained`` into ``folder``, written beside it and renamed into place."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(
            f"{type(model).__name__} has no save_pretrained(folder); checkpoints need one "
            "(HuggingFace models, HookedMamba and HookedRNN have it)"
        )
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-save progress bar (one per checkpoint otherwise)."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def checkpoint_steps(steps: int, n_checkpoints: int) -> list[int]:
    """Step 0 and ``n_checkpoints - 1`` log-spaced distinct steps in ``[1, steps]`` (``steps`` last).

    Early on, where rounding would repeat a step, the next step is used
    instead; fewer steps than checkpoints give every step.
    """
    if n_checkpoints < 2:
        raise ValueError(f"n_checkpoints must be >= 2 (the start and the end), got {n_checkpoints}")
    spaced: list[int] = []
    for x in np.geomspace(1, steps, n_checkpoints - 1):
        spaced.append(min(steps, max(int(round(x)), spaced[-1] + 1 if spaced else 1)))
    return [0] + sorted(set(spaced))


def cosine_lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@contextmanager
def deterministic(seed: int, num_threads: int | None = 1) -> Iterator[None]:
    """Seed torch, turn on deterministic algorithms, set the CPU thread count; restore on exit.

    One thread is the default: these models are tiny, so thread synchronisation
    costs more than it saves (tens of times more on a loaded machine).
    Denormal floats are flushed to zero meanwhile (on CPU they slow Mamba's
    training several-fold and carry no signal).
    """
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_flush_denormal(True)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.set_num_threads(was_threads)
            torch.set_flush_denormal(False)


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch: TaskBatch) -> dict[str, float]:
    """Held-out ``eval_loss``, ``eval_scored_loss`` and ``eval_accuracy`` of ``model`` on ``batch``."""
    was_training = model.training
    model.eval()
    try:
        logits = logits_of(model(batch.tokens))
    finally:
        model.train(was_training)
    return {
        "eval_loss": task.loss(logits, batch).item(),
        "eval_scored_loss": task.scored_loss(logits, batch).item(),
        "eval_accuracy": task.accuracy(logits, batch),
    }


def loss_drop_step(steps: Sequence[int], losses: Sequence[float]) -> int:
    """The step where a loss curve makes its big drop (a phase change).

    Detector: the plateau is the highest loss seen, the floor the last one; the
    drop step is the first step whose loss falls below the midpoint of the two.
    Raises ``ValueError`` when the curve never drops (final loss within 10% of
    the plateau).
    """
    if len(steps) != len(losses) or len(steps) < 2:
        raise ValueError("steps and losses must be two sequences of equal length >= 2")
    plateau, floor = max(losses), losses[-1]
    if floor > 0.9 * plateau:
        raise ValueError(f"no drop: the final loss {floor:.3g} is within 10% of the plateau {plateau:.3g}")
    peak = int(np.argmax(losses))
    midpoint = 0.5 * (plateau + floor)
    for step, loss in zip(steps[peak:], losses[peak:]):
        if loss < midpoint:
            return int(step)
    raise AssertionError("unreachable: the last loss lies below the midpoint")


# ------------------------------------------------------------- train state I/O
def _save_train_state(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, data: torch.Generator, step: int
) -> None:
    meta = {"step": str(step)}
    write_safetensors(folder / "model.safetensors", model.state_dict(), meta)
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {"rng.data": data.get_state(), "rng.torch": torch.get_rng_state()}
    plain: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                plain.setdefault(str(idx), {})[key] = value
    write_safetensors(folder / "optimizer.safetensors", tensors, meta)
    write_json(folder / "state.json", {"step": step, "param_groups": sd["param_groups"], "state": plain})


def _load_train_state(
    folder: Path, model: nn.Module, opt: torch.optim.Optimizer, data: torch.Generator
) -> int:
    info = read_json(folder / "state.json")
    step = int(info["step"])
    for name in ("model.safetensors", "optimizer.safetensors"):
        with safe_open(str(folder / name), framework="pt") as f:
            if f.metadata().get("step") != str(step):
                raise ValueError(
                    f"{folder} is inconsistent ({name} is from step {f.metadata().get('step')}, "
                    f"state.json from step {step}); delete it to start afresh"
                )
    model.load_state_dict(read_safetensors(folder / "model.safetensors"))
    tensors = read_safetensors(folder / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in info["state"].items():
        state.setdefault(int(idx), {}).update(entry)
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    data.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])
    return step


def _make_optimizer(
    params: list[nn.Parameter], optimizer: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


# ---------------------------------------------------------------------- train
def train(
    model: nn.Module,
    task: Task,
    steps: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 64,
    optimizer: str = "adamw",
    weight_decay: float = 0.01,
    warmup: int = 100,
    grad_clip: float = 1.0,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    n_checkpoints: int = 20,
    eval_size: int = 512,
    resume: bool = False,
    progress: bool = True,
    num_threads: int | None = 1,
    head_sparsity: float = 0.0,
    head_sparsity_from: int = 0,
) -> TrainResult:
    """Train ``model`` on batches of ``task`` for ``steps`` optimizer steps.

    Parameters
    ----------
    model
        Any module whose ``model(tokens)`` returns logits ``[batch, pos, d_vocab]``
        (a tensor, or an output with ``.logits``). Only parameters with
        ``requires_grad`` are trained; the model is trained in place.
    task
        A :class:`~dynalens.models.tasks.Task`; the loss is its masked cross-entropy.
    steps, lr, batch_size, optimizer, weight_decay, warmup, grad_clip
        ``optimizer`` is ``"adamw"`` or ``"sgd"`` (momentum 0.9); the learning
        rate warms up linearly over ``warmup`` steps, then decays as a cosine.
    seed
        Seeds the training data (a ``torch.Generator``) and torch's global RNG
        inside the run; held-out data use ``seed + 1_000_003``. Same seed, same
        model init: identical losses on CPU.
    out
        Folder for the final model (``save_pretrained``), ``training_curve.json``,
        ``checkpoints/step_XXXXXX/`` and ``train_state/``. ``None``: nothing written
        (held-out metrics are still measured at the checkpoint steps).
    n_checkpoints
        Step 0 plus ``n_checkpoints - 1`` log-spaced steps up to ``steps``.
    resume
        Continue from ``out/train_state`` if it exists (the model's weights are
        replaced by the saved ones).
    num_threads
        CPU threads during the run (restored after); ``None`` leaves torch's setting.
    head_sparsity, head_sparsity_from
        Weight of a group-lasso penalty added to the loss from step
        ``head_sparsity_from`` on: the sum over attention heads of
        :func:`head_weight_norms` (Llama-style transformers). Heads the task does
        not need are driven to zero, so the work gathers in few heads; starting
        it once a circuit has formed prunes a trained model, as head pruning does.

    Returns
    -------
    TrainResult
        Per-step loss and learning rate; held-out metrics per checkpoint.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if resume and out is None:
        raise ValueError("resume=True needs out=FOLDER holding the run to resume")
    if head_sparsity < 0:
        raise ValueError(f"head_sparsity must be >= 0, got {head_sparsity}")
    if head_sparsity:
        head_weight_norms(model)  # an unsupported model fails here, not at step head_sparsity_from
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True to train")
    out = Path(out) if out is not None else None
    device = params[0].device
    config = {
        "task": task.name, "steps": steps, "lr": lr, "batch_size": batch_size, "optimizer": optimizer,
        "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip, "seed": seed,
        "n_checkpoints": n_checkpoints, "eval_size": eval_size, "head_sparsity": head_sparsity,
        "head_sparsity_from": head_sparsity_from,
    }  # fmt: skip
    save_at = set(checkpoint_steps(steps, n_checkpoints))
    result = TrainResult([], [], [], [], out, config)

    with deterministic(seed, num_threads):
        opt = _make_optimizer(params, optimizer, lr, weight_decay)
        data = torch.Generator().manual_seed(seed)
        held_out = task.sample(eval_size, torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET))
        held_out = held_out.to(device)
        start = 0
        state_dir = out / TRAIN_STATE_DIR if out is not None else None
        if resume and state_dir is not None and (state_dir / "state.json").exists():
            start = _load_train_state(state_dir, model, opt, data)
            done = TrainResult(**{k: v for k, v in read_json(out / CURVE_FILE).items() if k != "config"})
            result.steps, result.loss, result.lr = (
                done.steps[:start], done.loss[:start], done.lr[:start]
            )
            result.checkpoints = [c for c in done.checkpoints if c["step"] <= start]
        else:
            _checkpoint(model, task, held_out, 0, result, opt, data)

        model.train()
        bar = tqdm(range(start + 1, steps + 1), disable=not progress, desc=f"train {task.name}")
        for step in bar:
            factor = cosine_lr_factor(step - 1, steps, warmup)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            batch = task.sample(batch_size, data).to(device)
            loss = task.loss(logits_of(model(batch.tokens)), batch)
            objective = loss
            if head_sparsity and step >= head_sparsity_from:
                objective = loss + head_sparsity * head_weight_norms(model).sum()
            opt.zero_grad(set_to_none=True)
            objective.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            result.steps.append(step)
            result.loss.append(loss.item())
            result.lr.append(lr * factor)
            if step in save_at:
                _checkpoint(model, task, held_out, step, result, opt, data)
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{result.final_accuracy:.3f}")
    return result


def _checkpoint(
    model: nn.Module,
    task: Task,
    held_out: TaskBatch,
    step: int,
    result: TrainResult,
    opt: torch.optim.Optimizer,
    data: torch.Generator,
) -> None:
    """Measure held-out metrics at ``step``; with an ``out`` folder, save model, state, curve."""
    result.checkpoints.append({"step": step, **evaluate(model, task, held_out)})
    out = result.out
    if out is None:
        return
    save_model(model, out / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step:06d}")
    if step == result.config["steps"]:  # the final model also sits at the top of `out`
        final = save_model(model, out / ".final")
        for item in final.iterdir():
            os.replace(item, out / item.name)
        final.rmdir()
    _save_train_state(out / TRAIN_STATE_DIR, model, opt, data, step)
    write_json(out / CURVE_FILE, result.to_dict())


def head_weight_norms(model: nn.Module) -> Float[Tensor, "layer head"]:
    """The L2 norm of each attention head's weights: its Q, K, V rows and O columns together.

    Summed over heads this is a group-lasso penalty (one group per head), which
    drives whole heads to zero rather than single weights. Grouped-query models
    count each key/value head's rows in every query head that reads them.
    Accepts HuggingFace models whose layers hold ``self_attn.{q,k,v,o}_proj``
    (Llama, Mistral, Qwen2, ...).
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(
            f"head_weight_norms needs a HuggingFace model with model.layers[i].self_attn "
            f"(Llama-style q/k/v/o_proj); got {type(model).__name__}"
        )
    norms = []
    for layer in layers:
        attn = layer.self_attn
        d_head = attn.head_dim
        n_heads = attn.o_proj.weight.shape[1] // d_head
        q = attn.q_proj.weight.reshape(n_heads, -1)
        k, v = (w.reshape(-1, d_head * w.shape[1]) for w in (attn.k_proj.weight, attn.v_proj.weight))
        kv = (k.square().sum(-1) + v.square().sum(-1)).repeat_interleave(n_heads // k.shape[0])
        o = attn.o_proj.weight.reshape(-1, n_heads, d_head).transpose(0, 1).reshape(n_heads, -1)
        norms.append((q.square().sum(-1) + kv + o.square().sum(-1)).sqrt())
    return torch.stack(norms)


# ------------------------------------------------------------------ architectures
def _gpt2_attn_only(task: Task, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4) -> nn.Module:
    """GPT-2 whose MLPs are exactly zero: ``c_proj`` weight and bias zeroed and frozen.

    Each MLP then adds exactly 0 to the residual stream (any input), so the
    model is attention-only while remaining a stock ``GPT2LMHeadModel`` that
    TransformerBridge boots. ``n_inner=4`` keeps the inert MLPs small on disk.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=task.d_vocab, n_positions=task.seq_len, n_embd=d_model, n_layer=n_layers,
        n_head=n_heads, n_inner=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        for p in block.mlp.c_proj.parameters():
            nn.init.zeros_(p)
            p.requires_grad_(False)
    return model


def _llama_attn_only(task: Task, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4) -> nn.Module:
    """Llama (RoPE) whose MLPs are exactly zero: ``down_proj`` zeroed and frozen.

    As in the GPT-2 variant, every MLP adds exactly 0 to the residual stream;
    rotary position embeddings make "attend to the previous token" one
    relative-position pattern, so a previous-token head forms quickly.
    """
    model = _llama(task, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_mlp=4)
    for layer in model.model.layers:
        nn.init.zeros_(layer.mlp.down_proj.weight)
        layer.mlp.down_proj.weight.requires_grad_(False)
    return model


def _llama(
    task: Task, *, d_model: int = 64, n_layers: int = 3, n_heads: int = 4, d_mlp: int = 128
) -> nn.Module:
    """A small Llama (RoPE, RMSNorm, SwiGLU MLP), untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=task.d_vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=task.seq_len,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _mamba(
    task: Task, *, d_model: int = 32, n_layers: int = 2, d_state: int = 8, expand: int = 2
) -> nn.Module:
    """A HookedMamba; the (tied) embedding re-drawn with std 0.02 as mamba_ssm initialises it."""
    from dynalens.models.mamba import HookedMamba, MambaConfig

    cfg = MambaConfig(d_model=d_model, n_layers=n_layers, d_vocab=task.d_vocab, d_state=d_state, expand=expand)
    model = HookedMamba(cfg)
    nn.init.normal_(model.embed.weight, std=0.02)
    return model


def _mamba2(
    task: Task, *, d_model: int = 32, n_layers: int = 2, d_head: int = 16, d_state: int = 16, expand: int = 2
) -> nn.Module:
    """A HookedMamba2 with tied embeddings (drawn with std 0.02, as mamba_ssm initialises them)."""
    from dynalens.models.mamba2 import HookedMamba2, Mamba2Config

    cfg = Mamba2Config(
        d_model=d_model, n_layers=n_layers, d_vocab=task.d_vocab, n_heads=expand * d_model // d_head, d_head=d_head,
        d_state=d_state, expand=expand, chunk_size=task.seq_len, tie_embeddings=True,
    )  # fmt: skip
    model = HookedMamba2(cfg)
    nn.init.normal_(model.embed.weight, std=0.02)
    return model


def _bamba(
    task: Task,
    *,
    d_model: int = 32,
    layer_types: Sequence[str] = ("mamba2", "attention"),
    n_heads: int = 2,
    d_mlp: int = 32,
    d_head: int = 16,
    d_state: int = 16,
) -> nn.Module:
    """A HookedHybrid over a Bamba (Mamba-2 and attention layers, each followed by a SwiGLU MLP), tied embeddings.

    ``layer_types`` lists each layer's mixer (``"mamba2"`` or ``"attention"``);
    attention has ``n_heads`` heads and rotary positions, the Mamba-2 mixers
    ``2 d_model / d_head`` heads of ``d_head`` with ``d_state``.
    """
    from transformers import BambaConfig, BambaForCausalLM

    from dynalens.models.hybrid import HookedHybrid

    unknown = sorted(set(layer_types) - {"mamba2", "attention"})
    if unknown:
        raise ValueError(f"layer_types may hold 'mamba2' and 'attention', got {unknown}")
    cfg = BambaConfig(
        vocab_size=task.d_vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=len(layer_types),
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=task.seq_len,
        attn_layer_indices=[i for i, kind in enumerate(layer_types) if kind == "attention"],
        mamba_n_heads=2 * d_model // d_head, mamba_d_head=d_head, mamba_d_state=d_state, mamba_n_groups=1,
        mamba_chunk_size=task.seq_len, tie_word_embeddings=True, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    hf = BambaForCausalLM(cfg)
    nn.init.normal_(hf.model.embed_tokens.weight, std=0.02)
    return HookedHybrid.from_hf(hf)


class TorchRNNLM(nn.Module):
    """``Embedding → torch.nn.LSTM/GRU → Linear``, saved as the equivalent :class:`HookedRNN`.

    The hooked model steps through time in Python so that every step can be
    hooked; this twin runs torch's C++ loop, which trains tens of times faster.
    ``save_pretrained`` writes ``HookedRNN.from_torch(...)``: the same weights
    and the same function.
    """

    def __init__(self, cell: str, d_vocab: int, d_model: int, n_layers: int):
        super().__init__()
        rnns = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in rnns:
            raise ValueError(f"cell must be one of {sorted(rnns)}, got {cell!r}")
        self.embed = nn.Embedding(d_vocab, d_model)
        self.rnn = rnns[cell](d_model, d_model, n_layers, batch_first=True)
        self.unembed = nn.Linear(d_model, d_vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.unembed(self.rnn(self.embed(tokens))[0])

    def to_hooked(self) -> nn.Module:
        """The :class:`HookedRNN` computing the same function (weights copied)."""
        from dynalens.models.rnn import HookedRNN

        return HookedRNN.from_torch(self.rnn, self.embed, self.unembed)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.to_hooked().save_pretrained(folder)


def _rnn(cell: str) -> Callable[..., nn.Module]:
    def build(task: Task, *, d_model: int = 32, n_layers: int = 1) -> nn.Module:
        return TorchRNNLM(cell, task.d_vocab, d_model, n_layers)

    build.__doc__ = f"An {cell.upper()} language model trained as torch.nn, saved as a HookedRNN."
    return build


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "attn-only-2l": _gpt2_attn_only,
    "attn-only-2l-rope": _llama_attn_only,
    "attn-3l": _llama,
    "mamba-2l": _mamba,
    "mamba2-2l": _mamba2,
    "hybrid-bamba": _bamba,
    "lstm-1l": _rnn("lstm"),
    "gru-1l": _rnn("gru"),
}


def build_model(arch: str, task: Task, seed: int = 0, **sizes: Any) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` sized for ``task``.

    The initialisation is seeded by ``seed`` without touching torch's global RNG.
    """
    if arch not in ARCHS:
        raise KeyError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHS[arch](task, **sizes)


# ------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynalens train", description="Train a model on a synthetic task.")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", required=True, help="output folder (model, curve, checkpoints)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--head-sparsity", type=float, default=0.0, help="group-lasso weight on attention heads")
    p.add_argument("--head-sparsity-from", type=int, default=0, help="first step of the head penalty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-checkpoints", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """``dynalens train ...``: build ``--arch`` for ``--task``, train it, print the held-out accuracy."""
    args = build_parser().parse_args(argv)
    task = TASKS[args.task]()
    model = build_model(args.arch, task, seed=args.seed)
    result = train(
        model, task, args.steps, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
        weight_decay=args.weight_decay, warmup=args.warmup, head_sparsity=args.head_sparsity,
        head_sparsity_from=args.head_sparsity_from, seed=args.seed, out=args.out,
        n_checkpoints=args.n_checkpoints, resume=args.resume, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{args.arch} on {args.task}: held-out accuracy {result.final_accuracy:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
