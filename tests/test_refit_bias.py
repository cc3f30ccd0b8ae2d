"""SolverConfig(refit_bias=...): a free bias in every linear consumer's fit (centred statistics)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune_graph as sp
from conftest import run, traced
from structprune_graph.passes.blockwise_calibrate import StatsCollector
from structprune_graph.solver import SolverConfig
from test_pruning import lm_batches

MLP_ONLY = ["mlp_channel"]
# the block solve's forwards in float32: the identities are checked against the model's own float32 activations
EXACT = {"solve_precision": "float32"}


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


def _down_proj_inputs(model: nn.Module, batches) -> torch.Tensor:
    """(tokens, intermediate) inputs of layer 0's down_proj over the calibration batches, in float64."""
    seen = []
    layer = model.model.layers[0].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for b in batches:
                run(model, b)
    finally:
        handle.remove()
    return torch.cat(seen).double()


def test_centred_statistics_are_the_covariance_about_the_mean():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    xs = [torch.randn(7, 5) + 3.0, torch.randn(4, 5) - 1.0]  # (tokens, in), a large mean
    stats = StatsCollector(layer, [""], torch.float64, centred=True)  # "": the layer itself
    try:
        with torch.no_grad():
            for x in xs:
                layer(x)
    finally:
        stats.close()
    stats.centre()
    x = torch.cat(xs).double()  # (11, 5)
    mu = x.mean(0)
    torch.testing.assert_close(stats.means[""], mu)
    # H is accumulated from float32 products (the hook's matmul): float32 rounding of the uncentred sums
    torch.testing.assert_close(stats.hessians[""], (x - mu).T @ (x - mu), rtol=1e-5, atol=1e-4)


BIASES = ["refit", "centred"]


@pytest.mark.parametrize("how", BIASES)
def test_keeping_everything_adds_no_bias_and_changes_nothing(llama, how):
    inputs = {"input_ids": torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(4))}
    result = sp.prune(llama, lm_batches(4), 0.0, method="structprune", solver=SolverConfig(refit_bias=how))
    assert result.plan.meta["bias_compensated"] == []
    torch.testing.assert_close(run(result.model, inputs), run(llama, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", BIASES)
def test_the_refit_keeps_each_consumers_output_mean(llama, how):
    """Least squares with a free (unpenalised) bias leaves a residual of mean zero: on the first block's
    calibration inputs, mean(X_K) W'^T + b equals mean(X) W^T. Without the bias it does not."""
    batches = lm_batches(4)
    x = _down_proj_inputs(llama, batches)  # block 0 sees the dense input
    dense_mean = x.mean(0) @ llama.model.layers[0].mlp.down_proj.weight.detach().double().T  # (hidden,)
    with_bias = sp.prune(llama, batches, 0.4, kinds=MLP_ONLY, solver=SolverConfig(refit_bias=how, **EXACT))
    without = sp.prune(llama, batches, 0.4, kinds=MLP_ONLY, solver=SolverConfig(refit_bias="none", **EXACT))
    gid = next(g for g in with_bias.plan.keep if "layers.0." in g)
    means = {}
    for name, r in (("bias", with_bias), ("none", without)):
        kept = torch.tensor(r.plan.keep[gid])
        layer = r.model.model.layers[0].mlp.down_proj
        bias = layer.bias.detach().double() if layer.bias is not None else 0.0
        means[name] = x[:, kept].mean(0) @ layer.weight.detach().double().T + bias
    assert "model.layers.0.mlp.down_proj" in with_bias.plan.meta["bias_compensated"]
    gap = {k: float((m - dense_mean).norm() / dense_mean.norm()) for k, m in means.items()}  # relative
    assert gap["bias"] < 1e-6 and gap["none"] > 1e-2, gap


@pytest.mark.parametrize("how", BIASES)
def test_ridge_to_infinity_is_flaps_bias_compensation(llama, how):
    """With the re-fit's ridge -> inf the kept weights stay dense and the bias is W_S mu_S: the removed
    units' mean output, FLAP's compensation (on the OBS keep-set of the centred statistics with "centred")."""
    batches = lm_batches(4)
    x = _down_proj_inputs(llama, batches)
    r = sp.prune(llama, batches, 0.4, kinds=MLP_ONLY, solver=SolverConfig(refit_bias=how, refit_ridge=1e12, **EXACT))
    gid = next(g for g in r.plan.keep if "layers.0." in g)
    kept = torch.tensor(r.plan.keep[gid])
    removed = torch.tensor(sorted(set(range(x.shape[1])) - set(r.plan.keep[gid])))
    dense = llama.model.layers[0].mlp.down_proj.weight.double()  # (hidden, intermediate)
    pruned = r.model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(pruned.weight.double(), dense[:, kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pruned.bias.double(), x[:, removed].mean(0) @ dense[:, removed].T, rtol=1e-5, atol=1e-6)


def test_pruned_model_runs_and_reloads_with_its_biases(llama, tmp_path):
    batches = lm_batches(4)
    r = sp.prune(llama, batches, 0.3, solver=SolverConfig(refit_bias="refit"))
    assert r.plan.meta["bias_compensated"], "a 30% pruning moves some consumer's output mean"
    loaded = sp.load(r.save(tmp_path / "out"))
    torch.testing.assert_close(run(loaded, batches[0]), run(r.model, batches[0]), atol=0, rtol=0)


def test_refit_bias_refuses_what_it_does_not_support():
    with pytest.raises(sp.StructPruneError, match="rounds=0"):
        SolverConfig(refit_bias="refit", rounds=2)
    with pytest.raises(sp.StructPruneError, match="tau_search='masked'"):
        SolverConfig(refit_bias="centred", tau_search="refit")
    with pytest.raises(sp.StructPruneError, match="unknown refit_bias 'yes'"):
        SolverConfig(refit_bias="yes")


def test_another_methods_refit_refuses_a_bias_rather_than_ignoring_it(llama):
    with pytest.raises(sp.StructPruneError, match="method='structprune' only"):
        sp.prune(llama, lm_batches(2), 0.3, method="wanda-sp", reconstruct=True, solver=SolverConfig(refit_bias="refit"))
