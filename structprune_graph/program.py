"""Pruning as a compile-time pass: an ``ExportedProgram`` (or an fx ``GraphModule``) in, a pruned one out,
which the user's build continues with (``torch.compile``, ``torch.onnx.export``, ``ExecuTorch``...).

``ExportedProgram.module()`` gives a flat graph: layers are ``aten.linear`` calls on ``get_attr``
parameters under plain ``nn.Module`` owners. ``lift_linear_layers`` turns each such call back into an
``nn.Linear`` submodule holding the *same* parameters under the same names, so the pipeline (tracing,
consumer statistics, rewrite) runs on it as on an eager model; the input program is never modified.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import torch
from torch import fx, nn

from .errors import StructPruneError
from .pruning import PruneResult, prune

logger = logging.getLogger(__name__)

LINEAR_TARGETS = (torch.ops.aten.linear.default, torch.nn.functional.linear)

Program = Union[torch.export.ExportedProgram, fx.GraphModule]


@dataclass(frozen=True)
class PrunedProgram:
    program: Program  # the same kind as the input: an ExportedProgram or a GraphModule
    result: PruneResult = field(repr=False)


def _param_of(gm: fx.GraphModule, node: Any) -> tuple[str, nn.Parameter] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else gm
    param = getattr(value, node.target.rpartition(".")[2], None)
    return (node.target, param) if isinstance(param, nn.Parameter) else None


def lift_linear_layers(gm: fx.GraphModule) -> int:
    """In place: ``linear(x, owner.weight, owner.bias)`` -> ``owner(x)`` with ``owner`` an ``nn.Linear`` that
    holds the same parameter objects. Returns the number of lifted calls; other calls are left alone."""
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        x, w_node, b_node = (list(node.args) + [node.kwargs.get("bias")])[:3]
        weight, bias = _param_of(gm, w_node), _param_of(gm, b_node) if b_node is not None else None
        if weight is None or (b_node is not None and bias is None):
            continue
        owner = weight[0].rpartition(".")[0]
        if not owner or weight[0] != f"{owner}.weight" or (bias and bias[0] != f"{owner}.bias"):
            continue
        old = gm.get_submodule(owner)
        if isinstance(old, nn.Linear) or list(old.children()) or \
                set(dict(old.named_parameters())) - {"weight", "bias"} or len(w_node.users) > 1:
            continue  # owner is already a layer, holds more than this call's parameters, or is shared
        layer = nn.Linear(weight[1].shape[1], weight[1].shape[0], bias=bias is not None)
        layer.weight = weight[1]
        if bias is not None:
            layer.bias = bias[1]
        parent, _, name = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner, (x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in (w_node, b_node):
            if attr is not None and not attr.users:
                gm.graph.erase_node(attr)
        lifted += 1
    gm.graph.lint()
    gm.recompile()
    return lifted


def prune_program(program: Program, calibration: Iterable[Any], sparsity: float, method: str = "structprune",
                  **prune_kwargs: Any) -> PrunedProgram:
    """Prune ``program`` (calibrated on inputs it accepts) and return the pruned program: re-exported
    when an ExportedProgram came in (on its own example inputs), a GraphModule otherwise."""
    if isinstance(program, torch.export.ExportedProgram):
        module = program.module()
        example = program.example_inputs
    elif isinstance(program, fx.GraphModule):
        module, example = copy.deepcopy(program), None
    else:
        raise StructPruneError(f"prune_program takes a torch.export.ExportedProgram or an fx.GraphModule, not "
                               f"{type(program).__name__}; for an nn.Module use structprune_graph.prune")
    lifted = lift_linear_layers(module)
    logger.info("prune_program: %d linear calls lifted to layers", lifted)
    result = prune(module, calibration, sparsity, method, **prune_kwargs)
    if not isinstance(program, torch.export.ExportedProgram):
        return PrunedProgram(result.model, result)
    if example is None:
        raise StructPruneError("prune_program: the ExportedProgram has no example inputs to re-export with; "
                               "export it with torch.export.export(model, args, kwargs)")
    args, kwargs = example
    return PrunedProgram(torch.export.export(result.model, tuple(args), dict(kwargs or {}), strict=False), result)
