"""Pruning time against one forward pass of the same calibration data, measured in one process (issue 12's
time bound: pruning within 10x one calibration forward).

On a shared 2-core machine the speed moves by 2-5x between minutes, so a ratio is only meaningful when both
sides are timed in the same spell: this script times the calibration forward before and after each pruning
and reports the pruning against both. What it prunes is the CLI's main job (``structprune prune``: SmolLM2,
30%, 32 x 512 tokens of the pydoc calibration half, 16 windows sampled from the model as the re-fit's prior:
the CLI's own defaults and window builders), once per ``--allocations`` (each with its own dense sweep, as a CLI run has).
Two denominators: the forward of the 32 calibration windows, and that plus the forward of the 16 prior windows
(all the data the pruning reads: the prior's windows are swept and fitted as the calibration's are).

Run: ``python examples/prune_time.py`` (about 20 min on 2 cores); JSON and a Markdown table to
``OUT/NAME.{json,md}`` (``--name``, default ``prune_time``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch


def forward_seconds(model, batches) -> float:
    """One forward pass of every batch, as the CLI batches them (no grad, no cache)."""
    t = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    return time.perf_counter() - t


def _finite(tau):
    """The chosen tau, None where none was searched (inf, which strict JSON cannot hold)."""
    return None if tau is None or math.isinf(tau) else tau


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--allocations", nargs="+", default=["softmax", "global-threshold"],
                        choices=("softmax", "global-threshold", "uniform"))
    parser.add_argument("--gradient-precisions", nargs="+", default=["auto"], choices=("auto", "float32", "bfloat16"),
                        help="SolverConfig.sensitivity_precision of each run (every allocation with each)")
    parser.add_argument("--solve-precisions", nargs="+", default=[None], choices=("auto", "float32", "bfloat16"),
                        help="SolverConfig.solve_precision of each run (default: the CLI's)")
    parser.add_argument("--evaluate", action="store_true",
                        help="also the perplexity of each pruned model on the CLI's held-out pydoc windows (about 100 s "
                             "each, after its timing)")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--name", default="prune_time", help="the results' file name: OUT/NAME.{json,md}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import structprune_graph as sp
    from structprune_graph import cli, models

    # the CLI's main job exactly: its parser's defaults, its calibration and prior windows, its SolverConfig
    job = cli.build_parser().parse_args(["prune", "--sparsity", str(args.sparsity)])
    model, tokenizer = models.load_model(job.model), models.load_tokenizer(job.model)
    batches, eval_windows = cli._calibration(job, tokenizer, model)  # 32 x (1, 512) of the pydoc calibration half
    t = time.perf_counter()
    prior = cli._prior_batches(job, tokenizer, model)  # --refit-prior auto: 16 windows sampled from the model
    sampling = time.perf_counter() - t
    rows = []
    before, prior_before = forward_seconds(model, batches), forward_seconds(model, prior)
    for allocation, precision, solving in ((a, p, s) for a in args.allocations for p in args.gradient_precisions
                                           for s in args.solve_precisions):
        t = time.perf_counter()
        solver = replace(cli._solver_config(job), allocation=allocation, sensitivity_precision=precision)
        solver = replace(solver, solve_precision=solving) if solving is not None else solver
        result = sp.prune(model, batches, args.sparsity, job.method, solver=solver, refit_prior=prior)
        pruning = time.perf_counter() - t
        after, prior_after = forward_seconds(model, batches), forward_seconds(model, prior)
        every = (before + prior_before, after + prior_after)  # the calibration and the prior windows
        rows.append({"allocation": allocation, "statistics": solver.statistics, "tau_batches": solver.tau_batch_count(),
                     "gradient_precision": f"{precision} ({result.report.solver['gradient_precision']})",
                     "solve_precision": f"{solver.solve_precision} ({result.report.solver['solve_precision']})",
                     "pruning_s": round(pruning, 1), "forward_before_s": round(before, 1),
                     "forward_after_s": round(after, 1), "ratio_range": [round(pruning / max(before, after), 2),
                                                                         round(pruning / min(before, after), 2)],
                     "prior_forward_before_s": round(prior_before, 1), "prior_forward_after_s": round(prior_after, 1),
                     "ratio_range_with_prior": [round(pruning / max(every), 2), round(pruning / min(every), 2)],
                     "tau": _finite(result.report.solver["tau"]), "stages": result.report.solver["stages"]})
        if args.evaluate:  # the main job's quality under this run's settings (not timed)
            from structprune_graph.evaluate import perplexity

            rows[-1]["perplexity"] = round(perplexity(result.model, eval_windows, progress=False), 3)
        print(json.dumps(rows[-1]), flush=True)
        before, prior_before = after, prior_after
    out = Path(args.out)
    (out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "sampling_s": round(sampling, 1),
                                                     "rows": rows}, indent=1))
    lines = [f"Pruning SmolLM2 at {args.sparsity:.0%} (the CLI's main job) against one forward pass of its 32 x 512 "
             "calibration tokens (and of those and its 16 x 512 prior tokens), timed just before and just after it in the "
             "same process:", "",
             "| allocation | statistics | gradient sweeps | block solve's forwards | pruning (s) | "
             "forward before (s) | forward after (s) | pruning / forward | prior forward before / after (s) | "
             "pruning / forward of calibration + prior | "
             "sensitivity (s) | prior's sweep (s) | block solve (s) | held-out pydoc perplexity (--evaluate) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['allocation']} | {r['statistics']} | {r.get('gradient_precision', 'float32')} | "
              f"{r.get('solve_precision', 'float32')} | "
              f"{r['pruning_s']:.1f} | {r['forward_before_s']:.1f} | {r['forward_after_s']:.1f} | "
              f"{r['ratio_range'][0]:.1f}-{r['ratio_range'][1]:.1f}x | "
              f"{r['prior_forward_before_s']:.1f} / {r['prior_forward_after_s']:.1f} | "
              f"{r['ratio_range_with_prior'][0]:.1f}-{r['ratio_range_with_prior'][1]:.1f}x | "
              f"{r['stages'].get('sensitivity', 0):.1f} | {r['stages'].get('prior_scores', 0):.1f} | "
              f"{r['stages'].get('block_solve', 0):.1f} | "
              f"{r.get('perplexity', '-')} |" for r in rows]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
