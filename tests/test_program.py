"""Pruning as a compile-time pass: an ExportedProgram in, a pruned ExportedProgram out, whose graph,
torch.compile of it, and ONNX export of it all give the pruned eager model's outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import run, traced
from structprune_graph.errors import StructPruneError
from structprune_graph.program import lift_linear_layers, prune_program


def _exported(name):
    entry, model, _ = traced(name)
    inputs = entry.inputs(0)
    if isinstance(inputs, dict):
        model.config.use_cache = False  # export cannot return a KV cache object
        return entry, torch.export.export(model, (), inputs, strict=False)
    return entry, torch.export.export(model, inputs, strict=False)


@pytest.fixture(scope="module", params=["plain_mlp", "llama"])
def pruned_program(request):
    entry, program = _exported(request.param)
    return entry, program, prune_program(program, [entry.inputs(s) for s in range(3)], 0.3)


def test_program_is_pruned_and_input_program_untouched(pruned_program):
    entry, program, pruned = pruned_program
    before = sum(p.numel() for p in program.parameters())
    after = sum(p.numel() for p in pruned.program.parameters())
    assert isinstance(pruned.program, torch.export.ExportedProgram)
    assert after == pruned.result.report.params_after < before == pruned.result.report.params_before
    assert abs(pruned.result.report.sparsity_achieved - 0.3) < 0.05
    torch.testing.assert_close(run(program.module(), entry.inputs(5)), run(traced(entry.name)[1], entry.inputs(5)))


def test_program_compile_and_onnx_match_the_pruned_eager_model(pruned_program, tmp_path):
    entry, _, pruned = pruned_program
    inputs = entry.inputs(7)
    eager = run(pruned.result.model, inputs)
    torch.testing.assert_close(run(pruned.program.module(), inputs), eager, rtol=0, atol=0)
    if entry.name == "llama":  # inductor's C++ build takes 10-20 s a model here: compiled for the transformer
        compiled = torch.compile(pruned.program.module())
        torch.testing.assert_close(run(compiled, inputs), eager, rtol=1e-5, atol=1e-5)
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(pruned.program, f=str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = inputs if isinstance(inputs, dict) else dict(zip([i.name for i in session.get_inputs()], inputs))
    names = [i.name for i in session.get_inputs()]
    out = session.run(None, {n: feeds[n].numpy() for n in names})[0]
    np.testing.assert_allclose(out, eager.numpy(), rtol=1e-4, atol=1e-4)


def test_linear_calls_become_layers_with_the_same_parameters():
    _, program = _exported("plain_mlp")
    module = program.module()
    weight = module.fc1.weight
    assert lift_linear_layers(module) == 3
    assert isinstance(module.fc1, torch.nn.Linear) and module.fc1.weight is weight


def test_a_plain_module_is_refused_with_what_to_use():
    with pytest.raises(StructPruneError, match="for an nn.Module use structprune_graph.prune"):
        prune_program(traced("plain_mlp")[1], [], 0.3)
