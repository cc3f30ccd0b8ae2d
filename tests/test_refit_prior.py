"""Prior text in the re-fit (``prune(refit_prior=...)``, ``SolverConfig.refit_prior_weight``): broad text
(e.g. the model's own samples) that the least-squares re-fit fits beside the calibration batches, weighted
per token, and (``SolverConfig.prior_scope``) the OBS selection and the order's Taylor and Fisher scores too
(``"scores"``, the default). A re-fit with the prior at its share of the tokens equals a re-fit on both texts
concatenated, and so does the whole solve with the prior in the selection (and in the Fisher weights); the
Taylor order follows the blended saliency; with the re-fit scope alone the first block's selection does not
move; the block-0 re-fit
solves the blended normal equations; ridge -> inf is still no re-fit; keeping every channel changes
nothing; the input batches are not modified; settings it cannot honour are refused; the report records it."""

from __future__ import annotations

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.pruning import select_groups
from structprune_graph.solver import SolverConfig, reconstruct
from test_pruning import lm_batches
from test_refit_target import PLAIN, _inputs_of, assert_no_refit_and_nothing_changed

RIDGE = 0.3


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


def _config(**extra):
    return SolverConfig(**{"refit_ridge": RIDGE, **PLAIN, **extra})


def test_the_prior_at_its_token_share_equals_one_refit_on_both_texts(llama):
    calibration, prior = lm_batches(3, seed=0), lm_batches(2, seed=1)
    result = sp.prune(llama, calibration, 0.4, solver=_config())
    keep, groups = result.plan.keep, select_groups(result.graph, None)
    both = reconstruct(llama, result.graph, groups, keep, calibration + prior, _config())
    share = 2 / 5  # the prior's tokens: 2 of the 5 equal batches
    blended = reconstruct(llama, result.graph, groups, keep, calibration,
                          _config(refit_prior_weight=share), prior=prior)
    assert set(blended) == set(both) and both
    for name, w in both.items():
        torch.testing.assert_close(blended[name], w, rtol=1e-5, atol=1e-7)
    alone = reconstruct(llama, result.graph, groups, keep, calibration, _config())
    assert any(not torch.allclose(alone[n], w, rtol=1e-4, atol=1e-6) for n, w in both.items())  # it moved


def test_the_refit_scope_keeps_the_selection_and_block_0_solves_the_blended_equations(llama):
    """prior_scope="refit" (the default until 2026-12-03): the selection sees the calibration only."""
    calibration, prior = lm_batches(3, seed=0), lm_batches(3, seed=2)
    copies = [{k: v.clone() for k, v in b.items()} for b in calibration + prior]
    weight = 0.7
    plain = sp.prune(llama, calibration, 0.4, solver=_config()).solution
    blended = sp.prune(llama, calibration, 0.4, solver=_config(refit_prior_weight=weight, prior_scope="refit"),
                       refit_prior=prior)
    first = [gid for gid in plain.keep if blended.graph.group(gid).members[0].name.startswith("model.layers.0.")]
    assert first and all(blended.solution.keep[gid] == plain.keep[gid] for gid in first)
    path = "model.layers.0.mlp.down_proj"  # block 0's MLP: its inputs are the dense model's on both texts
    refit = blended.solution.new_weights[path + ".weight"].double()  # (out, in), removed columns zero
    kept = refit.abs().sum(0).nonzero().flatten()
    assert 0 < len(kept) < refit.shape[1]
    x, x_prior = _inputs_of(llama, path, calibration), _inputs_of(llama, path, prior)  # (tokens, in)
    h = (1 - weight) * x.T @ x + weight * (len(x) / len(x_prior)) * x_prior.T @ x_prior  # per token: w vs 1 - w
    lhs = h[kept][:, kept] + RIDGE * h.diagonal().mean() * torch.eye(len(kept), dtype=h.dtype)
    w = llama.get_submodule(path).weight.double()  # (out, in)
    want = torch.linalg.solve(lhs, h[kept] @ w.T + RIDGE * h.diagonal().mean() * w[:, kept].T).T  # (out, kept)
    torch.testing.assert_close(refit[:, kept], want, rtol=1e-4, atol=1e-6)
    for batch, copy in zip(calibration + prior, copies):  # the inputs are never modified
        for k, v in batch.items():
            torch.testing.assert_close(v, copy[k], rtol=0, atol=0)
    assert blended.report.solver["refit_prior"] == {"batches": 3, "weight": weight, "scope": "refit"}


