"""The order inside each group (SolverConfig.taylor_first, obs_weighting): the block solve removes the first
units by first-order Taylor saliency, |w * dL/dw| summed over the unit's weights, swept block by block
(passes/sensitivity.py) with the memory of one block, and the rest by greedy OBS, whose error may weight each
output channel by the loss's mean squared gradient there. The Taylor scores equal method="taylor-global"'s
whole-model ones and the output Fisher a whole-model backward pass's; the allocation is OBS's; the removed
units are the lowest-scored ones, the re-fit is the one any fixed keep-set gets, and equal output weights
are plain OBS."""

from __future__ import annotations

import pytest
import torch
import transformers

import structprune_graph as sp
from conftest import traced
from structprune_graph.passes import ApplyPass, RewriteRequest
from structprune_graph.passes.calibrate import CalibratePass, CalibrationRequest
from structprune_graph.passes.score import ScorePass, ScoreRequest
from structprune_graph.pruning import select_groups
from structprune_graph.solver import SolverConfig, prepare, reconstruct, solve_dtype
from test_pruning import lm_batches
from test_sensitivity import _saved_llama

PLAIN_OBS = SolverConfig(taylor_first=0.0, obs_weighting="none")  # the order before 2026-12-03


def _taylor_global(model, graph, groups, batches):
    calibration = CalibratePass()(CalibrationRequest(model, graph, tuple(groups), tuple(batches), gradients=True)).state
    return ScorePass()(ScoreRequest(model, tuple(groups), "taylor", calibration)).state.per_unit


@pytest.mark.parametrize("budget", [None, 0], ids=["in-memory", "spilled-to-files"])
def test_block_by_block_taylor_scores_equal_the_whole_models(budget):
    model = traced("llama")[1]
    batches = lm_batches(3)
    graph = sp.trace(model, batches[0])
    groups = select_groups(graph)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    state = prepare(model, graph, groups, batches, SolverConfig(
        taylor_first=1.0, sensitivity_precision="float32", **({} if budget is None else {"buffer_budget": budget})))
    want = _taylor_global(model, graph, groups, batches)
    placed = {gid for b in state.partition.blocks for gid in b.group_ids}
    assert len(state.partition.blocks) > 1 and set(state.unit_scores) == placed
    assert {g.kind for g in groups if g.id in placed} >= {"mlp_channel", "query_head"}  # attention included
    for gid in placed:
        torch.testing.assert_close(torch.tensor(state.unit_scores[gid]), torch.tensor(want[gid]), rtol=1e-4, atol=1e-9)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())


def test_the_taylor_order_removes_the_lowest_scored_units_with_obs_counts_and_the_same_refit():
    model = traced("llama")[1]
    batches = lm_batches(3)
    obs = sp.prune(model, batches, 0.3, solver=PLAIN_OBS)
    taylor = sp.prune(model, batches, 0.3, solver=SolverConfig(taylor_first=1.0, obs_weighting="none"))
    scores = taylor.solver_state.unit_scores
    differs = 0
    for g in select_groups(obs.graph):
        kept_obs, kept = obs.plan.keep.get(g.id, range(g.size)), taylor.plan.keep.get(g.id, range(g.size))
        assert len(kept) == len(kept_obs)  # the allocation is OBS's
        if g.id in scores and len(kept) < g.size:
            ranked = sorted(range(g.size), key=lambda u: scores[g.id][u])
            assert set(ranked[:g.size - len(kept)]) == set(range(g.size)) - set(kept)
            differs += set(kept) != set(kept_obs)
    assert differs  # the orders disagree somewhere on this model
    # the re-fit is the one any fixed keep-set gets
    refit = reconstruct(model, obs.graph, select_groups(obs.graph), taylor.plan.keep, batches, SolverConfig())
    fixed = ApplyPass()(RewriteRequest(model, obs.graph, taylor.plan.keep, {}, refit)).state
    with torch.no_grad():
        torch.testing.assert_close(taylor.model(**batches[0]).logits, fixed(**batches[0]).logits)


def test_the_taylor_order_on_a_model_solved_as_one_block_uses_the_whole_models_gradients():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)} for _ in range(2)]
    graph = sp.trace(model, batches[0])
    groups = select_groups(graph)
    state = prepare(model, graph, groups, batches, SolverConfig(taylor_first=1.0))
    assert len(state.partition.blocks) == 1 and state.unit_scores
    want = _taylor_global(model, graph, groups, batches)
    for gid, scores in state.unit_scores.items():
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(want[gid]), rtol=1e-4, atol=1e-9)


