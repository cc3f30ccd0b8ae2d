"""Score pass: each score against its formula on a plain MLP."""

from __future__ import annotations

import pytest
import torch

from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.passes.calibrate import CalibratePass, CalibrationRequest
from structprune_graph.passes.score import ScorePass, ScoreRequest


@pytest.fixture(scope="module")
def setup():
    _, model, graph = traced("plain_mlp")
    batches = tuple((torch.randn(8, 12, generator=torch.Generator().manual_seed(i)),) for i in range(2))
    calib = CalibratePass()(CalibrationRequest(model, graph, graph.prunable_groups, batches, input_stats=True,
                                               gradients=True, loss_fn=lambda m, b: m(*b).sum())).state
    group = graph.group("mlp_channel:fc1.weight[0]")
    return model, group, calib


def score(setup, name):
    model, group, calib = setup
    return torch.tensor(ScorePass()(ScoreRequest(model, (group,), name, calib)).state.per_unit[group.id],
                        dtype=torch.float64)


def test_magnitude_is_the_l2_norm_of_the_unit(setup):
    model = setup[0]
    want = (model.fc1.weight.pow(2).sum(1) + model.fc1.bias.pow(2) + model.fc2.weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(score(setup, "magnitude"), want.double(), rtol=1e-5, atol=1e-6)


def test_wanda_sp_weights_consumer_columns_by_input_norms(setup):
    model, _, calib = setup
    want = model.fc2.weight.abs().sum(0).double() * calib.inputs["fc2"].l2
    torch.testing.assert_close(score(setup, "wanda-sp"), want, rtol=1e-5, atol=1e-8)


def test_flap_is_standardised_fluctuation(setup):
    model, _, calib = setup
    raw = model.fc2.weight.pow(2).sum(0).double() * calib.inputs["fc2"].variance
    got = score(setup, "flap")
    torch.testing.assert_close(got, (raw - raw.mean()) / raw.std(), rtol=1e-5, atol=1e-8)
    assert abs(got.mean()) < 1e-6


def test_taylor_sums_weight_times_gradient(setup):
    model, _, calib = setup
    g = calib.gradients
    want = ((model.fc1.weight * g["fc1.weight"]).abs().sum(1) + (model.fc1.bias * g["fc1.bias"]).abs()
            + (model.fc2.weight * g["fc2.weight"]).abs().sum(0)).double()
    torch.testing.assert_close(score(setup, "taylor"), want, rtol=1e-5, atol=1e-8)


def test_unknown_score_is_an_error(setup):
    with pytest.raises(StructPruneError, match="unknown score 'nope'"):
        score(setup, "nope")
