"""The re-fit's target (SolverConfig.refit_target): "block" matches the dense layer's output on the pruned
trajectory's own inputs; "model" matches the dense model's output of the layer, so that a block also undoes
the drift of the pruned blocks before it. The first block has no drift to undo (both targets give the same
weights); a later block's re-fit solves the ridge normal equations toward the dense model's activations;
ridge -> inf is still no re-fit; keeping every channel changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.solver import SolverConfig
from test_pruning import lm_batches

# the order does not matter here: fewer sweeps; float64 statistics and the block solve's forwards in float32: the
# identities below hold to their precision against activations of the model's own float32 forward
PLAIN = {"taylor_first": 0.0, "obs_weighting": "none", "statistics": "float64", "solve_precision": "float32"}
RIDGE = 0.3


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


def _inputs_of(model, path, batches):
    """The (tokens, in) inputs of layer ``path`` over the batches, float64."""
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        handle.remove()
    return torch.cat(seen)


def _prune(llama, batches, target, **extra):
    return sp.prune(llama, batches, 0.4, solver=SolverConfig(refit_target=target, **{"refit_ridge": RIDGE, **PLAIN, **extra}))


def test_the_first_block_gets_the_same_refit_and_a_later_one_undoes_the_drift(llama):
    batches = lm_batches(3)
    block, model = _prune(llama, batches, "block").solution, _prune(llama, batches, "model").solution
    assert block.keep == model.keep  # the target moves the re-fit only, not the selection of block 0 ...
    first = [n for n in block.new_weights if n.startswith("model.layers.0.")]
    later = [n for n in block.new_weights if not n.startswith("model.layers.0.")]
    assert first and later
    for name in first:
        torch.testing.assert_close(model.new_weights[name], block.new_weights[name], rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(model.new_weights[n], block.new_weights[n], rtol=1e-4, atol=1e-6) for n in later)


def test_a_later_blocks_refit_solves_the_normal_equations_toward_the_dense_models_activations(llama):
    batches = lm_batches(3)
    solved = _prune(llama, batches, "model").solution
    last = len(llama.model.layers) - 1
    path = f"model.layers.{last}.mlp.down_proj"
    refit = solved.new_weights[path + ".weight"].double()  # (out, in), removed columns zero
    kept = refit.abs().sum(0).nonzero().flatten()
    assert 0 < len(kept) < refit.shape[1]
    pruned_before = copy.deepcopy(llama)  # the pruned (re-fitted) blocks before the last, the last one dense
    with torch.no_grad():
        for name, w in solved.new_weights.items():
            if not name.startswith(f"model.layers.{last}."):
                pruned_before.get_parameter(name).copy_(w)
    x = _inputs_of(pruned_before, path, batches)  # (tokens, in): the pruned trajectory
    x_dense = _inputs_of(llama, path, batches)  # the dense model's
    assert not torch.allclose(x, x_dense, atol=1e-4)  # there is drift to undo
    w = llama.get_submodule(path).weight.double()  # (out, in)
    h = x.T @ x
    ridge = RIDGE * h.diagonal().mean()
    lhs = h[kept][:, kept] + ridge * torch.eye(len(kept), dtype=h.dtype)
    want = torch.linalg.solve(lhs, x[:, kept].T @ (x_dense @ w.T) + ridge * w[:, kept].T).T  # (out, kept)
    torch.testing.assert_close(refit[:, kept], want, rtol=1e-4, atol=1e-6)
    own = torch.linalg.solve(lhs, x[:, kept].T @ (x @ w.T) + ridge * w[:, kept].T).T  # the block's target
    assert not torch.allclose(own, want, rtol=1e-3, atol=1e-5)


def assert_no_refit_and_nothing_changed(llama, batches, huge, kept_all):
    """``huge`` (a solution at 40% with ridge -> inf) equals no re-fit; ``kept_all`` (a result at 0%) is the
    dense model exactly."""
    none = sp.prune(llama, batches, 0.4, solver=SolverConfig(reconstruct=False, **PLAIN)).solution
    assert huge.keep == none.keep
    for name, w in none.new_weights.items():
        torch.testing.assert_close(huge.new_weights[name], w, rtol=1e-6, atol=1e-7)
    for name, p in llama.named_parameters():
        torch.testing.assert_close(kept_all.model.get_parameter(name), p, rtol=0, atol=0)


def test_an_infinite_ridge_is_no_refit_and_keeping_everything_changes_nothing(llama):
    batches = lm_batches(2)
    assert_no_refit_and_nothing_changed(
        llama, batches, _prune(llama, batches, "model", refit_ridge=1e12).solution,
        sp.prune(llama, batches, 0.0, solver=SolverConfig(refit_target="model", **PLAIN)))


def test_bad_refit_targets_are_refused():
    with pytest.raises(StructPruneError, match="unknown refit_target 'dense'"):
        SolverConfig(refit_target="dense")
    with pytest.raises(StructPruneError, match="re-fits without a free bias"):
        SolverConfig(refit_target="model", refit_bias="refit")