def test_the_taylor_order_streams_from_a_checkpoint_like_the_in_memory_run(tmp_path):
    from structprune_graph.checkpoint import prune_checkpoint

    model, batches = _saved_llama(tmp_path / "tiny", 3)
    solver = SolverConfig(taylor_first=1.0)
    reference = sp.prune(model, batches, 0.3, solver=solver)
    result = prune_checkpoint(tmp_path / "tiny", batches, 0.3, tmp_path / "out", solver=solver)
    assert result.plan.keep == reference.plan.keep


def test_the_taylor_order_needs_a_loss_and_a_known_name():
    entry, model, _ = traced("bert")
    with pytest.raises(sp.StructPruneError, match="taylor_first > 0 and obs_weighting='fisher' need the loss "
                                                  "gradient .*use taylor_first=0"):
        sp.prune(model, [entry.inputs(s) for s in range(2)], 0.3, solver=SolverConfig(taylor_first=1.0))
    with pytest.raises(sp.StructPruneError, match="unknown obs_weighting 'wanda'"):
        SolverConfig(obs_weighting="wanda")
    with pytest.raises(sp.StructPruneError, match="taylor_first is a fraction of a group's units, in \\[0, 1\\]"):
        SolverConfig(taylor_first=1.5)


def test_a_dense_sweep_without_taylor_scores_is_not_reused_for_the_taylor_order():
    model = traced("llama")[1]
    batches = lm_batches(2)
    first = sp.prune(model, batches, 0.2, solver=PLAIN_OBS)
    with pytest.raises(sp.StructPruneError, match="reuse= holds a dense sweep made with .*'taylor': False"):
        sp.prune(model, batches, 0.3, solver=SolverConfig(taylor_first=1.0), reuse=first)


