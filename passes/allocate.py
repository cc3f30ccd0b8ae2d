"""Allocation pass: turn unit scores into keep-sets that remove a target number of parameters.

- ``uniform``: every group removes (as nearly as units allow) the same fraction of its units (local
  pruning, as the Wanda-sp and magnitude baselines do).
- ``global``: units of all groups are ranked together and the lowest are removed until the budget is
  met; ``per_param`` ranks by score per parameter removed (units of different cost, e.g. heads and MLP
  channels, compete fairly), otherwise by the raw (e.g. standardised) score as FLAP does.
Every group keeps at least ``min_keep`` units. The budget counts the parameters the selected groups
remove; the achieved count differs from the target by less than one unit.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    strategy: str = "uniform"
    per_param: bool = True


@dataclass(frozen=True)
class Allocation:
    keep: Mapping[str, tuple[int, ...]]
    target_params: int
    removed_params: int


def prunable_params(groups: tuple[Group, ...]) -> int:
    return sum(sum(g.unit_params) for g in groups)


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
        target = round(state.sparsity * prunable_params(state.groups))
        removed: dict[str, set[int]] = {g.id: set() for g in state.groups}
        if state.strategy == "uniform":
            counts = self._uniform_counts(state.groups, state.sparsity, target)
            for g in state.groups:
                order = sorted(range(g.size), key=lambda u: (state.scores.per_unit[g.id][u], u))
                removed[g.id] = set(order[: counts[g.id]])
        else:
            candidates = []
            for g in state.groups:
                for u, score in enumerate(state.scores.per_unit[g.id]):
                    cost = g.unit_params[u]
                    candidates.append((score / cost if state.per_param else score, g.id, u, cost))
            candidates.sort()
            room = {g.id: g.size - g.min_keep for g in state.groups}
            total = 0
            for _, gid, u, cost in candidates:
                if total >= target:
                    break
                if room[gid] == 0 or total + cost - target > target - total:  # overshoot > undershoot: skip
                    continue
                removed[gid].add(u)
                room[gid] -= 1
                total += cost
        by_id = {g.id: g for g in state.groups}
        keep = {gid: tuple(u for u in range(by_id[gid].size) if u not in gone) for gid, gone in removed.items()}
        done = sum(by_id[gid].unit_params[u] for gid, gone in removed.items() for u in gone)
        return PassResult(Allocation(keep, target, done), modified=bool(done))

    @staticmethod
    def _uniform_counts(groups: tuple[Group, ...], sparsity: float, target: int) -> dict[str, int]:
        """Water-filling: repeatedly take one more unit from the group whose removed fraction would stay
        the lowest, while that brings the total closer to the parameter target. Every group ends near the
        same fraction; coarse groups (3 head slots) are cut only when their share is due."""
        import heapq

        counts = {g.id: 0 for g in groups}
        cost = {g.id: sum(g.unit_params) / g.size for g in groups}
        heap = [(1 / g.size, g.id, g.size, g.size - g.min_keep) for g in groups if g.size > g.min_keep]
        heapq.heapify(heap)
        total = 0.0
        while heap:
            _, gid, size, room = heapq.heappop(heap)
            if abs(total + cost[gid] - target) >= abs(total - target):
                continue  # this group's unit overshoots; a cheaper one may still fit
            counts[gid] += 1
            total += cost[gid]
            if counts[gid] < room:
                heapq.heappush(heap, ((counts[gid] + 1) / size, gid, size, room))
        return counts

    def ensures(self, state: AllocationRequest, result: PassResult[Allocation]) -> None:
        for g in state.groups:
            if len(result.state.keep[g.id]) < g.min_keep:
                raise StructPruneError(f"allocation pass: group {g.id} keeps fewer than {g.min_keep} units")
