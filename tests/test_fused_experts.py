"""Fused mixture-of-experts tensors in the solver (passes/experts.py): the per-expert inputs the
statistics are taken on reproduce the experts module, structprune prunes expert channels, and a width
grouped_mm cannot run falls back to the eager loop in that layer only."""

from __future__ import annotations

import torch
import transformers

import structprune_graph as sp
from structprune_graph.passes.experts import routed_inputs


def _mixtral(seed: int = 0):
    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96,
                                     max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(cfg).eval()


def _batches(n: int):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 96, (2, 16), generator=g)} for _ in range(n)]


def test_routed_inputs_reproduce_the_experts_output():
    """sum_e scatter(down_e(x_e)) over the routed, weighted intermediate activations == the module's output."""
    moe = _mixtral().model.layers[0].mlp
    hidden = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))  # (tokens, hidden)
    with torch.no_grad():
        _, weights, index = moe.gate(hidden)  # (tokens, k), (tokens, k)
        expected = moe.experts(hidden, index, weights)
        rebuilt = torch.zeros_like(hidden)
        for e, (tokens, x) in routed_inputs(moe.experts, (hidden, index, weights), {}).items():
            rebuilt.index_add_(0, tokens, x @ moe.experts.down_proj[e].T)  # (tokens_e, intermediate) -> hidden
    torch.testing.assert_close(rebuilt, expected)


def test_structprune_prunes_expert_channels_and_keeps_the_input_model():
    model = _mixtral()
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = sp.prune(model, _batches(4), 0.3)
    kinds = {result.report.group_kinds[g] for g, f in result.report.kept_fraction.items() if f < 1.0}
    assert "expert_channel" in kinds
    assert abs(result.report.sparsity_achieved - 0.3) < 0.05
    ids = _batches(5)[-1]
    with torch.no_grad():
        assert torch.isfinite(result.model(**ids).logits).all()
    assert model.config._experts_implementation == "grouped_mm"
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
    widths = [layer.mlp.experts.down_proj.shape[-1] for layer in result.model.model.layers]
    assert any(w % 8 for w in widths), widths  # the fallback is exercised
    for layer in result.model.model.layers:  # grouped_mm where the width allows it, else that layer's eager loop
        experts = layer.mlp.experts
        width = experts.down_proj.shape[-1]
        assert experts.config._experts_implementation == ("grouped_mm" if width % 8 == 0 else "eager")
    assert result.model.config._experts_implementation == "grouped_mm"


def test_expert_channels_with_every_channel_kept_change_nothing():
    model = _mixtral()
    graph = sp.trace(model, _batches(1)[0])
    (group,) = [g for g in graph.prunable_groups if g.kind == "expert_channel"][:1]
    ids = _batches(2)[-1]
    with torch.no_grad():
        torch.testing.assert_close(sp.apply(model, graph, {group.id: list(range(group.size))})(**ids).logits,
                                   model(**ids).logits)
