"""Bad input gets a typed error that says what failed, where, and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune_graph as sp
from conftest import random_keep, run, traced
from structprune_graph.zoo import UnknownOpNet


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither export nor symbolic_trace can follow
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_names_both_frontends_and_what_to_do():
    with pytest.raises(sp.TraceError, match=r"torch.export.*symbolic_trace.*What to do"):
        sp.trace(DataDependent(), (torch.ones(2, 4),))


def test_bad_example_inputs_type():
    with pytest.raises(sp.TraceError, match="tuple of positional tensors or a dict"):
        sp.trace(DataDependent(), "not a tensor")


def test_unknown_op_pins_its_groups_with_the_op_and_node_named():
    model = UnknownOpNet().eval()
    x = (torch.randn(3, 8),)
    graph = sp.trace(model, x)
    by_id = {g.id: g for g in graph.groups}
    touched = by_id["channel:fc2.weight[0]"]
    assert not touched.prunable
    assert "fliplr" in touched.reason and "no coupling rule" in touched.reason and "'fliplr'" in touched.reason
    assert any("fliplr" in op for op in graph.unsupported)
    downstream = by_id["channel:fc3.weight[1]"]  # fc3's input comes out of the unknown op
    assert not downstream.prunable
    free = [g for g in graph.prunable_groups]
    assert {g.id for g in free} == {"mlp_channel:fc1.weight[0]", "mlp_channel:fc3.weight[0]"}
    keep = random_keep(graph, 0, only_exact=True)
    torch.testing.assert_close(run(sp.apply(model, graph, keep), x), run(sp.mask(model, graph, keep), x),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("keep, message", [
    ({"mlp_channel:nope": [0]}, "unknown group 'mlp_channel:nope'"),
    ({"mlp_channel:model.layers.0.mlp.gate_proj.weight[0]": [0, 96]}, r"units 0\.\.95; got index 96"),
    ({"mlp_channel:model.layers.0.mlp.gate_proj.weight[0]": [1, 1, 2]}, "duplicates"),
    ({"mlp_channel:model.layers.0.mlp.gate_proj.weight[0]": []}, "at least 1 unit"),
    ({"kv_group:model.layers.0.self_attn": [-1]}, "got index -1"),
    ({"channel:lm_head.weight[0]": [0, 1]}, "is not prunable: channels reach a model output"),
    ({"mlp_channel:model.layers.0.mlp.gate_proj.weight[0]": ["a"]}, "must be integers"),
])
def test_bad_keep_sets_raise_keep_set_error(keep, message):
    _, model, graph = traced("llama")
    with pytest.raises(sp.KeepSetError, match=message):
        sp.apply(model, graph, keep)
    with pytest.raises(sp.KeepSetError, match=message):
        sp.mask(model, graph, keep)


def test_unknown_model_path_lists_what_was_tried(tmp_path):
    from structprune_graph.models import load_model

    with pytest.raises(sp.ModelNotFoundError, match=r"tried: .*does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(sp.ModelNotFoundError, match=r"no config.json"):
        load_model(tmp_path)


def test_unreachable_hub_id_is_reported(monkeypatch, tmp_path):
    from structprune_graph.models import load_model

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read once at import: once another test has imported the hub, only the constant stops the network retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sp.ModelNotFoundError, match=r"tried: path some-org/some-model \(does not exist\); hub id some-org/some-model"):
        load_model("some-org/some-model")


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_input_statistic_scores_refuse_groups_no_calibrated_layer_reads(method):
    """A grouped convolution's channels reach no dense layer's input columns: wanda-sp and FLAP would score
    them 0 everywhere (or crashed on the grouped weight's width); the group is named with what to do."""
    entry, model, _ = traced("grouped_conv")
    with pytest.raises(sp.StructPruneError, match=rf"{method} scores a unit by the input statistics .* no calibrated "
                                                  r"layer reads group conv_channel:.*use --method magnitude"):
        sp.prune(model, [entry.inputs(s) for s in range(2)], 0.3, method=method)
    assert sp.prune(model, [entry.inputs(s) for s in range(2)], 0.3, method="magnitude").model is not None
