"""Would the tau search pick the global threshold? (issue 12, item 4.)

The softmax allocator picks tau by the masked model's calibration loss (``SolverConfig(tau_search="masked")``:
the first units of each group's order masked, no re-fit, on 8 tau windows and float64 statistics, the library's
defaults when its results were recorded). Held out, the
global threshold ties the softmax at 30% and beats it at 50% on SmolLM2 (docs/generalization.md, "The allocators on today's
defaults"). This probe scores the global threshold's counts by the same masked loss beside every tau's, at
each ``--sparsities``, from one dense sweep with today's defaults on 32 calibration windows: if the search
ranked it first where it wins held out, it could be one more candidate of the search.

Run: ``python examples/allocation_probe.py`` (about 8 min on 2 cores); JSON and a Markdown table to
``OUT/allocation_probe.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", default="austen", choices=("austen", "pydoc"))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--ridge", type=float, default=0.3)
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import generalization as G
    from structprune_graph import solver
    from structprune_graph.graph import trace
    from structprune_graph.pruning import select_groups

    setup = argparse.Namespace(calib_samples=args.calib_samples, seqlen=512, eval_windows=1, out=args.out,
                               self_calibration=False)
    model, calib, _, _ = G.setup(setup)  # neither the development nor the evaluation windows are read
    batches = G.batches_of(calib[args.calib])
    graph = trace(model, batches[0])
    groups = select_groups(graph)
    recorded = dict(refit_ridge=args.ridge, tau_batches=8, statistics="float64")  # as examples/results holds
    softmax = solver.SolverConfig(**recorded)
    threshold = solver.SolverConfig(**recorded, allocation="global-threshold")
    started = time.perf_counter()
    state = solver.prepare(model, graph, groups, batches, softmax)  # the curves are the same for both
    rows = []
    score = solver.tau_loss(model, state, batches, softmax)  # counts -> masked loss on the tau windows
    for s in args.sparsities:
        searched = solver.allocate(model, state, batches, s, softmax, groups)
        global_threshold = solver.allocate(model, state, batches, s, threshold, groups)
        rows.append({"calib": args.calib, "sparsity": s, "chosen_tau": searched.tau,
                     "tau_losses": {str(k): round(v, 4) for k, v in searched.tau_losses.items()},
                     "global_threshold_loss": round(score(global_threshold.counts), 4)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    (out / "allocation_probe.json").write_text(json.dumps(
        {"args": vars(args), "seconds": round(time.perf_counter() - started, 1), "rows": rows}, indent=1))
    taus = list(rows[0]["tau_losses"])
    lines = ["Masked calibration loss (the tau search's criterion) of each tau's allocation and of the global "
             "threshold's:", "", "| calibration | sparsity | " + " | ".join(f"tau {t}" for t in taus)
             + " | global threshold | search picks |", "|---|---|" + "---|" * (len(taus) + 2)]
    for r in rows:
        best = min(r["tau_losses"].values())
        pick = "global threshold" if r["global_threshold_loss"] < best else f"tau {r['chosen_tau']:g}"
        lines.append(f"| {r['calib']} | {r['sparsity']:.0%} | " + " | ".join(f"{r['tau_losses'][t]:.4f}" for t in taus)
                     + f" | {r['global_threshold_loss']:.4f} | {pick} |")
    (out / "allocation_probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
