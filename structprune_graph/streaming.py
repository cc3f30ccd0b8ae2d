"""Weights that stay where they are: a model whose blocks are materialised one (or two) at a time.

A transformers checkpoint folder (``model.safetensors``, or shards with ``model.safetensors.index.json``)
is the source. The model is built as a *skeleton*: its parameters on the ``meta`` device (no memory),
its buffers real (rotary frequencies are computed, not stored). Everything outside the block list
(embeddings, final norm, head) is loaded once; a block's parameters are read from the memory-mapped
files when the block is needed and dropped again when ``capacity`` other blocks have been needed since.
"Needed" is either an explicit ``streamer(module)`` (the solver's passes, before they read a block's
weights) or a forward call (a forward pre-hook on every block), so a whole-model forward (the chain
check, the allocator's loss) runs with at most ``capacity`` blocks resident.

Peak memory is therefore the resident part plus ``capacity`` blocks plus the activations, independent
of the number of blocks: the O(sqrt N) of the method when the blocks are O(sqrt N) each.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .errors import StructPruneError

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SINGLE = "model.safetensors"


class CheckpointError(StructPruneError, FileNotFoundError):
    """A folder is not a safetensors checkpoint, or lacks a tensor the model needs."""


def check_checkpoint(folder: Union[str, Path]) -> None:
    """Refuse, naming the file, a ``config.json`` that is not JSON and a safetensors file whose header or
    size is damaged (a truncated download), before any model is built."""
    check_config(folder)
    check_weights(folder)


def check_config(folder: Union[str, Path]) -> None:
    config = Path(folder) / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{config} is not valid JSON ({err}); restore the model's config.json") from None


def check_weights(folder: Union[str, Path]) -> None:
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a safetensors index ({type(err).__name__}: {err}); save the "
                                  f"checkpoint again") from None
    else:
        files = [SINGLE] if (folder / SINGLE).is_file() else []
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own error type for a damaged header or size
            raise CheckpointError(f"{folder / name} cannot be read ({type(err).__name__}: {err}): the file is "
                                  f"truncated or damaged; save or download the checkpoint again") from None


class CheckpointWeights:
    """Tensor name -> tensor, read on demand from a folder of safetensors files (memory-mapped while read)."""

    def __init__(self, folder: Union[str, Path]) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        check_weights(self.folder)
        index = self.folder / INDEX
        if index.is_file():
            self.files: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / SINGLE).is_file():
            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.files = {name: SINGLE for name in f.keys()}
        else:
            raise CheckpointError(f"{self.folder} holds neither {SINGLE} nor {INDEX}; save the model with "
                                  f"transformers' save_pretrained (safetensors) first")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype a tensor is stored in (read from the file's header, not its data)."""
        from safetensors import safe_open

        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.folder}")
        with safe_open(str(self.folder / self.files[name]), framework="pt") as f:
            code = f.get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.folder} is stored as {code}, which is not supported")
        return SAFETENSORS_DTYPES[code]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of the files (the files are unmapped before this returns)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.folder}")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).clone()  # own memory: nothing stays mapped
        return out


