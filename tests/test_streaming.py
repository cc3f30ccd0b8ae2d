"""Streaming a checkpoint: blocks read from disk one at a time give exactly the in-memory pruning."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers

import structprune_graph as sp
from structprune_graph.checkpoint import prune_checkpoint, streamed
from structprune_graph.cli import parse_bytes
from structprune_graph.errors import StructPruneError
from structprune_graph.pruning import select_groups
from structprune_graph.passes.partition import MemoryBudgetError
from structprune_graph.solver import SolverConfig, prepare
from structprune_graph.storage import OutputExistsError
from structprune_graph.streaming import CheckpointError, CheckpointWeights, WeightStreamer, empty_model

LAYERS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny tied-embedding Llama saved with save_pretrained, its calibration batches and the model."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)} for _ in range(4)]
    return folder, batches, model


def _weights(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_streamed_pruning_equals_in_memory_pruning(checkpoint, tmp_path):
    folder, batches, model = checkpoint
    before = {k: v.clone() for k, v in _weights(model).items()}
    reference = sp.prune(model, batches, 0.3, method="structprune")
    result = prune_checkpoint(folder, batches, 0.3, tmp_path / "out")
    assert result.plan.keep == reference.plan.keep
    shards = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(shards.values())) == LAYERS + 1  # one shard per block and one for the rest
    loaded = sp.load(tmp_path / "out")
    want, got = _weights(reference.model), _weights(loaded)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for name, value in _weights(model).items():  # the input model is untouched
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_streamed_biased_refit_equals_the_in_memory_one(checkpoint, tmp_path):
    """SolverConfig(refit_bias="refit"): the biases it creates are written into the shards and reloaded."""
    folder, batches, model = checkpoint
    config = SolverConfig(refit_bias="refit")
    reference = sp.prune(model, batches, 0.3, method="structprune", solver=config)
    result = prune_checkpoint(folder, batches, 0.3, tmp_path / "out", solver=config)
    assert result.plan.meta["bias_compensated"] == reference.plan.meta["bias_compensated"] != []
    loaded = sp.load(tmp_path / "out")
    want, got = _weights(reference.model), _weights(loaded)
    assert want.keys() == got.keys() and any(name.endswith("down_proj.bias") for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_streamed_rounded_widths_and_refit_tau_search_equal_the_in_memory_ones(checkpoint, tmp_path):
    folder, batches, model = checkpoint
    refit = SolverConfig(tau_search="refit")  # the tau trials' weights swapped into streamed layers too
    reference = sp.prune(model, batches, 0.4, method="structprune", round_to=8, uniform=True, solver=refit)
    result = prune_checkpoint(folder, batches, 0.4, tmp_path / "out", round_to=8, uniform=True, solver=refit)
    assert result.report.solver["tau_losses"] == reference.report.solver["tau_losses"]
    assert result.plan.keep == reference.plan.keep
    widths = {len(kept) for gid, kept in result.plan.keep.items() if gid.startswith("mlp_channel")}
    assert len(widths) == 1 and widths.pop() % 8 == 0


def test_streamed_global_threshold_equals_the_in_memory_one_without_a_tau_search(checkpoint, tmp_path):
    """--allocation global-threshold with --stream: no tau trial reads the checkpoint, same plan and weights."""
    folder, batches, model = checkpoint
    config = SolverConfig(allocation="global-threshold")
    reference = sp.prune(model, batches, 0.4, method="structprune", solver=config)
    result = prune_checkpoint(folder, batches, 0.4, tmp_path / "out", solver=config)
    assert result.report.solver["tau_losses"] == reference.report.solver["tau_losses"] == {}
    assert result.plan.keep == reference.plan.keep
    want, got = _weights(reference.model), _weights(sp.load(tmp_path / "out"))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)

def test_a_small_budget_gives_the_plan_and_weights_of_an_unlimited_one(checkpoint, tmp_path):
    """With ADMM on, the tightest budget that fits the blocks spills every buffer to disk: same result."""
    folder, batches, model = checkpoint
    graph = sp.trace(model, {"input_ids": batches[0]["input_ids"]})
    groups = select_groups(graph)
    tight = prepare(model, graph, groups, batches, SolverConfig(rounds=1)).partition.peak_bytes
    small = prune_checkpoint(folder, batches, 0.3, tmp_path / "small", solver=SolverConfig(rounds=1, memory_budget=tight))
    free = prune_checkpoint(folder, batches, 0.3, tmp_path / "free", solver=SolverConfig(rounds=1))
    assert small.plan.keep == free.plan.keep
    a, b = _weights(sp.load(tmp_path / "small")), _weights(sp.load(tmp_path / "free"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_budget_below_one_block_names_the_block(checkpoint, tmp_path):
    folder, batches, _ = checkpoint
    with pytest.raises(MemoryBudgetError, match=r"below block 'model\.layers\.\d', which needs .*MiB"):
        prune_checkpoint(folder, batches, 0.3, tmp_path / "out", solver=SolverConfig(memory_budget=1024))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_streamer_holds_at_most_two_blocks_and_computes_the_dense_output(checkpoint):
    folder, batches, model = checkpoint
    skeleton = empty_model(folder)
    blocks = skeleton.model.layers
    assert all(p.device.type == "meta" for p in blocks.parameters())
    resident = []
    hooks = [b.register_forward_hook(lambda m, a, o: resident.append(
        sum(any(p.device.type != "meta" for p in blk.parameters()) for blk in blocks))) for b in blocks]
    with WeightStreamer(skeleton, "model.layers", CheckpointWeights(folder)) as streamer:
        with torch.no_grad():
            got = skeleton(**batches[0]).logits
        assert streamer.loads == LAYERS
    for h in hooks:
        h.remove()
    assert max(resident) == 2
    assert all(p.device.type == "meta" for p in blocks.parameters())  # closed: every block dropped
    with torch.no_grad():
        torch.testing.assert_close(got, model(**batches[0]).logits)


def test_a_streamed_pruned_folder_runs_like_the_loaded_model(checkpoint, tmp_path):
    folder, batches, _ = checkpoint
    prune_checkpoint(folder, batches, 0.5, tmp_path / "out")
    loaded = sp.load(tmp_path / "out")
    with streamed(tmp_path / "out") as model, torch.no_grad():
        torch.testing.assert_close(model(**batches[1]).logits, loaded(**batches[1]).logits)


def test_bad_inputs_get_clear_errors(checkpoint, tmp_path):
    folder, batches, _ = checkpoint
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        CheckpointWeights(tmp_path)
    with pytest.raises(StructPruneError, match="is the input .*could destroy the model"):
        prune_checkpoint(folder, batches, 0.3, folder)
    with pytest.raises(StructPruneError, match="dicts of keyword tensors"):
        prune_checkpoint(folder, [batches[0]["input_ids"]], 0.3, tmp_path / "out")
    with pytest.raises(StructPruneError, match="coordination='kl' runs the whole model's head"):
        prune_checkpoint(folder, batches, 0.3, tmp_path / "kl", solver=SolverConfig(rounds=1, coordination="kl"))
    assert not (tmp_path / "kl").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        prune_checkpoint(folder, batches, 0.3, existing)
    assert [f.name for f in existing.iterdir()] == ["mine.txt"]


def test_a_streamed_flap_folder_keeps_its_compensated_biases(checkpoint, tmp_path):
    """Biases a method created are part of the saved structure, streamed or loaded."""
    _, batches, model = checkpoint
    result = sp.prune(model, batches, 0.3, method="flap")
    assert result.plan.meta["bias_compensated"]
    result.save(tmp_path / "flap")
    loaded = sp.load(tmp_path / "flap")
    with streamed(tmp_path / "flap") as streamed_model, torch.no_grad():
        torch.testing.assert_close(streamed_model(**batches[2]).logits, loaded(**batches[2]).logits)
        torch.testing.assert_close(loaded(**batches[2]).logits, result.model(**batches[2]).logits)


def test_memory_budget_sizes_parse():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_bytes("two gigs")
    with pytest.raises(argparse.ArgumentTypeError, match="must be positive"):
        parse_bytes("0MiB")


def test_a_streamed_cnn_uses_its_stored_batchnorm_statistics(tmp_path):
    """BatchNorm running statistics live in the checkpoint, not in the config: a streamed ResNet whose
    statistics are far from their initial values prunes and runs exactly as the loaded model does."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5)
    model = transformers.ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
    model.save_pretrained(tmp_path / "resnet")
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(3)]
    result = prune_checkpoint(tmp_path / "resnet", batches, 0.3, tmp_path / "out")
    reference = sp.prune(model, batches, 0.3, method="structprune")
    assert result.plan.keep == reference.plan.keep
    with streamed(tmp_path / "out") as written, torch.no_grad():
        got = written(**batches[0]).logits
        want = reference.model(**batches[0]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with streamed(tmp_path / "resnet") as dense, torch.no_grad():
        torch.testing.assert_close(dense(**batches[0]).logits, model(**batches[0]).logits, rtol=0, atol=1e-6)


def test_a_bf16_checkpoint_streams_in_its_own_precision_or_in_fp32_and_is_written_in_bf16(checkpoint, tmp_path):
    folder, batches, model = checkpoint
    half = transformers.LlamaForCausalLM(model.config).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    half.float().save_pretrained(tmp_path / "upcast")  # the same values, stored in fp32
    assert CheckpointWeights(tmp_path / "bf16").dtype_of("model.layers.0.mlp.down_proj.weight") == torch.bfloat16
    wide = prune_checkpoint(tmp_path / "bf16", batches, 0.3, tmp_path / "wide", dtype=torch.float32)
    upcast = prune_checkpoint(tmp_path / "upcast", batches, 0.3, tmp_path / "upcast-out")
    assert wide.plan.keep == upcast.plan.keep  # fp32 work on bf16 weights: what the fp32 copy gives
    got, want = CheckpointWeights(tmp_path / "wide"), CheckpointWeights(tmp_path / "upcast-out")
    for name in want.files:
        assert got.dtype_of(name) == torch.bfloat16  # written in the checkpoint's precision
        torch.testing.assert_close(got.read([name])[name], want.read([name])[name].to(torch.bfloat16), rtol=0, atol=0)
    native = prune_checkpoint(tmp_path / "bf16", batches, 0.3, tmp_path / "native")  # bf16 all the way
    with streamed(tmp_path / "native") as pruned, torch.no_grad():
        logits = pruned(**batches[0]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert native.report.sparsity_achieved == pytest.approx(0.3, abs=0.03)
