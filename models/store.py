"""An activation store: chosen hooks over a token corpus, in sharded safetensors files.

:func:`build_store` cuts a corpus into sequences of ``seq_len`` tokens, runs
the model on them a batch at a time with hooks on the chosen hook points only,
and writes each hook's activations per token (``[tokens, ...]``) into shards
of ``shard_sequences`` sequences, each shard a safetensors file renamed into
place. A shard is computed straight into its file's bytes
(:class:`~dynalens.models.safetensors_image.SafetensorsImage`; the Mamba
states are formed there by the scan), written page by page on a thread as
its hooks fire. ``manifest.json`` (rewritten
atomically after every shard) names the model, the hooks with dtype and
per-token shape, each shard's token range, and the corpus hash; a re-run
with the same corpus skips the shards it lists, so an interrupted build
resumes. With ``ray=True`` the shards are
built in parallel, one actor per worker, each loading the model once.

:class:`ActivationStore` reads a store back: ``store.shard(i)``, or iterate it
as a torch ``IterableDataset`` of shuffled batches (``{hook: [batch, ...]}``).

Any per-position hook of any architecture can be stored, the Mamba state
(``mixer.hook_ssm_state``, ``[tokens, d_inner, d_state]``) and the RNN hidden
included.

Examples
--------
>>> store = build_store("mamba-ar", [names.resid_post(1)], tokens, "acts/")   # doctest: +SKIP
>>> for batch in ActivationStore("acts/", batch_size=256):                   # doctest: +SKIP
...     batch["blocks.1.hook_resid_post"].shape                               # [256, d_model]
"""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from dynalens.models.io import read_json, write_json
from dynalens.models.safetensors_image import SafetensorsImage
from dynalens.models.state_buffer import states_into
from dynalens.models.surface import model_name_of

MANIFEST = "manifest.json"
TOKENS = "tokens"
"""The shard tensor holding each stored token's id."""


