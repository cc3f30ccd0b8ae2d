"""`structprune inspect` on a saved model folder, and its error path."""

from __future__ import annotations

import subprocess
import sys

from structprune_graph.cli import main
from structprune_graph.zoo import ZOO, build_eval


def test_inspect_prints_groups_and_summary(tmp_path, capsys):
    model = build_eval(next(e for e in ZOO if e.name == "llama"))
    model.save_pretrained(tmp_path / "tiny-llama")
    assert main(["inspect", str(tmp_path / "tiny-llama")]) == 0
    out = capsys.readouterr().out
    assert "kv_group:model.layers.1.self_attn" in out and "2x2q" in out
    assert "mlp_channel:model.layers.0.mlp.gate_proj.weight[0]" in out
    assert "no: channels reach a model output" in out
    assert f"LlamaForCausalLM: {sum(p.numel() for p in model.parameters()):,} parameters" in out and "7 prunable (1 hidden, 2 kv_group, 2 mlp_channel, 2 query_head)" in out


def test_inspect_json(tmp_path, capsys):
    import json

    model = build_eval(next(e for e in ZOO if e.name == "gpt2"))
    model.save_pretrained(tmp_path / "tiny-gpt2")
    assert main(["inspect", str(tmp_path / "tiny-gpt2"), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    heads = [g for g in groups if g["kind"] == "attention_head"]
    assert len(heads) == 2 and all(g["size"] == 4 and g["prunable"] for g in heads)


def test_missing_model_exits_2_with_a_clear_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "structprune_graph.cli", "inspect", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "structprune: error: cannot load model" in result.stderr and "does not exist" in result.stderr
