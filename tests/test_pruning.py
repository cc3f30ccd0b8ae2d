"""prune(): every method meets its budget, passes the foundation's equivalence check, replays, saves
and loads; bad input gets its error."""

from __future__ import annotations

import pytest
import torch

import structprune_graph as sp
from conftest import run, traced
from structprune_graph.errors import StructPruneError
from structprune_graph.passes.allocate import prunable_params
from structprune_graph.pruning import select_groups
from structprune_graph.storage import OutputExistsError


def lm_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return traced("llama")[1]


@pytest.fixture(scope="module", params=sorted(sp.METHODS))
def pruned(request, llama):
    return request.param, sp.prune(llama, lm_batches(), 0.3, method=request.param)


def test_budget_is_met_to_unit_granularity(pruned, llama):
    method, result = pruned
    groups = select_groups(result.graph)
    assert {g.kind for g in groups} == {"query_head", "mlp_channel"}  # GQA: slots, not whole KV groups
    added_biases = sum(result.model.get_submodule(path).bias.numel() for path in result.plan.meta["bias_compensated"])
    removed = result.report.params_before - result.report.params_after + added_biases  # flap adds biases
    prunable = prunable_params(groups, result.graph.param_shapes)
    assert abs(removed - 0.3 * prunable) <= max(max(g.unit_params) for g in groups)
    assert result.report.sparsity_achieved == pytest.approx(removed / prunable)


def test_prunable_count_is_the_config_arithmetic(pruned, llama):
    """Counted from the config alone, not by ``prunable_params``: per layer the query projection and the
    output projection (every query head slot) and the three MLP matrices."""
    method, result = pruned
    c = llama.config
    q_width = c.num_attention_heads * c.head_dim
    expected = c.num_hidden_layers * (2 * c.hidden_size * q_width + 3 * c.hidden_size * c.intermediate_size)
    assert result.report.prunable_params == expected
    added_biases = sum(result.model.get_submodule(path).bias.numel() for path in result.plan.meta["bias_compensated"])
    removed = result.report.params_before - result.report.params_after + added_biases
    assert abs(removed - 0.3 * expected) <= c.hidden_size * max(c.head_dim * c.num_attention_heads // c.num_key_value_heads * 2, 3)


def test_result_is_the_masked_model(pruned, llama):
    method, result = pruned
    x = lm_batches(1, seed=5)[0]
    if method == "structprune":  # re-fitted weights: tests/test_structprune.py checks it against the mask
        assert result.solution.new_weights
        return
    masked = sp.mask(llama, result.graph, result.plan.keep)
    if method == "flap":  # bias compensation: the masked reference plus the same biases
        for name, p in result.model.named_parameters():
            if name.endswith("proj.bias"):
                masked.get_submodule(name.rsplit(".", 1)[0]).bias = torch.nn.Parameter(p.detach().clone())
        assert result.plan.meta["bias_compensated"]
    torch.testing.assert_close(run(result.model, x), run(masked, x), atol=1e-5, rtol=0)


def test_plan_replays_and_saved_folder_loads(pruned, llama, tmp_path):
    method, result = pruned
    x = lm_batches(1, seed=6)[0]
    replayed = sp.apply_plan(traced("llama")[1], result.plan, graph=result.graph)
    for k, v in result.model.state_dict().items():
        if method in ("flap", "structprune"):  # compensated biases / re-fitted weights travel in the weights
            assert k.endswith("bias") or v.shape == replayed.state_dict()[k].shape, k
        else:  # keep-sets alone reproduce the model
            assert torch.equal(v, replayed.state_dict()[k]), k
    out = result.save(tmp_path / "out")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "plan.json", "config.json", "report.json",
                                               "report.md", "kept.png", "structprune.json"}
    torch.testing.assert_close(run(sp.load(out), x), run(result.model, x), atol=0, rtol=0)


def test_existing_output_is_refused_and_overwrite_is_atomic(llama, tmp_path):
    result = sp.prune(llama, lm_batches(), 0.2, method="magnitude")
    result.save(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        result.save(tmp_path / "out")
    result.save(tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def test_cnn_prunes_from_tensor_calibration():
    _, model, _ = traced("resnet")
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = sp.prune(model, batches, 0.4, method="wanda-sp", example_inputs={"pixel_values": batches[0]})
    groups = select_groups(result.graph)
    assert {g.kind for g in groups} == {"conv_channel"}
    removed = result.report.params_before - result.report.params_after  # exact although groups share weights
    assert abs(removed - 0.4 * prunable_params(groups, result.graph.param_shapes)) <= max(max(g.unit_params) for g in groups)
    x = {"pixel_values": batches[1]}
    torch.testing.assert_close(run(result.model, x), run(sp.mask(model, result.graph, result.plan.keep), x),
                               atol=1e-5, rtol=0)


def test_same_seed_same_plan(llama):
    a = sp.prune(llama, lm_batches(), 0.3, method="wanda-sp").plan.to_json()
    b = sp.prune(llama, lm_batches(), 0.3, method="wanda-sp").plan.to_json()
    assert a == b


@pytest.mark.parametrize("kwargs, error, message", [
    ({"method": "best"}, StructPruneError, "unknown method 'best'"),
    ({"sparsity": 1.5}, StructPruneError, r"sparsity must be in \[0, 1\)"),
    ({"calibration": []}, StructPruneError, "calibration is empty"),
    ({"kinds": ["hidden_states"]}, StructPruneError, "no prunable groups of kinds"),
])
def test_bad_input(llama, kwargs, error, message):
    args = {"calibration": lm_batches(), "sparsity": 0.3, "method": "magnitude", **kwargs}
    with pytest.raises(error, match=message):
        sp.prune(llama, **args)


def test_load_refuses_other_folders(tmp_path):
    with pytest.raises(StructPruneError, match="not a structprune output folder"):
        sp.load(tmp_path)
