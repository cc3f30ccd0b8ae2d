"""Block sensitivity pass (passes/sensitivity.py): the mean squared loss gradient per channel and token at
each block's output, equal to a direct autograd computation; SolverConfig(block_energy="gradient") scales
the dense sweep's curves by it and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.passes.sensitivity import BlockSensitivityPass, SensitivityRequest
from structprune_graph.pruning import select_groups
from structprune_graph.solver import SolverConfig, prepare
from test_pruning import lm_batches


def test_sensitivity_is_the_mean_squared_loss_gradient_at_each_block_output():
    model = traced("llama")[1]
    batches = lm_batches(3)
    graph = sp.trace(model, batches[0])
    state = prepare(model, graph, select_groups(graph), batches, SolverConfig())
    found = BlockSensitivityPass()(SensitivityRequest(model, state.partition, batches)).state.per_block
    layers = model.model.layers
    sums, count = [0.0] * len(layers), [0] * len(layers)
    for batch in batches:  # direct: keep every layer's output, then read its .grad
        outs = []
        handles = [layer.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
                   for layer in layers]
        try:
            with torch.enable_grad():
                model.model.embed_tokens.weight.requires_grad_(True)
                loss = model(**batch, labels=batch["input_ids"]).loss
                for o in outs:
                    o.retain_grad()
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
        for i, o in enumerate(outs):
            sums[i] += float((o.grad.double() ** 2).sum())
            count[i] += o.grad.numel()
    torch.testing.assert_close(torch.tensor(found), torch.tensor([s / c for s, c in zip(sums, count)]))


def test_gradient_block_energy_scales_each_blocks_curves_and_leaves_the_model_alone():
    model = traced("llama")[1]
    batches = lm_batches(3)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = sp.trace(model, batches[0])
    groups = select_groups(graph)
    plain = prepare(model, graph, groups, batches, SolverConfig())
    scaled = prepare(model, graph, groups, batches, SolverConfig(block_energy="gradient"))
    f = BlockSensitivityPass()(SensitivityRequest(model, plain.partition, batches)).state.per_block
    for block, energy, fb in zip(plain.partition.blocks, plain.calibration.input_energy, f):
        for gid in block.group_ids:
            a, b = plain.calibration.curves[gid], scaled.calibration.curves[gid]
            assert a.order == b.order
            torch.testing.assert_close(torch.tensor(b.increments), torch.tensor(a.increments) * energy * fb)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())
    result = sp.prune(model, batches, 0.3, solver=SolverConfig(block_energy="gradient"))
    assert abs(result.report.sparsity_achieved - 0.3) < 0.02


def test_gradient_block_energy_needs_a_loss():
    entry, model, _ = traced("bert")
    with pytest.raises(sp.StructPruneError, match="needs a model that returns a loss"):
        sp.prune(model, [entry.inputs(s) for s in range(2)], 0.3, solver=SolverConfig(block_energy="gradient"))


def test_gradient_block_energy_is_refused_for_streamed_weights_before_any_sweep():
    model = traced("llama")[1]
    batches = lm_batches(2)
    graph = sp.trace(model, batches[0])
    swept = []
    with pytest.raises(sp.StructPruneError, match="block_energy='stream' with --stream or --distributed"):
        prepare(model, graph, select_groups(graph), batches, SolverConfig(block_energy="gradient"),
                resident=lambda module: swept.append(module) or module)  # a streamer stand-in
    assert not swept  # refused up front, not after the dense sweep
