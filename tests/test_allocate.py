"""Allocation pass: the parameter budget to unit granularity, uniform and global."""

from __future__ import annotations

import pytest

from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.passes.allocate import AllocatePass, AllocationRequest, prunable_params
from structprune_graph.passes.score import Scores


def groups_and_scores(name="llama", kinds=("mlp_channel", "query_head")):
    _, _, graph = traced(name)
    groups = tuple(g for g in graph.prunable_groups if g.kind in kinds)
    scores = Scores({g.id: tuple(float((u * 7919) % 13) for u in range(g.size)) for g in groups})
    return groups, scores, graph


def request(groups, scores, graph, sparsity, strategy="uniform", per_param=True):
    return AllocationRequest(groups, scores, sparsity, graph.param_shapes, strategy, per_param)


@pytest.mark.parametrize("name, kinds", [("llama", ("mlp_channel", "query_head")), ("resnet", ("conv_channel",)),
                                         ("densenet_block", ("conv_channel",))])
@pytest.mark.parametrize("strategy", ["uniform", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.8])
def test_budget_is_exact_to_unit_granularity(name, kinds, strategy, sparsity):
    groups, scores, graph = groups_and_scores(name, kinds)
    result = AllocatePass()(request(groups, scores, graph, sparsity, strategy)).state
    # the ledger's count is the real one, even where groups share weights (conv rows and columns)
    assert result.removed_params == graph.param_count() - graph.param_count(result.keep)
    largest_unit = max(max(g.unit_params) for g in groups)
    assert abs(result.removed_params - sparsity * prunable_params(groups, graph.param_shapes)) <= largest_unit
    assert all(len(result.keep[g.id]) >= 1 for g in groups)


def test_uniform_removes_the_lowest_scores_of_each_group():
    groups, scores, graph = groups_and_scores()
    keep = AllocatePass()(request(groups, scores, graph, 0.5)).state.keep
    for g in groups:
        dropped = set(range(g.size)) - set(keep[g.id])
        kept_min = min(scores.per_unit[g.id][u] for u in keep[g.id])
        assert all(scores.per_unit[g.id][u] <= kept_min for u in dropped)


def test_global_ranks_by_score_per_parameter():
    groups, _, graph = groups_and_scores()
    # every MLP channel (192 params) scores 1, every head slot (4,096 params) 10: per parameter the head
    # slots matter least, by raw score the MLP channels do
    scores = Scores({g.id: tuple(10.0 if g.kind == "query_head" else 1.0 for _ in range(g.size)) for g in groups})
    keep = AllocatePass()(request(groups, scores, graph, 0.1, "global", per_param=True)).state.keep
    assert any(len(keep[g.id]) < g.size for g in groups if g.kind == "query_head")
    keep = AllocatePass()(request(groups, scores, graph, 0.1, "global", per_param=False)).state.keep
    assert all(len(keep[g.id]) == g.size for g in groups if g.kind == "query_head")


def test_bad_requests():
    groups, scores, graph = groups_and_scores()
    with pytest.raises(StructPruneError, match=r"sparsity must be in \[0, 1\)"):
        AllocatePass()(request(groups, scores, graph, 1.0))
    with pytest.raises(StructPruneError, match="unknown strategy"):
        AllocatePass()(request(groups, scores, graph, 0.3, "best"))
