"""Shared helpers: build zoo models once per session, run models on dict or tuple inputs."""

from __future__ import annotations

import functools

import pytest
import torch

import structprune_graph as sp
from structprune_graph.evaluate import main_output
from structprune_graph.zoo import ZOO, ZooEntry, build_eval

ZOO_NAMES = [e.name for e in ZOO]


def run(model: torch.nn.Module, inputs) -> torch.Tensor:
    """The model's main output tensor (logits, hidden states, or the plain output)."""
    with torch.no_grad():
        return main_output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


@functools.lru_cache(maxsize=None)
def traced(name: str, frontend: str = "auto") -> tuple[ZooEntry, torch.nn.Module, sp.DependencyGraph]:
    entry = next(e for e in ZOO if e.name == name)
    model = build_eval(entry)
    return entry, model, sp.trace(model, entry.inputs(0), frontend=frontend)


def random_keep(graph: sp.DependencyGraph, seed: int, only_exact: bool) -> dict[str, list[int]]:
    """About half of each prunable group, a different random half per group."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.prunable_groups:
        if only_exact and not g.mask_exact:
            continue
        count = max(g.min_keep, g.size // 2)
        keep[g.id] = sorted(torch.randperm(g.size, generator=gen)[:count].tolist())
    return keep


def deep_llama_model() -> torch.nn.Module:
    """A 6-layer random-init Llama with GQA (vocabulary 96): the coordination tests' chain of blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def token_batches(n: int = 10, seed: int = 0, vocab: int = 96) -> list[dict]:
    """``n`` batches of 2 x 16 random token ids, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 16), generator=g)} for _ in range(n)]


@pytest.fixture(params=ZOO_NAMES)
def zoo_model(request):
    return traced(request.param)
