"""Block sensitivity pass (passes/sensitivity.py): the mean squared loss gradient per channel and token at
each block's output, computed block by block, equal to a direct autograd computation of the whole model
(in memory, with block inputs spilled to files, and with weights streamed from a checkpoint);
SolverConfig(block_energy="gradient") scales the dense sweep's curves by it and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
import transformers

import structprune_graph as sp
from conftest import traced
from structprune_graph.checkpoint import prune_checkpoint
from structprune_graph.passes.sensitivity import BlockSensitivityPass, SensitivityRequest
from structprune_graph.pruning import select_groups
from structprune_graph.solver import SolverConfig, prepare
from structprune_graph.streaming import CheckpointWeights, WeightStreamer, empty_model
from test_pruning import lm_batches


def _direct(model, batches):
    """Per layer: the mean squared loss gradient at its output, from one backward pass of the whole model."""
    layers = model.model.layers
    sums, count = [0.0] * len(layers), [0] * len(layers)
    for batch in batches:  # direct: keep every layer's output, then read its .grad
        outs = []
        handles = [layer.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
                   for layer in layers]
        try:
            with torch.enable_grad():
                model.model.embed_tokens.weight.requires_grad_(True)
                loss = model(**batch, labels=batch["input_ids"]).loss
                for o in outs:
                    o.retain_grad()
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            model.zero_grad(set_to_none=True)
        for i, o in enumerate(outs):
            sums[i] += float((o.grad.double() ** 2).sum())
            count[i] += o.grad.numel()
    return torch.tensor([s / c for s, c in zip(sums, count)])


def _saved_llama(folder, n_batches):
    """A tiny 3-layer Llama saved as a checkpoint folder, and its calibration batches."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    return model, [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)} for _ in range(n_batches)]


@pytest.mark.parametrize("budget", [None, 0], ids=["in-memory", "spilled-to-files"])
def test_block_by_block_sensitivity_equals_the_whole_models_backward_pass(budget):
    model = traced("llama")[1]
    batches = lm_batches(3)
    graph = sp.trace(model, batches[0])
    state = prepare(model, graph, select_groups(graph), batches, SolverConfig())
    layers = list(model.model.layers)
    found = BlockSensitivityPass()(SensitivityRequest(model, state.partition, state.inputs, batches,
                                                      buffer_budget=budget)).state.per_block
    assert len(found) == len(layers) > 1
    assert all(a is b for a, b in zip(model.model.layers, layers))  # the pass-throughs are gone again
    torch.testing.assert_close(torch.tensor(found), _direct(model, batches))


def test_streamed_sensitivity_reads_each_block_twice_and_equals_the_in_memory_one(tmp_path):
    model, batches = _saved_llama(tmp_path / "tiny", 3)
    want = _direct(model, batches)
    skeleton = empty_model(tmp_path / "tiny")
    graph = sp.trace(model, batches[0])
    with WeightStreamer(skeleton, "model.layers", CheckpointWeights(tmp_path / "tiny")) as streamer:
        state = prepare(skeleton, graph, select_groups(graph), batches, SolverConfig(), resident=streamer)
        loads = streamer.loads
        found = BlockSensitivityPass()(SensitivityRequest(skeleton, state.partition, state.inputs, batches,
                                                          resident=streamer)).state.per_block
        assert streamer.loads - loads <= 2 * 3  # forward and backward sweep: each block at most twice
    torch.testing.assert_close(torch.tensor(found), want)


