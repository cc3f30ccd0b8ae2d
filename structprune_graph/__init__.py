"""structprune-graph: structured pruning of arbitrary PyTorch models through a traced dependency graph."""

from .api import apply, apply_plan, mask
from .checkpoint import CheckpointPruneResult, prune_checkpoint, streamed
from .errors import (KeepSetError, ModelNotFoundError, PlanMismatchError, RewriteError, StructPruneError,
                     TraceError)
from .graph import DependencyGraph, Group, Member, trace
from .plan import Plan
from .pruning import METHODS, PruneReport, PruneResult, prune
from .storage import load


def export_onnx(*args, **kwargs):
    """See ``structprune_graph.exporters.onnx.export_onnx`` (imported lazily: onnx is heavy)."""
    from structprune_graph.exporters import export_onnx as _export

    return _export(*args, **kwargs)
from .registry import CouplingRule, ModuleForm, Registry, default_registry

__all__ = [
    "trace", "mask", "apply", "apply_plan", "Plan", "DependencyGraph", "Group", "Member", "Registry",
    "CouplingRule", "ModuleForm", "default_registry", "StructPruneError", "TraceError", "KeepSetError",
    "PlanMismatchError", "RewriteError", "ModelNotFoundError", "prune", "load", "METHODS", "PruneResult",
    "PruneReport", "export_onnx", "prune_checkpoint", "streamed", "CheckpointPruneResult",
]
__version__ = "0.1.0"
