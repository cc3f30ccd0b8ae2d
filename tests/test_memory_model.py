"""The peak-memory model of a streamed pruning (structprune_graph/memory_model.py) against a measurement:
a fresh process prunes a small checkpoint whose memory is dominated by the solver's statistics (an MLP
3,072 wide: H is 72 MiB in float64), with the solver's matrices in float64 and then in float32, sampling
its resident memory every 2 ms over a baseline taken after a warm-up (and, for the second, after the
first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from structprune_graph.memory_model import streaming_peak

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHILD = r'''
import json, os, sys, threading, torch
sys.path.insert(0, sys.argv[3])
torch.set_num_threads(2)
import ctypes; ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # as the CLI: freed blocks leave the RSS
from memory_scaling import _warm_up
from structprune_graph.checkpoint import prune_checkpoint
from structprune_graph.solver import SolverConfig
g = torch.Generator().manual_seed(0)
batches = [{"input_ids": torch.randint(0, 1000, (1, 32), generator=g)} for _ in range(4)]
_warm_up()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for statistics in sys.argv[4:]:  # one pruning after the other, each over the memory the previous one left
    base, peak, stop = rss(), [0], threading.Event()
    def sample():
        while not stop.wait(0.002):
            peak[0] = max(peak[0], rss())
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    prune_checkpoint(sys.argv[1], batches, 0.3, f"{sys.argv[2]}-{statistics}", solver=SolverConfig(statistics=statistics))
    stop.set(); thread.join()
    print(json.dumps({"statistics": statistics, "net": max(peak[0], rss()) - base}))
'''


def test_the_memory_model_predicts_a_streamed_prunings_net_peak_within_20_percent(tmp_path):
    """In float64 and in float32 statistics, measured in one process (one start-up and warm-up for both)."""
    sys.path.insert(0, str(EXAMPLES))
    from memory_scaling import write_random_checkpoint

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=3072, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                                      architectures=["LlamaForCausalLM"])
    write_random_checkpoint(config, tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt"), str(tmp_path / "out"), str(EXAMPLES),
                           "float64", "float32"],
                          capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["statistics"] for r in runs] == ["float64", "float32"]
    for run in runs:
        measured = run["net"]
        predicted = streaming_peak(tmp_path / "ckpt", calibration_tokens=4 * 32, batch_tokens=32,
                                   statistics=getattr(torch, run["statistics"]))
        assert predicted.statistics > 0.8 * predicted.total  # the regime of a 7B block: statistics dominate
        assert abs(predicted.total - measured) <= 0.2 * measured, (run["statistics"], predicted.as_gib(), measured / 2**30)
    block = sum(p.numel() for p in transformers.LlamaForCausalLM(config).model.layers[0].parameters())
    assert predicted.blocks == block * 4
