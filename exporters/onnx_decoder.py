"""ONNX decoder with a KV cache, for token-by-token generation (dense or pruned causal LMs).

Inputs: ``input_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence) and, per layer i,
``past.i.key`` / ``past.i.value`` (batch, KV heads of layer i, past, head_dim); outputs: ``logits`` and
``present.i.key`` / ``present.i.value`` (past + sequence positions). The head counts are read from the
model's own cache after one forward, so a pruned model's per-layer KV heads are what the file declares.
A generation starts with empty pasts (length 0) and feeds each step's presents back as the next pasts.

The wrapper rebuilds a transformers ``DynamicCache`` from the flat tensors and calls the model with it,
so the exported graph is the model's own attention code (``torch.onnx.export(dynamo=True)``, opset 20).
Batch, sequence, past and total length are dynamic. ``validate_decoder`` runs a greedy generation in
onnxruntime against PyTorch's with a cache (the same tokens), and a batch of 3 after a past the model
produced itself (logits and presents within tolerance).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import nn

from structprune_graph.errors import StructPruneError
from structprune_graph.evaluate import cache_argument as _cache_argument
from structprune_graph.evaluate import present_cache as _present
from structprune_graph.tracing import traceable_experts

from .onnx import OPSET, TWO_GB, ExportError, providers


class DecoderValidationError(StructPruneError):
    """onnxruntime's generation differs from PyTorch's."""


@dataclass(frozen=True)
class CacheLayout:
    kv_heads: tuple[int, ...]  # per layer
    head_dims: tuple[int, ...]  # per layer

    def names(self) -> list[str]:
        return [f"past.{i}.{kind}" for i in range(len(self.kv_heads)) for kind in ("key", "value")]

    def empty(self, batch: int = 1, length: int = 0, seed: int = -1) -> list[torch.Tensor]:
        """Past tensors of ``length`` positions (zeros, or random with a ``seed``)."""
        gen = torch.Generator().manual_seed(seed) if seed >= 0 else None
        make = (lambda s: torch.randn(s, generator=gen)) if gen is not None else torch.zeros
        return [make((batch, h, length, d)) for h, d in zip(self.kv_heads, self.head_dims) for _ in range(2)]


@dataclass(frozen=True)
class DecoderExportResult:
    path: Path
    layout: CacheLayout
    file_bytes: int
    seconds: float
    greedy_tokens: tuple[int, ...]
    max_abs_diff: float


class _DecoderWithCache(nn.Module):
    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers, self.cache_arg = model, layers, _cache_argument(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.cache_arg: cache})
        present = [t for layer in _present(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_layout(model: nn.Module) -> CacheLayout:
    """Per-layer KV heads and head_dim, read from the cache of one forward on two tokens."""
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
        layers = _present(out).layers
    except Exception as err:  # noqa: BLE001 - re-raised typed with the cause
        raise ExportError(f"{type(model).__name__}: no KV cache from a forward with use_cache=True "
                          f"({type(err).__name__}: {err}); export it without a cache (export_onnx)") from err
    return CacheLayout(tuple(int(layer.keys.shape[1]) for layer in layers),
                       tuple(int(layer.keys.shape[3]) for layer in layers))


def export_decoder(model: nn.Module, path: Union[str, Path], *, prompt: Sequence[int] = tuple(range(1, 17)),
                   steps: int = 16, validate: bool = True, opset: int = OPSET) -> DecoderExportResult:
    """Export ``model`` (a transformers causal LM, dense or pruned) with past/present key-value tensors to
    ``path`` (atomically) and, unless ``validate=False``, check it with ``validate_decoder``."""
    from torch.export import Dim

    path = Path(path)
    layout = cache_layout(model)
    wrapper = _DecoderWithCache(model, len(layout.kv_heads)).eval()
    ids = torch.ones(2, 3, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.long)
    past = layout.empty(batch=2, length=4, seed=0)
    batch, seq = Dim("batch", min=1, max=1024), Dim("sequence", min=1, max=8192)
    past_len, total = Dim("past", min=0, max=8192), Dim("total", min=1, max=16384)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))
    names = layout.names()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), traceable_experts(model):
            program = torch.onnx.export(wrapper, (ids, mask, *past), dynamo=True, opset_version=opset,
                                        input_names=["input_ids", "attention_mask", *names],
                                        output_names=["logits", *(n.replace("past.", "present.") for n in names)],
                                        dynamic_shapes=dynamic, verbose=False)
    except Exception as err:  # noqa: BLE001 - re-raised typed, with the cause attached
        raise ExportError(f"torch.onnx.export(dynamo=True) of {type(model).__name__} with a KV cache failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        program.save(str(tmp / path.name), external_data=weight_bytes > TWO_GB)
        for produced in tmp.iterdir():
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    tokens, diff = (), 0.0
    if validate:
        tokens, diff = validate_decoder(path, model, prompt, steps=steps)
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return DecoderExportResult(path, layout, size, seconds, tokens, diff)


class OnnxGenerator:
    """Greedy generation with an exported decoder in onnxruntime (batch 1)."""

    def __init__(self, path: Union[str, Path], layout: CacheLayout, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers())
        self.layout = layout

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits, presents) for ``ids`` (1, sequence) after ``past``."""
        total = ids.shape[1] + past[0].shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), dtype=np.int64)}
        feeds.update(zip(self.layout.names(), past))
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def greedy(self, prompt: Sequence[int], steps: int) -> list[int]:
        """``steps`` greedy tokens after ``prompt``, from empty pasts."""
        past = [t.numpy() for t in self.layout.empty()]
        logits, past = self.step(np.array([list(prompt)], dtype=np.int64), past)
        tokens: list[int] = []
        for _ in range(steps):
            tokens.append(int(np.argmax(logits[0, -1])))
            if len(tokens) == steps:
                break
            logits, past = self.step(np.array([[tokens[-1]]], dtype=np.int64), past)
        return tokens


