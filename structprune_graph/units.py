"""Compact units: which indices of which parameter dimension each unit (channel, head) owns.

A model has a unit per MLP channel, head and hidden channel of every layer: hundreds of thousands of
(unit, dimension) pairs for a deep model. A Python tuple per pair costs ~80 bytes and dominated the
streaming solver's memory on deep models; here a member keeps one flat int32 array with unit offsets,
and the units are read off the resolved components with numpy, without a Python object per unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch


class UnitIndices(Sequence):
    """Per unit, the sorted indices it owns in one dim: ``indices[u]`` is a tuple of ints."""

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = np.ascontiguousarray(flat, dtype=np.int32)  # (indices,)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)  # (units + 1,)

    @classmethod
    def of(cls, units: Sequence[Sequence[int]]) -> "UnitIndices":
        lens = np.array([len(u) for u in units], dtype=np.int64)
        flat = np.fromiter((i for u in units for i in u), dtype=np.int32, count=int(lens.sum()))
        return cls(flat, np.r_[0, np.cumsum(lens)])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, u: Any) -> Any:
        if isinstance(u, slice):
            return tuple(self[i] for i in range(*u.indices(len(self))))
        if u < 0:
            u += len(self)
        if not 0 <= u < len(self):
            raise IndexError(u)
        return tuple(self.flat[self.offsets[u]: self.offsets[u + 1]].tolist())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return (self[u] for u in range(len(self)))

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)  # (units,)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UnitIndices):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.flat, other.flat)
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.flat.tobytes(), self.offsets.tobytes()))

    def __repr__(self) -> str:
        return f"UnitIndices({len(self)} units, {len(self.flat)} indices)"

    def __reduce__(self):
        return UnitIndices, (self.flat, self.offsets)


def unit_tensors(indices: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per unit, its indices as a long tensor (views of one tensor for ``UnitIndices``: an MLP's thousands of
    units cost one conversion, not one each)."""
    if isinstance(indices, UnitIndices):
        return list(torch.from_numpy(indices.flat.astype(np.int64)).split(indices.sizes().tolist()))
    return [torch.tensor(u, dtype=torch.long) for u in indices]


def per_unit_sum(values: torch.Tensor, indices: Sequence[Sequence[int]]) -> torch.Tensor:
    """(channels,) ``values`` -> (units,) float64, each unit's sum over the channels it owns."""
    columns = unit_tensors(indices)
    sizes = torch.tensor([len(c) for c in columns], dtype=torch.long)
    unit = torch.repeat_interleave(torch.arange(len(columns)), sizes)  # (owned channels,)
    owned = values.double()[torch.cat(columns)] if columns else values.new_zeros(0, dtype=torch.float64)
    return torch.zeros(len(columns), dtype=torch.float64).index_add_(0, unit, owned)


@dataclass(frozen=True)
class UnitTable:
    """The units of a resolution: atoms sorted by (component, space, index), cut into *runs* (one
    component in one space) and runs into components. Only components that hold a parameter atom and
    that some rule touched are kept."""

    local: np.ndarray  # (atoms,) index within its dim, in sorted order
    run_lo: np.ndarray  # (runs,) first sorted atom of each run
    run_hi: np.ndarray  # (runs,)
    run_space: np.ndarray  # (runs,) space index of each run
    comp: np.ndarray  # (units,) component id of each kept unit
    comp_run_lo: np.ndarray  # (units,) its first run
    comp_run_hi: np.ndarray  # (units,)
    first_atom: np.ndarray  # (units,) its smallest atom id (the order units are listed in)

    @staticmethod
    def build(spaces: Sequence[Any], component: np.ndarray, degree: np.ndarray) -> "UnitTable":
        sizes = np.array([s.size for s in spaces], dtype=np.int64)
        starts = np.array([s.start for s in spaces], dtype=np.int64)
        space_idx = np.repeat(np.arange(len(spaces)), sizes)
        local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        atom_ids = np.repeat(starts, sizes) + local
        comps = component[atom_ids]
        order = np.lexsort((local, space_idx, comps))
        local, space_idx, atom_ids, comps = local[order], space_idx[order], atom_ids[order], comps[order]
        run_lo = np.r_[0, np.flatnonzero((np.diff(comps) != 0) | (np.diff(space_idx) != 0)) + 1]
        run_hi = np.r_[run_lo[1:], len(comps)]
        run_comp, run_space = comps[run_lo], space_idx[run_lo]
        comp_run_lo = np.r_[0, np.flatnonzero(np.diff(run_comp) != 0) + 1]
        comp_run_hi = np.r_[comp_run_lo[1:], len(run_lo)]
        is_param = np.array([s.is_param for s in spaces], dtype=bool)
        has_param = np.logical_or.reduceat(is_param[run_space], comp_run_lo)
        atom_lo, atom_hi = run_lo[comp_run_lo], run_hi[comp_run_hi - 1]
        first_atom = np.minimum.reduceat(atom_ids, atom_lo)
        # a lone atom no rule consumed (e.g. a conv kernel tap) is not a unit
        untouched = (atom_hi - atom_lo == 1) & (degree[atom_ids[atom_lo]] == 0)
        kept = has_param & ~untouched  # buffer-only units (position ids, rotary tables) are not structure
        return UnitTable(local, run_lo, run_hi, run_space, run_comp[comp_run_lo][kept], comp_run_lo[kept],
                         comp_run_hi[kept], first_atom[kept])

    def __len__(self) -> int:
        return len(self.comp)

    def signature(self, i: int) -> tuple[int, ...]:
        """The space indices unit ``i`` touches, ascending."""
        return tuple(self.run_space[self.comp_run_lo[i]: self.comp_run_hi[i]].tolist())

    def member(self, units: np.ndarray, k: int) -> UnitIndices:
        """The indices the given units (positions, all of one signature) own in their k-th space."""
        runs = self.comp_run_lo[units] + k
        lo, lens = self.run_lo[runs], self.run_hi[runs] - self.run_lo[runs]
        offsets = np.r_[0, np.cumsum(lens)]
        gather = np.repeat(lo - offsets[:-1], lens) + np.arange(offsets[-1])
        return UnitIndices(self.local[gather], offsets)

    def members(self, i: int) -> dict[int, list[int]]:
        """Space index -> indices, for one unit (the few units grouped by hand: GQA lanes)."""
        return {int(self.run_space[r]): self.local[self.run_lo[r]: self.run_hi[r]].tolist()
                for r in range(self.comp_run_lo[i], self.comp_run_hi[i])}
