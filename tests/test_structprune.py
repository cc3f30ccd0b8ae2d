"""The structprune method end to end on tiny models: exact budget, determinism, keep-all is the identity,
zero ADMM rounds is the sequential local solution, ADMM lowers the coordinated output error, finite
weights on degenerate data, the memory budget error, and models that are one block."""

from __future__ import annotations


import pytest
import torch

import structprune_graph as sp
from conftest import run, traced
from structprune_graph.passes import ApplyPass, RewriteRequest
from structprune_graph.passes.admm import AdmmPass, AdmmRequest
from structprune_graph.passes.partition import MemoryBudgetError
from structprune_graph.passes.solve import BlockSolvePass, BlockSolveRequest
from structprune_graph.pruning import select_groups
from structprune_graph.solver import AUTO_TAYLOR_FIRST, STATISTICS_DTYPES, SolverConfig, prepare, solve_dtype
from test_pruning import lm_batches


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


ADMM = SolverConfig(rounds=2)


@pytest.fixture(scope="module")
def default_run(llama):
    return sp.prune(llama, lm_batches(4), 0.3, method="structprune", solver=ADMM)


def test_budget_is_exact_to_a_unit(default_run, llama):
    r = default_run.report
    groups = select_groups(default_run.graph)
    smallest = min(min(g.unit_params) for g in groups)
    target = round(0.3 * r.prunable_params)
    assert abs((r.params_before - r.params_after) - target) <= smallest
    assert r.solver["tau"] in SolverConfig().taus and len(r.solver["tau_losses"]) == len(SolverConfig().taus)


def test_same_seed_same_plan_and_weights(default_run, llama):
    again = sp.prune(llama, lm_batches(4), 0.3, method="structprune", solver=ADMM)
    assert again.plan.to_json() == default_run.plan.to_json()
    for (name, a), (_, b) in zip(again.model.state_dict().items(), default_run.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_pruned_model_is_the_masked_model_with_the_refit_weights(default_run, llama):
    """Physically sliced == dense shapes with removed units zeroed, using the same re-fitted weights."""
    inputs = {"input_ids": torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))}
    refit = {n: p for n, p in default_run.model.state_dict().items()}
    dense_shape = traced("llama")[1]
    masked = sp.mask(dense_shape, default_run.graph, default_run.plan.keep)
    kept = default_run.graph.kept_indices(default_run.plan.keep)
    with torch.no_grad():  # scatter the pruned model's weights back into the masked model's shapes
        for name, p in masked.named_parameters():
            value = refit[name]
            index = [torch.tensor(kept[(name, d)]) if (name, d) in kept else torch.arange(s) for d, s in enumerate(p.shape)]
            p.zero_()
            p[torch.meshgrid(*index, indexing="ij")] = value
    torch.testing.assert_close(run(default_run.model, inputs), run(masked, inputs), rtol=1e-5, atol=1e-5)


def test_keeping_everything_changes_nothing(llama):
    inputs = {"input_ids": torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))}
    result = sp.prune(llama, lm_batches(4), 0.0, method="structprune")
    assert result.report.params_after == result.report.params_before
    torch.testing.assert_close(run(result.model, inputs), run(llama, inputs), rtol=1e-5, atol=1e-5)


