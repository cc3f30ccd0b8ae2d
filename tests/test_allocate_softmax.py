"""Softmax allocation: exact budget, its two limits (tau -> inf: equal shares; tau -> 0: greedy order),
the global threshold, and the choice of tau on a loss."""

from __future__ import annotations

import math

import pytest

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group, Member
from structprune_graph.passes.allocate_softmax import SoftmaxAllocatePass, SoftmaxAllocationRequest
from structprune_graph.passes.blockwise_calibrate import GroupCurve

WIDTH = 10  # each unit is one row of a (units, WIDTH) weight: WIDTH parameters


def _group(i: int, size: int = 20) -> Group:
    member = Member(f"layer{i}.weight", 0, True, tuple((u,) for u in range(size)))
    return Group(f"g{i}", "mlp_channel", size, True, None, True, (member,), (WIDTH,) * size)


def _case(scales=(1.0, 4.0, 16.0, 64.0), size=20, cap=16):
    groups = tuple(_group(i, size) for i in range(len(scales)))
    # error per unit grows along the order; a group's scale sets its energy
    curves = {g.id: GroupCurve(tuple(range(cap)), tuple(s * (1 + k / cap) for k in range(cap)))
              for g, s in zip(groups, scales)}
    shapes = {f"layer{i}.weight": (size, WIDTH) for i in range(len(scales))}
    return groups, curves, shapes


def _run(sparsity, strategy="softmax", taus=(1.0,), evaluate=None, **case):
    groups, curves, shapes = _case(**case)
    return SoftmaxAllocatePass()(SoftmaxAllocationRequest(groups, curves, sparsity, shapes, strategy, taus,
                                                          evaluate)).state


@pytest.mark.parametrize("strategy", ["softmax", "uniform", "global-threshold"])
@pytest.mark.parametrize("sparsity", [0.1, 0.35, 0.5])
def test_budget_is_exact_to_a_unit(strategy, sparsity):
    alloc = _run(sparsity, strategy)
    assert alloc.target_params == round(sparsity * 4 * 20 * WIDTH)
    assert abs(alloc.removed_params - alloc.target_params) <= WIDTH // 2
    assert alloc.removed_params == WIDTH * sum(alloc.counts.values())


def test_infinite_tau_gives_equal_shares():
    alloc = _run(0.5, taus=(math.inf,))
    assert set(alloc.counts.values()) == {10}
    assert _run(0.5, "uniform").counts == alloc.counts


def test_large_tau_approaches_equal_shares_and_small_tau_the_greedy_order():
    warm = _run(0.5, taus=(1e6,)).counts
    assert max(warm.values()) - min(warm.values()) <= 1
    cold = _run(0.3, taus=(1e-4,)).counts  # 24 units: the lowest-energy group fills to its cap first
    assert cold == {"g0": 16, "g1": 8, "g2": 0, "g3": 0}


def test_lower_energy_gets_more_at_moderate_tau():
    counts = _run(0.4, taus=(1.0,)).counts
    assert counts["g0"] >= counts["g1"] >= counts["g2"] >= counts["g3"]
    assert counts["g0"] > counts["g3"]


def test_cap_is_respected_and_excess_redistributed():
    alloc = _run(0.7, taus=(1e-3,))  # 56 units wanted, 16 per group at most
    assert max(alloc.counts.values()) <= 16
    assert sum(alloc.counts.values()) == 56


def test_global_threshold_removes_the_lowest_marginal_errors():
    counts = _run(0.3, "global-threshold").counts  # 24 units; g0's marginals (1..2) beat g1's (4..8)
    assert counts == {"g0": 16, "g1": 8, "g2": 0, "g3": 0}


def test_tau_is_chosen_by_the_lowest_loss():
    seen = []

    def loss(counts):  # pretend the uniform split is best
        seen.append(dict(counts))
        return float(max(counts.values()) - min(counts.values()))

    alloc = _run(0.5, taus=(0.5, 2.0, math.inf), evaluate=loss)
    assert len(seen) == 3 and alloc.tau == math.inf
    assert set(alloc.losses) == {0.5, 2.0, math.inf}


def test_bad_requests_are_refused():
    with pytest.raises(StructPruneError, match="unknown strategy 'greedy'"):
        _run(0.3, "greedy")
    with pytest.raises(StructPruneError, match="taus must be positive"):
        _run(0.3, taus=(0.0,))
    with pytest.raises(StructPruneError, match="cannot meet the budget"):
        _run(0.95)  # 76 units wanted, the caps allow 64