def empty_model(folder: Union[str, Path], meta_buffers: bool = False) -> nn.Module:
    """The checkpoint's transformers architecture with parameters on the meta device (no memory) and,
    unless ``meta_buffers``, real buffers (computed at construction, e.g. rotary frequencies)."""
    import transformers
    from accelerate import init_empty_weights

    check_config(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise CheckpointError(f"{folder}/config.json names no transformers architecture ({names}); "
                              f"set config.architectures before saving")
    if meta_buffers:
        with torch.device("meta"):
            model = cls(config).eval()
    else:
        with init_empty_weights(include_buffers=False):
            model = cls(config).eval()
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied embeddings are one parameter, stored once in the checkpoint
    return model


def _aliases(module: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(parameter) -> every (owner module, attribute, qualified name) it is reachable under (tied weights)."""
    out: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for path, owner in module.named_modules(remove_duplicate=False):
        for attr, p in owner._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((owner, attr, f"{path}.{attr}" if path else attr))
    return out


class WeightStreamer:
    """Keeps the blocks of ``blocks_path`` on the meta device and materialises them on demand (see the
    module docstring). Use as a context manager; ``close`` removes the hooks and drops every block."""

    def __init__(self, model: nn.Module, blocks_path: str, source: CheckpointWeights,
                 device: Union[str, torch.device] = "cpu", capacity: int = 2,
                 dtype: Optional[torch.dtype] = None) -> None:
        self.model, self.source, self.device, self.capacity = model, source, torch.device(device), capacity
        self.dtype = dtype  # floating-point weights are cast to it as they are read; None: as stored
        self.blocks = model.get_submodule(blocks_path)
        self._paths = {id(b): f"{blocks_path}.{i}" for i, b in enumerate(self.blocks)}
        self._owner = {id(m): b for b in self.blocks for m in b.modules()}  # any module inside -> its block
        self._resident: "OrderedDict[int, nn.Module]" = OrderedDict()  # id(block) -> block, least recent first
        self.loads = 0
        block_ids = {id(p) for p in self.blocks.parameters()}
        outside = {pid: names for pid, names in _aliases(model).items() if pid not in block_ids}
        self._materialise(outside)
        self._load_buffers()
        self._handles = [b.register_forward_pre_hook(self._before_forward) for b in self.blocks]

    def _before_forward(self, block: nn.Module, args: tuple) -> None:
        self(block)  # a whole-model forward reaches each block: make it resident first

    def _load_buffers(self) -> None:
        """Persistent buffers stored in the checkpoint (BatchNorm statistics); computed ones stay as built."""
        for path, owner in self.model.named_modules():
            for attr, b in owner._buffers.items():
                name = f"{path}.{attr}" if path else attr
                if b is not None and name in self.source:
                    owner._buffers[attr] = self.source.read([name])[name].to(self.device)

    def _materialise(self, params: Mapping[int, list[tuple[nn.Module, str, str]]]) -> None:
        wanted = {}
        for pid, names in params.items():
            stored = next((q for _, _, q in names if q in self.source), None)
            if stored is None:
                raise CheckpointError(f"no tensor in {self.source.folder} for parameter {names[0][2]!r}")
            wanted[pid] = stored
        values = self.source.read(wanted.values())
        for pid, names in params.items():
            value = values[wanted[pid]]
            dtype = self.dtype if self.dtype is not None and value.is_floating_point() else value.dtype
            param = nn.Parameter(value.to(self.device, dtype), requires_grad=False)
            for owner, attr, _ in names:
                owner._parameters[attr] = param

    @staticmethod
    def _drop(block: nn.Module) -> None:
        for owner in block.modules():
            for attr, p in owner._parameters.items():
                if p is not None:
                    owner._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def __call__(self, block: nn.Module) -> nn.Module:
        """Make ``block`` (a child of the block list, or any module inside it) resident; returns it."""
        owner = self._owner.get(id(block))
        if owner is None:
            inside = {id(m) for m in block.modules()}
            contained = [b for b in self.blocks if id(b) in inside]
            if contained:  # a module above the blocks (a model solved as one block): all of them, kept
                self.capacity = max(self.capacity, len(contained))
                for b in contained:
                    self(b)
            return block  # outside the blocks: always resident
        key = id(owner)
        if key in self._resident:
            self._resident.move_to_end(key)
            return block
        while len(self._resident) >= self.capacity:
            _, old = self._resident.popitem(last=False)
            self._drop(old)
        path = self._paths[key]
        self._materialise({pid: [(o, a, f"{path}.{q}") for o, a, q in names]
                           for pid, names in _aliases(owner).items()})
        self._resident[key] = owner
        self.loads += 1
        return block

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for block in self._resident.values():
            self._drop(block)
        self._resident.clear()

    def __enter__(self) -> "WeightStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resident(module: nn.Module) -> nn.Module:
    """The default residency: a model in memory is always resident."""
    return module


def meta_inputs(batch: Mapping, rows: int = 2) -> dict:
    """A calibration batch as meta tensors of two rows: enough to trace a skeleton (labels are per dim)."""
    return {k: (v[:rows].to("meta") if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in batch.items()}


__all__ = ["CheckpointError", "CheckpointWeights", "WeightStreamer", "empty_model", "meta_inputs", "resident"]