def test_zero_admm_rounds_is_the_sequential_local_solution(llama, default_run):
    config = SolverConfig(rounds=0)
    result = sp.prune(llama, lm_batches(4), 0.3, method="structprune", solver=config, reuse=default_run)
    state = default_run.solver_state
    counts = {gid: state.groups[gid].size - len(kept) for gid, kept in result.plan.keep.items()}
    local = BlockSolvePass()(BlockSolveRequest(  # the default order inside each group: a Taylor prefix, then OBS
        llama, state.partition, state.groups, state.inputs, counts, unit_scores=state.unit_scores,
        scored_fraction=AUTO_TAYLOR_FIRST, output_weights=state.output_fisher,
        statistics_dtype=STATISTICS_DTYPES[config.statistics],
        precision=solve_dtype(config, state.partition, state.inputs))).state
    unchanged = AdmmPass()(AdmmRequest(llama, state.partition, state.groups, state.inputs[:2],
                                       torch.stack([state.calibration.final_outputs[i] for i in range(2)]), local,
                                       store=_store(), rounds=0)).state
    assert unchanged.solution is local and unchanged.best_round == 0
    expected = ApplyPass()(RewriteRequest(llama, result.graph, local.keep, weight_updates=local.new_weights)).state
    for (name, a), (_, b) in zip(result.model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name


def _store():
    from structprune_graph.blockwise import ActivationStore

    return ActivationStore()


def test_admm_keeps_the_round_with_the_lowest_output_error(default_run):
    errors = default_run.report.solver["admm_output_errors"]
    assert len(errors) == ADMM.rounds + 1
    best = default_run.report.solver["admm_best_round"]
    assert errors[best] == min(errors)


def test_weights_stay_finite_on_degenerate_calibration(llama):
    constant = [{"input_ids": torch.full((2, 12), 5)} for _ in range(3)]  # rank-deficient statistics
    result = sp.prune(llama, constant, 0.5, method="structprune")
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_budget_below_the_largest_block_errors(llama):
    with pytest.raises(MemoryBudgetError, match=r"below block 'model\.layers\.\d'"):
        sp.prune(llama, lm_batches(2), 0.3, method="structprune", solver=SolverConfig(memory_budget=10_000))


def test_spilling_activations_to_disk_gives_identical_weights(llama):
    state_budget = prepare(llama, traced("llama")[2], select_groups(traced("llama")[2]), lm_batches(4),
                           ADMM).partition.peak_bytes
    small = sp.prune(llama, lm_batches(4), 0.3, method="structprune",
                     solver=SolverConfig(rounds=2, memory_budget=state_budget + 1))  # buffers go to disk
    big = sp.prune(llama, lm_batches(4), 0.3, method="structprune", solver=ADMM)
    assert small.plan.keep == big.plan.keep
    for (name, a), (_, b) in zip(small.model.state_dict().items(), big.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["plain_mlp", "resnet", "vit", "bert"])
def test_other_architectures_meet_the_budget(name):
    entry, model, graph = traced(name)
    batches = [entry.inputs(s) for s in range(3)]
    result = sp.prune(model, batches, 0.3, method="structprune", graph=graph, example_inputs=entry.inputs(0))
    assert abs(result.report.sparsity_achieved - 0.3) < 0.05
    out = run(result.model, entry.inputs(9))
    assert torch.isfinite(out).all() and out.shape == run(model, entry.inputs(9)).shape


def test_reconstruction_refits_another_methods_selection(llama):
    """Same units as the method alone; the re-fit brings the output closer to the dense model's."""
    batches = lm_batches(4)
    plain = sp.prune(llama, batches, 0.4, method="magnitude")
    refit = sp.prune(llama, batches, 0.4, method="magnitude", reconstruct=True)
    assert refit.plan.keep == plain.plan.keep
    dense = run(llama, batches[0])
    err = [float(((run(r.model, batches[0]) - dense) ** 2).mean()) for r in (plain, refit)]
    assert err[1] < 0.9 * err[0]
    with pytest.raises(sp.StructPruneError, match="re-fits already"):
        sp.prune(llama, batches, 0.4, method="structprune", reconstruct=True)
    with pytest.raises(sp.StructPruneError, match="compensates biases"):
        sp.prune(llama, batches, 0.4, method="flap", reconstruct=True)


def test_refit_ridge_to_infinity_gives_the_unrefitted_weights(llama):
    """The re-fit's ridge shrinks toward the dense weights: r -> inf is no re-fit; r small is a real re-fit.
    The OBS selection keeps its own damping; a later block's selection depends on the re-fitted trajectory."""
    batches = lm_batches(4)
    loose = sp.prune(llama, batches, 0.3, method="structprune", solver=SolverConfig(refit_ridge=1e-3))
    stiff = sp.prune(llama, batches, 0.3, method="structprune", solver=SolverConfig(refit_ridge=1e12))
    plain = sp.prune(llama, batches, 0.3, method="structprune", solver=SolverConfig(reconstruct=False))
    assert stiff.plan.keep == plain.plan.keep
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(stiff.model.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    probe = batches[0]
    assert not torch.allclose(run(loose.model, probe), run(plain.model, probe), atol=1e-3)


def test_robust_block_energy_ignores_massive_channels_and_changes_only_the_curves_scale(llama):
    """A block's errors are relative to its input energy: ``robust`` is channels x the median channel's,
    so one massive channel does not shrink every error of the block; the curves' orders stay the same."""
    from structprune_graph.passes.blockwise_calibrate import stream_energy

    per_channel = torch.tensor([1.0, 2.0, 3.0, 1000.0], dtype=torch.float64)
    assert stream_energy(per_channel, "stream") == 1006.0
    assert stream_energy(per_channel, "robust") == 4 * 2.0  # torch's median: the lower middle value
    graph = sp.trace(llama, lm_batches(1)[0])
    groups = select_groups(graph)
    plain = prepare(llama, graph, groups, lm_batches(4), SolverConfig())
    robust = prepare(llama, graph, groups, lm_batches(4), SolverConfig(block_energy="robust"))
    assert plain.calibration.curves.keys() == robust.calibration.curves.keys()
    ratios = set()
    for gid, curve in plain.calibration.curves.items():
        assert robust.calibration.curves[gid].order == curve.order
        ratios.add(round(robust.calibration.curves[gid].error(3) / curve.error(3), 6))
    assert len(ratios) > 1  # the blocks' scales move apart: the allocation can change
    with pytest.raises(sp.StructPruneError, match="unknown block_energy 'median'"):
        SolverConfig(block_energy="median")


def test_float32_statistics_give_the_float64_plan_and_weights(llama):
    """SolverConfig(statistics="float32") halves the solver's matrices; on a well-conditioned model it keeps
    the same units and re-fits the same weights to float32's precision, and the pruned model runs."""
    batches = lm_batches(4)
    want = sp.prune(llama, batches, 0.3, solver=SolverConfig(block_energy="stream", statistics="float64"))
    got = sp.prune(llama, batches, 0.3, solver=SolverConfig(block_energy="stream"))  # float32: the default
    assert got.plan.keep == want.plan.keep
    assert got.report.solver["statistics"] == "float32" and want.report.solver["statistics"] == "float64"
    for (name, a), b in zip(got.model.state_dict().items(), want.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    with pytest.raises(sp.StructPruneError, match="unknown statistics 'float16'; choose one of"):
        SolverConfig(statistics="float16")