def corpus_tokens(model: Any, text: str) -> Int[Tensor, " n"]:
    """The model's token ids of ``text``, as one stream (no BOS between pieces)."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass the corpus as a tensor of token ids")
    return torch.tensor(model.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def corpus_hash(tokens: Int[Tensor, " n"], seq_len: int) -> str:
    """A digest of the token stream and the sequence length it is cut at."""
    digest = hashlib.sha256(f"{seq_len}:".encode())
    digest.update(tokens.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def build_store(
    model: Any,
    hooks: Sequence[str],
    corpus: str | Int[Tensor, " n"],
    folder: str | os.PathLike,
    *,
    seq_len: int = 128,
    shard_sequences: int = 64,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    ray: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Stream ``hooks`` over ``corpus`` into sharded safetensors files in ``folder``.

    Parameters
    ----------
    model
        A dynalens model, or a name or path for ``dl.load`` (required with ``ray=True``).
    hooks
        Per-position hook names (activations ``[batch, pos, ...]``).
    corpus
        Text (tokenised with the model's tokenizer) or token ids ``[n]``; cut
        into ``n // seq_len`` sequences of ``seq_len`` tokens (the tail is dropped).
    folder
        Where the shards and ``manifest.json`` go; an existing store of the
        same corpus, model and hooks is resumed.
    seq_len, shard_sequences, batch_size
        Tokens per sequence, sequences per shard, sequences per forward.
    dtype
        The stored dtype.
    ray, workers
        Build shards in parallel on Ray (a local Ray with ``workers`` CPUs
        unless one is running).
    progress
        A tqdm bar over shards.
    """
    from dynalens.models.loading import load

    source = model if isinstance(model, (str, os.PathLike)) else None
    loaded = load(source) if source is not None else model
    hooks = list(hooks)
    if not hooks:
        raise ValueError("hooks must name at least one hook")
    loaded.check_hook_names(hooks)
    tokens = corpus_tokens(loaded, corpus) if isinstance(corpus, str) else torch.as_tensor(corpus).reshape(-1)
    n_sequences = tokens.numel() // seq_len
    if n_sequences == 0:
        raise ValueError(f"the corpus has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
    folder = Path(folder)
    spec = {
        "model": str(source) if source is not None else model_name_of(loaded),
        "architecture": loaded.cfg.architecture,
        "corpus_hash": corpus_hash(tokens[: n_sequences * seq_len], seq_len),
        "seq_len": seq_len,
        "shard_sequences": shard_sequences,
        "dtype": str(dtype).removeprefix("torch."),
        "hooks": _per_token_shapes(loaded, hooks, seq_len),
    }
    manifest = _resume(folder, spec)
    done = {s["index"] for s in manifest["shards"]}
    n_shards = -(-n_sequences // shard_sequences)
    todo = [i for i in range(n_shards) if i not in done]
    sequences = tokens[: n_sequences * seq_len].reshape(n_sequences, seq_len)
    jobs = [(i, sequences[i * shard_sequences : (i + 1) * shard_sequences]) for i in todo]
    bar = tqdm(total=n_shards, initial=n_shards - len(todo), desc="store shards", disable=not progress)
    try:
        if ray:
            if source is None:
                raise ValueError("ray=True needs the model as a name or path, so each worker can load it")
            _build_on_ray(source, spec["hooks"], jobs, folder, manifest, batch_size, dtype, bar, workers)
        else:
            writer = ShardWriter(loaded, spec["hooks"], str(folder), batch_size, dtype, buffers=2)

            def save(index: int, image: SafetensorsImage, filled: queue.SimpleQueue) -> None:
                _record(folder, manifest, writer.save(index, image, _until_none(filled)))

            # Shard i's file is written and recorded on the thread as shard i runs, and after.
            with ThreadPoolExecutor(max_workers=1) as files:
                writing: Future | None = None
                for index, shard in jobs:
                    image, filled = writer.image_for(shard), queue.SimpleQueue()
                    written = files.submit(save, index, image, filled)
                    try:
                        writer.fill(image, shard, filled.put)
                    except BaseException as err:
                        filled.put(err)  # the thread drops the half-written file
                        raise
                    filled.put(None)
                    if writing is not None:
                        writing.result()
                        bar.update()
                    writing = written
                if writing is not None:
                    writing.result()
                    bar.update()
    finally:
        bar.close()
    return ActivationStore(folder)


class ShardWriter:
    """Runs one model over shards of sequences and writes each shard's file.

    Each shard is computed into a :class:`SafetensorsImage`, the file's bytes:
    the SSM states of Mamba layers are formed there by the scan
    (:func:`~dynalens.models.state_buffer.states_into`), the other hooks'
    activations are copied there once, as their hook fires, and the file is
    written from that buffer. ``buffers`` images are
    reused in turn, so the one :meth:`image_for` returns stays valid until
    ``buffers`` more shards have been laid out (two let one shard's file be
    finished while the next shard runs).
    """

    def __init__(
        self,
        model: Any,
        hooks: dict[str, list[int]],
        folder: str,
        batch_size: int,
        dtype: torch.dtype,
        buffers: int = 1,
    ):
        if isinstance(model, (str, os.PathLike)):
            from dynalens.models.loading import load

            model = load(model)
        self.model, self.hooks, self.folder = model, hooks, Path(folder)
        self.batch_size, self.dtype = batch_size, dtype
        self.images = [SafetensorsImage() for _ in range(buffers)]
        self._turn = 0

    def write(self, index: int, sequences: Int[Tensor, "seq pos"]) -> dict[str, Any]:
        """Write shard ``index`` (its sequences' activations per token); return its manifest entry."""
        image = self.image_for(sequences)
        self.fill(image, sequences)
        return self.save(index, image)

    def image_for(self, sequences: Int[Tensor, "seq pos"]) -> SafetensorsImage:
        """The next of the images, laid out for the shard's tensors (the tokens, each hook ``[seq * pos, ...]``)."""
        image = self.images[self._turn % len(self.images)]
        self._turn += 1
        n_tokens = sequences.numel()
        hooks = {name: (self.dtype, [n_tokens, *shape]) for name, shape in self.hooks.items()}
        image.layout({TOKENS: (torch.int64, [n_tokens]), **hooks})
        return image

    @torch.no_grad()
    def fill(
        self,
        image: SafetensorsImage,
        sequences: Int[Tensor, "seq pos"],
        progress: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        """Run the shard's sequences a batch at a time and put the hooks' activations into ``image``.

        Each hook's activations are copied into the image as the hook fires
        (the SSM states are formed there), and ``progress``, when given, is
        called then with the tokens of each tensor that are final so far:
        the file's pages can be written while the rest of the forward runs.
        """
        out = image.tensors
        out[TOKENS].copy_(sequences.reshape(-1))
        final = {TOKENS: sequences.numel(), **dict.fromkeys(self.hooks, 0)}
        done = 0
        for batch in sequences.split(self.batch_size):
            end = done + batch.numel()
            views = {name: out[name][done:end].view(*batch.shape, *shape) for name, shape in self.hooks.items()}

            def keep(activation: Tensor, hook: Any, name: str) -> None:
                if not _same_memory(activation, views[name]):
                    views[name].copy_(activation)
                final[name] = end
                if progress is not None:
                    progress(dict(final))

            keeps = [(name, functools.partial(keep, name=name)) for name in self.hooks]
            with states_into(views), self.model.hooks(fwd_hooks=keeps):  # the SSM states are formed in the image
                self.model(batch)
            missed = [name for name, rows in final.items() if rows < end]
            if missed:
                raise RuntimeError(f"hooks {missed} did not fire on a batch of the shard; they cannot be stored")
            done = end

    def save(
        self, index: int, image: SafetensorsImage, progress: Iterable[dict[str, int]] = ()
    ) -> dict[str, Any]:
        """Write shard ``index``'s file atomically (pages as ``progress`` says they are final); return its entry."""
        file = f"shard_{index:05d}.safetensors"
        image.write(self.folder / file, progress)
        return {"index": index, "file": file, "n_tokens": image.tensors[TOKENS].numel()}


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _until_none(items: queue.SimpleQueue) -> Iterator[Any]:
    """The items put on ``items`` until ``None``; an exception put on it is raised."""
    while (item := items.get()) is not None:
        if isinstance(item, BaseException):
            raise RuntimeError("the shard's activations were not computed") from item
        yield item


class ActivationStore(torch.utils.data.IterableDataset):
    """A store :func:`build_store` wrote, as shards or as shuffled batches.

    Iterating yields ``{hook: [batch_size, ...], "tokens": [batch_size]}``
    dicts, the tokens shuffled within a buffer of ``buffer_shards`` shards
    (shards themselves in shuffled order); with ``shuffle=False`` in stored
    order. Under a ``DataLoader`` with workers each worker reads its own shards.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        hooks: Sequence[str] | None = None,
        batch_size: int = 256,
        shuffle: bool = True,
        buffer_shards: int = 4,
        seed: int = 0,
    ):
        super().__init__()
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no activation store in {str(self.folder)!r} (no {MANIFEST})")
        self.manifest = read_json(path)
        stored = list(self.manifest["hooks"])
        self.hooks = list(hooks) if hooks is not None else stored
        unknown = [h for h in self.hooks if h not in stored]
        if unknown:
            raise KeyError(f"the store holds no {unknown}; it holds {stored}")
        self.batch_size, self.shuffle, self.buffer_shards, self.seed = batch_size, shuffle, buffer_shards, seed

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in self.manifest["shards"])

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.folder)!r}, {len(self.manifest['shards'])} shards, {self.n_tokens} tokens)"

    def shard(self, index: int) -> dict[str, Float[Tensor, "tokens ..."]]:
        """One shard's tensors: each hook ``[tokens, ...]`` and ``tokens``."""
        entry = next((s for s in self.manifest["shards"] if s["index"] == index), None)
        if entry is None:
            raise IndexError(f"no shard {index}: the store has {sorted(s['index'] for s in self.manifest['shards'])}")
        with safe_open(str(self.folder / entry["file"]), framework="pt") as f:
            return {name: f.get_tensor(name) for name in [*self.hooks, TOKENS]}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        indices = sorted(s["index"] for s in self.manifest["shards"])
        info = torch.utils.data.get_worker_info()
        if info is not None:
            indices = indices[info.id :: info.num_workers]
        rng = random.Random(self.seed)
        if self.shuffle:
            rng.shuffle(indices)
        generator = torch.Generator().manual_seed(self.seed)
        step = self.buffer_shards if self.shuffle else 1
        for group in range(0, len(indices), step):
            shards = [self.shard(i) for i in indices[group : group + step]]
            buffer = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
            n = len(buffer[TOKENS])
            order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
            for start in range(0, n, self.batch_size):
                pick = order[start : start + self.batch_size]
                yield {k: v[pick] for k, v in buffer.items()}


def _per_token_shapes(model: Any, hooks: list[str], seq_len: int) -> dict[str, list[int]]:
    """The shape one token of each hook stores, checked on one two-token forward."""
    probe = torch.zeros((1, min(2, seq_len)), dtype=torch.long)
    with torch.no_grad():
        _, cache = model.run_with_cache(probe, names_filter=hooks)
    shapes = {}
    for name in hooks:
        if name not in cache.cache_dict:
            raise ValueError(f"hook {name!r} did not fire on a forward pass; it cannot be stored")
        shape = list(cache[name].shape)
        if len(shape) < 2 or shape[:2] != list(probe.shape):
            raise ValueError(
                f"hook {name!r} has shape {shape}, not [batch, pos, ...]: the store keeps per-position "
                "hooks (attention patterns are not per position)"
            )
        shapes[name] = shape[2:]
    return shapes


def _resume(folder: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue: the existing one if it describes the same build, else a new one."""
    path = folder / MANIFEST
    if path.is_file():
        manifest = read_json(path)
        same = {k: manifest.get(k) for k in spec} == spec
        if not same:
            raise ValueError(
                f"{str(folder)!r} holds a store of another model, corpus or hook set; "
                "choose another folder or delete it"
            )
        manifest["shards"] = [s for s in manifest["shards"] if (folder / s["file"]).is_file()]
        return manifest
    manifest = {**spec, "shards": []}
    write_json(path, manifest)
    return manifest


def _record(folder: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> None:
    manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda s: s["index"])
    write_json(folder / MANIFEST, manifest)


def _build_on_ray(
    source: Any,
    hooks: dict[str, list[int]],
    jobs: list[tuple[int, Tensor]],
    folder: Path,
    manifest: dict[str, Any],
    batch_size: int,
    dtype: torch.dtype,
    bar: tqdm,
    workers: int | None,
) -> None:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        n_actors = max(1, min(len(jobs), int(ray.available_resources().get("CPU", 1))))
        actor = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(ShardWriter)
        actors = [actor.remote(source, hooks, str(folder), batch_size, dtype) for _ in range(n_actors)]
        pending = [actors[k % n_actors].write.remote(i, shard) for k, (i, shard) in enumerate(jobs)]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            _record(folder, manifest, ray.get(ready[0]))
            bar.update()
    finally:
        if started_here:
            ray.shutdown()

