"""What the groups are: heads with GQA, fused projections, gated MLPs, concat index maps, grouped and
depthwise convolutions, the residual hidden dim, and pinned dims with reasons."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

import structprune_graph as sp
from conftest import traced


def groups_of(name, kind):
    return [g for g in traced(name)[2].groups if g.kind == kind]


def member(group, label):
    return next(m for m in group.members if m.label == label)


def test_llama_gqa_kv_groups_hold_their_query_heads():
    kv = groups_of("llama", "kv_group")
    assert [g.id for g in kv] == ["kv_group:model.layers.0.self_attn", "kv_group:model.layers.1.self_attn"]
    g = kv[0]
    assert (g.size, g.heads_per_unit, g.prunable, g.mask_exact) == (2, 2, True, True)
    # unit 1 = KV head 1 (k/v rows 16..31) with query heads 2 and 3 (q rows 32..63)
    assert member(g, "model.layers.0.self_attn.k_proj.weight[0]").indices[1] == tuple(range(16, 32))
    assert member(g, "model.layers.0.self_attn.q_proj.weight[0]").indices[1] == tuple(range(32, 64))
    assert member(g, "model.layers.0.self_attn.o_proj.weight[1]").indices[1] == tuple(range(32, 64))
    assert g.params_per_unit == 2 * 16 * 64 + 16 * 64 * 2 + 2 * 16 * 64


def test_gated_mlp_is_one_group():
    g = groups_of("llama", "mlp_channel")[0]
    assert g.size == 96 and g.params_per_unit == 3 * 64
    assert [m.label for m in g.members] == ["model.layers.0.mlp.gate_proj.weight[0]",
                                            "model.layers.0.mlp.up_proj.weight[0]",
                                            "model.layers.0.mlp.down_proj.weight[1]"]


def test_gpt2_fused_qkv_split_into_heads():
    g = groups_of("gpt2", "attention_head")[0]
    assert g.size == 4
    qkv = member(g, "transformer.h.0.attn.c_attn.weight[1]")  # Conv1D weight is (in, out)
    # head 1: q columns 16..31, k columns 80..95, v columns 144..159 of the fused projection
    assert qkv.indices[1] == tuple(range(16, 32)) + tuple(range(80, 96)) + tuple(range(144, 160))


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "vit"])
def test_residual_hidden_dim_is_one_group_through_norms(name):
    hidden = groups_of(name, "hidden")
    assert len(hidden) == 1
    assert hidden[0].size == 64 and not hidden[0].mask_exact  # LayerNorm/RMSNorm reduce over it


def test_bert_hidden_dim_is_pinned_because_it_is_the_output():
    hidden = groups_of("bert", "hidden")[0]
    assert not hidden.prunable and "model output" in hidden.reason


def test_densenet_concat_maps_indices():
    convs = {g.id: g for g in groups_of("densenet_block", "conv_channel")}
    g1 = convs["conv_channel:conv1.weight[0]"]
    assert member(g1, "conv2.weight[1]").indices[0] == (8,)  # conv1's output lands after the 8 stem channels
    assert member(g1, "head.weight[1]").indices[5] == (13,)
    g2 = convs["conv_channel:conv2.weight[0]"]
    assert member(g2, "bn3.running_mean[0]").indices[0] == (14,)


def test_grouped_conv_units_are_lanes_and_depthwise_follows_its_input():
    convs = {g.id: g for g in groups_of("grouped_conv", "conv_channel")}
    stem = convs["conv_channel:stem.weight[0]"]
    assert member(stem, "dw.weight[0]").indices[3] == (3,)  # depthwise channel 3 belongs to stem channel 3
    assert member(stem, "proj.weight[0]").indices[3] == (3,)  # residual add couples proj with the stem
    lanes = convs["conv_channel:grouped.weight[0]"]
    assert lanes.size == 6 and member(lanes, "grouped.weight[0]").indices[1] == (1, 7, 13, 19)


def test_input_and_output_dims_are_pinned_with_reasons():
    groups = {g.id: g for g in traced("resnet")[2].groups}
    stem_in = next(g for g in groups.values() if any(m.label == "resnet.embedder.embedder.convolution.weight[1]" for m in g.members))
    assert not stem_in.prunable and "fixed size" in stem_in.reason and "conv2d" in stem_in.reason
    head = next(g for g in groups.values() if g.id.startswith("channel:classifier"))
    assert not head.prunable and "model output" in head.reason


def test_networkx_graph_links_groups_to_channel_spaces():
    graph = traced("llama")[2]
    g = graph.nx_graph
    gid = "mlp_channel:model.layers.0.mlp.gate_proj.weight[0]"
    assert set(g.neighbors(gid)) == {m.label for m in graph.group(gid).members}
    assert nx.has_path(g, gid, "model.layers.0.mlp.down_proj.weight[1]")


class NativeGqa(torch.nn.Module):
    """Grouped-query attention through F.scaled_dot_product_attention(enable_gqa=True): 6 query heads
    read 2 KV heads (head_dim 4) without any repeat in the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(12, 24), torch.nn.Linear(12, 8), torch.nn.Linear(12, 8)
        self.o = torch.nn.Linear(24, 12)

    def forward(self, x):  # (batch, tokens, 12)
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, 4).transpose(1, 2)  # (batch, 6, tokens, 4)
        k = self.k(x).view(b, t, -1, 4).transpose(1, 2)  # (batch, 2, tokens, 4)
        v = self.v(x).view(b, t, -1, 4).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("frontend", ["export", "fx"])
