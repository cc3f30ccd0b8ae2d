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


def _class_of(group: Group, rule: WidthRule) -> tuple:
    """Groups that move together: with ``uniform``, those of one kind, size and step; otherwise each alone."""
    return (group.kind, group.size, unit_step(group, rule.round_to)) if rule.uniform else (group.id,)


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
            classes.setdefault(_class_of(g, state.rule), []).append(g.id)
        options = {}  # class -> allowed removed counts (common to its groups)
        choice = {}  # class -> index into its options
        for key, gids in classes.items():
            g = by_id[gids[0]]
            options[key] = allowed_removals(g, unit_step(g, state.rule.round_to), min(cap[gid] for gid in gids))
            mean = sum(state.counts.get(gid, 0) for gid in gids) / len(gids)
            choice[key] = min(range(len(options[key])), key=lambda i: (abs(options[key][i] - mean), i))
        ledger = ParamLedger(state.groups, state.param_shapes)
        total = sum(ledger.remove(by_id[gid], u) for key, gids in classes.items() for gid in gids
                    for u in state.order[gid][:options[key][choice[key]]])

        def shift(key, direction: int) -> tuple[int, float]:
            """Move the class one option up (+1: remove more) or down (-1); (signed parameters, error)."""
            i = choice[key]
            lo, hi = sorted((options[key][i], options[key][i + direction]))
            change, error = 0, 0.0
            for gid in classes[key]:
                units = state.order[gid][lo:hi]
                error += sum(state.costs[gid][lo:hi])
                for u in (units if direction > 0 else reversed(units)):
                    change += ledger.remove(by_id[gid], u) if direction > 0 else -ledger.restore(by_id[gid], u)
            choice[key] = i + direction
            return change, error

        def probe(key, direction: int) -> tuple[int, float]:
            change, error = shift(key, direction)
            shift(key, -direction)
            return change, error

        def movable(key, direction: int) -> bool:
            return 0 <= choice[key] + direction < len(options[key])

        while total != state.target:
            direction = 1 if total < state.target else -1
            candidates = []
            for key in (k for k in classes if movable(k, direction)):
                change, error = probe(key, direction)
                if change and abs(total + change - state.target) < abs(total - state.target):
                    # removing: cheapest error per parameter first; restoring: the most costly first
                    candidates.append((direction * error / abs(change), key))
            if not candidates:
                break
            total += shift(min(candidates, key=lambda c: c[0])[1], direction)[0]
        counts = {gid: options[key][choice[key]] for key, gids in classes.items() for gid in gids}
        steps = [abs(probe(key, d)[0]) for key in classes for d in (1, -1) if movable(key, d)]
        return PassResult(RoundedCounts(counts, total, state.target, max(steps, default=0)), modified=False)

    def ensures(self, state: RoundRequest, result: PassResult[RoundedCounts]) -> None:
        by_id = {g.id: g for g in state.groups}
        for gid, n in result.state.counts.items():
            g = by_id[gid]
            kept = g.size - n
            if kept != g.size and kept % unit_step(g, state.rule.round_to):
                raise StructPruneError(f"width rounding pass: group {gid} keeps {kept} units, not a multiple of "
                                       f"{state.rule.round_to} channels")
        seen: dict[tuple, int] = {}
        for gid, n in result.state.counts.items():
            key = _class_of(by_id[gid], state.rule)
            if seen.setdefault(key, n) != n:
                raise StructPruneError(f"width rounding pass: group {gid} removes {n} units, another of its "
                                       f"kind {seen[key]}; uniform widths were asked for")
