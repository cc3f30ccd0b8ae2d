"""GGUF export of dense or pruned LLaMA-family models, for llama.cpp and the runtimes built on it.

Layout: llama.cpp's own names (``blk.N.attn_q.weight`` ...) written with the ``gguf`` package. Q and K rows
are permuted per head from transformers' rotate-half RoPE layout to llama.cpp's interleaved one, as
llama.cpp's ``convert_hf_to_gguf.py`` does. Architecture: ``llama`` when every layer has the same widths
and no bias was added; otherwise ``deci``, whose loader reads per-layer arrays for the head count, the KV
head count and the feed-forward length (llama.cpp's DeciLM / Nemotron-NAS support), and the optional
``attn_output`` / ``ffn_down`` biases that FLAP's compensation adds. Every group keeps at least one unit,
so no layer has zero heads or MLP channels; a model that does is refused (llama.cpp's ``deci`` graph drops
the whole layer, attention included, when its feed-forward length is 0).

Tokenizer: copied field by field from a ``.gguf`` (the source model's, exact), converted from a
transformers BPE ``tokenizer.json`` (``gpt2`` model, pre-tokenizer ``default`` unless named), or none
(``tokenizer.ggml.model = none`` with the vocabulary size: the model takes token ids only).

``validate_gguf`` runs the file in llama.cpp (``llama-cpp-python``, the ``gguf`` extra) beside PyTorch:
logits of a prompt within tolerance, and the same greedy tokens for a number of steps.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from structprune_graph.errors import StructPruneError
from structprune_graph.evaluate import greedy_tokens

logger = logging.getLogger(__name__)

FILE_TYPES = {"f32": 0, "f16": 1}  # llama.cpp's general.file_type: ALL_F32, MOSTLY_F16
MODEL_TYPES = ("llama", "mistral")  # transformers model types with llama.cpp's LLaMA tensor layout
# llama.cpp vs PyTorch on the same weights, of 1 + max|PyTorch logits|. The check runs llama.cpp with an f32
# KV cache: its default f16 cache alone moves SmolLM2's logits by 0.018-0.024 (of ~35), measured; with
# f32 the file's logits are within 6e-5 of PyTorch's. f16 files add the weights' rounding.
LOGIT_TOLERANCE = {"f32": 2e-5, "f16": 3e-2}
GGML_TYPE_F32 = 0  # llama.cpp's KV cache type for the check


class GgufExportError(StructPruneError):
    """The model cannot be written as GGUF (architecture, RoPE scaling, biases)."""


class GgufValidationError(StructPruneError):
    """llama.cpp's output for the written file differs from PyTorch's."""


@dataclass(frozen=True)
class LayerWidths:
    heads: int
    kv_heads: int
    ffn: int


@dataclass(frozen=True)
class GgufResult:
    path: Path
    architecture: str  # "llama" (one width per kind) or "deci" (per-layer arrays)
    file_type: str
    layers: tuple[LayerWidths, ...]
    tokenizer: str  # where the vocabulary came from
    file_bytes: int
    seconds: float


@dataclass(frozen=True)
class GgufCheck:
    max_abs_diff: float
    tolerance: float
    greedy_tokens: tuple[int, ...]
    steps: int


def layer_widths(model: nn.Module) -> tuple[LayerWidths, ...]:
    """Heads, KV heads and MLP width of every decoder layer, read from the (pruned) weights."""
    config = model.config
    head_dim = _head_dim(config)
    widths = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        widths.append(LayerWidths(attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim,
                                  mlp.up_proj.out_features))
    return tuple(widths)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _check_supported(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES or not hasattr(getattr(model, "model", None), "layers"):
        raise GgufExportError(f"GGUF export supports the LLaMA layout ({', '.join(MODEL_TYPES)}); "
                              f"{type(model).__name__} (model_type {model_type!r}) is not one: export ONNX instead")
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise GgufExportError(f"GGUF export: RoPE scaling {rope_type!r} is not written yet (default RoPE only)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GgufExportError(f"GGUF export: activation {config.hidden_act!r}; llama.cpp's LLaMA graph uses SiLU")
    for i, block in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            if getattr(block.self_attn, name).bias is not None:
                raise GgufExportError(f"GGUF export: layer {i} self_attn.{name} has a bias, which llama.cpp's "
                                      f"LLaMA layout does not read")
        for name in ("gate_proj", "up_proj"):
            if getattr(block.mlp, name).bias is not None:
                raise GgufExportError(f"GGUF export: layer {i} mlp.{name} has a bias, which llama.cpp's LLaMA "
                                      f"layout does not read")


def _rope_permute(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """transformers' rotate-half rows -> llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]  # (heads * head_dim, d_in)
    return weight.reshape(rows // head_dim, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _tensors(model: nn.Module, widths: Sequence[LayerWidths], head_dim: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) in file order; weights keep PyTorch's (out, in) orientation."""
    yield "token_embd.weight", model.model.embed_tokens.weight  # (vocab, hidden)
    for i, (block, w) in enumerate(zip(model.model.layers, widths)):
        attn, mlp = block.self_attn, block.mlp
        yield f"blk.{i}.attn_norm.weight", block.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", _rope_permute(attn.q_proj.weight, head_dim)
        yield f"blk.{i}.attn_k.weight", _rope_permute(attn.k_proj.weight, head_dim)
        yield f"blk.{i}.attn_v.weight", attn.v_proj.weight
        yield f"blk.{i}.attn_output.weight", attn.o_proj.weight
        if attn.o_proj.bias is not None:
            yield f"blk.{i}.attn_output.bias", attn.o_proj.bias
        yield f"blk.{i}.ffn_norm.weight", block.post_attention_layernorm.weight
        yield f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight
        yield f"blk.{i}.ffn_up.weight", mlp.up_proj.weight
        yield f"blk.{i}.ffn_down.weight", mlp.down_proj.weight
        if mlp.down_proj.bias is not None:
            yield f"blk.{i}.ffn_down.bias", mlp.down_proj.bias
    yield "output_norm.weight", model.model.norm.weight
    if not getattr(model.config, "tie_word_embeddings", False):
        yield "output.weight", model.lm_head.weight


def _uses_bias(model: nn.Module) -> bool:
    return any(b.self_attn.o_proj.bias is not None or b.mlp.down_proj.bias is not None for b in model.model.layers)


def export_gguf(model: nn.Module, path: Union[str, Path], *, file_type: str = "f32",
                tokenizer: Optional[Union[str, Path]] = None, pre_tokenizer: str = "default") -> GgufResult:
    """Write ``model`` (a dense or pruned transformers LLaMA/Mistral) to ``path``, atomically.

    ``tokenizer``: a ``.gguf`` file whose ``tokenizer.*`` fields are copied, a folder with a BPE
    ``tokenizer.json``, or None (token ids only)."""
    import gguf

    if file_type not in FILE_TYPES:
        raise GgufExportError(f"GGUF file type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    _check_supported(model)
    t0 = time.perf_counter()
    path = Path(path)
    config = model.config
    head_dim = _head_dim(config)
    widths = layer_widths(model)
    for i, w in enumerate(widths):
        if not (w.heads and w.kv_heads and w.ffn) or w.heads % w.kv_heads:
            raise GgufExportError(f"GGUF export: layer {i} has {w.heads} heads, {w.kv_heads} KV heads and {w.ffn} "
                                  f"MLP channels; llama.cpp needs at least one of each and whole query groups")
    arch = "llama" if len(set(widths)) == 1 and not _uses_bias(model) else "deci"
    heads = [w.heads for w in widths]
    kv_heads = [w.kv_heads for w in widths]
    ffn = [w.ffn for w in widths]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, arch)
        writer.add_name(getattr(config, "_name_or_path", "") or type(model).__name__)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(len(widths))
        writer.add_feed_forward_length(ffn[0] if arch == "llama" else ffn)
        writer.add_head_count(heads[0] if arch == "llama" else heads)
        writer.add_head_count_kv(kv_heads[0] if arch == "llama" else kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(_rope_theta(config)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        writer.add_file_type(FILE_TYPES[file_type])
        source = _write_tokenizer(writer, tokenizer, pre_tokenizer)
        for name, tensor in _tensors(model, widths, head_dim):
            array = tensor.detach().to(torch.float32).cpu().numpy()
            if file_type == "f16" and array.ndim == 2:  # norms and biases stay f32, as llama.cpp's converter does
                array = array.astype(np.float16)
            writer.add_tensor(name, np.ascontiguousarray(array))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %s)", path, arch, file_type)
    return GgufResult(path, arch, file_type, widths, source, path.stat().st_size, time.perf_counter() - t0)


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return 10000.0 if theta is None else theta


def _write_tokenizer(writer: Any, tokenizer: Optional[Union[str, Path]], pre_tokenizer: str) -> str:
    import gguf

    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return "none (token ids only)"
    tokenizer = Path(tokenizer)
    if tokenizer.suffix == ".gguf":
        reader = gguf.GGUFReader(str(tokenizer))
        copied = 0
        for name, field in reader.fields.items():
            if not name.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub_type)
            copied += 1
        if not copied:
            raise GgufExportError(f"{tokenizer} has no tokenizer.* fields to copy")
        return f"copied from {tokenizer}"
    spec = tokenizer / "tokenizer.json"
    if not spec.is_file():
        raise GgufExportError(f"tokenizer {tokenizer}: expected a .gguf file or a folder with tokenizer.json")
    data = json.loads(spec.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise GgufExportError(f"{spec}: tokenizer model {model.get('type')!r}; GGUF export converts BPE "
                              f"tokenizers only (pass the source .gguf, or none for token ids)")
    vocab = dict(model["vocab"])
    special = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, token in special.items():
        vocab[content] = token["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for text, idx in vocab.items():
        tokens[idx] = text
    types = [gguf.TokenType.CONTROL if t in special and special[t].get("special") else
             gguf.TokenType.USER_DEFINED if t in special else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    gguf.SpecialVocab(str(tokenizer), load_merges=False).add_to_gguf(writer)
    return f"converted from {spec} (BPE, pre-tokenizer {pre_tokenizer!r})"


def validate_gguf(path: Union[str, Path], model: nn.Module, prompt: Sequence[int], *, steps: int = 32,
                  file_type: str = "f32", threads: int = 0) -> GgufCheck:
    """Run the file in llama.cpp (f32 KV cache): the prompt's logits within ``LOGIT_TOLERANCE[file_type]`` of
    PyTorch's (relative to 1 + their largest magnitude) and the same greedy tokens for ``steps`` steps."""
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise GgufValidationError("validating a GGUF file needs llama.cpp's Python binding: pip install "
                                  "'structprune-graph[gguf]' (builds llama-cpp-python from source)") from err
    prompt = [int(t) for t in prompt]
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + steps + 8, n_batch=len(prompt) + steps + 8,
                logits_all=True, verbose=False, n_threads=threads or torch.get_num_threads(),
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        return _compare(llm, path, model, prompt, steps, file_type)
    finally:
        llm.close()


def _compare(llm: Any, path: Union[str, Path], model: nn.Module, prompt: list[int], steps: int,
             file_type: str) -> GgufCheck:
    llm.eval(prompt)
    got = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))  # (tokens, vocab)
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].float()  # (tokens, vocab)
    diff = float((got - want).abs().max())
    tolerance = LOGIT_TOLERANCE[file_type] * (1.0 + float(want.abs().max()))
    if diff > tolerance:
        raise GgufValidationError(f"{path}: llama.cpp's logits differ from PyTorch's by {diff:.3g} on the "
                                  f"{len(prompt)}-token prompt (tolerance {tolerance:.3g})")
    ours = greedy_tokens(model, prompt, steps)
    theirs = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(token)
        llm.eval([token])
    if theirs != ours:
        first = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
        raise GgufValidationError(f"{path}: llama.cpp's greedy tokens differ from PyTorch's at step {first} "
                                  f"({theirs[first]} vs {ours[first]})")
    return GgufCheck(diff, tolerance, tuple(ours), steps)