def test_native_gqa_gives_kv_groups_and_query_head_slots(frontend):
    model, x = NativeGqa().eval(), torch.randn(2, 5, 12)
    graph = sp.trace(model, (x,), frontend=frontend)
    kv = next(g for g in graph.groups if g.kind == "kv_group")
    slots = next(g for g in graph.groups if g.kind == "query_head")
    assert (kv.size, kv.heads_per_unit) == (2, 3) and (slots.size, slots.heads_per_unit) == (3, 2)
    # slot 1 = query heads 1 and 4 (head 1 of each KV group): q rows 4..7 and 16..19
    assert next(m for m in slots.members if m.label == "q.weight[0]").indices[1] == tuple(range(4, 8)) + tuple(range(16, 20))
    assert {m.label for m in slots.members} == {"q.weight[0]", "q.bias[0]", "o.weight[1]"}
    keep = {slots.id: [0, 2], kv.id: [1]}
    torch.testing.assert_close(sp.apply(model, graph, keep)(x), sp.mask(model, graph, keep)(x), atol=1e-6, rtol=0)
    assert graph.param_count(keep) == sum(p.numel() for p in sp.apply(model, graph, keep).parameters())


def test_query_head_slots_thin_every_kv_group():
    _, model, graph = traced("llama")
    keep = {"query_head:model.layers.0.self_attn": [1]}
    pruned = sp.apply(model, graph, keep)
    attn = pruned.model.layers[0].self_attn
    assert attn.num_key_value_groups == 1 and attn.q_proj.out_features == 32 and attn.k_proj.out_features == 32
    kept_q_rows = next(m for m in graph.group("query_head:model.layers.0.self_attn").members
                       if m.label.endswith("q_proj.weight[0]")).indices[1]
    assert kept_q_rows == tuple(range(16, 32)) + tuple(range(48, 64))  # heads 1 and 3
    torch.testing.assert_close(pruned.model.layers[0].self_attn.q_proj.weight,
                               model.model.layers[0].self_attn.q_proj.weight[list(kept_q_rows)])


def test_convnextv2_mlp_channels_through_grn_are_mlp_and_streams_hidden():
    """Kinds from structure: pwconv1's outputs pass GRN (a norm and an add of its own) yet only pwconv2 reads
    them, so they are MLP channels; each stage's residual stream is hidden."""
    import transformers

    cfg = transformers.ConvNextV2Config(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                        num_labels=5, image_size=32)
    torch.manual_seed(0)
    model = transformers.ConvNextV2ForImageClassification(cfg).eval()
    graph = sp.trace(model, (torch.randn(2, 3, 32, 32),))
    kinds = {g.id: g.kind for g in graph.prunable_groups}
    assert kinds == {"hidden:convnextv2.embeddings.patch_embeddings.weight[0]": "hidden",
                     "mlp_channel:convnextv2.encoder.stages.0.layers.0.pwconv1.weight[0]": "mlp_channel",
                     "hidden:convnextv2.encoder.stages.1.downsampling_layer.1.weight[0]": "hidden",
                     "mlp_channel:convnextv2.encoder.stages.1.layers.0.pwconv1.weight[0]": "mlp_channel"}
    result = sp.prune(model, [(torch.randn(2, 3, 32, 32),) for _ in range(2)], 0.3, method="magnitude")
    assert {result.report.group_kinds[g] for g in result.report.kept_fraction} == {"mlp_channel"}


