"""Allocation pass: turn unit scores into keep-sets that remove a target number of parameters.

- ``uniform``: every group removes (as nearly as units allow) the same fraction of its units (local
  pruning, as the Wanda-sp and magnitude baselines do).
- ``global``: units of all groups are ranked together and the lowest are removed until the budget is
  met; ``per_param`` ranks by score per parameter removed (units of different cost, e.g. heads and MLP
  channels, compete fairly), otherwise by the raw (e.g. standardised) score as FLAP does.
Every group keeps at least ``min_keep`` units. The budget is exact: groups can share a weight (a conv's
output channels in one group, its input channels in the next), so parameters are counted per tensor from
the kept size of each dim, never by adding per-unit costs. The prunable parameters are those on at least
one index of a selected group; the achieved count differs from the target by less than one unit.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from math import prod
from typing import Mapping

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group

from ._infra import Pass, PassResult
from .score import Scores

ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class AllocationRequest:
    groups: tuple[Group, ...]
    scores: Scores
    sparsity: float  # fraction of the selected groups' parameters to remove
    param_shapes: Mapping[str, tuple[int, ...]]  # every parameter the groups touch, full shape
    strategy: str = "uniform"
    per_param: bool = True


@dataclass(frozen=True)
class Allocation:
    keep: Mapping[str, tuple[int, ...]]
    target_params: int
    removed_params: int


class ParamLedger:
    """Kept size of every dim of every parameter: removing a unit removes exactly prod(before) - prod(after)."""

    def __init__(self, groups: tuple[Group, ...], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.kept = {m.name: list(shapes[m.name]) for g in groups for m in g.members if m.is_param}

    def size(self, name: str) -> int:
        return prod(self.kept[name])

    def remove(self, group: Group, unit: int, dry_run: bool = False) -> int:
        """Parameters the unit's removal takes away now (given what is already gone)."""
        before = {m.name: self.size(m.name) for m in group.members if m.is_param}
        saved = {n: list(v) for n, v in self.kept.items() if n in before}
        for m in group.members:
            if m.is_param:
                self.kept[m.name][m.dim] -= len(m.indices[unit])
        removed = sum(before[n] - self.size(n) for n in before)
        if dry_run:
            self.kept.update(saved)
        return removed

    def restore(self, group: Group, unit: int, dry_run: bool = False) -> int:
        """Parameters putting a removed unit back adds (the inverse of ``remove``)."""
        before = {m.name: self.size(m.name) for m in group.members if m.is_param}
        saved = {n: list(v) for n, v in self.kept.items() if n in before}
        for m in group.members:
            if m.is_param:
                self.kept[m.name][m.dim] += len(m.indices[unit])
        added = sum(self.size(n) - before[n] for n in before)
        if dry_run:
            self.kept.update(saved)
        return added


def prunable_params(groups: tuple[Group, ...], shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Parameters on at least one index of the groups (each counted once)."""
    covered: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        for m in g.members:
            if m.is_param:
                covered.setdefault((m.name, m.dim), set()).update(i for u in m.indices for i in u)
    names = {name for name, _ in covered}
    return sum(prod(shapes[n]) - prod(s - len(covered.get((n, d), ())) for d, s in enumerate(shapes[n]))
               for n in names)


def removal_order(scores: Scores, group: Group) -> list[int]:
    """A group's units, lowest score first (ties by index): the order a score-based method removes them."""
    return sorted(range(group.size), key=lambda u: (scores.per_unit[group.id][u], u))


class AllocatePass(Pass[AllocationRequest, Allocation]):
    def requires(self, state: AllocationRequest) -> None:
        if not 0.0 <= state.sparsity < 1.0:
            raise StructPruneError(f"allocation pass: sparsity must be in [0, 1), got {state.sparsity}")
        if state.strategy not in ALLOCATIONS:
            raise StructPruneError(f"allocation pass: unknown strategy {state.strategy!r}; choose {ALLOCATIONS}")
        missing = [g.id for g in state.groups if g.id not in state.scores.per_unit]
        if missing:
            raise StructPruneError(f"allocation pass: groups without scores: {missing[:3]}")

    def call(self, state: AllocationRequest) -> PassResult[Allocation]:
        target = round(state.sparsity * prunable_params(state.groups, state.param_shapes))
        ledger = ParamLedger(state.groups, state.param_shapes)
        by_id = {g.id: g for g in state.groups}
        order = {g.id: removal_order(state.scores, g) for g in state.groups}
        removed: dict[str, list[int]] = {g.id: [] for g in state.groups}
        total = 0
        if state.strategy == "uniform":
            # water-filling: one more unit from the group whose removed fraction stays the lowest, while
            # that brings the total closer to the target; coarse groups are cut only when their share is due
            heap = [(1 / g.size, g.id) for g in state.groups if g.size > g.min_keep]
            heapq.heapify(heap)
            while heap:
                _, gid = heapq.heappop(heap)
                g = by_id[gid]
                unit = order[gid][len(removed[gid])]
                cost = ledger.remove(g, unit, dry_run=True)
                if abs(total + cost - target) >= abs(total - target):
                    continue  # overshoots; a cheaper group's unit may still fit
                total += ledger.remove(g, unit)
                removed[gid].append(unit)
                if len(removed[gid]) < g.size - g.min_keep:
                    heapq.heappush(heap, ((len(removed[gid]) + 1) / g.size, gid))
        else:
            candidates = sorted(
                ((score / g.unit_params[u] if state.per_param else score), g.id, u)
                for g in state.groups for u, score in enumerate(state.scores.per_unit[g.id]))
            for _, gid, unit in candidates:
                if total >= target:
                    break
                g = by_id[gid]
                if len(removed[gid]) >= g.size - g.min_keep:
                    continue
                cost = ledger.remove(g, unit, dry_run=True)
                if total + cost - target > target - total:  # overshoot larger than the undershoot: skip
                    continue
                total += ledger.remove(g, unit)
                removed[gid].append(unit)
        keep = {gid: tuple(u for u in range(by_id[gid].size) if u not in set(gone)) for gid, gone in removed.items()}
        return PassResult(Allocation(keep, target, total), modified=bool(total))

    def ensures(self, state: AllocationRequest, result: PassResult[Allocation]) -> None:
        for g in state.groups:
            if len(result.state.keep[g.id]) < g.min_keep:
                raise StructPruneError(f"allocation pass: group {g.id} keeps fewer than {g.min_keep} units")