def test_gradient_block_energy_scales_each_blocks_curves_and_leaves_the_model_alone():
    model = traced("llama")[1]
    batches = lm_batches(3)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = sp.trace(model, batches[0])
    groups = select_groups(graph)
    # "stream" explicitly: the default ("auto") is "gradient" on a causal LM, and the curves here are ~1e-5,
    # so only a relative tolerance can tell a scaled curve from an unscaled one
    plain = prepare(model, graph, groups, batches, SolverConfig(block_energy="stream"))
    scaled = prepare(model, graph, groups, batches, SolverConfig(block_energy="gradient"))
    assert plain.block_energy == "stream" and scaled.block_energy == "gradient"
    f = BlockSensitivityPass()(SensitivityRequest(  # the solver's own precision ("auto": bf16 on a bf16 CPU)
        model, plain.partition, plain.inputs, batches, precision=SolverConfig().sensitivity_precision)).state.per_block
    for block, energy, fb in zip(plain.partition.blocks, plain.calibration.input_energy, f):
        for gid in block.group_ids:
            a, b = plain.calibration.curves[gid], scaled.calibration.curves[gid]
            assert a.order == b.order
            torch.testing.assert_close(torch.tensor(b.increments, dtype=torch.float64),
                                       torch.tensor(a.increments, dtype=torch.float64) * energy * fb, rtol=1e-9, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is None for p in model.parameters())
    result = sp.prune(model, batches, 0.3, solver=SolverConfig(block_energy="gradient"))
    assert abs(result.report.sparsity_achieved - 0.3) < 0.02


def test_gradient_block_energy_needs_a_loss():
    entry, model, _ = traced("bert")
    with pytest.raises(sp.StructPruneError, match="needs a model that returns a loss"):
        sp.prune(model, [entry.inputs(s) for s in range(2)], 0.3, solver=SolverConfig(block_energy="gradient"))


def test_gradient_block_energy_streams_from_a_checkpoint_like_the_in_memory_run(tmp_path):
    model, batches = _saved_llama(tmp_path / "tiny", 4)
    solver = SolverConfig(block_energy="gradient")
    reference = sp.prune(model, batches, 0.3, method="structprune", solver=solver)
    result = prune_checkpoint(tmp_path / "tiny", batches, 0.3, tmp_path / "out", solver=solver)
    assert result.plan.keep == reference.plan.keep


def test_the_default_block_energy_is_the_gradient_for_a_causal_lm_and_the_stream_for_an_encoder():
    model = traced("llama")[1]
    batches = lm_batches(3)
    assert SolverConfig().block_energy == "auto"
    result = sp.prune(model, batches, 0.3)
    assert result.report.solver["block_energy"] == "gradient"
    explicit = sp.prune(model, batches, 0.3, solver=SolverConfig(block_energy="gradient"))
    assert explicit.plan.keep == result.plan.keep
    entry, bert, _ = traced("bert")
    encoded = sp.prune(bert, [entry.inputs(s) for s in range(2)], 0.3)
    assert encoded.report.solver["block_energy"] == "stream"
    stream = sp.prune(bert, [entry.inputs(s) for s in range(2)], 0.3, solver=SolverConfig(block_energy="stream"))
    assert stream.plan.keep == encoded.plan.keep


def test_a_dense_sweep_is_not_reused_under_other_sweep_settings():
    model = traced("llama")[1]
    batches = lm_batches(2)
    first = sp.prune(model, batches, 0.2, solver=SolverConfig(block_energy="stream"))
    assert first.solver_state.sweep["block_energy"] == "stream"
    again = sp.prune(model, batches, 0.3, solver=SolverConfig(block_energy="stream", rounds=1), reuse=first)
    assert again.report.solver["block_energy"] == "stream"
    with pytest.raises(sp.StructPruneError, match="reuse= holds a dense sweep made with .*'block_energy': 'stream'"):
        sp.prune(model, batches, 0.3, solver=SolverConfig(block_energy="gradient"), reuse=first)
    with pytest.raises(sp.StructPruneError, match="reuse= holds a dense sweep made with .*'curve_error': 'removal'"):
        sp.prune(model, batches, 0.3, solver=SolverConfig(block_energy="stream", curve_error="obs"), reuse=first)


