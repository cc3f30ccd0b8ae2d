"""The allocator's tau search with the re-fit in the loop: each tau is scored by the loss, on held-out
calibration batches, of exactly the model the run would return with that tau; keep-all scores the dense
model; the split never scores a batch it fitted; bad settings are refused."""

from __future__ import annotations

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.passes.calibrate import default_loss
from structprune_graph.pruning import select_groups
from structprune_graph.solver import (MASKED_TAU_BATCHES, REFIT_TAU_BATCHES, SolverConfig, _tau_split, prepare,
                                     tau_loss, taylor_first)
from test_pruning import lm_batches


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


def _held_loss(model, batches):
    with torch.no_grad():
        return sum(float(default_loss(model, b)) for b in batches) / len(batches)


def _setup(llama, fit, held, config):
    graph = sp.trace(llama, fit[0])
    groups = select_groups(graph)
    state = prepare(llama, graph, groups, fit + held, config)
    return graph, state, tau_loss(llama, state, fit + held, config)


def test_refit_score_is_the_held_out_loss_of_the_returned_model(llama):
    fit, held = lm_batches(3, seed=1), lm_batches(2, seed=2)
    config = SolverConfig(tau_search="refit", tau_batches=len(fit), tau_holdout=len(held))
    returned = sp.prune(llama, fit, 0.3, method="structprune", solver=SolverConfig(taus=(1.0,)))
    graph, state, evaluate = _setup(llama, fit, held, config)
    counts = {g.id: g.size - len(returned.plan.keep.get(g.id, range(g.size))) for g in select_groups(graph)}
    assert sum(counts.values()) > 0
    torch.testing.assert_close(evaluate(counts), _held_loss(returned.model, held), rtol=1e-5, atol=1e-6)


def test_removing_nothing_scores_the_dense_model(llama):
    fit, held = lm_batches(2, seed=1), lm_batches(2, seed=2)
    graph, state, evaluate = _setup(llama, fit, held, SolverConfig(tau_search="refit", tau_batches=2, tau_holdout=2))
    counts = {g.id: 0 for g in select_groups(graph)}
    assert evaluate(counts) == pytest.approx(_held_loss(llama, held), rel=1e-6)
    for name, p in llama.named_parameters():  # the trial weights were swapped back
        assert isinstance(p, torch.nn.Parameter), name


@pytest.mark.parametrize("n, fit, held", [(32, list(range(8)), list(range(28, 32))),
                                          (6, list(range(3)), list(range(3, 6))),
                                          (1, [0], [0])])
def test_split_never_scores_a_fitted_batch_unless_there_is_one(n, fit, held):
    assert _tau_split(n, SolverConfig(tau_search="refit")) == (fit, held)  # re-fitted on REFIT_TAU_BATCHES = 8


def test_the_default_masked_search_scores_the_first_four_batches(llama):
    """tau_batches=None: the masked search reads MASKED_TAU_BATCHES = 4 calibration batches (of 6 here), the
    refit search re-fits on REFIT_TAU_BATCHES = 8; an explicit tau_batches is taken as given."""
    batches = lm_batches(6, seed=1)
    graph, state, evaluate = _setup(llama, batches, [], SolverConfig())
    curves = state.calibration.curves
    counts = {gid: min(len(curves[gid].order), state.groups[gid].size // 2) for gid in curves}
    keep = {gid: [u for u in range(state.groups[gid].size) if u not in set(curves[gid].order[:n])]
            for gid, n in counts.items()}
    masked = sp.apply(llama, graph, keep)
    assert MASKED_TAU_BATCHES == 4 and REFIT_TAU_BATCHES == 8
    torch.testing.assert_close(evaluate(counts), _held_loss(masked, batches[:4]), rtol=1e-5, atol=1e-6)
    assert abs(_held_loss(masked, batches[:4]) - _held_loss(masked, batches)) > 1e-4  # the count matters here
    assert SolverConfig(tau_search="refit").tau_batch_count() == 8 and SolverConfig(tau_batches=6).tau_batch_count() == 6


def test_bad_tau_settings_are_refused():
    with pytest.raises(StructPruneError, match="unknown tau_search 'loss'"):
        SolverConfig(tau_search="loss")
    with pytest.raises(StructPruneError, match="tau_batches must be >= 1"):
        SolverConfig(tau_batches=0)
    with pytest.raises(StructPruneError, match=r"unknown allocation 'greedy'; choose one of \('softmax'"):
        SolverConfig(allocation="greedy")  # refused before any sweep, not at the allocation after it



def test_masked_score_masks_the_sweeps_obs_order_even_under_a_taylor_prefix(llama):
    batches = lm_batches(3, seed=1)
    config = SolverConfig(tau_batches=2)  # the default order: a Taylor prefix, then (Fisher-weighted) OBS
    graph, state, evaluate = _setup(llama, batches, [], config)
    curves = state.calibration.curves
    counts = {gid: min(len(curves[gid].order), state.groups[gid].size // 2) for gid in curves}
    assert taylor_first(config, state) == 0.25
    lowest = {gid: sorted(range(state.groups[gid].size), key=lambda u: (state.unit_scores[gid][u], u))
              for gid in counts}
    # the solve's first units (lowest Taylor) are not the OBS order's, so the two masks differ
    assert any(not set(lowest[gid][:int(0.25 * state.groups[gid].size)]) <= set(curves[gid].order[:n])
               for gid, n in counts.items())
    keep = {gid: [u for u in range(state.groups[gid].size) if u not in set(curves[gid].order[:n])]
            for gid, n in counts.items()}
    torch.testing.assert_close(evaluate(counts), _held_loss(sp.apply(llama, graph, keep), batches[:2]),
                               rtol=1e-5, atol=1e-6)
