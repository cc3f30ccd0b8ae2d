"""Widths for serving (issue 14): SmolLM2-135M pruned by structprune with free widths, ``--round-to`` 8 and 64,
and ``--uniform`` (one width per kind in every layer, a config stock ``from_pretrained`` loads), one dense
sweep shared; held-out perplexity on pydoc's evaluation half and on *Pride and Prejudice*.

Run: ``python examples/widths.py [--sparsities 0.3 0.5] [--calib-samples 16] [--out examples/results]``
writes ``OUT/widths.json`` and ``OUT/widths.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

AUSTEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen"
SETTINGS = {"free": dict(round_to=1, uniform=False), "round-to 8": dict(round_to=8, uniform=False),
            "round-to 64": dict(round_to=64, uniform=False), "uniform": dict(round_to=1, uniform=True),
            "uniform, round-to 64": dict(round_to=64, uniform=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    import structprune_graph as sp
    from structprune_graph import data, models
    from structprune_graph.evaluate import perplexity
    from structprune_graph.hf_config import stock_config

    model, tok = models.load_model(None), models.load_tokenizer(None)
    spec = data.WindowSpec(args.calib_samples, 512, 0)
    calib = data.calibration_windows(data.tokenize(tok, data.load_text("pydoc", "calibration")), spec)
    batches = [{"input_ids": calib[i: i + 1]} for i in range(len(calib))]
    evals = {"pydoc": data.evaluation_windows(data.tokenize(tok, data.load_text("pydoc", "evaluation")), 1024,
                                              args.eval_windows),
             "austen": data.evaluation_windows(data.tokenize(tok, (AUSTEN / "prideprejudice.txt").read_text())[:40961],
                                               1024, args.eval_windows)}
    rows = [{"setting": "dense", "sparsity": 0.0, "params": sum(p.numel() for p in model.parameters()),
             "ppl": {k: round(perplexity(model, w, progress=False), 3) for k, w in evals.items()}}]
    out = Path(args.out)
    first = None
    for s in args.sparsities:
        for name in args.settings:
            t = time.perf_counter()
            result = sp.prune(model, batches, s, reuse=first, **SETTINGS[name])
            first = first or result
            r = result.report
            mlp = sorted({layer.mlp.up_proj.out_features for layer in result.model.model.layers})
            rows.append({"setting": name, "sparsity": s, "params": r.params_after,
                         "removed_fraction": round(r.sparsity_achieved, 4), "seconds": round(time.perf_counter() - t, 1),
                         "mlp_widths": [mlp[0], mlp[-1]], "stock_config": stock_config(result.model, model.config)[0] is not None,
                         "ppl": {k: round(perplexity(result.model, w, progress=False), 3) for k, w in evals.items()}})
            print(json.dumps(rows[-1]), flush=True)
            (out / "widths.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
            (out / "widths.md").write_text(table(rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| sparsity | widths | removed | params | MLP widths (min-max) | stock config | ppl pydoc | ppl austen | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = "-" if "mlp_widths" not in r else f"{r['mlp_widths'][0]}-{r['mlp_widths'][1]}"
        lines.append(f"| {r['sparsity']:.0%} | {r['setting']} | {r.get('removed_fraction', 0):.2%} | {r['params']:,} | "
                     f"{widths} | {'yes' if r.get('stock_config') else 'no'} | {r['ppl']['pydoc']:.2f} | "
                     f"{r['ppl']['austen']:.2f} | {r.get('seconds', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
