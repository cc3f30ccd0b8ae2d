"""The foundation invariants on every zoo model: exact rewrite, apply == mask, predicted sizes,
untouched inputs."""

from __future__ import annotations

import copy

import pytest
import torch

import structprune_graph as sp
from conftest import random_keep, run, traced


def test_keeping_every_unit_changes_nothing(zoo_model):
    entry, model, graph = zoo_model
    x = entry.inputs(1)
    full = {g.id: list(range(g.size)) for g in graph.groups}
    pruned = sp.apply(model, graph, full)
    torch.testing.assert_close(run(pruned, x), run(model, x), atol=1e-6, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_apply_equals_mask_for_exact_groups(zoo_model, seed):
    entry, model, graph = zoo_model
    keep = random_keep(graph, seed, only_exact=True)
    assert keep, f"{entry.name}: no mask-exact prunable group found"
    x = entry.inputs(2)
    pruned, masked = sp.apply(model, graph, keep), sp.mask(model, graph, keep)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(run(pruned, x), run(masked, x), atol=1e-5, rtol=0)
    assert not torch.allclose(run(masked, x), run(model, x)), "masking half the units must change the output"


def test_pruning_every_group_runs_finite_with_predicted_params(zoo_model):
    entry, model, graph = zoo_model
    keep = random_keep(graph, 3, only_exact=False)
    pruned = sp.apply(model, graph, keep)
    out = run(pruned, entry.inputs(4))
    assert torch.isfinite(out).all()
    assert out.shape == run(model, entry.inputs(4)).shape
    assert sum(p.numel() for p in pruned.parameters()) == graph.param_count(keep)


def test_each_group_removes_params_per_unit(zoo_model):
    entry, model, graph = zoo_model
    dense = sum(p.numel() for p in model.parameters())
    for g in graph.prunable_groups:
        keep = {g.id: list(range(g.size - 1))}  # drop the last unit
        pruned = sp.apply(model, graph, keep)
        assert dense - sum(p.numel() for p in pruned.parameters()) == g.unit_params[-1], g.id


def test_input_model_is_not_modified(zoo_model):
    entry, model, graph = zoo_model
    before = copy.deepcopy(model.state_dict())
    keep = random_keep(graph, 5, only_exact=False)
    sp.apply(model, graph, keep)
    sp.mask(model, graph, keep)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("name", ["plain_mlp", "densenet_block", "grouped_conv"])
def test_symbolic_trace_frontend_agrees_with_export(name):
    _, _, exported = traced(name, "export")
    entry, model, fx_graph = traced(name, "fx")
    assert fx_graph.captured.frontend == "fx"
    shape = lambda g: sorted((grp.kind, grp.size, grp.prunable, tuple(sorted(m.label for m in grp.members)))
                             for grp in g.groups)
    assert shape(fx_graph) == shape(exported)
    keep = random_keep(fx_graph, 0, only_exact=True)
    torch.testing.assert_close(run(sp.apply(model, fx_graph, keep), entry.inputs(1)),
                               run(sp.mask(model, fx_graph, keep), entry.inputs(1)), atol=1e-5, rtol=0)



def test_prunable_param_count_counts_each_parameter_once():
    _, model, graph = traced("plain_mlp")  # fc1 12->32, fc2 32->24, fc3 24->5
    # fc1 rows and fc2 rows are prunable, so everything but fc3's 5 bias entries touches a prunable index,
    # fc2's weight counted once although its rows and columns belong to two groups
    assert graph.prunable_param_count() == sum(p.numel() for p in model.parameters()) - 5


def test_prunable_param_count_with_overlapping_gqa_groups():
    _, model, graph = traced("llama")  # kv_group and query_head both cover the q rows
    per_layer = sum(p.numel() for n, p in model.named_parameters()
                    if ".layers.0." in n and ("_proj" in n))  # q, k, v, o, gate, up, down
    assert graph.prunable_param_count() == 2 * per_layer


def _kinds(graph):
    return sorted({g.kind for g in graph.prunable_groups})


def _of_kinds(keep, graph, kinds):
    kind = {g.id: g.kind for g in graph.groups}
    return {gid: units for gid, units in keep.items() if kind[gid] in kinds}


def test_every_kind_alone_and_together_prunes_exactly(zoo_model):
    """The property over the whole zoo: random keep-sets of each prunable kind alone, then of all kinds
    together, run with finite outputs, equal the masked model where every pruned group is mask-exact, and
    remove exactly the parameters that masking zeroes (counted on a copy whose parameters are all nonzero)."""
    entry, model, graph = zoo_model
    x = entry.inputs(6)
    nonzero = copy.deepcopy(model)
    with torch.no_grad():
        for p in nonzero.parameters():
            p.copy_(p.abs() + 0.5)
    dense = sum(p.numel() for p in model.parameters())
    kinds = _kinds(graph)
    assert kinds, entry.name
    for chosen in [[k] for k in kinds] + [kinds]:
        keep = _of_kinds(random_keep(graph, 7, only_exact=False), graph, chosen)
        pruned = sp.apply(model, graph, keep)
        out = run(pruned, x)
        assert torch.isfinite(out).all(), (entry.name, chosen)
        by_id = {g.id: g for g in graph.groups}
        if all(by_id[gid].mask_exact for gid in keep):
            torch.testing.assert_close(out, run(sp.mask(model, graph, keep), x), atol=1e-5, rtol=0)
        zeroed = sum(int((p == 0).sum()) for p in sp.mask(nonzero, graph, keep).parameters())
        assert dense - sum(p.numel() for p in pruned.parameters()) == zeroed, (entry.name, chosen)
