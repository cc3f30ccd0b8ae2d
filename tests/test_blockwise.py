"""Block-wise execution: captured inputs replay the model block by block exactly, a KV cache never leaks
into the captured arguments, and the activation store gives back what it was given (memory or disk)."""

from __future__ import annotations

import torch

from conftest import run, traced
from structprune_graph.blockwise import ActivationStore, capture_block_inputs, chains, run_block
from test_pruning import lm_batches


def test_blocks_replay_the_model_exactly_even_with_the_cache_on():
    _, model, _ = traced("llama")
    model.config.use_cache = True  # the captured arguments must still carry no cache
    batches = lm_batches(2)
    inputs = capture_block_inputs(model, model.model.layers, batches)
    assert all(not type(v).__name__.endswith("Cache") for i in inputs for v in i.kwargs.values())
    stream = inputs[0]
    for block in model.model.layers:
        first = run_block(block, stream)
        torch.testing.assert_close(run_block(block, stream), first, rtol=0, atol=0)  # no state carried over
        stream = stream.with_stream(first)
    hidden = model.model.norm(stream.stream)  # (batch, tokens, hidden)
    torch.testing.assert_close(model.lm_head(hidden), run(model, batches[0]), rtol=1e-5, atol=1e-5)
    assert chains(model, model.model.layers, batches[0]) is None


def test_store_spills_past_its_budget_and_reads_back_exactly():
    store = ActivationStore(budget_bytes=64)
    small, big = torch.arange(8.0), torch.randn(64, 3)
    store.put("small", small)
    store.put("big", big)
    assert store.bytes_in_memory == 32 and store.bytes_on_disk > 0
    torch.testing.assert_close(store.get("big"), big, rtol=0, atol=0)
    store.put("big", big * 2)  # replacing a spilled entry never reads a stale file
    store.put("other", big + 1)
    torch.testing.assert_close(store.get("big"), big * 2, rtol=0, atol=0)
    torch.testing.assert_close(store.get("other"), big + 1, rtol=0, atol=0)
    store.close()
