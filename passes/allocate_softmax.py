"""Softmax allocation pass: spread one global budget of parameters over the groups (cells: one kind of
group in one block) by their energy.

A cell c (P_c parameters) has the energy E_c = log of the relative error per parameter removed when c
loses the uniform fraction of its units (from its block-wise error curve), centred on the median cell.
The budget R goes to the cells as

    R_c = R * P_c exp(-E_c / tau) / sum_c' P_c' exp(-E_c' / tau)

clipped to [0, params of the cell's ``max_remove`` units] with the excess redistributed among the cells
below their cap, then rounded down to whole units; the total is then made exact by adding (or taking
back) single units in the order of their marginal error per parameter, until one more unit would miss
the target by more than it does now. tau -> inf gives every cell the same fraction (``uniform``); tau -> 0
fills the cells in order of energy (the greedy order). ``global-threshold`` keeps a unit iff its marginal
error per parameter is at least lambda, lambda set by the budget. With ``evaluate`` and several taus, the
tau of the lowest calibration loss is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group

from ._infra import Pass, PassResult
from .allocate import ParamLedger, prunable_params
from .blockwise_calibrate import GroupCurve

STRATEGIES = ("softmax", "uniform", "global-threshold")
DEFAULT_TAUS = (0.25, 0.5, 1.0, 2.0, math.inf)
TINY = 1e-30

Counts = Mapping[str, int]


@dataclass(frozen=True)
class SoftmaxAllocationRequest:
    groups: tuple[Group, ...]  # the groups the budget is spread over (each with a curve)
    curves: Mapping[str, GroupCurve]
    sparsity: float  # of the prunable parameters of ``groups`` (or of ``budget_of`` when given)
    param_shapes: Mapping[str, tuple[int, ...]]
    strategy: str = "softmax"
    taus: tuple[float, ...] = DEFAULT_TAUS
    evaluate: Optional[Callable[[Counts], float]] = field(default=None, compare=False)  # counts -> loss
    budget_of: Optional[tuple[Group, ...]] = None  # groups whose parameters define the budget


@dataclass(frozen=True)
class SoftmaxAllocation:
    counts: Mapping[str, int]  # group id -> units removed
    target_params: int
    removed_params: int
    tau: Optional[float]
    energies: Mapping[str, float]  # group id -> E_c (log relative error per parameter, median 0)
    losses: Mapping[float, float] = field(default_factory=dict)  # tau -> calibration loss


def _prefix_params(group: Group, curve: GroupCurve, k: int) -> int:
    return sum(group.unit_params[u] for u in curve.order[:k])


def energies(groups: tuple[Group, ...], curves: Mapping[str, GroupCurve], sparsity: float) -> dict[str, float]:
    raw = {}
    for g in groups:
        curve = curves[g.id]
        k = min(max(1, round(sparsity * g.size)), len(curve.order))
        raw[g.id] = math.log(max(curve.error(k) / max(_prefix_params(g, curve, k), 1), TINY)) if k else 0.0
    median = sorted(raw.values())[len(raw) // 2] if raw else 0.0
    return {gid: e - median for gid, e in raw.items()}


def _softmax_shares(groups: tuple[Group, ...], curves: Mapping[str, GroupCurve], energy: Mapping[str, float],
                    budget: float, tau: float) -> dict[str, float]:
    size = {g.id: float(sum(g.unit_params)) for g in groups}
    cap = {g.id: float(_prefix_params(g, curves[g.id], len(curves[g.id].order))) for g in groups}
    low = min(energy.values()) if energy else 0.0
    weight = {gid: size[gid] * (1.0 if math.isinf(tau) else math.exp(-(energy[gid] - low) / tau)) for gid in size}
    share, open_cells, left = {gid: 0.0 for gid in size}, set(size), budget
    while left > 1e-9 and open_cells:
        total_w = sum(weight[g] for g in open_cells)
        if total_w <= 0:  # every open cell has a vanishing weight: fill them in energy order
            gid = min(open_cells, key=lambda g: energy[g])
            add = min(left, cap[gid] - share[gid])
            share[gid] += add
            left -= add
            open_cells.discard(gid)
            continue
        spill = 0.0
        for gid in list(open_cells):
            want = share[gid] + left * weight[gid] / total_w
            share[gid] = min(want, cap[gid])
            spill += want - share[gid]
            if share[gid] >= cap[gid] - 1e-9:
                open_cells.discard(gid)
        left = spill
    return share


def _units_within(group: Group, curve: GroupCurve, params: float) -> int:
    """The number of units (in the curve's order) whose parameters come closest to ``params``."""
    k, spent = 0, 0
    while k < len(curve.order):
        cost = group.unit_params[curve.order[k]]
        if abs(spent + cost - params) >= abs(spent - params):
            break
        spent += cost
        k += 1
    return k


def _make_exact(groups: tuple[Group, ...], curves: Mapping[str, GroupCurve], counts: dict[str, int],
                shapes: Mapping[str, tuple[int, ...]], target: int) -> int:
    """Add or take back single units (cheapest marginal error per parameter first) until the total is
    as close to the target as one unit allows; returns the removed parameter count (exact, per tensor)."""
    by_id = {g.id: g for g in groups}
    ledger = ParamLedger(groups, shapes)
    total = sum(ledger.remove(by_id[gid], u) for gid, n in counts.items() for u in curves[gid].order[:n])

    def marginal(gid: str, k: int) -> float:
        return curves[gid].increments[k] / max(by_id[gid].unit_params[curves[gid].order[k]], 1)

    while total != target:
        if total < target:
            options = sorted((marginal(g, counts[g]), g) for g in counts if counts[g] < len(curves[g].order))
        else:
            options = sorted((-marginal(g, counts[g] - 1), g) for g in counts if counts[g] > 0)
        for _, gid in options:
            group = by_id[gid]
            if total < target:
                unit = curves[gid].order[counts[gid]]
                change = ledger.remove(group, unit, dry_run=True)
            else:
                unit = curves[gid].order[counts[gid] - 1]
                change = -ledger.restore(group, unit, dry_run=True)
            if abs(total + change - target) < abs(total - target):
                if change >= 0:
                    ledger.remove(group, unit)
                    counts[gid] += 1
                else:
                    ledger.restore(group, unit)
                    counts[gid] -= 1
                total += change
                break
        else:
            return total
    return total


class SoftmaxAllocatePass(Pass[SoftmaxAllocationRequest, SoftmaxAllocation]):
    def requires(self, state: SoftmaxAllocationRequest) -> None:
        if state.strategy not in STRATEGIES:
            raise StructPruneError(f"softmax allocation pass: unknown strategy {state.strategy!r}; choose {STRATEGIES}")
        if not 0.0 <= state.sparsity < 1.0:
            raise StructPruneError(f"softmax allocation pass: sparsity must be in [0, 1), got {state.sparsity}")
        if not state.taus or any(t <= 0 for t in state.taus):
            raise StructPruneError(f"softmax allocation pass: taus must be positive, got {state.taus}")
        missing = [g.id for g in state.groups if g.id not in state.curves]
        if missing:
            raise StructPruneError(f"softmax allocation pass: groups without an error curve: {missing[:3]}")

    def allocate(self, state: SoftmaxAllocationRequest, tau: float, target: int, energy: Mapping[str, float]) -> tuple[dict, int]:
        groups, curves = state.groups, state.curves
        if state.strategy == "global-threshold":
            marginals = sorted((curves[g.id].increments[k] / max(g.unit_params[curves[g.id].order[k]], 1), g.id)
                               for g in groups for k in range(len(curves[g.id].order)))
            counts = {g.id: 0 for g in groups}
            spent = 0
            by_id = {g.id: g for g in groups}
            for _, gid in marginals:  # lambda rises until the budget is spent
                if spent >= target:
                    break
                if counts[gid] < len(curves[gid].order):
                    spent += by_id[gid].unit_params[curves[gid].order[counts[gid]]]
                    counts[gid] += 1
        else:
            shares = _softmax_shares(groups, curves, energy, target, math.inf if state.strategy == "uniform" else tau)
            counts = {g.id: _units_within(g, curves[g.id], shares[g.id]) for g in groups}
        return counts, _make_exact(groups, curves, counts, state.param_shapes, target)

    def call(self, state: SoftmaxAllocationRequest) -> PassResult[SoftmaxAllocation]:
        target = round(state.sparsity * prunable_params(state.budget_of or state.groups, state.param_shapes))
        energy = energies(state.groups, state.curves, state.sparsity)
        taus = state.taus if state.strategy == "softmax" else (math.inf,)
        if len(taus) == 1 or state.evaluate is None:
            counts, removed = self.allocate(state, taus[0], target, energy)
            return PassResult(SoftmaxAllocation(counts, target, removed, taus[0], energy), modified=False)
        losses, best = {}, None
        for tau in taus:
            counts, removed = self.allocate(state, tau, target, energy)
            losses[tau] = float(state.evaluate(counts))
            if best is None or losses[tau] < best[0]:
                best = (losses[tau], tau, counts, removed)
        _, tau, counts, removed = best
        return PassResult(SoftmaxAllocation(counts, target, removed, tau, energy, losses), modified=False)

    def ensures(self, state: SoftmaxAllocationRequest, result: PassResult[SoftmaxAllocation]) -> None:
        alloc = result.state
        for g in state.groups:
            n = alloc.counts[g.id]
            if not 0 <= n <= len(state.curves[g.id].order) or g.size - n < g.min_keep:
                raise StructPruneError(f"softmax allocation pass: group {g.id} removes {n} of {g.size} units")
        coarsest = max((max(g.unit_params) for g in state.groups if g.unit_params), default=0)
        if abs(alloc.removed_params - alloc.target_params) > coarsest:
            raise StructPruneError(f"softmax allocation pass: removed {alloc.removed_params} parameters for a target of "
                                   f"{alloc.target_params}: the groups cannot meet the budget within their caps "
                                   f"(SolverConfig.max_prune, prune_margin); lower the sparsity or raise them")
