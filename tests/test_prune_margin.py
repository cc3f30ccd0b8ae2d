"""The allocator's cap per group (SolverConfig.prune_margin): at sparsity s no group loses more than
s + margin of its units (and never more than max_prune, where the dense sweep's curves end); None is
max_prune alone; the budget is still met; the dense sweep is shared by every margin."""

from __future__ import annotations

import math

import pytest

import structprune_graph as sp
from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.pruning import select_groups
from structprune_graph.solver import SolverConfig, allocation_cap
from test_pruning import lm_batches

SHARP = {"taus": (0.25,), "taylor_first": 0.0, "obs_weighting": "none"}  # concentrated counts, fewer sweeps


def _removed_share(result):
    return {g.id: (g.size - len(result.plan.keep.get(g.id, range(g.size)))) / g.size
            for g in select_groups(result.graph)}


def test_the_cap_is_the_sparsity_plus_the_margin_up_to_max_prune():
    assert allocation_cap(SolverConfig(prune_margin=0.2), 0.3) == pytest.approx(0.5)
    assert allocation_cap(SolverConfig(prune_margin=0.2), 0.7) == 0.8
    assert allocation_cap(SolverConfig(prune_margin=None, max_prune=0.9), 0.3) == 0.9
    with pytest.raises(StructPruneError, match="prune_margin is the share of a group"):
        SolverConfig(prune_margin=0.0)


def test_no_group_loses_more_than_the_cap_and_the_budget_is_met():
    model = traced("llama")[1]
    batches = lm_batches(3)
    free = sp.prune(model, batches, 0.3, solver=SolverConfig(prune_margin=None, **SHARP))
    capped = sp.prune(model, batches, 0.3, solver=SolverConfig(prune_margin=0.1, **SHARP), reuse=free)
    sizes = {g.id: g.size for g in select_groups(free.graph)}
    assert max(_removed_share(free).values()) > 0.4  # uncapped, the sharp allocation cuts deeper somewhere
    for gid, share in _removed_share(capped).items():
        assert share * sizes[gid] <= math.floor(0.4 * sizes[gid]), gid
    for r in (free, capped):
        assert abs(r.report.sparsity_achieved - 0.3) < 0.05
    assert _removed_share(capped) != _removed_share(free)
    assert (capped.report.solver["prune_margin"], free.report.solver["prune_margin"]) == (0.1, None)
