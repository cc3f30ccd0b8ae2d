"""Widths that serving runtimes like (issue 14): ``round_to`` keeps every width a multiple of N channels and
``uniform`` the same width in every layer, both within one step of the budget; a uniform pruning of the
LLaMA family writes a config that stock ``from_pretrained`` loads, in a process that never imports this
library, with the same logits; a non-uniform one says why it needs ``structprune_graph.load``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.errors import StructPruneError
from structprune_graph.passes.allocate import ParamLedger, prunable_params
from structprune_graph.passes.round_widths import RoundRequest, RoundWidthsPass, WidthRule, unit_step
from structprune_graph.pruning import select_groups
from test_pruning import lm_batches


def _channels(group, kept):
    return kept * len(group.members[0].indices[0])


@pytest.mark.parametrize("method", ["wanda-sp", "structprune"])
@pytest.mark.parametrize("round_to, uniform", [(8, False), (1, True), (16, True)])
def test_rounded_widths_meet_the_budget_within_one_step(method, round_to, uniform):
    _, model, graph = traced("llama")
    result = sp.prune(model, lm_batches(4), 0.4, method=method, round_to=round_to, uniform=uniform)
    groups = select_groups(graph)
    kept = {g.id: len(result.plan.keep.get(g.id, range(g.size))) for g in groups}
    for g in groups:
        assert kept[g.id] == g.size or _channels(g, kept[g.id]) % round_to == 0, (g.id, kept[g.id])
    if uniform:
        for kind in {g.kind for g in groups}:
            assert len({kept[g.id] for g in groups if g.kind == kind}) == 1, kind
    r = result.report
    target = round(0.4 * r.prunable_params)
    # one step: the coarsest move the rounding can make (every group of a class at once when uniform)
    per_unit = max(max(g.unit_params) for g in groups)
    step = max(unit_step(g, round_to) for g in groups) * per_unit * (len(groups) if uniform else 1)
    assert r.params_before - r.params_after != 0
    assert abs((r.params_before - r.params_after) - target) <= step
    assert r.solver["widths"] == {"round_to": round_to, "uniform": uniform}


def test_round_pass_counts_parameters_exactly_and_prefers_cheap_steps():
    _, model, graph = traced("llama")
    groups = tuple(g for g in select_groups(graph) if g.kind == "mlp_channel")
    shapes = graph.param_shapes
    order = {g.id: tuple(range(g.size)) for g in groups}
    cheap, dear = groups[0].id, groups[1].id
    costs = {cheap: (0.0,) * groups[0].size, dear: (1.0,) * groups[1].size}
    target = round(0.3 * prunable_params(groups, shapes))
    out = RoundWidthsPass()(RoundRequest(groups, {cheap: 0, dear: 0}, order, costs, shapes, target,
                                         WidthRule(round_to=8))).state
    ledger = ParamLedger(groups, shapes)
    exact = sum(ledger.remove(g, u) for g in groups for u in order[g.id][:out.counts[g.id]])
    assert out.removed_params == exact and abs(exact - target) <= out.step_params
    assert out.counts[cheap] > out.counts[dear]  # the budget went to the group whose units cost nothing
    assert all(n % 8 == 0 for n in out.counts.values())


def test_bad_round_to_is_refused():
    _, model, _ = traced("llama")
    with pytest.raises(StructPruneError, match="round_to must be a positive whole number"):
        sp.prune(model, lm_batches(2), 0.3, method="wanda-sp", round_to=0)


STOCK_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not any(m.startswith("structprune_graph") for m in sys.modules), "the library was imported"
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_uniform_pruning_loads_with_stock_from_pretrained(name, tmp_path):
    _, model, _ = traced(name)
    result = sp.prune(model, lm_batches(4), 0.5, method="wanda-sp", kinds=["kv_group", "mlp_channel"], uniform=True)
    out = result.save(tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["intermediate_size"] < model.config.intermediate_size
    ids = [[5, 17, 3, 60, 2, 41, 9]]
    subprocess.run([sys.executable, "-c", STOCK_LOAD, str(out), json.dumps(ids), str(tmp_path / "logits.pt")],
                   check=True, cwd=tmp_path, capture_output=True)
    with torch.no_grad():
        want = result.model(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sp.load(out)(input_ids=torch.tensor(ids)).logits, want, rtol=1e-5, atol=1e-5)


def test_non_uniform_pruning_keeps_the_dense_config_and_says_why(tmp_path):
    _, model, _ = traced("llama")
    result = sp.prune(model, lm_batches(4), 0.3, method="flap")
    widths = {len(v) for k, v in result.plan.keep.items() if k.startswith("mlp_channel")}
    assert len(widths) > 1  # the layers differ: no stock config can describe them
    out = result.save(tmp_path / "pruned")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == model.config.intermediate_size
    assert json.loads((out / "structprune.json").read_text())["config"] == "dense+plan"
    why = json.loads((out / "report.json").read_text())["metrics"]["loads_with"]
    assert "structprune_graph.load only" in why and "differs across layers" in why and "--gguf" in why
    assert "LlamaForCausalLM does not build from transformers' per_layer_config" in why  # transformers 5.24
    loaded = sp.load(out)  # generates with a KV cache: the same tokens as without one
    ids = torch.tensor([[5, 17, 3, 60]])
    cached = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = loaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, uncached)


def test_per_layer_sizes_go_to_per_layer_config_where_the_architecture_reads_it():
    """An architecture whose layers read ``config.per_layer_config[i]`` gets the pruned widths per layer (only
    the sizes that vary), and the config builds exactly the pruned shapes."""
    import transformers
    from torch import nn

    from structprune_graph.hf_config import stock_config

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.self_attn, self.mlp = nn.Module(), nn.Module()
            self.self_attn.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim)
            self.self_attn.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim)
            self.mlp.up_proj = nn.Linear(c.hidden_size, c.intermediate_size)

    class PerLayerLM(transformers.PreTrainedModel):
        config_class = transformers.LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(
                Block(config.per_layer_config[i] if config.is_heterogeneous else config)
                for i in range(config.num_hidden_layers))

        def get_input_embeddings(self):
            return self.embed

    dense = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    pruned = PerLayerLM(dense)
    for layer, width in zip(pruned.model.layers, (96, 40, 64)):  # MLP widths differ, heads do not
        layer.mlp.up_proj = nn.Linear(64, width)
    config, why = stock_config(pruned, dense)
    assert why == "" and config.is_heterogeneous
    assert {i: dict(config.per_layer_config[i].to_dict()).get("intermediate_size") for i in range(3)} == \
        {0: 96, 1: 40, 2: 64}
    rebuilt = PerLayerLM(config)
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in pruned.named_parameters()}


def test_uniform_flap_keeps_the_dense_config_because_of_its_biases(tmp_path):
    """FLAP's compensation biases (o_proj, down_proj) have no stock config switch: the same widths in every
    layer still save as dense config plus plan, with the reason, instead of failing the stock check."""
    _, model, _ = traced("llama")
    result = sp.prune(model, lm_batches(4), 0.4, method="flap", uniform=True)
    out = result.save(tmp_path / "pruned")
    meta = json.loads((out / "structprune.json").read_text())
    assert meta["config"] == "dense+plan" and "cannot describe" in meta["why_not_stock"]
    assert "down_proj.bias" in meta["why_not_stock"]
    ids = torch.tensor([[5, 17, 3, 60]])
    with torch.no_grad():
        torch.testing.assert_close(sp.load(out)(ids).logits, result.model(ids).logits)


def test_a_stock_config_that_does_not_fit_is_never_written(tmp_path, monkeypatch):
    """The save-time check: a config whose sizes do not describe the weights fails the save, typed, and
    leaves no folder (here a deliberately wrong intermediate size)."""
    import structprune_graph.hf_config as hf_config
    from structprune_graph.errors import RewriteError

    _, model, _ = traced("qwen2")
    result = sp.prune(model, lm_batches(4), 0.5, method="wanda-sp", kinds=["kv_group", "mlp_channel"], uniform=True)
    real = hf_config.stock_config

    def off_by_one(pruned, dense):
        config, why = real(pruned, dense)
        config.intermediate_size += 1
        return config, why
    monkeypatch.setattr(hf_config, "stock_config", off_by_one)
    with pytest.raises(RewriteError, match="loaded with stock from_pretrained fails.*stock=False"):
        result.save(tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists() and not list(tmp_path.iterdir())
