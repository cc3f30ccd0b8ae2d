"""Partition pass: blocks are the chained layers, groups are placed in one block or excluded with a reason,
and a budget below the largest block is an error naming it."""

from __future__ import annotations

import pytest
import torch

from conftest import traced
from structprune_graph.blockwise import chains
from structprune_graph.passes.partition import MemoryBudgetError, PartitionPass, PartitionRequest
from structprune_graph.pruning import select_groups


def _partition(name, budget=None, kinds=None, coupled=True):
    entry, model, graph = traced(name)
    groups = select_groups(graph, kinds)
    return model, PartitionPass()(PartitionRequest(model, graph, groups, 4096, budget, coupled)).state


def test_decoder_layers_are_the_blocks_and_hold_their_groups():
    model, part = _partition("llama")
    assert part.list_path == "model.layers" and [b.path for b in part.blocks] == ["model.layers.0", "model.layers.1"]
    for block in part.blocks:
        assert {gid.split(":")[0] for gid in block.group_ids} and all(block.group_ids)
        assert block.param_bytes == sum(p.numel() * 4 for p in model.get_submodule(block.path).parameters())
    assert not part.excluded
    assert chains(model, model.model.layers, {"input_ids": torch.randint(0, 96, (2, 8))}) is None


def test_groups_spanning_blocks_are_excluded_with_the_reason():
    _, part = _partition("llama", kinds=("hidden", "mlp_channel"))
    (hidden_id, reason), = part.excluded.items()
    assert "spans blocks" in reason and "residual stream" in reason
    assert all(hidden_id not in b.group_ids for b in part.blocks)


def test_a_model_without_a_block_list_is_one_block():
    model, part = _partition("plain_mlp")
    assert part.list_path is None and len(part.blocks) == 1 and part.blocks[0].path == ""


def test_budget_below_the_largest_block_names_it():
    _, part = _partition("llama")
    with pytest.raises(MemoryBudgetError, match=r"below block 'model\.layers\.\d'.*MiB.*Raise --memory-budget"):
        _partition("llama", budget=part.blocks[0].param_bytes // 2)
    _partition("llama", budget=part.peak_bytes)  # exactly enough is fine


def test_the_coupling_step_needs_two_blocks():
    _, alone = _partition("llama", coupled=False)
    _, coupled = _partition("llama", coupled=True)
    assert coupled.peak_bytes == alone.peak_bytes + alone.blocks[1].param_bytes
