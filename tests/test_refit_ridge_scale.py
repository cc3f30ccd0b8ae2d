"""What the re-fit's ridge is relative to (SolverConfig.refit_ridge_scale): "mean" adds r mean(diag H) I,
"diagonal" adds r diag(H) (each input by its own second moment). The diagonal re-fit solves its normal
equations exactly; ridge -> inf is still no re-fit; the mean scale is today's re-fit unchanged; keeping every
channel changes nothing; a bad scale is refused; the report records it."""

from __future__ import annotations

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.passes.obs import damped, redamped, ridged
from structprune_graph.solver import SolverConfig
from test_pruning import lm_batches
from test_refit_target import PLAIN, _inputs_of, assert_no_refit_and_nothing_changed

RIDGE = 0.3


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


def _prune(llama, batches, scale, sparsity=0.4, **extra):
    config = SolverConfig(refit_ridge_scale=scale, **{"refit_ridge": RIDGE, **PLAIN, **extra})
    return sp.prune(llama, batches, sparsity, solver=config)


def test_redamped_and_ridged_give_h_plus_r_diag_h():
    x = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([1e-3, 0.1, 1.0, 10.0, 3.0, 0.5])  # (tokens, in)
    x[:, 5] = 0.0  # a dead input: a unit diagonal, as damped gives it
    h = x.T @ x
    want = h.clone()
    want.diagonal()[5] = 1.0
    want.diagonal().mul_(1.0 + RIDGE)
    torch.testing.assert_close(redamped(damped(h, 0.01, inplace=False), 0.01, RIDGE, "diagonal"), want)
    torch.testing.assert_close(ridged(h, RIDGE, "diagonal"), want)
    torch.testing.assert_close(ridged(h, RIDGE, "mean"), damped(h, RIDGE))
    torch.testing.assert_close(redamped(damped(h, 0.01), 0.01, RIDGE), damped(h, RIDGE))


def test_the_diagonal_refit_solves_its_normal_equations(llama):
    batches = lm_batches(3)
    solved = _prune(llama, batches, "diagonal").solution
    path = "model.layers.0.mlp.down_proj"  # block 0's MLP: its inputs are the dense model's
    refit = solved.new_weights[path + ".weight"].double()  # (out, in), removed columns zero
    kept = refit.abs().sum(0).nonzero().flatten()
    assert 0 < len(kept) < refit.shape[1]
    x = _inputs_of(llama, path, batches)  # (tokens, in)
    w = llama.get_submodule(path).weight.double()  # (out, in)
    h = x.T @ x
    shift = RIDGE * h.diagonal()[kept]  # (kept,)
    lhs = h[kept][:, kept] + torch.diag(shift)
    want = torch.linalg.solve(lhs, h[kept] @ w.T + shift[:, None] * w[:, kept].T).T  # (out, kept)
    torch.testing.assert_close(refit[:, kept], want, rtol=1e-4, atol=1e-6)
    mean = _prune(llama, batches, "mean").solution.new_weights[path + ".weight"].double()
    assert not torch.allclose(mean[:, kept], want, rtol=1e-3, atol=1e-5)  # the scale changes the re-fit


def test_an_infinite_ridge_is_no_refit_and_keeping_everything_changes_nothing(llama):
    batches = lm_batches(2)
    kept_all = _prune(llama, batches, "diagonal", sparsity=0.0)
    assert_no_refit_and_nothing_changed(llama, batches, _prune(llama, batches, "diagonal", refit_ridge=1e12).solution,
                                        kept_all)
    assert kept_all.report.solver["refit_ridge_scale"] == "diagonal"
    assert kept_all.report.solver["refit_ridge"] == RIDGE


def test_a_bad_scale_is_refused():
    with pytest.raises(StructPruneError, match="unknown refit_ridge_scale 'input'"):
        SolverConfig(refit_ridge_scale="input")