def _direct_output_fisher(model, batches):
    """Per o_proj / down_proj: mean over tokens of (dL/dy)^2 per output channel, from whole-model backward passes."""
    layers = {n: m for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj"))}
    sums, tokens = {}, 0
    for batch in batches:
        outs = {}
        handles = [m.register_forward_hook(lambda mod, a, out, n=n: outs.__setitem__(n, out)) for n, m in layers.items()]
        try:
            with torch.enable_grad():
                model.model.embed_tokens.weight.requires_grad_(True)
                loss = model(**batch, labels=batch["input_ids"]).loss
                grads = torch.autograd.grad(loss, list(outs.values()))
        finally:
            for h in handles:
                h.remove()
        for n, g in zip(outs, grads):
            sums[n] = sums.get(n, 0) + (g.double().reshape(-1, g.shape[-1]) ** 2).sum(0)
        tokens += grads[0].numel() // grads[0].shape[-1]
    return {n: s / tokens for n, s in sums.items()}


@pytest.mark.parametrize("taylor_first", [None, 0.0])
def test_block_by_block_output_fisher_equals_the_whole_models_backward_pass(taylor_first):
    """With the Taylor scores (block 0's weights carry its backward pass) and without them, on a frozen model
    (only block 0's input then makes its layers' outputs require grad)."""
    model = traced("llama")[1]
    batches = lm_batches(3)
    graph = sp.trace(model, batches[0])
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        state = prepare(model, graph, select_groups(graph), batches,
                        SolverConfig(obs_weighting="fisher", taylor_first=taylor_first, sensitivity_precision="float32"))
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    assert bool(state.unit_scores) == (taylor_first is None)
    want = _direct_output_fisher(model, batches)
    assert set(state.output_fisher) == set(want) and len(want) == 2 * len(model.model.layers)
    for name, d in want.items():
        torch.testing.assert_close(state.output_fisher[name], d, rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_equal_output_weights_are_the_obs_order_and_the_fisher_order_differs():
    """Weighting every output channel alike is OBS (the same keep-set, the same weights); the loss's own
    weights move some units on this model."""
    from structprune_graph.passes.solve import BlockSolvePass, BlockSolveRequest

    model = traced("llama")[1]
    batches = lm_batches(3)
    obs = sp.prune(model, batches, 0.3, solver=PLAIN_OBS)
    st = obs.solver_state
    counts = {gid: g.size - len(obs.plan.keep.get(gid, range(g.size))) for gid, g in st.groups.items()}
    fisher = sp.prune(model, batches, 0.3, solver=SolverConfig(obs_weighting="fisher")).solver_state.output_fisher

    def solved(weights):
        return BlockSolvePass()(BlockSolveRequest(model, st.partition, st.groups, st.inputs, counts,
                                                  output_weights=weights,
                                                  precision=solve_dtype(PLAIN_OBS, st.partition, st.inputs))).state
    plain, flat = solved(None), solved({n: torch.full_like(d, 3.0) for n, d in fisher.items()})
    assert flat.keep == plain.keep
    assert plain.keep == {gid: tuple(obs.plan.keep.get(gid, range(st.groups[gid].size))) for gid in plain.keep}
    for name, w in plain.new_weights.items():
        torch.testing.assert_close(flat.new_weights[name], w)
    assert solved(fisher).keep != plain.keep


def test_the_fisher_order_is_refused_on_a_model_solved_as_one_block():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    batches = [{"input_ids": torch.randint(0, 96, (2, 12))} for _ in range(2)]
    with pytest.raises(sp.StructPruneError, match="obs_weighting='fisher' .* solved as one block; use "
                                                  "obs_weighting='none'"):
        sp.prune(model, batches, 0.3, solver=SolverConfig(obs_weighting="fisher"))


def test_a_taylor_prefix_removes_the_lowest_scored_units_first_and_the_rest_by_obs():
    model = traced("llama")[1]
    batches = lm_batches(3)
    full = sp.prune(model, batches, 0.4, solver=SolverConfig(taylor_first=1.0))
    part = sp.prune(model, batches, 0.4, solver=SolverConfig(taylor_first=0.1), reuse=full)
    obs_rest = 0
    for g in select_groups(full.graph):
        kept = part.plan.keep.get(g.id, range(g.size))
        n = g.size - len(kept)
        assert n == g.size - len(full.plan.keep.get(g.id, range(g.size)))  # the same counts
        if g.id not in full.solver_state.unit_scores or n == 0:
            continue
        scores = full.solver_state.unit_scores[g.id]
        ranked = sorted(range(g.size), key=lambda u: scores[u])
        first = min(n, int(0.1 * g.size))
        assert set(ranked[:first]) <= set(range(g.size)) - set(kept)
        obs_rest += set(kept) != set(full.plan.keep[g.id])
    assert obs_rest  # beyond the prefix OBS chose other units than Taylor's order


def test_greedy_obs_removes_the_given_units_first():
    from structprune_graph.passes.obs import Consumer, greedy_obs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    h = x.T @ x + 0.01 * torch.eye(12, dtype=torch.float64)

    def consumer():
        return Consumer("fc", torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64), h,
                        [torch.tensor([u]) for u in range(12)])
    order, increments = greedy_obs([consumer()], 12, 6, first=[7, 3])
    assert order[:2] == [7, 3] and len(order) == len(increments) == 6
    plain, _ = greedy_obs([consumer()], 12, 6)
    assert plain[:2] != [7, 3]


def test_the_default_order_is_a_taylor_prefix_and_fisher_weighted_obs_where_the_model_gives_a_loss():
    model = traced("llama")[1]
    batches = lm_batches(3)
    default = sp.prune(model, batches, 0.3)
    assert (default.report.solver["taylor_first"], default.report.solver["obs_weighting"]) == (0.25, "fisher")
    explicit = sp.prune(model, batches, 0.3, solver=SolverConfig(taylor_first=0.25, obs_weighting="fisher"))
    assert explicit.plan.keep == default.plan.keep
    entry, bert, _ = traced("bert")  # no loss: plain OBS, as block_energy="auto" falls back to the stream
    encoded = sp.prune(bert, [entry.inputs(s) for s in range(2)], 0.3)
    assert (encoded.report.solver["taylor_first"], encoded.report.solver["obs_weighting"]) == (0.0, "none")
    plain = sp.prune(bert, [entry.inputs(s) for s in range(2)], 0.3, solver=PLAIN_OBS)
    assert plain.plan.keep == encoded.plan.keep


def test_an_explicit_taylor_prefix_on_a_streamed_model_solved_as_one_block_is_refused(tmp_path):
    """A one-block model's Taylor scores need the whole model's gradients, which streaming never holds:
    refused before any sweep, and nothing is written."""
    from structprune_graph.checkpoint import prune_checkpoint

    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)).eval()
    model.save_pretrained(tmp_path / "resnet")
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32)} for _ in range(2)]
    with pytest.raises(sp.StructPruneError, match="taylor_first on a model solved as one block .* use taylor_first=0"):
        prune_checkpoint(tmp_path / "resnet", batches, 0.3, tmp_path / "out", solver=SolverConfig(taylor_first=0.5))
    assert not (tmp_path / "out").exists()