def _mixtral():
    import transformers

    cfg = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=96,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_mixtral_expert_channels_are_one_group_across_the_fused_experts_and_prune_exactly():
    """Fused experts (gate_up_proj (E, 2I, H), down_proj (E, H, I)): traced through batched_mm, the I channels
    of every expert are one ``expert_channel`` group (gate and up rows together, down's columns); the
    expert dim, pinned by the channel analysis (indexed by the router), is one opt-in ``expert`` group
    (structprune_graph/moe.py); the model keeps its own experts implementation."""
    model = _mixtral()
    ids = {"input_ids": torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))}
    graph = sp.trace(model, ids)
    assert model.config._experts_implementation == "grouped_mm"
    kinds = {g.kind for g in graph.prunable_groups}
    assert kinds == {"hidden", "kv_group", "query_head", "expert_channel", "expert"}
    (experts,) = [g for g in graph.prunable_groups if g.kind == "expert_channel"]
    assert experts.size == 48 and experts.mask_exact
    assert {(m.name, m.dim) for m in experts.members if m.is_param} == {
        ("model.layers.0.mlp.experts.gate_up_proj", 1), ("model.layers.0.mlp.experts.down_proj", 2)}
    assert not [g for g in graph.groups if g.id.endswith("gate_up_proj[0]")]  # the pinned dim became:
    (whole,) = [g for g in graph.groups if g.kind == "expert"]
    assert whole.prunable and not whole.mask_exact and whole.size == 4 and whole.min_keep == 2
    keep = {experts.id: list(range(0, 48, 2))}
    pruned = sp.apply(model, graph, keep)
    assert tuple(pruned.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 48, 32)
    assert tuple(pruned.model.layers[0].mlp.experts.down_proj.shape) == (4, 32, 24)
    with torch.no_grad():  # the pruned model runs with grouped_mm, the reference is the masked dense model
        torch.testing.assert_close(pruned(**ids).logits, sp.mask(model, graph, keep)(**ids).logits)


def test_a_single_head_stays_one_unit_and_a_constant_channel_count_pins_its_channels():
    """SegFormer: stage 0 has one attention head, split by ``view(b, n, -1, head_dim)``: the head is one
    unit (its head_dim channels are not prunable behind the constant head_dim); its reduction conv's output
    is reshaped with the *input's* channel count (``reshape(b, num_channels, -1)``), so those channels are
    pinned, while ``view(-1, channels)`` (Mixtral's router) leaves channels prunable."""
    import transformers

    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                       num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
                                       mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5)
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(cfg).eval()
    graph = sp.trace(model, (torch.randn(2, 3, 32, 32),))
    by_id = {g.id: g for g in graph.groups}
    single = by_id["attention_head:segformer.stages.0.blocks.0.attention"]
    assert single.size == 1 and not single.prunable
    assert not any(g.id.startswith("mlp_channel:segformer.stages.0.blocks.0.attention.q_proj") for g in graph.groups)
    reduced = by_id["conv_channel:segformer.stages.0.blocks.0.attention.sequence_reduction.sequence_reduction.weight[0]"]
    assert not reduced.prunable and "writes this channel count as a constant" in reduced.reason
    assert by_id["attention_head:segformer.stages.1.blocks.0.attention"].prunable
    from structprune_graph.errors import RewriteError
    from structprune_graph.pruning import select_groups

    keep = {g.id: list(range(g.size // 2)) for g in select_groups(graph)}  # every default group, at half
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sp.apply(model, graph, keep)(x).logits, sp.mask(model, graph, keep)(x).logits)
    # the stage's stream is the reduction's input; its code reshapes the conv's output to the stream's width,
    # which no trace can see: the first forward of the pruned model fails, and the rewrite refuses it
    stream = by_id["hidden:segformer.stages.0.patch_embeddings.proj.weight[0]"]
    with pytest.raises(RewriteError, match="sequence_reduction"):
        sp.apply(model, graph, {stream.id: list(range(8))})


def test_t5_relative_position_min_of_two_tensors_is_elementwise():
    """``torch.min(a, b)`` (aten.min.other, T5's position buckets) is element-wise, not a reduction."""
    import transformers

    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
                                num_heads=4, relative_attention_num_buckets=8)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, 96, (2, 8))
    graph = sp.trace(model, {"input_ids": ids, "decoder_input_ids": ids.flip(1)})
    heads = {g.module: g for g in graph.groups if g.kind == "attention_head"}
    assert heads["encoder.block.0.layer.0.SelfAttention"].prunable
    assert heads["decoder.block.0.layer.0.SelfAttention"].prunable
    # cross-attention adds a zero position bias built with the config's head count: pinned, with the op named
    cross = heads["decoder.block.0.layer.1.EncDecAttention"]
    assert not cross.prunable and "scaled_dot_product_attention" in cross.reason
