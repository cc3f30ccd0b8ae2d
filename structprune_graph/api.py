"""The public functions: trace a model, mask or apply keep-sets, replay a plan."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from structprune_graph.passes import ApplyPass, MaskPass, RewriteRequest

from .graph import DependencyGraph, trace
from .plan import Plan
from .tracing import ExampleInputs


def mask(model: nn.Module, graph: DependencyGraph, keep: Mapping[str, Any]) -> nn.Module:
    """A copy of ``model`` with the same shapes whose removed units contribute nothing (zeroed)."""
    return MaskPass()(RewriteRequest(model, graph, keep)).state


def apply(model: nn.Module, graph: DependencyGraph, keep: Mapping[str, Any]) -> nn.Module:
    """A physically smaller copy of ``model`` keeping, for each group id in ``keep``, the listed units."""
    return ApplyPass()(RewriteRequest(model, graph, keep)).state


def apply_plan(model: nn.Module, plan: Plan, example_inputs: Optional[ExampleInputs] = None,
               graph: Optional[DependencyGraph] = None) -> nn.Module:
    """Replay a saved plan on a fresh copy of the same model (traced on ``example_inputs`` unless a
    graph is given); the result's weights equal the original pruning's bit for bit."""
    if graph is None:
        if example_inputs is None:
            raise ValueError("apply_plan needs example_inputs (to trace the model) or a graph")
        graph = trace(model, example_inputs)
    plan.check(model, graph)
    return apply(model, graph, plan.keep)
