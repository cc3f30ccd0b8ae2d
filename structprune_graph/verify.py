"""Invariants checked after every pass (``verify``): a broken invariant is a bug, reported with the
group and tensor it concerns, never a silently wrong model."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from torch import nn

from .errors import StructPruneError
from .graph import DependencyGraph


class InvariantError(StructPruneError, AssertionError):
    """An internal invariant does not hold (please report it with the model that triggers it)."""


def verify_graph(graph: DependencyGraph) -> None:
    """Every group: all members list one index set per unit; units are disjoint and in range within each
    member; in a group of one kind no (tensor, dim) index belongs to two units."""
    shapes = {**graph.param_shapes, **graph.buffer_shapes}
    for g in graph.groups:
        if g.size != len(g.unit_params):
            raise InvariantError(f"group {g.id}: {g.size} units but {len(g.unit_params)} parameter counts")
        for m in g.members:
            if len(m.indices) != g.size:
                raise InvariantError(f"group {g.id}: member {m.label} lists {len(m.indices)} units, not {g.size}")
            flat = [i for unit in m.indices for i in unit]
            if len(flat) != len(set(flat)):
                raise InvariantError(f"group {g.id}: member {m.label} gives one index to two units")
            size = shapes[m.name][m.dim]
            if flat and (min(flat) < 0 or max(flat) >= size):
                raise InvariantError(f"group {g.id}: member {m.label} has indices outside 0..{size - 1}")


def verify_rewrite(graph: DependencyGraph, keep: Mapping[str, Sequence[int]], model: nn.Module,
                   added: Optional[Sequence[str]] = ()) -> None:
    """A rewritten model: every tensor has exactly the kept sizes; nothing but ``added`` (e.g. biases
    created by compensation) is new; every kept index map is ascending and within its dim."""
    kept = graph.kept_indices(keep)
    for (name, dim), indices in kept.items():
        size = (graph.param_shapes.get(name) or graph.buffer_shapes[name])[dim]
        if indices != sorted(set(indices)) or (indices and (indices[0] < 0 or indices[-1] >= size)):
            raise InvariantError(f"rewrite of {name}[{dim}]: the kept indices are not an ascending map into 0..{size - 1}")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, shape in {**graph.param_shapes, **graph.buffer_shapes}.items():
        want = tuple(len(kept[(name, d)]) if (name, d) in kept else s for d, s in enumerate(shape))
        if name in tensors and tuple(tensors[name].shape) != want:
            raise InvariantError(f"rewrite: {name} has shape {tuple(tensors[name].shape)}, expected {want}")
    known = set(graph.param_shapes) | set(graph.buffer_shapes) | {a for names in graph.aliases.values() for a in names}
    extra = [n for n in dict(model.named_parameters()) if n not in known and n.rpartition(".")[0] not in set(added or ())]
    if extra:
        raise InvariantError(f"rewrite created parameters no pass asked for: {extra[:3]}")
