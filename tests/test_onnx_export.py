"""ONNX export: onnxruntime matches PyTorch for dense and pruned zoo models; a tampered model is caught."""

from __future__ import annotations

import copy

import pytest
import torch

import structprune_graph as sp
from conftest import ZOO_NAMES, random_keep, traced
from structprune_graph.exporters import ExportValidationError, validate_onnx

FAST = ("llama", "resnet", "plain_mlp", "grouped_conv")  # the rest of the zoo: pytest -m slow
ZOO_PARAMS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in ZOO_NAMES]


@pytest.mark.parametrize("name", ZOO_PARAMS)
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_export_matches_pytorch(name, pruned, tmp_path):
    entry, model, graph = traced(name)
    if pruned:
        model = sp.apply(model, graph, random_keep(graph, 11, only_exact=False))
    result = sp.export_onnx(model, entry.inputs(0), tmp_path / "model.onnx")
    assert result.path.is_file() and result.file_bytes > 0 and result.opset == 20
    assert "CPUExecutionProvider" in result.providers
    assert len(result.checked_shapes) >= 2 and result.max_abs_diff < 1e-4


def test_tampered_weight_is_reported_with_output_and_difference(tmp_path):
    entry, model, _ = traced("plain_mlp")
    path = sp.export_onnx(model, entry.inputs(0), tmp_path / "mlp.onnx").path
    tampered = copy.deepcopy(model)
    with torch.no_grad():
        tampered.fc2.weight[0, 0] += 1.0
    with pytest.raises(ExportValidationError, match=r"output 'output' for inputs x\(1, 12\): max \|diff\| [0-9.e-]+") as info:
        validate_onnx(path, tampered, entry.inputs(0))
    assert len(info.value.mismatches) == 2 and all(m.max_abs_diff > 1e-3 for m in info.value.mismatches)


@pytest.mark.parametrize("factor, caught", [(3.0, True), (0.3, False)])
def test_the_default_validation_tolerance_is_what_it_says(tmp_path, factor, caught):
    """The exported model's output is the constant 1 (last layer: zero weights, bias 1), so the default bound
    is exactly 1e-4 + 1e-4 * |reference|; a PyTorch model shifted by 3x that bound is caught, by 0.3x it
    passes: a loosened or tightened tolerance fails one of the two."""
    entry, model, _ = traced("plain_mlp")
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.fc3.weight.zero_()
        model.fc3.bias.fill_(1.0)
    path = sp.export_onnx(model, entry.inputs(0), tmp_path / "mlp.onnx").path
    shift = factor * (1e-4 + 1e-4 * 1.0)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.fc3.bias += shift
    if caught:
        with pytest.raises(ExportValidationError, match="does not match PyTorch"):
            validate_onnx(path, shifted, entry.inputs(0))
    else:
        validate_onnx(path, shifted, entry.inputs(0))


def test_cli_exports_a_pruned_folder(tmp_path, capsys):
    from structprune_graph.cli import main

    _, model, _ = traced("llama")
    batches = [{"input_ids": torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    folder = sp.prune(model, batches, 0.3, method="magnitude").save(tmp_path / "pruned")
    assert main(["export", str(folder), "--onnx", str(tmp_path / "pruned.onnx")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "pruned.onnx").is_file() and "onnxruntime (CPUExecutionProvider) matches PyTorch" in out
