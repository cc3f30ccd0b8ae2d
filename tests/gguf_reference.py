"""A reference forward of a GGUF LLaMA / DeciLM file with llama.cpp's semantics, in PyTorch: interleaved
(adjacent-pair) RoPE, per-layer head counts, attention-free layers, optional output biases, tied output.
It checks our writer (names, orientation, Q/K permutation, per-layer arrays) where llama.cpp is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _per_layer(value, layers):
    return list(value) if isinstance(value, list) else [value] * layers


def gguf_forward(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits (tokens, vocab) of the file for one sequence of token ids, in float64."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    layers = _field(reader, f"{arch}.block_count")
    heads = _per_layer(_field(reader, f"{arch}.attention.head_count"), layers)
    kv_heads = _per_layer(_field(reader, f"{arch}.attention.head_count_kv"), layers)
    head_dim = _field(reader, f"{arch}.attention.key_length")
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon")
    base = _field(reader, f"{arch}.rope.freq_base")
    w = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float64)) for t in reader.tensors}

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    tokens = ids.shape[0]
    pos = torch.arange(tokens, dtype=torch.float64)[:, None]  # (tokens, 1)
    angle = pos * base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (tokens, hd/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (tokens, 1, hd/2)

    def rope(x):  # (tokens, heads, hd): rotate adjacent pairs (x0, x1), (x2, x3), ...
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    causal = torch.full((tokens, tokens), float("-inf"), dtype=torch.float64).triu(1)
    x = w["token_embd.weight"][ids]  # (tokens, hidden)
    for i in range(layers):
        if heads[i]:
            h = norm(x, w[f"blk.{i}.attn_norm.weight"])
            q = rope((h @ w[f"blk.{i}.attn_q.weight"].T).view(tokens, heads[i], head_dim))
            k = rope((h @ w[f"blk.{i}.attn_k.weight"].T).view(tokens, kv_heads[i], head_dim))
            v = (h @ w[f"blk.{i}.attn_v.weight"].T).view(tokens, kv_heads[i], head_dim)
            share = heads[i] // kv_heads[i]  # consecutive query heads share one KV head
            k, v = k.repeat_interleave(share, dim=1), v.repeat_interleave(share, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5 + causal  # (heads, tokens, tokens)
            out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(tokens, -1)
            x = x + out @ w[f"blk.{i}.attn_output.weight"].T + w.get(f"blk.{i}.attn_output.bias", 0.0)
        h = norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[f"blk.{i}.ffn_gate.weight"].T)
        x = x + (gate * (h @ w[f"blk.{i}.ffn_up.weight"].T)) @ w[f"blk.{i}.ffn_down.weight"].T \
            + w.get(f"blk.{i}.ffn_down.bias", 0.0)
    x = norm(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T
