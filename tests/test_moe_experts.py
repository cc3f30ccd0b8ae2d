"""Whole experts as groups (structprune_graph/moe.py): one ``expert`` group per MoE layer (the router row
and the expert's slices of the fused tensors), opt-in, at least top_k kept; the pruned model equals the
dense model routing with the removed experts' logits at -inf (Mixtral, Qwen2-MoE with its shared expert,
OLMoE), and the routers' and experts' counts follow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import structprune_graph as sp
from structprune_graph.pruning import select_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from zoo_coverage import BENCH  # noqa: E402

MOE = {e.name: e for e in BENCH if e.name in ("mixtral", "qwen2_moe", "olmoe")}
REMOVED = {0: [1], 1: [0, 3]}  # layer -> experts removed (4 experts, top 2)


def _masked_router(router, removed):
    """The dense router with the removed experts' logits at -inf: softmax over the others, top-k, and the
    router's own renormalisation (Mixtral always renormalises)."""
    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, router.hidden_dim)
        logits = F.linear(hidden_states, router.weight)  # (tokens, experts)
        probs = torch.softmax(logits.float().masked_fill(removed, float("-inf")), dim=-1)
        top, index = torch.topk(probs, router.top_k, dim=-1)  # (tokens, k)
        if getattr(router, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), index
    return forward


@pytest.mark.parametrize("name", sorted(MOE))
def test_removing_whole_experts_equals_routing_around_them(name):
    entry = MOE[name]
    model = entry.build().eval()
    inputs = entry.inputs(0)
    graph = sp.trace(model, inputs)
    experts = [g for g in graph.groups if g.kind == "expert"]
    assert len(experts) == 2 and all(g.prunable and not g.mask_exact and g.size == 4 for g in experts)
    for i, g in enumerate(experts):
        prefix = f"model.layers.{i}.mlp"
        assert g.min_keep == 2  # top_k
        assert {m.label for m in g.members} == {f"{prefix}.gate.weight[0]", f"{prefix}.experts.gate_up_proj[0]",
                                                 f"{prefix}.experts.down_proj[0]"}
    assert not any(g.kind == "expert" for g in select_groups(graph))  # opt-in
    keep = {g.id: [e for e in range(4) if e not in REMOVED[i]] for i, g in enumerate(experts)}
    pruned = sp.apply(model, graph, keep)
    for i, layer in enumerate(pruned.model.layers):
        kept = 4 - len(REMOVED[i])
        assert layer.mlp.gate.num_experts == layer.mlp.experts.num_experts == kept
        assert layer.mlp.experts.gate_up_proj.shape[0] == layer.mlp.gate.weight.shape[0] == kept
    originals = []
    for i, layer in enumerate(model.model.layers):
        mask = torch.zeros(4, dtype=torch.bool)
        mask[REMOVED[i]] = True
        originals.append(layer.mlp.gate.forward)
        layer.mlp.gate.forward = _masked_router(layer.mlp.gate, mask)
    try:
        with torch.no_grad():
            want = model(**entry.inputs(1)).logits
    finally:
        for layer, forward in zip(model.model.layers, originals):
            layer.mlp.gate.forward = forward
    with torch.no_grad():
        got = pruned(**entry.inputs(1)).logits
        dense = model(**entry.inputs(1)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-4)  # the routing did change


def test_keeping_fewer_experts_than_top_k_is_refused_and_methods_prune_experts_on_request(tmp_path):
    entry = MOE["mixtral"]
    model = entry.build().eval()
    graph = sp.trace(model, entry.inputs(0))
    gid = next(g.id for g in graph.groups if g.kind == "expert")
    with pytest.raises(sp.StructPruneError, match="keep at least 2"):
        sp.apply(model, graph, {gid: [0]})
    batches = [entry.inputs(s) for s in range(4)]
    result = sp.prune(model, batches, 0.25, method="taylor-global", kinds=["expert"])
    removed = {g: f for g, f in result.report.kept_fraction.items() if f < 1.0}
    assert removed and all(g.startswith("expert:") for g in removed)
    assert abs(result.report.sparsity_achieved - 0.25) <= 0.13  # one expert is a quarter of a layer's
    with torch.no_grad():
        logits = result.model(**entry.inputs(5)).logits
    assert torch.isfinite(logits).all()
    result.save(tmp_path / "out")  # the folder loads again: the plan replays on the dense model
    with torch.no_grad():
        torch.testing.assert_close(sp.load(tmp_path / "out")(**entry.inputs(5)).logits, logits)
    with pytest.raises(sp.StructPruneError, match="whole experts"):
        sp.prune(model, batches, 0.25, method="structprune", kinds=["expert"])
    for method in ("wanda-sp", "flap"):  # input statistics: no layer reads a router row or the fused experts
        with pytest.raises(sp.StructPruneError, match=f"{method} scores a unit by the input statistics"):
            sp.prune(model, batches, 0.25, method=method, kinds=["expert"])
