"""Channel atoms and per-dimension labels: the data model of the coupling analysis.

Every index of every dimension of every parameter and buffer is one *atom* (an int). While the graph is
interpreted, each tensor carries, per dimension, either a 1-D vector of the atoms that live along it or
``None`` for a data dimension (batch, sequence, spatial) that no parameter controls. Coupling rules
*union* atoms that must be removed together, *pin* atoms that must never be removed (they meet a
fixed-size dimension, a model output, an op without a rule) and *flag* atoms whose removal is not the
same as zeroing them (they are reduced over by a mean, a norm, a softmax). Nothing is resolved while
rules run: the unions are edges, and connected components are computed once at the end.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

Label = Optional[torch.Tensor]  # 1-D int64 atoms along one dimension, or None for a data dimension


@dataclass(frozen=True)
class Space:
    """One dimension of one parameter or buffer: the atoms ``start .. start + size - 1``."""

    name: str  # fully qualified name, e.g. "model.layers.0.mlp.up_proj.weight"
    dim: int
    size: int
    is_param: bool
    start: int


@dataclass(frozen=True)
class GqaSite:
    """Where query heads share KV heads: the query-head atoms and each head's slot (lane) in its KV group."""

    query_heads: torch.Tensor  # (heads,) atoms
    lanes: torch.Tensor  # (heads,) slot of each query head within its KV group
    module: str


def repeat_lanes(heads: torch.Tensor) -> Optional[torch.Tensor]:
    """For a head label with repeated atoms (a KV head repeated for its query heads), each position's
    slot among the copies of its atom; None when no atom repeats or the repeat count is not uniform."""
    _, inverse, counts = torch.unique(heads, return_inverse=True, return_counts=True)
    if counts.max() == 1 or counts.min() != counts.max():
        return None
    lanes = torch.zeros_like(heads)
    seen: dict[int, int] = {}
    for i, atom in enumerate(inverse.tolist()):
        lanes[i] = seen.get(atom, 0)
        seen[atom] = lanes[i].item() + 1
    return lanes


@dataclass(frozen=True)
class Labelled:
    """A tensor value during the analysis: its concrete shape and the atoms along each dimension."""

    shape: tuple[int, ...]
    dims: tuple[Label, ...]

    def __post_init__(self) -> None:
        assert len(self.shape) == len(self.dims), (self.shape, len(self.dims))
        for size, lab in zip(self.shape, self.dims):
            assert lab is None or lab.numel() == size, (self.shape, [None if d is None else d.numel() for d in self.dims])

    @staticmethod
    def plain(shape: Sequence[int]) -> "Labelled":
        shape = tuple(int(s) for s in shape)
        return Labelled(shape, (None,) * len(shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_labelled(self) -> bool:
        return any(d is not None for d in self.dims)

    def with_dims(self, dims: Sequence[Label], shape: Optional[Sequence[int]] = None) -> "Labelled":
        return Labelled(tuple(int(s) for s in (shape if shape is not None else self.shape)), tuple(dims))


class AtomTable:
    """Allocates atoms for parameter/buffer dimensions and records unions, pins, flags and tags."""

    def __init__(self) -> None:
        self.size = 0
        self.spaces: list[Space] = []
        self._edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._soft_edges: list[tuple[torch.Tensor, torch.Tensor]] = []  # GQA: query heads ~ their shared KV head
        self.pins: list[tuple[torch.Tensor, str]] = []
        self.flags: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.tags: list[tuple[str, torch.Tensor, str]] = []  # (kind, atoms along a head dim, module)
        self.gqa_sites: list[GqaSite] = []

    def allocate(self, name: str, dim: int, size: int, is_param: bool) -> torch.Tensor:
        space = Space(name, dim, size, is_param, self.size)
        self.spaces.append(space)
        self.size += size
        return torch.arange(space.start, space.start + size, dtype=torch.int64)

    def union(self, a: torch.Tensor, b: torch.Tensor, soft: bool = False) -> None:
        """``soft`` marks a coupling that only binds when the shared side is removed: grouped-query
        attention, where removing a KV head removes its query heads but a query head can go alone
        (uniformly across KV groups). Full resolution uses every edge; ``hard_only`` skips soft ones."""
        a, b = torch.broadcast_tensors(a, b)
        (self._soft_edges if soft else self._edges).append((a.reshape(-1), b.reshape(-1)))

    def union_all(self, atoms: torch.Tensor) -> None:
        """Make every atom in ``atoms`` one unit."""
        flat = atoms.reshape(-1)
        if flat.numel() > 1:
            self.union(flat[:1], flat[1:])

    def data_atoms(self, size: int, reason: str) -> torch.Tensor:
        """Fresh pinned atoms for positions that hold data, not channels (e.g. the part of a concat that
        comes from a model input): whatever they are unioned with is pinned too."""
        atoms = torch.arange(self.size, self.size + size, dtype=torch.int64)
        self.size += size
        self.pin(atoms, reason)
        return atoms

    def pin(self, atoms: torch.Tensor, reason: str) -> None:
        """Never remove the units these atoms belong to; ``reason`` says which op and node forbid it."""
        self.pins.append((atoms.reshape(-1).clone(), reason))

    def flag(self, atoms: torch.Tensor, flag: str) -> None:
        self.flags[flag].append(atoms.reshape(-1))

    def tag(self, kind: str, head_atoms: torch.Tensor, module: str) -> None:
        self.tags.append((kind, head_atoms.reshape(-1).clone(), module))

    def degree(self) -> np.ndarray:
        """How many unions and pins touched each atom (0: no rule ever consumed it)."""
        degree = np.zeros(self.size, dtype=np.int64)
        for a, b in self._edges + self._soft_edges:
            np.add.at(degree, a.numpy(), 1)
            np.add.at(degree, b.numpy(), 1)
        for atoms, _ in self.pins:
            np.add.at(degree, atoms.numpy(), 1)
        return degree

    def resolve(self, hard_only: bool = False) -> "Resolution":
        edges = self._edges if hard_only else self._edges + self._soft_edges
        if edges:
            src = torch.cat([a for a, _ in edges]).numpy()
            dst = torch.cat([b for _, b in edges]).numpy()
        else:
            src = dst = np.zeros(0, dtype=np.int64)
        adjacency = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(self.size, self.size))
        _, component = connected_components(adjacency, directed=False)
        return Resolution(self, component.astype(np.int64))


class Resolution:
    """The atoms' connected components: one component is one unit (a set of channels removed together)."""

    def __init__(self, table: AtomTable, component: np.ndarray) -> None:
        self.table = table
        self.component = component
        self.flagged: dict[str, set[int]] = {
            flag: set(np.unique(component[torch.cat(atoms).numpy()]).tolist()) for flag, atoms in table.flags.items()
        }
        self.pin_reason: dict[int, str] = {}  # component -> why it can never be removed
        for atoms, reason in table.pins:  # the first reason recorded wins: it is the closest to the inputs
            for comp in np.unique(component[atoms.numpy()]).tolist():
                self.pin_reason.setdefault(comp, reason)

    def of(self, atoms: torch.Tensor) -> np.ndarray:
        return self.component[atoms.numpy()]
