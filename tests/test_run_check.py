"""Run what we return: every rewrite runs the pruned model once (against the masked reference where the
groups are mask-exact); bad input is refused before any work; --out never endangers the input."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import structprune_graph as sp
from structprune_graph.cli import main
from structprune_graph.passes import ApplyPass
from structprune_graph.passes import rewrite as rewrite_mod
from structprune_graph.verify import verify_forward


def _phi3_gqa() -> tuple[nn.Module, dict]:
    cfg = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                                  max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 128, (2, 8))}


@pytest.mark.parametrize("kind", ["kv_group", "query_head"])
def test_phi3_gqa_heads_prune_and_run(kind):
    model, inputs = _phi3_gqa()
    graph = sp.trace(model, inputs)
    keep = {g.id: [1] for g in graph.groups if g.kind == kind}
    assert len(keep) == 2
    small = sp.apply(model, graph, keep)
    ref = sp.mask(model, graph, keep)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert model.config.num_attention_heads == 4  # the shared config is untouched
    assert small.model.layers[0].self_attn.config is not small.model.layers[1].self_attn.config


def test_phi3_structprune_prunes_heads_and_runs():
    model, inputs = _phi3_gqa()
    batches = [{"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    result = sp.prune(model, batches, 0.4, kinds=["query_head"])
    assert result.report.kept_fraction == {f"query_head:model.layers.{i}.self_attn": 0.5 for i in range(2)}
    assert result.model.model.layers[0].self_attn.o_proj.in_features == 32
    with torch.no_grad():
        assert torch.isfinite(result.model(**batches[0]).logits).all()


def test_a_rewrite_that_breaks_the_forward_is_refused_naming_the_module(monkeypatch):
    model, inputs = _phi3_gqa()
    graph = sp.trace(model, inputs)
    keep = {g.id: [1] for g in graph.groups if g.kind == "query_head"}
    monkeypatch.setattr(ApplyPass, "_fix_attention_modules", staticmethod(lambda *a: None))  # the old bug
    with pytest.raises(sp.RewriteError, match=r"fails at its first forward in module 'model.layers.0.self_attn"):
        sp.apply(model, graph, keep)


def test_a_rewrite_that_changes_the_output_is_refused(monkeypatch):
    model, inputs = _phi3_gqa()
    graph = sp.trace(model, inputs)
    keep = {g.id: list(range(48)) for g in graph.groups if g.kind == "mlp_channel"}
    real = rewrite_mod.MaskPass.call

    def perturbed(self, state):  # a masked reference 1% off: the comparison must notice
        result = real(self, state)
        with torch.no_grad():
            result.state.lm_head.weight.mul_(1.01)
        return result

    monkeypatch.setattr(rewrite_mod.MaskPass, "call", perturbed)
    with pytest.raises(sp.RewriteError, match="differs from the dense model with the same units masked"):
        sp.apply(model, graph, keep)


def test_verify_forward_tolerance_is_tight():
    lin = nn.Linear(4, 4)
    other = nn.Linear(4, 4)
    other.load_state_dict(lin.state_dict())
    x = (torch.ones(2, 4),)
    verify_forward(lin, x, other)
    with torch.no_grad():
        other.bias.add_(1e-3)
    with pytest.raises(sp.RewriteError, match="differs"):
        verify_forward(lin, x, other)


def test_nan_weights_are_refused_before_pruning():
    model, inputs = _phi3_gqa()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    for method in ("magnitude", "structprune"):
        with pytest.raises(sp.StructPruneError, match=r"non-finite weights .*model.layers.1.mlp.down_proj.weight"):
            sp.prune(model, [inputs], 0.3, method=method)


def test_load_runs_the_rebuilt_model(tmp_path):
    model, inputs = _phi3_gqa()
    result = sp.prune(model, [inputs], 0.4, method="magnitude", kinds=["query_head", "mlp_channel"])
    result.save(tmp_path / "out")
    again = sp.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, result.model(**inputs).logits)


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.2"], "a sparsity is a fraction in"),
    (["--sparsity", "-0.1"], "a sparsity is a fraction in"),
    (["--calib-samples", "-3"], "must be a positive whole number"),
    (["--seqlen", "0"], "must be a positive whole number"),
    (["--batch-size", "0"], "must be a positive whole number"),
    (["--eval-windows", "x"], "is not a whole number"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def _tiny_folder(tmp_path):
    model, _ = _phi3_gqa()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("out", ["model", ".", "model/sub"])
def test_out_never_is_contains_or_lies_inside_the_input(tmp_path, out, capsys):
    folder = _tiny_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    code = main(["prune", str(folder), "--out", str(tmp_path / out), "--overwrite", "--method", "magnitude"])
    assert code == 2 and "could destroy the model the run reads" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_unwritable_out_and_binary_calibration_are_refused_up_front(tmp_path, capsys):
    folder = _tiny_folder(tmp_path)
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    assert main(["prune", str(folder), "--calib", str(binary), "--out", str(tmp_path / "o")]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert main(["prune", str(folder), "--out", str(binary / "out")]) == 2  # a file where a folder should be
    assert "is not a writable folder" in capsys.readouterr().err


def test_sigterm_during_save_leaves_no_partial_folder(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal, time
        from pathlib import Path
        from structprune_graph.cli import _exit_on_sigterm
        from structprune_graph.storage import atomic_folder
        _exit_on_sigterm()
        with atomic_folder(Path({str(tmp_path / 'out')!r}), overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + 15, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_load_names_a_missing_or_malformed_plan(tmp_path):
    model, inputs = _phi3_gqa()
    result = sp.prune(model, [inputs], 0.4, method="magnitude", kinds=["mlp_channel"])
    result.save(tmp_path / "out")
    (tmp_path / "out" / "plan.json").write_text("{not json")
    with pytest.raises(sp.StructPruneError, match=r"out/plan.json is not a valid structprune plan"):
        sp.load(tmp_path / "out")
    (tmp_path / "out" / "plan.json").unlink()
    with pytest.raises(sp.StructPruneError, match=r"no plan at .*out/plan.json"):
        sp.load(tmp_path / "out")


def test_large_models_are_run_but_not_copied_for_the_reference(monkeypatch):
    model, inputs = _phi3_gqa()
    graph = sp.trace(model, inputs)
    keep = {g.id: [1] for g in graph.groups if g.kind == "query_head"}
    monkeypatch.setattr(rewrite_mod, "REFERENCE_MAX_BYTES", 0)
    built = []
    real = rewrite_mod.MaskPass.call
    monkeypatch.setattr(rewrite_mod.MaskPass, "call", lambda self, state: built.append(1) or real(self, state))
    sp.apply(model, graph, keep)
    assert built == []
    monkeypatch.setattr(ApplyPass, "_fix_attention_modules", staticmethod(lambda *a: None))
    with pytest.raises(sp.RewriteError, match="fails at its first forward"):  # still run
        sp.apply(model, graph, keep)
