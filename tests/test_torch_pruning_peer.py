"""The Torch-Pruning peer of the LLM benchmarks (examples/torch_pruning_peer.py): the budget it matches is
the one our methods count, it refuses what it cannot run, and (with the bench extra) it removes that many
parameters from a copy, leaving the input model as it was."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import deep_llama_model, token_batches

_spec = importlib.util.spec_from_file_location(
    "torch_pruning_peer", Path(__file__).parents[1] / "examples" / "torch_pruning_peer.py")
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def _query_and_mlp_params(model) -> int:
    names = ("q_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith(names))


def test_the_budget_is_the_query_slots_and_the_mlp():
    model = deep_llama_model()  # GQA: k/v are smaller than q and stay outside the budget
    assert peer.prunable_params(model) == _query_and_mlp_params(model)


def test_bad_requests_are_refused():
    model, batches = deep_llama_model(), token_batches(2)
    with pytest.raises(ValueError, match="unknown Torch-Pruning peer 'tp-random-global'"):
        peer.prune(model, batches, 0.3, "tp-random-global")
    with pytest.raises(ValueError, match="tp-taylor-local: pass grads=calibration_gradients"):
        peer.prune(model, batches, 0.3, "tp-taylor-local")


@pytest.mark.parametrize("job", ["tp-magnitude-global", "tp-taylor-local"])
def test_prunes_the_budget_from_a_copy(job):
    pytest.importorskip("torch_pruning")
    model, batches = deep_llama_model(), token_batches(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = peer.calibration_gradients(model, batches) if "taylor" in job else None
    pruned = peer.prune(model, batches, 0.3, job, grads)
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters())
    # MLP channels only: 3 x hidden parameters per channel, so the budget is met to within one channel per layer
    target = 0.3 * peer.prunable_params(model)
    assert abs(removed - target) <= 3 * 64 * len(model.model.layers)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with torch.no_grad():
        logits = pruned(**batches[0]).logits  # (2, 16, vocab): the pruned copy runs
    assert logits.shape == (2, 16, 96) and torch.isfinite(logits).all()


def test_a_pruned_copy_that_does_not_run_cleanly_is_refused():
    """The run-before-return check: a copy whose first forward gives non-finite logits (here a NaN planted in
    the LM head, a layer the peer never prunes) raises with the job's name instead of being returned."""
    pytest.importorskip("torch_pruning")
    model, batches = deep_llama_model(), token_batches(2)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"tp-magnitude-global at 30%: the pruned copy's first forward gave "
                                           r"non-finite logits"):
        peer.prune(model, batches, 0.3, "tp-magnitude-global")
