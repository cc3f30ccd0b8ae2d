"""Trace every foundation-zoo model and record its groups, trace time and rewrite checks.

Writes ``results/zoo_groups.json`` and ``results/zoo_groups.md`` (the table in the README).
Run: ``python examples/zoo_groups.py [--out results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import structprune_graph as sp
from structprune_graph.evaluate import main_output
from structprune_graph.zoo import ZOO, build_eval


def run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def measure(entry) -> dict:
    model, x = build_eval(entry), entry.inputs(0)
    t0 = time.perf_counter()
    graph = sp.trace(model, x)
    trace_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    keep = {g.id: sorted(torch.randperm(g.size, generator=gen)[: max(1, g.size // 2)].tolist())
            for g in graph.prunable_groups if g.mask_exact}
    diff = (run(sp.apply(model, graph, keep), x) - run(sp.mask(model, graph, keep), x)).abs().max()
    dense = sum(p.numel() for p in model.parameters())
    in_groups = graph.prunable_param_count()
    return {"model": entry.name, "class": type(model).__name__, "params": dense, "nodes": len(graph.fx_graph.nodes),
            "trace_s": round(trace_s, 3), "groups": len(graph.groups), "prunable": len(graph.prunable_groups),
            "kinds": dict(Counter(g.kind for g in graph.prunable_groups)),
            "prunable_param_share": round(in_groups / dense, 3), "apply_vs_mask_max_abs": float(diff),
            "unsupported_ops": list(graph.unsupported)}


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure(entry) for entry in tqdm(ZOO, desc="zoo")]
    write_atomic(out / "zoo_groups.json", json.dumps(rows, indent=1))
    lines = ["| model | params | graph nodes | trace (s) | groups (prunable) | prunable groups by kind | "
             "params on a prunable index (hidden dim excluded) | apply vs mask, max abs diff |", "|---" * 8 + "|"]
    for r in rows:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["kinds"].items()))
        lines.append(f"| {r['model']} | {r['params']:,} | {r['nodes']} | {r['trace_s']:.2f} | {r['groups']} "
                     f"({r['prunable']}) | {kinds} | {r['prunable_param_share']:.0%} | {r['apply_vs_mask_max_abs']:.1e} |")
    write_atomic(out / "zoo_groups.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
