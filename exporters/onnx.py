"""ONNX export of dense or pruned models, validated against PyTorch with onnxruntime.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (opset 20). It goes through ``torch.export``, which
captures current transformers models and plain CNNs alike; the TorchScript exporter (``dynamo=False``)
fails on transformers 5's attention-mask code (``aten::diff``), measured here. The model is wrapped to
return one tensor: ``logits`` for language and vision classifiers, ``last_hidden_state`` for encoders.
The batch axis is dynamic (exported from a batch of 2: a batch of 1 gets fixed silently), and so is the
sequence axis of token inputs. Files whose weights exceed 2 GB keep them as external data.

Validation runs onnxruntime (CUDA or TensorRT provider when present, CPU otherwise) and PyTorch on a grid
of fresh random inputs of several shapes and raises ``ExportValidationError`` listing every output whose
largest difference exceeds ``atol + rtol * max|reference|`` (scale-aware: a deep fp32 model's logits of
magnitude ~20-100 differ by ~1e-4-1e-3 in another summation order, while a wrong weight moves them by far more).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from structprune_graph.errors import StructPruneError
from structprune_graph.evaluate import main_output
from structprune_graph.tracing import traceable_experts

OPSET = 20
TWO_GB = 2 * 1024**3


class ExportError(StructPruneError):
    """The model could not be exported to ONNX."""


@dataclass(frozen=True)
class Mismatch:
    output: str
    input_shapes: str
    max_abs_diff: float


class ExportValidationError(StructPruneError):
    """onnxruntime's outputs differ from PyTorch's beyond tolerance."""

    def __init__(self, path: Path, mismatches: Sequence[Mismatch], atol: float, rtol: float) -> None:
        self.mismatches = tuple(mismatches)
        lines = "; ".join(f"output '{m.output}' for inputs {m.input_shapes}: max |diff| {m.max_abs_diff:.3g}"
                          for m in mismatches)
        super().__init__(f"ONNX model {path} does not match PyTorch (atol {atol}, rtol {rtol}): {lines}")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    file_bytes: int
    seconds: float
    providers: tuple[str, ...]
    checked_shapes: tuple[str, ...]
    max_abs_diff: float


class _MainOutput(nn.Module):
    """The model with keyword inputs in a fixed order and one tensor out."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        if "input_ids" in kwargs and _accepts(self.model, "use_cache"):
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        try:
            return main_output(out)
        except TypeError as err:
            raise ExportError(f"{type(self.model).__name__}: {err}; export needs one tensor out") from None


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _as_named(model: nn.Module, example_inputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, Mapping):
        return {k: v for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    import inspect

    names = [p for p in inspect.signature(model.forward).parameters][: len(example_inputs)]
    return dict(zip(names, example_inputs))


def _at_least_two(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of 1 would be fixed in the graph: export from a batch of at least 2."""
    return {k: (v.repeat(2, *([1] * (v.dim() - 1))) if v.dim() and v.shape[0] == 1 else v) for k, v in inputs.items()}


def _dynamic_shapes(inputs: Mapping[str, torch.Tensor]) -> tuple:
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=1024), Dim("sequence", min=2, max=8192)
    shapes = []
    for v in inputs.values():
        axes = {0: batch} if v.dim() else {}
        if v.dim() == 2 and not v.is_floating_point():  # token ids and masks: (batch, sequence)
            axes[1] = seq
        shapes.append(axes)
    return tuple(shapes)


def providers(prefer_gpu: bool = True) -> list[str]:
    """onnxruntime providers in order of preference: TensorRT, CUDA, then CPU, as available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = (["TensorrtExecutionProvider", "CUDAExecutionProvider"] if prefer_gpu else []) + ["CPUExecutionProvider"]
    return [p for p in wanted if p in available]


def export_onnx(model: nn.Module, example_inputs: Any, path: Union[str, Path], *, validate: bool = True,
                atol: float = 1e-4, rtol: float = 1e-4, opset: int = OPSET) -> ExportResult:
    """Export ``model`` (dense or pruned) to ``path`` and, unless ``validate=False``, check it with
    onnxruntime against PyTorch. The file is written atomically; the model is not modified."""
    path = Path(path)
    named = _at_least_two(_as_named(model, example_inputs))
    wrapper = _MainOutput(model, list(named)).eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), traceable_experts(model):
            program = torch.onnx.export(wrapper, tuple(named.values()), dynamo=True, opset_version=opset,
                                        input_names=list(named), output_names=["output"],
                                        dynamic_shapes=(_dynamic_shapes(named),), verbose=False)
    except Exception as err:  # noqa: BLE001 - re-raised typed, with the cause attached
        raise ExportError(f"torch.onnx.export(dynamo=True) failed for {type(model).__name__}: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        program.save(str(tmp / path.name), external_data=weight_bytes > TWO_GB)
        for produced in tmp.iterdir():  # the model file and, for large models, its external data
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    checked, worst, used = (), 0.0, tuple(providers())
    if validate:
        checked, worst, used = validate_onnx(path, model, named, atol=atol, rtol=rtol)
    size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
    return ExportResult(path, opset, size, seconds, used, checked, worst)


def _random_like(name: str, value: torch.Tensor, batch: int, seq: Optional[int], vocab: int,
                 gen: torch.Generator) -> torch.Tensor:
    shape = list(value.shape)
    shape[0] = batch
    if seq is not None and value.dim() == 2:
        shape[1] = seq
    if value.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=value.dtype)
    if "mask" in name:
        return torch.ones(shape, dtype=value.dtype)
    high = int(value.max()) + 1 if name != "input_ids" else vocab
    return torch.randint(0, max(high, 2), shape, generator=gen, dtype=value.dtype)


def validate_onnx(path: Union[str, Path], model: nn.Module, example_inputs: Any, *, atol: float = 1e-4,
                  rtol: float = 1e-4, batches: Sequence[int] = (1, 3), seed: int = 0,
                  prefer_gpu: bool = True) -> tuple[tuple[str, ...], float, tuple[str, ...]]:
    """Run onnxruntime and PyTorch on fresh random inputs (batch 1 and 3; for token inputs two sequence
    lengths) and raise ``ExportValidationError`` with every mismatch. Returns (shapes checked, worst
    difference, providers used)."""
    import onnxruntime as ort

    path = Path(path)
    named = _as_named(model, example_inputs)
    wrapper = _MainOutput(model, list(named)).eval()
    session = ort.InferenceSession(str(path), providers=providers(prefer_gpu))
    vocab = getattr(getattr(model, "config", None), "vocab_size", 2) or 2
    token = any(v.dim() == 2 and not v.is_floating_point() for v in named.values())
    base_seq = next((v.shape[1] for v in named.values() if v.dim() == 2 and not v.is_floating_point()), None)
    seqs = (base_seq, base_seq + 5) if token else (None,)
    gen = torch.Generator().manual_seed(seed)
    mismatches, checked, worst = [], [], 0.0
    for batch in batches:
        for seq in seqs:
            inputs = {k: _random_like(k, v, batch, seq, vocab, gen) for k, v in named.items()}
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in inputs.items())
            with torch.no_grad():
                want = wrapper(*inputs.values()).float()
            got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]).float()
            checked.append(shapes)
            if got.shape != want.shape:
                mismatches.append(Mismatch("output", shapes, float("inf")))
                continue
            diff = (got - want).abs()
            worst = max(worst, float(diff.max()))
            if float(diff.max()) > atol + rtol * float(want.abs().max()):  # scale-aware: logits reach ~10^2
                mismatches.append(Mismatch("output", shapes, float(diff.max())))
    if mismatches:
        raise ExportValidationError(path, mismatches, atol, rtol)
    return tuple(checked), worst, tuple(session.get_providers())
