"""GGUF export (issue 14 item 3): the file's own forward, computed from its tensors with llama.cpp's
semantics (``gguf_reference``), equals the PyTorch model for dense, uniform, per-layer (``deci``) and
FLAP-biased prunings, in f32 and f16; the per-layer arrays say each layer's widths; the vocabulary is copied
from a source GGUF or converted from ``tokenizer.json``; unsupported models are refused before anything is
written. Running the file in llama.cpp itself is the slow test at the end (``llama-cpp-python``)."""

from __future__ import annotations

import gguf
import pytest
import torch

import structprune_graph as sp
from conftest import traced
from gguf_reference import gguf_forward
from structprune_graph.solver import SolverConfig
from structprune_graph.exporters.gguf import (LOGIT_TOLERANCE, GgufExportError, export_gguf, layer_widths,
                                              validate_gguf)
from test_pruning import lm_batches


@pytest.fixture(scope="module")
def prunings():
    _, model, _ = traced("llama")
    return {"dense": model,
            "uniform": sp.prune(model, lm_batches(4), 0.5, method="wanda-sp", uniform=True).model,
            "wanda-sp": sp.prune(model, lm_batches(4), 0.35, method="wanda-sp").model,
            "flap": sp.prune(model, lm_batches(4), 0.5, method="flap").model,
            # stream block energy and OBS curves: on this random tiny model they give per-layer widths (the
            # defaults, gradient energy and removal curves, give the same widths in both layers)
            "structprune": sp.prune(model, lm_batches(4), 0.5, method="structprune",
                                    solver=SolverConfig(block_energy="stream", curve_error="obs")).model}


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("file_type", ["f32", "f16"])
@pytest.mark.parametrize("name, arch", [("dense", "llama"), ("uniform", "llama"), ("wanda-sp", "deci"),
                                        ("flap", "deci"), ("structprune", "deci")])
def test_the_file_computes_what_the_model_computes(prunings, tmp_path, name, arch, file_type):
    model = prunings[name]
    result = export_gguf(model, tmp_path / "m.gguf", file_type=file_type)
    assert result.architecture == arch
    ids = torch.randint(0, 96, (14,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids[None]).logits[0].double()  # (tokens, vocab)
    got = gguf_forward(result.path, ids)
    # f32: the same weights in float64; f16: weights rounded to half precision
    tolerance = 1e-5 if file_type == "f32" else LOGIT_TOLERANCE["f16"]
    torch.testing.assert_close(got, want, atol=tolerance * (1 + float(want.abs().max())), rtol=0)
    fields, tensors = _fields(result.path)
    widths = layer_widths(model)
    heads = fields[f"{arch}.attention.head_count"]
    assert (heads if arch == "deci" else [heads] * len(widths)) == [w.heads for w in widths]
    ffn = fields[f"{arch}.feed_forward_length"]
    assert (ffn if arch == "deci" else [ffn] * len(widths)) == [w.ffn for w in widths]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == file_type.upper()
    assert tensors["blk.0.ffn_norm.weight"].tensor_type.name == "F32"  # norms stay f32, as llama.cpp's converter


def test_flap_biases_are_written_and_matter(prunings, tmp_path):
    """Every bias FLAP added is in the file, and the file's forward depends on them: the model with its
    biases zeroed is far from it."""
    import copy

    model = prunings["flap"]
    path = export_gguf(model, tmp_path / "m.gguf").path
    _, tensors = _fields(path)
    biases = {f"blk.{i}.{name}.bias" for i, b in enumerate(model.model.layers)
              for name, layer in (("attn_output", b.self_attn.o_proj), ("ffn_down", b.mlp.down_proj))
              if layer.bias is not None}
    assert biases and biases == {n for n in tensors if n.endswith(".bias")}
    unbiased = copy.deepcopy(model)
    for name, param in unbiased.named_parameters():
        if name.endswith("bias"):
            param.data.zero_()
    ids = torch.arange(3, 17)
    with torch.no_grad():
        without = unbiased(ids[None]).logits[0].double()
    assert float((gguf_forward(path, ids) - without).abs().max()) > 1e-3


def test_per_layer_widths_differ_in_the_deci_file(prunings, tmp_path):
    fields, _ = _fields(export_gguf(prunings["structprune"], tmp_path / "m.gguf").path)
    assert len(set(fields["deci.feed_forward_length"])) > 1 or len(set(fields["deci.attention.head_count"])) > 1
    assert fields["deci.attention.key_length"] == 16  # head_dim, no longer hidden / heads


def _biased_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name, match", [("gpt2", "LLaMA layout .* GPT2LMHeadModel"), ("qwen2", "model_type 'qwen2'"),
                                         ("biased-llama", "layer 0 self_attn.q_proj has a bias")])
def test_unsupported_models_are_refused_and_nothing_is_written(tmp_path, name, match):
    model = _biased_llama() if name == "biased-llama" else traced(name)[1]
    with pytest.raises(GgufExportError, match=match):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(prunings, tmp_path, monkeypatch):
    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(prunings["dense"], tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_file_type_is_refused(prunings, tmp_path):
    with pytest.raises(GgufExportError, match="choose one of f32, f16"):
        export_gguf(prunings["dense"], tmp_path / "m.gguf", file_type="q4_0")


def test_vocabulary_copied_from_the_source_gguf_or_converted_from_tokenizer_json(tmp_path):
    """SmolLM2: copying the source file's vocabulary is exact; converting the tokenizer.json that transformers
    made from it gives the same tokens, types and merges (the pre-tokenizer name is the one thing it cannot
    recover)."""
    from structprune_graph.models import load_tokenizer, smollm2_gguf

    source, _ = _fields(smollm2_gguf())
    model = traced("llama")[1]
    copied, _ = _fields(export_gguf(model, tmp_path / "a.gguf", tokenizer=smollm2_gguf()).path)
    for key in [k for k in source if k.startswith("tokenizer.")]:
        assert copied[key] == source[key], key
    load_tokenizer().save_pretrained(tmp_path / "tok")
    result = export_gguf(model, tmp_path / "b.gguf", tokenizer=tmp_path / "tok", pre_tokenizer="smollm")
    converted, _ = _fields(result.path)
    assert "tokenizer.json" in result.tokenizer
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert converted[key] == source[key], key


def test_no_tokenizer_means_token_ids_only(prunings, tmp_path):
    fields, _ = _fields(export_gguf(prunings["dense"], tmp_path / "m.gguf").path)
    assert fields["tokenizer.ggml.model"] == "none" and fields["llama.vocab_size"] == 96


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "uniform", "wanda-sp", "flap", "structprune"])
@pytest.mark.parametrize("file_type", ["f32", "f16"])
def test_llama_cpp_runs_the_file_like_pytorch(prunings, tmp_path, name, file_type):
    pytest.importorskip("llama_cpp")
    model = prunings[name]
    path = export_gguf(model, tmp_path / "m.gguf", file_type=file_type).path
    check = validate_gguf(path, model, list(range(3, 35)), steps=32, file_type=file_type)
    assert check.max_abs_diff <= check.tolerance and len(check.greedy_tokens) == 32