def test_an_infinite_ridge_is_no_refit_and_keeping_everything_changes_nothing(llama):
    batches, prior = lm_batches(2), lm_batches(2, seed=3)
    infinite = _config(refit_ridge=1e12, prior_scope="refit")  # the selection as without a prior: the same units
    assert_no_refit_and_nothing_changed(
        llama, batches, sp.prune(llama, batches, 0.4, solver=infinite, refit_prior=prior).solution,
        sp.prune(llama, batches, 0.0, solver=_config(), refit_prior=prior))


def test_what_it_cannot_honour_is_refused(llama):
    batches, prior = lm_batches(2), lm_batches(1, seed=4)
    with pytest.raises(StructPruneError, match=r"refit_prior_weight .* in \(0, 1\); got 1.0"):
        SolverConfig(refit_prior_weight=1.0)
    with pytest.raises(StructPruneError, match="method 'flap' has no re-fit: use method='structprune' or reconstruct"):
        sp.prune(llama, batches, 0.4, method="flap", refit_prior=prior)
    with pytest.raises(StructPruneError, match="this run has refit_bias='refit'"):
        sp.prune(llama, batches, 0.4, solver=_config(refit_bias="refit"), refit_prior=prior)
    with pytest.raises(StructPruneError, match=r"this run has reconstruct=False \(no re-fit\)"):
        sp.prune(llama, batches, 0.4, solver=_config(reconstruct=False), refit_prior=prior)


def test_the_prior_in_the_selection_equals_one_solve_on_both_texts(llama):
    """prior_scope="selection": the OBS selection reads the blended H too (the scores scope adds nothing
    here: PLAIN has neither Taylor nor Fisher scores). At the prior's share of
    the tokens (3 of 6 equal batches, w = 0.5) the blend is H of both texts, halved (the OBS order and the
    relative damping and ridge do not see a scale): with counts that do not depend on the text (uniform), the
    keep-set and the re-fitted weights equal one solve on both texts."""
    calibration, prior = lm_batches(3, seed=0), lm_batches(3, seed=5)
    uniform = {"allocation": "uniform"}
    both = sp.prune(llama, calibration + prior, 0.4, solver=_config(**uniform)).solution
    selected = sp.prune(llama, calibration, 0.4, solver=_config(**uniform), refit_prior=prior)  # the default
    assert selected.report.solver["refit_prior"] == {"batches": 3, "weight": 0.5, "scope": "scores"}
    selected = selected.solution
    refit_only = sp.prune(llama, calibration, 0.4, solver=_config(prior_scope="refit", **uniform),
                          refit_prior=prior).solution
    assert selected.keep == both.keep
    assert refit_only.keep != both.keep  # the calibration's H alone picks other units: the blend moved them
    assert set(selected.new_weights) == set(both.new_weights) and both.new_weights
    for name, w in both.new_weights.items():
        torch.testing.assert_close(selected.new_weights[name], w, rtol=1e-5, atol=1e-7)



def test_the_prior_in_the_fisher_weights_equals_one_solve_on_both_texts(llama):
    """prior_scope="scores" (the default): the output Fisher that weights the OBS error blends the prior's,
    (1 - w) F + w F_prior, each a mean per token. At the prior's share of the tokens (w = 0.5, 3 of 6 equal batches) that is the
    Fisher of both texts, and with the blended H the whole solve equals one solve on both texts; the
    selection scope alone (the calibration's Fisher) picks other units, so the test has power."""
    calibration, prior = lm_batches(3, seed=0), lm_batches(3, seed=5)
    fisher = {"refit_ridge": RIDGE, "taylor_first": 0.0, "obs_weighting": "fisher", "allocation": "uniform"}
    both = sp.prune(llama, calibration + prior, 0.4, solver=SolverConfig(**fisher)).solution
    scored = sp.prune(llama, calibration, 0.4, solver=SolverConfig(**fisher), refit_prior=prior)
    assert scored.report.solver["refit_prior"] == {"batches": 3, "weight": 0.5, "scope": "scores"}
    selected = sp.prune(llama, calibration, 0.4, solver=SolverConfig(prior_scope="selection", **fisher),
                        refit_prior=prior).solution
    assert scored.solution.keep == both.keep
    assert selected.keep != both.keep
    assert set(scored.solution.new_weights) == set(both.new_weights) and both.new_weights
    for name, w in both.new_weights.items():
        torch.testing.assert_close(scored.solution.new_weights[name], w, rtol=1e-5, atol=1e-7)


