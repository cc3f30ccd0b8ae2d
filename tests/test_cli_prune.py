"""`structprune prune` end to end on a tiny Llama with SmolLM2's tokenizer and a small text file."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import structprune_graph as sp
from structprune_graph.cli import main
from structprune_graph.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    text = " ".join(f"The {i}th sentence of a small corpus talks about pruning and models." for i in range(400))
    (root / "text.txt").write_text(text)
    return root


@pytest.fixture
def sampled(monkeypatch):
    """The WindowSpec of every call of data.self_generated (which still samples)."""
    from structprune_graph import data

    calls = []
    real = data.self_generated

    def spy(model, tokenizer, spec, **kw):
        calls.append(spec)
        return real(model, tokenizer, spec, **kw)

    monkeypatch.setattr(data, "self_generated", spy)
    return calls


def _prune_args(model_dir, samples: int, seqlen: int, windows: int, extra: tuple[str, ...] = ()) -> list[str]:
    """`structprune prune` of the tiny model at 40% on its own text (calibration and evaluation), plus ``extra``."""
    text = str(model_dir / "text.txt")
    return ["prune", str(model_dir / "model"), "--sparsity", "0.4", "--calib", text, "--eval", text, "--calib-samples",
            str(samples), "--seqlen", str(seqlen), "--eval-seqlen", "64", "--eval-windows", str(windows), *extra]


def test_prune_writes_a_loadable_folder_with_report(tiny_model_dir, capsys):
    out = tiny_model_dir / "out"
    args = ["prune", str(tiny_model_dir / "model"), "--sparsity", "0.4", "--method", "wanda-sp", "--calib",
            str(tiny_model_dir / "text.txt"), "--eval", str(tiny_model_dir / "text.txt"), "--calib-samples", "4",
            "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "wanda-sp" and report["params_after"] < report["params_before"]
    assert report["metrics"]["eval_windows"] == 2 and report["metrics"]["ppl_after"] > 0
    assert (out / "kept.png").stat().st_size > 1000 and (out / "tokenizer").is_dir()
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 2  # the folder exists now: refused without --overwrite
    assert main(args + ["--overwrite", "--kinds", "mlp_channel"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {report["group_kinds"][g] for g, f in report["kept_fraction"].items() if f < 1} == {"mlp_channel"}


def test_refit_re_fits_another_methods_keep_set(tiny_model_dir, capsys):
    """--refit: the same keep-set as without it, other weights (the least squares ran), and a report that
    says so; with a method that compensates by itself it is refused in one line."""
    common = _prune_args(tiny_model_dir, samples=4, seqlen=32, windows=2, extra=("--method", "taylor-global"))
    plain, refit = tiny_model_dir / "taylor", tiny_model_dir / "taylor-refit"
    assert main(common + ["--out", str(plain)]) == 0 and main(common + ["--out", str(refit), "--refit"]) == 0
    reports = [json.loads((d / "report.json").read_text()) for d in (plain, refit)]
    assert reports[0]["kept_fraction"] == reports[1]["kept_fraction"]
    assert "reconstruct" in reports[1]["solver"] and "reconstruct" not in reports[0]["solver"]
    a, b = (sp.load(d) for d in (plain, refit))
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
    capsys.readouterr()
    assert main(common + ["--method", "flap", "--out", str(tiny_model_dir / "never"), "--refit"]) == 2  # the last --method
    assert "flap compensates biases" in capsys.readouterr().err
    assert not (tiny_model_dir / "never").exists()


def test_uniform_round_to_writes_a_stock_config(tiny_model_dir, capsys):
    """--uniform --round-to 8: the same MLP width in both layers, a multiple of 8, in a config.json that stock
    from_pretrained reads; the run says where the folder loads."""
    from transformers import AutoModelForCausalLM

    out = tiny_model_dir / "uniform"
    args = ["prune", str(tiny_model_dir / "model"), "--sparsity", "0.4", "--method", "structprune", "--calib",
            str(tiny_model_dir / "text.txt"), "--eval", str(tiny_model_dir / "text.txt"), "--calib-samples", "4",
            "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows", "2", "--out", str(out), "--uniform",
            "--round-to", "8"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] < 64 and config["intermediate_size"] % 8 == 0
    assert "stock transformers from_pretrained" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {layer.mlp.up_proj.out_features for layer in model.model.layers} == {config["intermediate_size"]}
    with pytest.raises(SystemExit) as refused:  # --round-to 0: refused by the parser
        main(args[:-1] + ["0", "--overwrite"])
    assert refused.value.code == 2 and "positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated weights", "config not JSON"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_damaged_checkpoint_is_named_in_one_line(tiny_model_dir, tmp_path, capsys, damage, stream):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir / "model", folder)
    if damage == "truncated weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        want = f"{folder / 'model.safetensors'} cannot be read .*truncated or damaged; save or download"
    else:
        (folder / "config.json").write_text("{not json")
        want = f"{folder / 'config.json'} is not valid JSON .*restore the model's config.json"
    args = ["prune", str(folder), "--calib", str(tiny_model_dir / "text.txt"), "--calib-samples", "2",
            "--seqlen", "32", "--out", str(tmp_path / "out")] + (["--stream"] if stream else ["--method", "wanda-sp"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(want, err), err
    assert not (tmp_path / "out").exists()


def test_prune_reports_too_little_text(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "structprune_graph.cli", "prune", str(tiny_model_dir / "model"),
                             "--calib", str(tiny_model_dir / "text.txt"), "--calib-samples", "10000",
                             "--out", str(tiny_model_dir / "never")], capture_output=True, text=True)
    assert result.returncode == 2 and "calibration needs 10000 windows" in result.stderr
    assert not (tiny_model_dir / "never").exists()


def test_stream_prunes_the_checkpoint_like_the_in_memory_run(tiny_model_dir, capsys, caplog):
    common = [str(tiny_model_dir / "model"), "--sparsity", "0.4", "--calib", str(tiny_model_dir / "text.txt"),
              "--eval", str(tiny_model_dir / "text.txt"), "--calib-samples", "4", "--seqlen", "32",
              "--eval-seqlen", "64", "--eval-windows", "2"]
    # --stream has no prior text in its re-fit (--refit-prior auto is none there): the in-memory run without one
    assert main(["prune", *common, "--refit-prior", "none", "--out", str(tiny_model_dir / "mem")]) == 0
    memory_line = capsys.readouterr().out
    assert main(["prune", *common, "--stream", "--memory-budget", "64MiB", "--out", str(tiny_model_dir / "stream")]) == 0
    stream_line = capsys.readouterr().out
    ppl = [line.split("ppl ")[1].split(";")[0] for line in (memory_line, stream_line) if "ppl " in line]
    assert len(ppl) == 2 and ppl[0] == ppl[1]  # same perplexities before and after, to the printed digit
    index = json.loads((tiny_model_dir / "stream" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # two blocks and the rest
    assert main(["prune", *common, "--stream", "--method", "flap", "--out", str(tiny_model_dir / "x")]) == 2
    assert "--stream runs the structprune method only" in capsys.readouterr().err
    assert json.loads((tiny_model_dir / "stream" / "report.json").read_text())["solver"]["statistics"] == "float32"
    assert main(["prune", *common, "--stream", "--statistics", "float64", "--out", str(tiny_model_dir / "f64")]) == 0
    assert ppl[1] in capsys.readouterr().out  # float64 statistics: the same perplexities to the printed digit
    report = json.loads((tiny_model_dir / "f64" / "report.json").read_text())
    assert report["solver"]["statistics"] == "float64"
    with caplog.at_level("WARNING", logger="structprune_graph.cli"):
        assert main(["prune", *common, "--stream", "--dtype", "bfloat16", "--out", str(tiny_model_dir / "bf16")]) == 0
    assert "--dtype bfloat16 on a CPU: half-precision matrix products" in caplog.text


def test_self_generated_calibration_mixed_with_text(tiny_model_dir, sampled, capsys):
    calls = sampled
    out = tiny_model_dir / "self"
    args = ["prune", str(tiny_model_dir / "model"), "--sparsity", "0.3", "--method", "wanda-sp", "--calib",
            f"{tiny_model_dir / 'text.txt'}+self", "--eval", str(tiny_model_dir / "text.txt"), "--calib-samples", "4",
            "--seqlen", "16", "--eval-seqlen", "64", "--eval-windows", "1", "--out", str(out)]
    assert main(args) == 0
    assert [(s.samples, s.seqlen) for s in calls] == [(4, 16)]
    assert json.loads((out / "report.json").read_text())["calibration_batches"] == 4
    streamed = ["prune", str(tiny_model_dir / "model"), "--stream", "--calib", "self", "--out", str(tiny_model_dir / "s2")]
    assert main(streamed) == 2 and "--calib self samples from the model" in capsys.readouterr().err
    in_memory = ["prune", str(tiny_model_dir / "model"), "--dtype", "bfloat16", "--out", str(tiny_model_dir / "s3")]
    assert main(in_memory) == 2 and "--dtype bfloat16 sets the precision of streamed weights; add --stream" in \
        capsys.readouterr().err
    assert not (tiny_model_dir / "s3").exists()


def test_self_generated_windows_are_seeded_and_mixed_evenly():
    from transformers import LlamaConfig, LlamaForCausalLM

    from structprune_graph import data

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    spec = data.WindowSpec(3, 8, seed=5)
    a = data.self_generated(model, tokenizer, spec, batch_size=2, progress=False)
    b = data.self_generated(model, tokenizer, spec, batch_size=2, progress=False)
    assert a.shape == (3, 8) and torch.equal(a, b)
    mixed = data.mixed_windows([torch.zeros(5, 8, dtype=torch.long), torch.ones(5, 8, dtype=torch.long)], 5)
    assert mixed.shape == (5, 8) and int(mixed[:, 0].sum()) == 2  # 3 from the first source, 2 from the second


def test_export_gguf_and_decoder_from_a_pruned_folder(tiny_model_dir, tmp_path, capsys):
    """`structprune export DIR --gguf / --onnx-decoder`: the folder records its source; the vocabulary comes
    from the saved tokenizer; the GGUF file computes what ``load(DIR)`` computes; the decoder generates;
    no target is a clear error."""
    from gguf_reference import gguf_forward


    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir / "model"), "--sparsity", "0.4", "--method", "flap", "--calib",
                 str(tiny_model_dir / "text.txt"), "--eval", str(tiny_model_dir / "text.txt"), "--calib-samples",
                 "4", "--seqlen", "32", "--eval-seqlen", "64", "--eval-windows", "2", "--out", str(out)]) == 0
    assert json.loads((out / "structprune.json").read_text())["source"] == str((tiny_model_dir / "model").resolve())
    capsys.readouterr()
    gguf_path = tmp_path / "m.gguf"
    assert main(["export", str(out), "--gguf", str(gguf_path), "--gguf-type", "f32"]) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp architecture 'deci'" in printed and "converted from" in printed
    model = sp.load(out)
    ids = torch.arange(5, 25)
    with torch.no_grad():
        want = model(ids[None]).logits[0].double()
    torch.testing.assert_close(gguf_forward(gguf_path, ids), want, atol=1e-5 * (1 + float(want.abs().max())), rtol=0)
    assert main(["export", str(out), "--onnx-decoder", str(tmp_path / "decoder.onnx")]) == 0
    assert "onnxruntime generates PyTorch's 16 greedy tokens with its cache" in capsys.readouterr().out
    weights = (out / "model.safetensors").read_bytes()
    assert main(["export", str(out), "--gguf", str(out / "model.safetensors")]) == 2
    assert "is a file of" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights  # the folder's weights are untouched
    assert main(["export", str(out)]) == 2
    assert "name a target, --onnx FILE, --onnx-decoder FILE and/or --gguf FILE" in capsys.readouterr().err


def test_torchrun_distributed_stream_writes_the_single_process_folder(tiny_model_dir, tmp_path):
    """The README's launch: `torchrun --nproc-per-node 2 -m structprune_graph.cli prune ... --distributed`."""
    common = _prune_args(tiny_model_dir, samples=8, seqlen=32, windows=2, extra=("--stream",))
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                               "structprune_graph.cli", *common, "--distributed", "--out", str(tmp_path / "dist")],
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    assert main([*common, "--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "dist" / "plan.json").read_text() == (tmp_path / "single" / "plan.json").read_text()
    ids = torch.tensor([[3, 9, 27, 81, 50]])
    with torch.no_grad():  # rank 0's folder holds the single-process weights (each rank solved half the batches)
        torch.testing.assert_close(sp.load(tmp_path / "dist")(ids).logits, sp.load(tmp_path / "single")(ids).logits,
                                   atol=1e-6, rtol=1e-6)


def test_taylor_first_and_obs_weighting_reach_the_solver_and_are_refused_with_another_method(tiny_model_dir, capsys):
    common = _prune_args(tiny_model_dir, samples=4, seqlen=32, windows=2)
    out = tiny_model_dir / "ordered"
    assert main(common + ["--out", str(out), "--taylor-first", "0.5", "--obs-weighting", "fisher"]) == 0
    solver = json.loads((out / "report.json").read_text())["solver"]
    assert solver["taylor_first"] == 0.5 and solver["obs_weighting"] == "fisher"
    capsys.readouterr()
    never = tiny_model_dir / "never-ordered"
    assert main(common + ["--out", str(never), "--method", "wanda-sp", "--taylor-first", "0.5"]) == 2
    assert "--taylor-first and --obs-weighting choose structprune's order" in capsys.readouterr().err
    assert not never.exists()
    with pytest.raises(SystemExit):
        main(common + ["--out", str(never), "--taylor-first", "1.5"])
    assert "a share of each layer's units, in [0, 1]" in capsys.readouterr().err


def test_refit_prior_samples_the_model_reaches_the_solver_and_is_refused_without_a_refit(tiny_model_dir, sampled,
                                                                                         capsys):
    """--refit-prior self: --refit-prior-samples windows sampled from the model, fitted by the re-fit with
    --refit-prior-weight and, unless --refit-prior-scope refit, seen by the OBS selection and the Taylor and
    Fisher scores ('scores', the default; 'selection': the OBS selection alone); the report records all three;
    refused in one line where nothing would fit it."""
    calls = sampled
    common = _prune_args(tiny_model_dir, samples=4, seqlen=16, windows=1)
    out, plain = tiny_model_dir / "prior", tiny_model_dir / "no-prior"
    assert main(common + ["--out", str(out), "--refit-prior", "self", "--refit-prior-samples", "3",
                          "--refit-prior-weight", "0.25", "--refit-prior-scope", "refit"]) == 0
    assert [(s.samples, s.seqlen) for s in calls] == [(3, 16)]
    assert "re-fit prior: 3 x 16 tokens of self" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["solver"]["refit_prior"] == {
        "batches": 3, "weight": 0.25, "scope": "refit"}
    assert json.loads((out / "report.json").read_text())["metrics"]["refit_prior"] == "48 tokens of self"
    assert main(common + ["--out", str(plain), "--refit-prior", "none"]) == 0
    assert "refit_prior" not in json.loads((plain / "report.json").read_text())["solver"]
    assert json.loads((plain / "report.json").read_text())["metrics"]["refit_prior"] == "none"
    from safetensors.torch import load_file

    fitted, unfitted = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"  # block 0: the same keep-set, a re-fit on both texts
    assert fitted[name].shape == unfitted[name].shape and not torch.allclose(fitted[name], unfitted[name])
    auto = tiny_model_dir / "auto-prior"  # the default: 'self' for structprune in memory, none for wanda-sp
    assert main(common + ["--out", str(auto), "--refit-prior-samples", "2"]) == 0
    assert json.loads((auto / "report.json").read_text())["solver"]["refit_prior"] == {
        "batches": 2, "weight": 0.5, "scope": "scores"}
    selected = tiny_model_dir / "selected-prior"
    assert main(common + ["--out", str(selected), "--refit-prior-samples", "2",
                          "--refit-prior-scope", "selection"]) == 0
    assert json.loads((selected / "report.json").read_text())["solver"]["refit_prior"] == {
        "batches": 2, "weight": 0.5, "scope": "selection"}
    assert main(common + ["--out", str(tiny_model_dir / "auto-wanda"), "--method", "wanda-sp"]) == 0
    assert json.loads((tiny_model_dir / "auto-wanda" / "report.json").read_text())["metrics"]["refit_prior"] == "none"
    assert len(calls) == 3
    capsys.readouterr()
    never = tiny_model_dir / "never-prior"
    assert main(common + ["--out", str(never), "--method", "wanda-sp", "--refit-prior", "self"]) == 2
    assert "--method wanda-sp has no re-fit: add --refit" in capsys.readouterr().err
    assert main(common + ["--out", str(never), "--refit-prior", "none", "--refit-prior-scope", "refit"]) == 2
    assert "this run has no prior (--refit-prior none): drop --refit-prior-scope" in capsys.readouterr().err
    assert main(common + ["--out", str(never), "--method", "wanda-sp", "--refit", "--refit-prior-scope",
                          "selection"]) == 2
    assert "--method wanda-sp, whose selection is its own: drop --refit-prior-scope" in capsys.readouterr().err
    assert not never.exists() and len(calls) == 3  # refused before any sampling
    with pytest.raises(SystemExit):
        main(common + ["--out", str(never), "--refit-prior-weight", "1"])
    assert "a share of the re-fit's weight, in (0, 1)" in capsys.readouterr().err


def test_kl_rounds_reach_the_solver_and_are_refused_where_nothing_coordinates(tiny_model_dir, capsys):
    common = _prune_args(tiny_model_dir, samples=6, seqlen=16, windows=1, extra=("--refit-prior", "none"))
    out = tiny_model_dir / "kl-rounds"
    assert main(common + ["--out", str(out), "--kl-rounds", "2"]) == 0
    solver = json.loads((out / "report.json").read_text())["solver"]
    assert "rounds=2 (kl)" in solver["config"]
    every = tiny_model_dir / "kl-all"
    assert main(common + ["--out", str(every), "--kl-rounds", "1", "--kl-exits", "all"]) == 0
    assert "rounds=1 (kl, all linear layers)" in json.loads((every / "report.json").read_text())["solver"]["config"]
    # round 0 (the block solve) and one entry per round taken; the returned round is the best held-out one
    assert 2 <= len(solver["admm_output_errors"]) <= 3 and len(solver["coordination_fit_errors"]) == len(
        solver["admm_output_errors"])
    assert solver["admm_output_errors"][solver["admm_best_round"]] == min(solver["admm_output_errors"])
    capsys.readouterr()
    never = tiny_model_dir / "never-kl"
    assert main(common + ["--out", str(never), "--method", "wanda-sp", "--kl-rounds", "1"]) == 2
    assert "--kl-rounds coordinates the blocks of structprune's solve" in capsys.readouterr().err
    assert main(common + ["--out", str(never), "--kl-rounds", "1", "--stream"]) == 2
    assert "--kl-rounds runs on a model in memory" in capsys.readouterr().err
    assert main(common + ["--out", str(never), "--kl-exits", "all"]) == 2
    assert "--kl-exits all chooses the layers the KL rounds move; add --kl-rounds N" in capsys.readouterr().err
    assert not never.exists()


def test_allocation_and_precisions_reach_the_solver_and_allocation_is_refused_with_another_method(tiny_model_dir, capsys):
    common = _prune_args(tiny_model_dir, samples=6, seqlen=16, windows=1, extra=("--refit-prior", "none"))
    out = tiny_model_dir / "threshold"
    assert main(common + ["--out", str(out), "--allocation", "global-threshold"]) == 0
    solver = json.loads((out / "report.json").read_text())["solver"]
    assert solver["config"].startswith("global-threshold,") and solver["tau_losses"] == {}  # no tau search
    from structprune_graph.passes.sensitivity import native_bf16  # --gradient-precision auto, resolved
    assert solver["gradient_precision"] == ("bfloat16" if native_bf16(torch.device("cpu")) else "float32")
    assert solver["solve_precision"] == solver["gradient_precision"]  # --solve-precision's default: auto too
    pinned = tiny_model_dir / "gradient-float32"
    assert solver["token_cap"] is None  # --token-cap's default: SolverConfig's, off
    pinned_args = ["--out", str(pinned), "--gradient-precision", "float32", "--solve-precision", "bfloat16",
                   "--token-cap", "10"]
    assert main(common + pinned_args) == 0
    solver = json.loads((pinned / "report.json").read_text())["solver"]
    assert (solver["gradient_precision"], solver["solve_precision"], solver["token_cap"]) == ("float32", "bfloat16",
                                                                                             10.0)
    capsys.readouterr()
    never = tiny_model_dir / "never-threshold"
    assert main(common + ["--out", str(never), "--method", "wanda-sp", "--allocation", "uniform"]) == 2
    assert "--allocation spreads structprune's budget; --method wanda-sp allocates its own" in capsys.readouterr().err
    assert not never.exists()
    assert main(common + ["--out", str(never), "--method", "flap", "--token-cap", "10"]) == 2
    assert "--token-cap caps the tokens of the solver's second moments; --method flap without --refit" in (
        capsys.readouterr().err)
    assert not never.exists()
    with pytest.raises(SystemExit):
        main(common + ["--out", str(never), "--allocation", "greedy"])
    assert "invalid choice: 'greedy'" in capsys.readouterr().err


def test_several_sparsities_share_one_sweep_and_each_equals_its_own_run(tiny_model_dir, capsys):
    """--sparsity 0.2,0.4: one folder per value under --out (sparsity-S), the second solved on the first's
    dense sweep (no dense-sweep stage of its own), and each the model a run of that sparsity alone writes."""
    base = _prune_args(tiny_model_dir, samples=6, seqlen=16, windows=1, extra=("--refit-prior", "none"))
    at = base.index("--sparsity")
    several = base[:at] + ["--sparsity", "0.2,0.4"] + base[at + 2:]
    out = tiny_model_dir / "several"
    assert main(several + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "structprune at 0.2:" in printed and "structprune at 0.4:" in printed
    reports = {s: json.loads((out / f"sparsity-{s}" / "report.json").read_text()) for s in ("0.2", "0.4")}
    assert reports["0.2"]["sparsity_target"] == 0.2 and reports["0.4"]["sparsity_target"] == 0.4
    assert "dense_sweep" in reports["0.2"]["solver"]["stages"]
    assert "dense_sweep" not in reports["0.4"]["solver"]["stages"]  # reused: solved on the first one's sweep
    alone = tiny_model_dir / "alone-0.4"
    assert main(base + ["--out", str(alone)]) == 0
    assert (json.loads((alone / "plan.json").read_text())["groups"]
            == json.loads((out / "sparsity-0.4" / "plan.json").read_text())["groups"])
    ours, theirs = sp.load(out / "sparsity-0.4"), sp.load(alone)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    never = tiny_model_dir / "never-several"
    capsys.readouterr()
    assert main(base[:at] + ["--sparsity", "0.2,0.2"] + base[at + 2:] + ["--out", str(never)]) == 2
    assert "--sparsity 0.2,0.2 repeats a value; give each once" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a MODEL after --sparsity is the model, and a bad value is named
        main(["prune", "--sparsity", "0.2,1.5", str(tiny_model_dir / "model")])
    assert "1.5: a sparsity is a fraction in [0, 1)" in capsys.readouterr().err
    from structprune_graph.cli import build_parser
    parsed = build_parser().parse_args(["prune", "--sparsity", "0.3", "some/model"])
    assert (parsed.sparsity, parsed.model) == ([0.3], "some/model")
    assert main(several + ["--out", str(never), "--onnx", str(tiny_model_dir / "x.onnx")]) == 2
    assert "which --onnx does not: give one --sparsity with --onnx (or export each folder" in capsys.readouterr().err
    for flag in ("--stream", "--distributed"):  # refused before any weights load or process group starts
        assert main(several + ["--out", str(never), flag]) == 2
        assert f"which {flag} does not: give one --sparsity with {flag}" in capsys.readouterr().err
    assert not never.exists()
