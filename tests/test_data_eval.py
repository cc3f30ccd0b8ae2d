"""Data windows, perplexity against a direct computation, FLOPs and memory tracking."""

from __future__ import annotations

import math

import pytest
import torch

from structprune_graph import data, evaluate
from structprune_graph.zoo import ZOO, build_eval


def test_perplexity_matches_a_direct_computation():
    model = build_eval(next(e for e in ZOO if e.name == "llama"))
    windows = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits, dim=-1)  # (3, 10, vocab)
    nll = [-logp[w, t, windows[w, t + 1]].item() for w in range(3) for t in range(9)]
    assert evaluate.perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(
        math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_window_losses_and_the_paired_ratio():
    model = build_eval(next(e for e in ZOO if e.name == "llama"))
    windows = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits, dim=-1)  # (3, 10, vocab)
        losses = evaluate.window_losses(model, windows, batch_size=2, progress=False)
    want = [-sum(logp[w, t, windows[w, t + 1]].item() for t in range(9)) / 9 for w in range(3)]
    assert losses == pytest.approx(want, rel=1e-5)
    ratio, low, high = evaluate.paired_ratio([1.0, 2.0, 3.5], [0.5, 1.5, 2.5])  # differences 0.5, 0.5, 1.0
    se = math.sqrt(((0.5 - 2 / 3) ** 2 * 2 + (1.0 - 2 / 3) ** 2) / 2 / 3)
    assert ratio == pytest.approx(math.exp(2 / 3))
    assert (low, high) == pytest.approx((math.exp(2 / 3 - 1.96 * se), math.exp(2 / 3 + 1.96 * se)))
    assert evaluate.paired_ratio([1.0, 2.0], [1.0, 2.0]) == (1.0, 1.0, 1.0)  # the same model: no spread
    with pytest.raises(ValueError, match="the same windows, at least 2: got 2 and 3"):
        evaluate.paired_ratio([1.0, 2.0], [1.0, 2.0, 3.0])


def test_calibration_windows_are_disjoint_seeded_and_checked():
    tokens = torch.arange(1000)
    a = data.calibration_windows(tokens, data.WindowSpec(samples=5, seqlen=100, seed=1))
    b = data.calibration_windows(tokens, data.WindowSpec(samples=5, seqlen=100, seed=1))
    assert torch.equal(a, b) and a.shape == (5, 100)
    assert len(set(a[:, 0].tolist())) == 5 and all(int(s) % 100 == 0 for s in a[:, 0])
    with pytest.raises(data.DataError, match=r"needs 11 windows of 100 tokens \(1,100 tokens\) but the text has "
                                             r"1,000 tokens \(10 windows\)"):
        data.calibration_windows(tokens, data.WindowSpec(samples=11, seqlen=100))


def test_evaluation_windows_follow_sparsegpt():
    w = data.evaluation_windows(torch.arange(2049), 1024)
    assert w.shape == (2, 1024) and w[1, 0] == 1024
    with pytest.raises(data.DataError, match="at least one window of 1024 tokens; the text has 10"):
        data.evaluation_windows(torch.arange(10), 1024)


def test_pydoc_halves_are_disjoint_and_large():
    calib, held_out = data.load_text("pydoc", "calibration"), data.load_text(None, "evaluation")
    assert len(calib) > 100_000 and len(held_out) > 100_000
    assert not {p.strip() for p in calib.split("\n\n")} & {p.strip() for p in held_out.split("\n\n")}


def test_text_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "b.txt").write_text("second file")
    assert data.load_text(tmp_path / "a.txt", "calibration") == "first file"
    assert data.load_text(tmp_path, "evaluation") == "first file\n\nsecond file"
    with pytest.raises(data.DataError, match="no text at"):
        data.load_text(tmp_path / "missing.txt", "calibration")


def test_flops_per_token_count_the_matmuls():
    model = build_eval(next(e for e in ZOO if e.name == "llama"))
    flops = evaluate.flops_per_token(model, seqlen=16)
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight")
    assert 2 * linear <= flops <= 2 * linear * 1.2  # attention scores add a little on top of the weights


def test_peak_memory_sees_an_allocation():
    """The increase over the starting RSS, not the absolute peak (the interpreter alone is above 256 MiB)."""
    import time

    with evaluate.track_peak_memory() as peak:
        start = peak.rss_bytes
        block = torch.ones(64, 2**20)  # 256 MiB, touched
        time.sleep(0.1)  # several sampling intervals
        del block
    assert 240 * 2**20 < peak.rss_bytes - start < 400 * 2**20 and peak.seconds >= 0.1


def test_main_output_of_a_two_tower_model_is_its_image_text_logits():
    """CLIP's output has neither logits nor last_hidden_state: its image-text logits read both towers."""
    from transformers.models.clip.modeling_clip import CLIPOutput

    from structprune_graph.evaluate import main_output

    logits = torch.randn(2, 3)
    assert main_output(CLIPOutput(logits_per_image=logits, logits_per_text=logits.T)) is logits
    with pytest.raises(TypeError, match="no logits, last_hidden_state or logits_per_image"):
        main_output(CLIPOutput())
