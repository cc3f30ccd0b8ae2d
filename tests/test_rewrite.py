"""The rewrite pass: typed results, postconditions, and literal reshape sizes in GraphModules."""

from __future__ import annotations

import torch
from torch import fx, nn

import structprune_graph as sp
from conftest import traced
from structprune_graph.passes import ApplyPass, MaskPass, RewriteRequest


class HeadsWithLiterals(nn.Module):
    """Multi-head attention written with literal head counts in view/reshape (as symbolic_trace keeps them)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):  # (batch, 5, 16)
        q = self.q(x).view(2, 5, 4, 4).transpose(1, 2)  # (batch, heads, tokens, head_dim)
        k = self.k(x).view(2, 5, 4, 4).transpose(1, 2)
        v = self.v(x).view(2, 5, 4, 4).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(2, 5, 16))


def test_graph_module_literal_head_counts_are_rewritten():
    gm = fx.symbolic_trace(HeadsWithLiterals().eval())
    x = torch.randn(2, 5, 16)
    graph = sp.trace(gm, (x,))
    (heads,) = [g for g in graph.groups if g.kind == "attention_head"]
    assert heads.size == 4 and heads.mask_exact
    keep = {heads.id: [0, 3]}
    pruned = sp.apply(gm, graph, keep)
    assert isinstance(pruned, fx.GraphModule)
    assert "view(2, 5, 2, 4)" in pruned.code and "reshape(2, 5, 8)" in pruned.code
    assert "view(2, 5, 4, 4)" in gm.code  # the input's graph is untouched
    torch.testing.assert_close(pruned(x), sp.mask(gm, graph, keep)(x), atol=1e-5, rtol=0)


def test_passes_return_typed_results():
    _, model, graph = traced("plain_mlp")
    gid = "mlp_channel:fc1.weight[0]"
    applied = ApplyPass()(RewriteRequest(model, graph, {gid: [0, 1, 2]}))
    assert applied.modified and applied.state.fc1.out_features == 3 and applied.state.fc2.in_features == 3
    unchanged = ApplyPass()(RewriteRequest(model, graph, {}))
    assert not unchanged.modified
    masked = MaskPass()(RewriteRequest(model, graph, {gid: [0, 1, 2]}))
    assert masked.modified and masked.state.fc1.weight.shape == model.fc1.weight.shape
    assert torch.count_nonzero(masked.state.fc1.weight[3:]) == 0


def test_attention_attributes_follow_the_heads():
    _, model, graph = traced("opt")
    gid = "attention_head:model.decoder.layers.0.self_attn"
    pruned = sp.apply(model, graph, {gid: [1, 2, 3]})
    attn = pruned.model.decoder.layers[0].self_attn
    assert attn.num_heads == 3 and attn.q_proj.out_features == 48 and attn.out_proj.in_features == 48
    assert pruned.model.decoder.layers[1].self_attn.num_heads == 4  # other layers keep their width


def test_depthwise_conv_groups_follow_channels():
    _, model, graph = traced("grouped_conv")
    pruned = sp.apply(model, graph, {"conv_channel:stem.weight[0]": list(range(0, 16, 2))})
    assert pruned.dw.groups == 8 and pruned.dw.in_channels == 8 and pruned.bn0.num_features == 8
    assert pruned.bn0.running_mean.shape == (8,)


def test_verify_catches_a_broken_group_and_a_wrong_shape():
    import dataclasses

    import pytest

    from structprune_graph.verify import InvariantError, verify_graph, verify_rewrite

    _, model, graph = traced("plain_mlp")
    g = graph.group("mlp_channel:fc1.weight[0]")
    m = g.members[0]
    bad = dataclasses.replace(g, members=(dataclasses.replace(m, indices=(m.indices[1],) + m.indices[1:]),) + g.members[1:])
    with pytest.raises(InvariantError, match="gives one index to two units"):
        verify_graph(dataclasses.replace(graph, groups=(bad,)))
    with pytest.raises(InvariantError, match=r"fc1.weight has shape \(32, 12\), expected \(3, 12\)"):
        verify_rewrite(graph, {g.id: [0, 1, 2]}, model)
