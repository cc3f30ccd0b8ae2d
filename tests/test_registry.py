"""The coupling registry is an immutable table; a new op is one entry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import structprune_graph as sp
from structprune_graph import rules
from structprune_graph.zoo import UnknownOpNet


def test_registry_is_immutable():
    registry = sp.default_registry()
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.rules = ()
    with pytest.raises(TypeError):
        registry._by_aten["aten.linear"] = None


def test_one_entry_teaches_a_new_op():
    model = UnknownOpNet().eval()
    x = (torch.randn(3, 8),)
    # fliplr reverses the feature dim: positions carry meaning, so the right rule pins it explicitly
    flip_rule = sp.CouplingRule("fliplr", rules.order_dependent, aten=("aten.fliplr",), functions=(torch.fliplr,),
                                signature=lambda self, dim=1: None)
    graph = sp.trace(model, x, registry=sp.default_registry().with_rules(flip_rule))
    assert graph.unsupported == ()
    fc2 = graph.group("channel:fc2.weight[0]")
    assert not fc2.prunable and "ordered or indexed" in fc2.reason
    # the shared default registry is untouched
    assert sp.default_registry().for_target(torch.fliplr) is None


def test_every_form_of_linear_maps_to_one_rule():
    registry = sp.default_registry()
    by_aten = registry.for_target(torch.ops.aten.linear.default)
    assert by_aten is registry.for_target(torch.nn.functional.linear)
    assert registry.for_module(torch.nn.Linear(2, 2))[0] is by_aten
