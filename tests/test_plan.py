"""Plans serialise to JSON and replay on a fresh copy of the same model bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import structprune_graph as sp
from conftest import random_keep, traced
from structprune_graph.zoo import ZOO, build_eval


@pytest.mark.parametrize("name", ["llama", "gpt2", "densenet_block"])
def test_saved_plan_replays_bit_for_bit_on_a_fresh_model(tmp_path, name):
    entry, model, graph = traced(name)
    keep = random_keep(graph, 7, only_exact=False)
    pruned = sp.apply(model, graph, keep)
    path = sp.Plan.from_keep(graph, model, keep, meta={"method": "random"}).save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["meta"] == {"method": "random"} and set(data["groups"]) == set(keep)

    fresh = build_eval(next(e for e in ZOO if e.name == name))  # a new object, same weights
    replayed = sp.apply_plan(fresh, sp.Plan.load(path), entry.inputs(9))
    a, b = pruned.state_dict(), replayed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_plan_for_another_model_is_refused(tmp_path):
    _, llama, graph = traced("llama")
    plan = sp.Plan.from_keep(graph, llama, random_keep(graph, 0, only_exact=True))
    entry, gpt2, gpt2_graph = traced("gpt2")
    with pytest.raises(sp.PlanMismatchError, match="plan was made for LlamaForCausalLM"):
        sp.apply_plan(gpt2, plan, graph=gpt2_graph)


def test_plan_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    _, model, graph = traced("plain_mlp")
    plan = sp.Plan.from_keep(graph, model, random_keep(graph, 0, only_exact=True))
    plan.save(tmp_path / "p.json")
    plan.save(tmp_path / "p.json")  # overwrite through rename
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    assert sp.Plan.load(tmp_path / "p.json") == plan


def test_unsupported_plan_format(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(sp.PlanMismatchError, match="format 99"):
        sp.Plan.load(tmp_path / "p.json")
