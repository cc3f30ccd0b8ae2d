"""Running a model one block at a time: capture the inputs of the first block, then feed each block the
previous block's output. Only the block being run needs to be on the compute device; the boundary
activations live in an ``ActivationStore`` (CPU memory, or files on disk past a byte budget).

A *block list* is the ``nn.ModuleList`` whose children are called one after the other on the residual
stream (the decoder layers of a transformer): the input of child i+1 is the output of child i, and every
other argument (position embeddings, attention mask) is the same for all children. This is checked on a
real batch, never assumed.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, MutableMapping, Optional

import torch
from torch import nn
from torch.func import functional_call

from .evaluate import main_output

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockInput:
    """The arguments a block is called with for one calibration batch."""

    args: tuple
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> torch.Tensor:  # the residual stream: (batch, tokens, hidden)
        return self.args[0]

    def with_stream(self, stream: torch.Tensor) -> "BlockInput":
        return BlockInput((stream, *self.args[1:]), self.kwargs)


class _Stop(Exception):
    pass


def run_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*batch) if isinstance(batch, tuple) else model(batch)


def stream_of(output: Any) -> torch.Tensor:
    """A block's residual-stream output (decoder layers return a tensor or a tuple led by it)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output if isinstance(output, torch.Tensor) else main_output(output)


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[Any]) -> list[BlockInput]:
    """Run the model up to its first block for every batch and keep that block's arguments."""
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # a KV cache would grow on every later call of the block and make it attend to stale keys
        captured.append(BlockInput(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                   {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_model(model, without_cache(model, batch))
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")


def without_cache(model: nn.Module, batch: Any) -> Any:
    """A keyword batch asks a transformers model for no KV cache (when its forward takes ``use_cache``)."""
    if isinstance(batch, Mapping) and "use_cache" not in batch:
        try:
            if "use_cache" in inspect.signature(model.forward).parameters:
                return {**batch, "use_cache": False}
        except (TypeError, ValueError):
            pass
    return batch


def chains(model: nn.Module, blocks: nn.ModuleList, batch: Any) -> Optional[str]:
    """None when block i+1 is called on block i's output (and blocks run once, in order); else why not.
    The model stops after its last block (no head: its logits would be the largest tensors of the run)."""
    order: list[int] = []
    problem: list[str] = []
    previous: list[torch.Tensor] = []
    handles = []
    others: list[tuple] = []  # block 0's arguments after the stream: every block must get the same
    for i, block in enumerate(blocks):
        def hook(module, args, kwargs, output, i=i):
            first = args[0] if args else next(iter(kwargs.values()), None)
            if previous and (not isinstance(first, torch.Tensor) or first.shape != previous[0].shape
                             or not torch.equal(first, previous[0])) and not problem:
                problem.append(f"block {i}'s first argument is not block {i - 1}'s output")
            rest = (args[1:], {k: v for k, v in kwargs.items() if not _is_cache(v)})
            if not others:
                others.append(rest)
            elif not _same(rest, others[0]) and not problem:
                problem.append(f"block {i} is called with other arguments than block 0 (not only the stream)")
            order.append(i)
            previous[:] = [stream_of(output)]
            if i == len(blocks) - 1:
                raise _Stop
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run_model(model, without_cache(model, batch))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if order != list(range(len(blocks))):
        return f"blocks ran in the order {order[:8]}..., not once each in order"
    return problem[0] if problem else None


def _same(a: Any, b: Any) -> bool:
    """Equal call arguments: tensors by shape and value, containers element-wise, the rest by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable == (masks, configs): compare identity
        return a is b


def run_block(block: nn.Module, inp: BlockInput, overrides: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """The block's residual-stream output, with some parameters replaced (the block is not modified)."""
    if overrides:
        return stream_of(functional_call(block, dict(overrides), inp.args, dict(inp.kwargs), strict=False))
    return stream_of(block(*inp.args, **inp.kwargs))


class ActivationStore(MutableMapping):
    """Tensors by key (boundary activations, re-fitted weights): kept in CPU memory until ``budget_bytes``
    is used, then written to files in a private temporary folder and memory-mapped back when read (never
    all on the device). A mapping: ``store[key] = t`` puts, ``store[key]`` reads, ``del store[key]`` drops."""

    def __init__(self, budget_bytes: Optional[int] = None, directory: Optional[Path] = None) -> None:
        self.budget = budget_bytes
        self._memory: dict[Any, torch.Tensor] = {}
        self._files: dict[Any, Path] = {}
        self._dir = directory
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self._written = 0  # file names are never reused: a dropped key's name could still be open

    def _folder(self) -> Path:
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="structprune-acts-")
            self._dir = Path(self._tmp.name)
        return self._dir

    def put(self, key: Any, value: torch.Tensor) -> None:
        self.drop(key)
        value = value.detach().to("cpu")
        size = value.numel() * value.element_size()
        if self.budget is None or self.bytes_in_memory + size <= self.budget:
            self._memory[key] = value.clone() if value.storage_offset() or not value.is_contiguous() else value
            self.bytes_in_memory += size
            return
        self._written += 1
        path = self._folder() / f"{self._written}-{os.getpid()}.pt"
        torch.save(value.contiguous(), path)
        self._files[key] = path
        self.bytes_on_disk += size

    def __getitem__(self, key: Any) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        return torch.load(self._files[key], mmap=True, weights_only=True)

    def __contains__(self, key: object) -> bool:
        return key in self._memory or key in self._files

    def __setitem__(self, key: Any, value: torch.Tensor) -> None:
        self.put(key, value)

    def __delitem__(self, key: Any) -> None:
        if key not in self:
            raise KeyError(key)
        self.drop(key)

    def __iter__(self) -> Iterator[Any]:
        return iter([*self._memory, *self._files])

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def drop(self, key: Any) -> None:
        if key in self._memory:
            value = self._memory.pop(key)
            self.bytes_in_memory -= value.numel() * value.element_size()
        if key in self._files:
            path = self._files.pop(key)
            self.bytes_on_disk -= path.stat().st_size if path.exists() else 0
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