def test_half_precision_weights_get_their_sensitivity_in_float32_and_are_left_in_half_precision():
    """A bf16 model: the head and the VJPs run in float32 (a bf16 backward product is two orders of
    magnitude slower on CPUs without native bf16); the result is the float32 computation on the bf16 weights
    up to the bf16 rounding of the stored block inputs, and every weight is bf16 again after."""
    model = traced("llama")[1]
    batches = lm_batches(3)
    half = __import__("copy").deepcopy(model).bfloat16()
    rounded = __import__("copy").deepcopy(half).float()  # the same values in float32
    graph = sp.trace(model, batches[0])
    state = prepare(half, graph, select_groups(graph), batches, SolverConfig(block_energy="stream"))
    seen = []  # the precision the head and the last block's VJP computed in (the forward sweep: as stored)

    def record(module, args):
        if torch.is_grad_enabled():
            seen.append((module.weight.dtype, args[0].dtype))

    hooks = [m.register_forward_pre_hook(record) for m in (half.lm_head, half.model.layers[-1].mlp.down_proj)]
    try:
        found = BlockSensitivityPass()(SensitivityRequest(half, state.partition, state.inputs, batches)).state.per_block
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    torch.testing.assert_close(torch.tensor(found), _direct(rounded, batches), rtol=0.05, atol=0)


def test_bf16_sensitivity_runs_the_vjps_in_bf16_within_a_percent_and_auto_follows_the_device(monkeypatch):
    """precision="bfloat16": the blocks' re-run forward and backward compute in bf16 (the head in float32),
    and the block energies, Taylor scores and Fisher weights stay within 1% of float32's on a tiny Llama;
    "auto" is bf16 exactly where the device multiplies it natively, float32 elsewhere."""
    import structprune_graph.passes.sensitivity as sensitivity

    model = traced("llama")[1]
    batches = lm_batches(3)
    graph = sp.trace(model, batches[0])
    groups = select_groups(graph)
    state = prepare(model, graph, groups, batches, SolverConfig(block_energy="stream", taylor_first=0.0,
                                                                obs_weighting="none"))
    placed = {gid: state.groups[gid] for b in state.partition.blocks for gid in b.group_ids}

    def sweep(precision):
        seen = []

        def record(module, args, out):
            if torch.is_grad_enabled():
                seen.append((type(module).__name__, out.dtype))

        hooks = [m.register_forward_hook(record) for m in (model.lm_head, model.model.layers[-1].mlp.down_proj)]
        try:
            found = BlockSensitivityPass()(SensitivityRequest(model, state.partition, state.inputs, batches,
                                                              groups=placed, output_fisher=True,
                                                              precision=precision)).state
        finally:
            for h in hooks:
                h.remove()
        return found, set(seen)

    exact, seen32 = sweep("float32")
    half, seen16 = sweep("bfloat16")
    assert (exact.precision, half.precision) == ("float32", "bfloat16")
    assert seen32 == {("Linear", torch.float32)}
    assert seen16 == {("Linear", torch.float32), ("Linear", torch.bfloat16)}  # the head float32, the block bf16
    torch.testing.assert_close(torch.tensor(half.per_block), torch.tensor(exact.per_block), rtol=1e-2, atol=0)
    for gid, scores in exact.unit_taylor.items():
        assert (torch.tensor(half.unit_taylor[gid]) - torch.tensor(scores)).norm() < 1e-2 * torch.tensor(scores).norm()
    for path, fisher in exact.output_fisher.items():
        assert (half.output_fisher[path] - fisher).norm() < 1e-2 * fisher.norm()
    for native, want in ((False, exact), (True, half)):
        monkeypatch.setattr(sensitivity, "native_bf16", lambda device, native=native: native)
        got = sweep("auto")[0]  # the same computation, bit for bit
        assert (got.per_block, got.unit_taylor) == (want.per_block, want.unit_taylor)
        assert all(torch.equal(got.output_fisher[path], f) for path, f in want.output_fisher.items())
    with pytest.raises(sp.StructPruneError, match="sensitivity_precision 'fp8'.*choose one of"):
        SolverConfig(sensitivity_precision="fp8")
