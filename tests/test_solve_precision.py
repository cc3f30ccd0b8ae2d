"""The block solve's forwards in bf16 (``SolverConfig.solve_precision``): the blocks' branches compute in bf16,
H is still summed in float32 from their inputs, the residual stream between blocks stays float32, and the
re-fitted weights stay within a few percent of the float32 solve's on the same keep-set."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune_graph as sp
from conftest import traced
from structprune_graph.passes.blockwise_calibrate import StatsCollector
from structprune_graph.passes.solve import BlockSolvePass, BlockSolveRequest
from structprune_graph.pruning import select_groups
from structprune_graph.solver import SolverConfig, prepare
from test_pruning import lm_batches


def test_h_is_summed_in_float32_from_a_bf16_forward():
    """Inside a bf16 autocast region the second layer's input is bf16; its H is that input's exact float32
    gram (a gram computed in bf16 would round every sum: about 1e-3 relative)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 8))
    x = torch.randn(4, 96, 64)  # (batch, tokens, d_in)
    stats = StatsCollector(module, ["1"], torch.float32)
    seen = []
    handle = module[1].register_forward_pre_hook(lambda layer, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            module(x)
    finally:
        stats.close()
        handle.remove()
    assert seen[0].dtype == torch.bfloat16
    flat = seen[0].reshape(-1, 256).double()  # (tokens, 256)
    exact = flat.T @ flat  # (256, 256)
    error = float((stats.hessians["1"].double() - exact).norm() / exact.norm())
    in_bf16 = flat.bfloat16().T @ flat.bfloat16()  # what the hook's product would give under the autocast
    assert error < 1e-6 < 1e-4 < float((in_bf16.double() - exact).norm() / exact.norm())


def _solve(model, state, counts, precision, keep=None):
    seen = []

    def record(layer, args, out):
        seen.append(out.dtype)

    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(record)
    try:
        return BlockSolvePass()(BlockSolveRequest(model, state.partition, state.groups, state.inputs, counts,
                                                  fixed_keep=keep, statistics_dtype=torch.float32,
                                                  precision=precision)).state, set(seen)
    finally:
        hook.remove()


def test_bf16_block_solve_refits_the_same_keep_set_within_a_few_percent():
    model = traced("llama")[1]
    batches = lm_batches(4)
    graph = sp.trace(model, batches[0])
    groups = select_groups(graph)
    state = prepare(model, graph, groups, batches, SolverConfig(block_energy="stream", taylor_first=0.0,
                                                                obs_weighting="none"))
    placed = [gid for b in state.partition.blocks for gid in b.group_ids]
    counts = {gid: state.groups[gid].size // 3 for gid in placed}
    exact, seen32 = _solve(model, state, counts, None)
    half, seen16 = _solve(model, state, counts, torch.bfloat16, keep=exact.keep)  # the same units: re-fit only
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}
    assert half.keep == exact.keep and exact.new_weights.keys() == half.new_weights.keys()
    for name, w in exact.new_weights.items():
        assert half.new_weights[name].dtype == torch.float32
        assert (half.new_weights[name] - w).norm() < 3e-2 * w.norm(), name
    torch.testing.assert_close(torch.tensor(half.block_errors), torch.tensor(exact.block_errors), rtol=0.1, atol=1e-4)


def test_solve_precision_reaches_the_report_and_auto_follows_the_device(monkeypatch):
    import structprune_graph.passes.sensitivity as sensitivity

    model = traced("llama")[1]
    batches = lm_batches(4)
    half = sp.prune(model, batches, 0.3, solver=SolverConfig(solve_precision="bfloat16"))
    assert half.report.solver["solve_precision"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in half.model.parameters())
    for native, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(sensitivity, "native_bf16", lambda device, native=native: native)
        auto = SolverConfig(solve_precision="auto", sensitivity_precision="float32")
        got = sp.prune(model, batches, 0.3, solver=auto)
        assert got.report.solver["solve_precision"] == want
    with pytest.raises(sp.StructPruneError, match="unknown solve_precision 'fp8'.*choose one of"):
        SolverConfig(solve_precision="fp8")