def validate_decoder(path: Union[str, Path], model: nn.Module, prompt: Sequence[int], *, steps: int = 16,
                     atol: float = 1e-4, rtol: float = 1e-4) -> tuple[tuple[int, ...], float]:
    """Greedy generation in onnxruntime from empty pasts equals PyTorch's with a KV cache; the prompt's
    logits and, for a batch of 3 after the model's own past of 5 random tokens, logits and presents are
    within ``atol + rtol * max|reference|``. Returns (tokens, largest difference)."""
    from structprune_graph.evaluate import greedy_tokens

    layout = cache_layout(model)
    generator = OnnxGenerator(path, layout)
    ours = generator.greedy(prompt, steps)
    theirs = greedy_tokens(model, prompt, steps)
    if ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        raise DecoderValidationError(f"{path}: onnxruntime's greedy tokens differ from PyTorch's at step {first} "
                                     f"({ours[first]} vs {theirs[first]})")
    wrapper = _DecoderWithCache(model, len(layout.kv_heads)).eval()
    gen = torch.Generator().manual_seed(1)
    vocab = int(model.config.vocab_size)
    prefix = torch.randint(0, vocab, (3, 5), generator=gen)
    with torch.no_grad():  # a past the model itself produced (random keys would be far off its scale)
        own = _present(model(input_ids=prefix, use_cache=True)).layers
    cases = [(torch.tensor([list(prompt)]), layout.empty()),
             (torch.randint(0, vocab, (3, 4), generator=gen),
              [t.clone() for layer in own for t in (layer.keys, layer.values)])]
    worst = 0.0
    for ids, past in cases:
        with torch.no_grad():
            want = wrapper(ids, torch.ones(ids.shape[0], ids.shape[1] + past[0].shape[2], dtype=torch.long), *past)
        logits, present = generator.step(ids.numpy(), [p.numpy() for p in past])
        for name, got, ref in zip(["logits", *(n.replace("past.", "present.") for n in layout.names())],
                                  [logits, *present], want):
            diff = float(np.abs(got - ref.numpy()).max())
            bound = atol + rtol * float(ref.abs().max())
            if diff > bound:
                raise DecoderValidationError(f"{path}: output {name} for input {tuple(ids.shape)} after a past of "
                                             f"{past[0].shape[2]} differs from PyTorch by {diff:.3g} (allowed {bound:.3g})")
            worst = max(worst, diff)
    return tuple(ours), worst
