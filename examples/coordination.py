"""Coordination across blocks on SmolLM2-135M (issue 12 item 3): the sequential block solve (rounds 0), ADMM
(the auxiliary/dual rounds) and target propagation (every block re-fitted toward its share of the output
error's gradient, rounds chosen on held-out calibration batches), structprune calibrated on Austen, one
dense sweep shared. Reported per variant: development perplexity (Austen and pydoc development windows:
what a default may be chosen on), evaluation perplexity (Austen, pydoc, code: never used to choose), and
per round the output error on the fitted and the held-out batches and each block's relative weight change.

Run: ``python examples/coordination.py [--sparsities 0.3] [--rounds 2] [--out examples/results]``; writes
``OUT/coordination.json`` and ``.md`` (the splits and texts of ``generalization.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generalization import batches_of, ppl, setup  # noqa: E402  (the protocol's splits and texts)

VARIANTS = {"sequential": dict(rounds=0), "admm": dict(coordination="admm"),
            "propagate": dict(coordination="propagate", propagate_step=1.0),
            "propagate, step 0.5": dict(coordination="propagate", propagate_step=0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="write OUT/coordination.md from the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table_only:
        return write_table(json.loads((out / "coordination.json").read_text())["rows"], args, out)
    torch.set_num_threads(args.threads)
    import structprune_graph as sp
    from structprune_graph.solver import SolverConfig

    model, calib, dev, evals = setup(args)
    rows = [{"variant": "dense", "sparsity": 0.0, "dev": ppl(model, dev), "eval": ppl(model, evals)}]
    first = None
    for s in args.sparsities:
        for name in args.variants:
            settings = {"rounds": args.rounds, "tau_batches": 4, **VARIANTS[name]}
            t = time.perf_counter()
            result = sp.prune(model, batches_of(calib["austen"]), s, reuse=first, solver=SolverConfig(**settings))
            first = first or result
            solver = result.report.solver
            rows.append({"variant": name, "sparsity": s, "seconds": round(time.perf_counter() - t, 1),
                         "dev": ppl(result.model, dev), "eval": ppl(result.model, evals),
                         "best_round": solver["admm_best_round"], "round_errors": solver["admm_output_errors"],
                         "fit_errors": solver.get("coordination_fit_errors", []),
                         "weight_changes": solver.get("coordination_weight_changes", [])})
            print(json.dumps(rows[-1]), flush=True)
            (out / "coordination.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    write_table(rows, args, out)


def write_table(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    d = rows[0]
    lines = ["# Coordination across blocks: SmolLM2-135M, structprune calibrated on Austen", "",
             f"Settings: {args.calib_samples} x {args.seqlen} Austen calibration windows, {args.rounds} rounds, "
             f"{args.eval_windows} x 1024 windows per text. Development: Austen and pydoc development windows; "
             "evaluation: Pride and Prejudice, pydoc's evaluation half, Python source (code), never used to choose. "
             "Round errors: ADMM's are on its fitted batches, propagate's on 4 held-out calibration batches "
             "(the round returned is the best there).", "",
             "| sparsity | variant | dev austen | dev pydoc | dev geo-mean / dense | austen | pydoc | code | "
             "best round | round errors | seconds |", "|" + "---|" * 11,
             f"| 0% | dense | {d['dev']['austen']:.2f} | {d['dev']['pydoc']:.2f} | 1.000 | {d['eval']['austen']:.2f} | "
             f"{d['eval']['pydoc']:.2f} | {d['eval']['code']:.2f} | - | - | - |"]
    for r in rows[1:]:
        geo = math.exp(sum(math.log(r["dev"][k] / d["dev"][k]) for k in r["dev"]) / len(r["dev"]))
        errs = ", ".join(f"{e:.4f}" for e in r["round_errors"])
        lines.append(f"| {r['sparsity']:.0%} | {r['variant']} | {r['dev']['austen']:.2f} | {r['dev']['pydoc']:.2f} | "
                     f"{geo:.3f} | {r['eval']['austen']:.2f} | {r['eval']['pydoc']:.2f} | {r['eval']['code']:.2f} | "
                     f"{r['best_round']} | {errs} | {r['seconds']} |")
    changes = [r for r in rows[1:] if r["weight_changes"]]
    if changes:
        lines += ["", "Relative weight change of each block per round (target propagation):", ""]
        for r in changes:
            for k, per_block in enumerate(r["weight_changes"], start=1):
                lines.append(f"- {r['sparsity']:.0%} {r['variant']}, round {k}: min {min(per_block):.2e}, median "
                             f"{sorted(per_block)[len(per_block) // 2]:.2e}, max {max(per_block):.2e} over "
                             f"{len(per_block)} blocks ({sum(c > 0 for c in per_block)} changed)")
    (out / "coordination.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
