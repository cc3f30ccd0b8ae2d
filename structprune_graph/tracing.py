"""Front ends: capture a model as a torch.fx graph plus plain values (shapes, ints) for every node.

``torch.export.export(strict=False)`` is the default: it captures current transformers models that
``torch.fx.symbolic_trace`` cannot (measured: Llama and BERT fail under symbolic_trace with
transformers 5). ``symbolic_trace`` serves GraphModules handed in by the user (their graph is what gets
rewritten) and plain modules when asked for, or when export fails.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Union

import torch
from torch import fx, nn

from .errors import TraceError
from .labels import Labelled

logger = logging.getLogger(__name__)

ExampleInputs = Union[tuple, list, Mapping[str, Any], torch.Tensor]


@dataclass(frozen=True)
class Captured:
    frontend: str  # "export" or "fx"
    graph: fx.Graph
    root: nn.Module  # owner of call_module / get_attr targets (the GraphModule for fx)
    state_of: Mapping[str, str]  # placeholder or get_attr node name -> parameter/buffer name
    values: Mapping[str, Any]  # node name -> plain value: Labelled.plain(shape), python value, tuple
    module_path: Mapping[str, str]  # node name -> innermost module path ("" when none)


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tuple of positional tensors or a dict of keyword tensors, "
                     f"got {type(example_inputs).__name__}")


def plain(value: Any) -> Any:
    """A traced value without labels: shapes for tensors, ints for symbolic ints."""
    if isinstance(value, torch.Tensor):
        return Labelled.plain(value.shape)
    if isinstance(value, torch.SymInt):
        return int(value.node.hint) if value.node.hint is not None else int(value)
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode (no dropout, running BN statistics) and give the model back as it came."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:  # not model.eval(): the module of an ExportedProgram refuses it (its mode is fixed)
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# the fused-experts implementation whose graph is plain ATen (index the expert weights by the routed expert,
# then bmm); grouped_mm goes through transformers' own op, which neither the coupling rules nor the ONNX
# exporter know
TRACEABLE_EXPERTS = "batched_mm"


@contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """Run transformers mixture-of-experts layers (fused expert tensors) with ``batched_mm`` while the
    model is traced or exported, and give the model back with the implementations it came with (a pruned
    layer may have a config of its own: ``passes/rewrite.py``). The expert tensors are sliced uniformly,
    so every implementation runs the pruned model."""
    configs = {id(c): c for c in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]
               if c is not None and getattr(c, "_experts_implementation", None) not in (None, TRACEABLE_EXPERTS)}
    saved = {key: c._experts_implementation for key, c in configs.items()}
    for c in configs.values():
        c._experts_implementation = TRACEABLE_EXPERTS
    try:
        yield
    finally:
        for key, c in configs.items():
            c._experts_implementation = saved[key]


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """transformers decoders return a KV cache object that export cannot return; ask for none."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    if "use_cache" in params and "use_cache" not in kwargs:
        return {**kwargs, "use_cache": False}
    return kwargs


def capture_export(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    with traceable_experts(model):
        ep = torch.export.export(model, args, kwargs=_without_cache(model, kwargs), strict=False)
    state_of = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind in (torch.export.graph_signature.InputKind.PARAMETER,
                         torch.export.graph_signature.InputKind.BUFFER):
            state_of[spec.arg.name] = spec.target
    values, module_path = {}, {}
    for node in ep.graph.nodes:
        values[node.name] = plain(node.meta.get("val"))
        stack = node.meta.get("nn_module_stack") or {}
        module_path[node.name] = list(stack.values())[-1][0] if stack else ""
    return Captured("export", ep.graph, model, state_of, values, module_path)


class _ValueRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n.name] = plain(result)
        return result


def capture_fx(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    ordered = list(args) + [kwargs[n.target] for n in placeholders[len(args):] if n.target in kwargs]
    recorder = _ValueRecorder(gm)
    with torch.no_grad():
        recorder.run(*ordered)
    names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    names |= {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    state_of = {n.name: n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in names}
    module_path = {n.name: (n.target if n.op == "call_module" else "") for n in gm.graph.nodes}
    return Captured("fx", gm.graph, gm, state_of, recorder.values, module_path)


def capture(model: nn.Module, example_inputs: ExampleInputs, frontend: str = "auto") -> Captured:
    """Capture ``model`` on ``example_inputs``; raise ``TraceError`` saying what failed and what to do."""
    if frontend not in ("auto", "export", "fx"):
        raise TraceError(f"frontend must be 'auto', 'export' or 'fx', got {frontend!r}")
    args, kwargs = split_inputs(example_inputs)
    if isinstance(model, fx.GraphModule) and frontend == "auto":
        frontend = "fx"
    attempts = ("export", "fx") if frontend == "auto" else (frontend,)
    failures = []
    with eval_mode(model), torch.no_grad():
        for name in attempts:
            try:
                return capture_export(model, args, kwargs) if name == "export" else capture_fx(model, args, kwargs)
            except Exception as err:  # noqa: BLE001 - each failure is reported below, none is swallowed
                logger.debug("%s capture failed", name, exc_info=True)
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                failures.append(f"{'torch.export.export(strict=False)' if name == 'export' else 'torch.fx.symbolic_trace'}"
                                f" failed with {type(err).__name__}: {first}")
    raise TraceError(
        f"could not trace {type(model).__name__}: " + "; ".join(failures) + ". What to do: check that "
        "model(*args, **kwargs) runs on these example inputs; pass inputs as keyword tensors matching "
        "forward()'s parameter names (e.g. {'input_ids': ids}); avoid data-dependent Python control flow "
        "in forward (or move it out of the traced part).")
