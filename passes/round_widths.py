"""Width rounding pass: kept widths that hardware and stock runtimes like.

- ``round_to`` N: every group keeps a number of units whose channels are a multiple of N (a unit of c
  channels steps by N / gcd(N, c) units: MLP channels by N, 64-channel heads by 1 for N = 8), or all its
  units. Odd widths cost speed (a 1,000-wide matmul runs slower than a 1,024-wide one on most kernels).
- ``uniform``: the groups of one kind and size keep the same number of units, so one config describes every
  layer (stock ``from_pretrained``, runtimes that take one width per kind).
The allocation's counts are rounded (uniform: the class's mean count first) to the nearest allowed value,
then the budget is met again: whole steps (uniform: one step of every group of a class at once) are
removed or restored, the lowest error per parameter first, while that brings the total closer to the
target. The result misses the target by at most one step of the coarsest class. An analysis pass: it
changes counts, never weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group

from ._infra import Pass, PassResult
from .allocate import ParamLedger


@dataclass(frozen=True)
class WidthRule:
    round_to: int = 1  # kept channels of every group: a multiple of this (or all of them)
    uniform: bool = False  # the same kept count in every group of a kind and size

    @property
    def identity(self) -> bool:
        return self.round_to == 1 and not self.uniform

    def __post_init__(self) -> None:
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise StructPruneError(f"round_to must be a positive whole number of channels, got {self.round_to!r}")


@dataclass(frozen=True)
class RoundRequest:
    groups: tuple[Group, ...]
    counts: Mapping[str, int]  # group id -> units removed (as allocated)
    order: Mapping[str, Sequence[int]]  # group id -> units in removal order (at least max_remove of them)
    costs: Mapping[str, Sequence[float]]  # group id -> error of removing each unit of ``order`` (>= 0)
    param_shapes: Mapping[str, tuple[int, ...]]
    target: int  # parameters to remove
    rule: WidthRule
    max_remove: Optional[Mapping[str, int]] = None  # most units a group may lose (default: len(order))


@dataclass(frozen=True)
class RoundedCounts:
    counts: Mapping[str, int]
    removed_params: int
    target_params: int
    step_params: int  # parameters of the coarsest step: the budget is met to within it


def unit_step(group: Group, round_to: int) -> int:
    """Units per step so that the kept channels stay a multiple of ``round_to``."""
    channels = 0
    for indices in group.members[0].indices:
        channels = math.gcd(channels, len(indices))
    return round_to // math.gcd(round_to, max(channels, 1))


def allowed_removals(group: Group, step: int, cap: int) -> list[int]:
    """Removed counts whose kept width is a multiple of the step (or keeps everything), within the cap."""
    keeps = {group.size} | {k for k in range(step, group.size + 1, step) if k >= group.min_keep}
    return sorted(group.size - k for k in keeps if group.size - k <= cap)


class RoundWidthsPass(Pass[RoundRequest, RoundedCounts]):
    def requires(self, state: RoundRequest) -> None:
        unknown = [gid for gid in state.counts if gid not in {g.id for g in state.groups}]
        if unknown:
            raise StructPruneError(f"width rounding pass: counts for unknown groups {unknown[:3]}")

    def call(self, state: RoundRequest) -> PassResult[RoundedCounts]:
        by_id = {g.id: g for g in state.groups}
        cap = {g.id: (state.max_remove or {}).get(g.id, len(state.order[g.id])) for g in state.groups}
        classes: dict[tuple, list[str]] = {}
        for g in state.groups:
            key = (g.kind, g.size, unit_step(g, state.rule.round_to)) if state.rule.uniform else (g.id,)
            classes.setdefault(key, []).append(g.id)
        options = {}  # class -> allowed removed counts (common to its groups)
        choice = {}  # class -> index into its options
        for key, gids in classes.items():
            g = by_id[gids[0]]
            limit = min(cap[gid] for gid in gids)
            options[key] = allowed_removals(g, unit_step(g, state.rule.round_to), limit)
            mean = sum(state.counts.get(gid, 0) for gid in gids) / len(gids)
            choice[key] = min(range(len(options[key])), key=lambda i: (abs(options[key][i] - mean), i))
        ledger = ParamLedger(state.groups, state.param_shapes)
        total = 0
        for key, gids in classes.items():
            for gid in gids:
                for u in state.order[gid][:options[key][choice[key]]]:
                    total += ledger.remove(by_id[gid], u)

        def move(key, direction: int, apply: bool) -> tuple[int, float]:
            """Parameters (signed) and error of moving the class one option up (+1) or down (-1)."""
            i = choice[key]
            a, b = options[key][i], options[key][i + direction]
            lo, hi = min(a, b), max(a, b)
            change, error = 0, 0.0
            for gid in classes[key]:
                units = state.order[gid][lo:hi]
                error += sum(state.costs[gid][lo:hi])
                for u in (units if direction > 0 else reversed(units)):
                    change += ledger.remove(by_id[gid], u) if direction > 0 else -ledger.restore(by_id[gid], u)
            if not apply:  # undo
                for gid in classes[key]:
                    units = state.order[gid][lo:hi]
                    for u in (reversed(units) if direction > 0 else units):
                        (ledger.restore if direction > 0 else ledger.remove)(by_id[gid], u)
            else:
                choice[key] = i + direction
            return change, error

        while total != state.target:
            direction = 1 if total < state.target else -1
            candidates = []
            for key in classes:
                if not 0 <= choice[key] + direction < len(options[key]):
                    continue
                change, error = move(key, direction, apply=False)
                if change and abs(total + change - state.target) < abs(total - state.target):
                    # removing: cheapest error per parameter first; restoring: the most costly first
                    candidates.append((direction * error / abs(change), key))
            if not candidates:
                break
            key = min(candidates, key=lambda c: c[0])[1]
            total += move(key, direction, apply=True)[0]
        counts = {gid: options[key][choice[key]] for key, gids in classes.items() for gid in gids}
        steps = [abs(move(key, d, apply=False)[0]) for key in classes for d in (1, -1)
                 if 0 <= choice[key] + d < len(options[key])]
        return PassResult(RoundedCounts(counts, total, state.target, max(steps, default=0)), modified=False)

    def ensures(self, state: RoundRequest, result: PassResult[RoundedCounts]) -> None:
        by_id = {g.id: g for g in state.groups}
        for gid, n in result.state.counts.items():
            g = by_id[gid]
            kept = g.size - n
            if kept != g.size and (kept * len(g.members[0].indices[0])) % state.rule.round_to:
                raise StructPruneError(f"width rounding pass: group {gid} keeps {kept} units, not a multiple of "
                                       f"{state.rule.round_to} channels")
        if state.rule.uniform:
            seen: dict[tuple, int] = {}
            for gid, n in result.state.counts.items():
                g = by_id[gid]
                if seen.setdefault((g.kind, g.size), n) != n:
                    raise StructPruneError(f"width rounding pass: group {gid} removes {n} units, another of its "
                                           f"kind {seen[(g.kind, g.size)]}; uniform widths were asked for")
