"""Calibration pass: consumer-layer input statistics and loss gradients, the model untouched."""

from __future__ import annotations

import pytest
import torch

from conftest import traced
from structprune_graph.passes.calibrate import (CalibratePass, CalibrationError, CalibrationRequest,
                                                consumer_modules)


def test_input_statistics_of_consumer_layers():
    _, model, graph = traced("plain_mlp")
    groups = graph.prunable_groups
    assert consumer_modules(model, groups) == {"fc2": 1, "fc3": 1}
    batches = tuple((torch.randn(4, 12, generator=torch.Generator().manual_seed(i)),) for i in range(3))
    stats = CalibratePass()(CalibrationRequest(model, graph, groups, batches, input_stats=True)).state
    h = torch.cat([torch.relu(model.fc1(b[0])) for b in batches]).double()  # fc2's input, (12, 32)
    assert stats.inputs["fc2"].count == 12
    torch.testing.assert_close(stats.inputs["fc2"].l2, h.norm(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.inputs["fc2"].variance, h.var(dim=0, unbiased=False), rtol=1e-6, atol=1e-6)


def test_gradients_are_the_loss_gradient_and_leave_the_model_alone():
    _, model, graph = traced("plain_mlp")
    batches = tuple((torch.randn(4, 12, generator=torch.Generator().manual_seed(i)),) for i in range(2))
    loss = lambda m, b: m(*b).pow(2).mean()
    calib = CalibratePass()(CalibrationRequest(model, graph, graph.prunable_groups, batches, gradients=True,
                                               loss_fn=loss)).state
    expected = torch.autograd.grad(sum(loss(model, b) for b in batches) / 2, model.fc1.weight)[0]
    torch.testing.assert_close(calib.gradients["fc1.weight"], expected)
    assert model.fc1.weight.grad is None


def test_empty_calibration_and_missing_loss_are_errors():
    _, model, graph = traced("plain_mlp")
    with pytest.raises(CalibrationError, match="no calibration batches"):
        CalibratePass()(CalibrationRequest(model, graph, graph.prunable_groups, ()))
    with pytest.raises(CalibrationError, match="taylor-global needs a loss"):
        CalibratePass()(CalibrationRequest(model, graph, graph.prunable_groups, ((torch.randn(2, 12),),),
                                           gradients=True))