def test_the_prior_in_the_taylor_scores_orders_units_by_the_blend(llama):
    """prior_scope="scores" with the whole order by Taylor (taylor_first=1): each group removes the units with the
    lowest (1 - w) s + w s_prior, s and s_prior the saliency each text gives alone (ties by index), which is
    not the calibration's order."""
    calibration, prior = lm_batches(3, seed=0), lm_batches(2, seed=6)
    taylor = {"refit_ridge": RIDGE, "taylor_first": 1.0, "obs_weighting": "none", "allocation": "uniform"}
    weight = 0.3
    own = sp.prune(llama, calibration, 0.4, solver=SolverConfig(**taylor))
    other = sp.prune(llama, prior, 0.4, solver=SolverConfig(**taylor)).solver_state.unit_scores
    scored = sp.prune(llama, calibration, 0.4, refit_prior=prior,
                      solver=SolverConfig(refit_prior_weight=weight, **taylor)).solution
    moved = 0
    for gid, s in own.solver_state.unit_scores.items():
        n = len(s) - len(own.solution.keep[gid])  # uniform: the same count with or without the prior
        blend = [(1 - weight) * a + weight * b for a, b in zip(s, other[gid])]
        gone = set(sorted(range(len(s)), key=lambda u: (blend[u], u))[:n])
        assert scored.keep[gid] == tuple(u for u in range(len(s)) if u not in gone), gid
        moved += scored.keep[gid] != own.solution.keep[gid]
    assert moved  # the prior's saliency moved some group's units


def test_the_prior_scores_read_only_the_first_prior_score_batches(llama):
    """prior_score_batches=1: the Taylor order blends the saliency of the first prior window alone (its sweep
    reads no other), while the re-fit still fits every prior window; the order differs from the one that
    reads both windows, so the test has power."""
    calibration, prior = lm_batches(3, seed=0), lm_batches(2, seed=6)
    taylor = {"refit_ridge": RIDGE, "taylor_first": 1.0, "obs_weighting": "none", "allocation": "uniform"}
    weight = 0.3
    own = sp.prune(llama, calibration, 0.4, solver=SolverConfig(**taylor)).solver_state.unit_scores
    first = sp.prune(llama, prior[:1], 0.4, solver=SolverConfig(**taylor)).solver_state.unit_scores
    config = SolverConfig(refit_prior_weight=weight, prior_score_batches=1, **taylor)
    scored = sp.prune(llama, calibration, 0.4, refit_prior=prior, solver=config)
    assert scored.report.solver["refit_prior"] == {"batches": 2, "weight": weight, "scope": "scores",
                                                   "score_batches": 1}  # the re-fit's prior: both windows
    every = sp.prune(llama, calibration, 0.4, refit_prior=prior,
                     solver=SolverConfig(refit_prior_weight=weight, **taylor)).solution
    for gid, s in own.items():
        n = len(s) - len(scored.solution.keep[gid])
        blend = [(1 - weight) * a + weight * b for a, b in zip(s, first[gid])]
        gone = set(sorted(range(len(s)), key=lambda u: (blend[u], u))[:n])
        assert scored.solution.keep[gid] == tuple(u for u in range(len(s)) if u not in gone), gid
    assert any(scored.solution.keep[gid] != every.keep[gid] for gid in own)


def test_reuse_keeps_the_prior_sweep_for_the_same_prior(llama, monkeypatch):
    """Another sparsity with reuse= and the same prior reads the prior's sensitivity sweep the first call made
    (no sweep runs) and returns what a fresh call returns; a different prior is swept again."""
    from structprune_graph.passes import sensitivity

    calibration, prior = lm_batches(3, seed=0), lm_batches(2, seed=6)
    first = sp.prune(llama, calibration, 0.3, refit_prior=prior)
    assert first.solver_state.prior_sweep is not None
    fresh = sp.prune(llama, calibration, 0.4, refit_prior=prior)
    sweeps = []
    original = sensitivity.BlockSensitivityPass.call
    monkeypatch.setattr(sensitivity.BlockSensitivityPass, "call",
                        lambda self, state: sweeps.append(len(state.batches)) or original(self, state))
    again = sp.prune(llama, calibration, 0.4, reuse=first, refit_prior=[dict(b) for b in prior])  # equal copies
    assert sweeps == []
    assert again.plan.keep == fresh.plan.keep
    for name, w in fresh.solution.new_weights.items():
        torch.testing.assert_close(again.solution.new_weights[name], w, rtol=0, atol=0)
    sp.prune(llama, calibration, 0.4, reuse=first, refit_prior=lm_batches(2, seed=7))
    assert sweeps == [2]  # another prior: its own sweep


def test_prior_score_batches_below_one_is_refused():
    with pytest.raises(StructPruneError, match=r"prior_score_batches is a number of prior windows, >= 1 \(None: "
                                               r"all\); got 0"):
        SolverConfig(prior_score_batches=0)


def test_an_unknown_prior_scope_is_refused():
    with pytest.raises(StructPruneError, match=r"unknown prior_scope 'all'; choose one of \('refit', 'selection', "
                                               r"'scores'\)"):
        SolverConfig(prior_scope="all")
