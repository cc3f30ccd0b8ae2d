"""A fast selection of the coverage benchmark (examples/zoo_coverage.py): each passes every stage (trace,
structprune 30%, apply == mask, ONNX validated). Each one stands for a fix the benchmark found."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("zoo_coverage", Path(__file__).parents[1] / "examples" / "zoo_coverage.py")
zoo_coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_coverage)

FAST = {
    "falcon": "linear layers written as x @ W.T (aten.numpy_T)",
    "bloom": "decoder layers returning a tuple",
    "swin": "stages called with other arguments than the stream (solved as one block)",
    "regnet": "grouped convolutions as consumers (no least squares through them)",
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_benchmark_model_passes_every_stage(name):
    entry = next(e for e in zoo_coverage.BENCH if e.name == name)
    row = zoo_coverage.ours(entry)
    assert row["stage"] == "ok", f"{name} ({FAST[name]}): {row.get('error')}\n{row.get('trace', '')}"
    assert row["params_after"] < row["params"]
    assert row["apply_vs_mask"] <= 1e-4 and row["onnx_max_diff"] <= 1e-4


def test_the_benchmark_lists_enough_models():
    assert len(zoo_coverage.BENCH) >= 39
    assert len({e.name for e in zoo_coverage.BENCH}) == len(zoo_coverage.BENCH)
