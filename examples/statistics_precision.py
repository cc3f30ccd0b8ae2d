"""The solver's matrices in float32 against float64 (issue 16: ``SolverConfig(statistics="float32")`` halves
the largest memory of a 7B-shaped run), measured on SmolLM2-135M-Instruct in one run.

Calibration on Austen (16 windows of 512 tokens, as the generalization protocol), structprune at each of
``--sparsities`` with the default solver, once with float64 and once with float32 statistics (each with its
own dense sweep, reused across sparsities). Reported per run: held-out perplexity on Austen (*Pride and
Prejudice*), pydoc's evaluation half and Python source code (``generalization.py``'s domains; nothing is
chosen here), the share of removed units both precisions removed, the largest relative difference of a
weight tensor where the plans agree, the per-block output errors, the stage seconds, and from the
float32 run's own checks: how many re-fits were checked, the largest estimated relative error (one step of
iterative refinement), and how many were redone in float64.

Run: ``python examples/statistics_precision.py [--sparsities 0.3 0.5] [--out examples/results]``; writes
``OUT/statistics_precision.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


class RefitChecks(logging.Handler):
    """Counts the float32 re-fit checks of ``passes/obs.py`` (a DEBUG record each) and their fallbacks."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.errors: list[float] = []
        self.fallbacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        from structprune_graph.passes.obs import REFIT_ERROR_LOG

        if record.msg == REFIT_ERROR_LOG:
            self.errors.append(float(record.args[0]))
        elif "redone in float64" in str(record.msg):
            self.fallbacks.append(record.getMessage())


def removed_units(plan_keep: dict, sizes: dict) -> set:
    return {(gid, u) for gid, kept in plan_keep.items() for u in set(range(sizes[gid])) - set(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from OUT's JSON")
    args = parser.parse_args()
    if args.table_only:
        measured = json.loads((Path(args.out) / "statistics_precision.json").read_text())
        return print(table(measured["dense"], measured["rows"]))
    torch.set_num_threads(args.threads)
    import generalization as gen
    import structprune_graph as sp
    from structprune_graph.solver import SolverConfig

    model, calib, _dev, evals = gen.setup(args)
    batches = gen.batches_of(calib["austen"])
    dense = gen.ppl(model, evals)
    checks = RefitChecks()
    obs_log = logging.getLogger("structprune_graph.passes.obs")
    obs_log.addHandler(checks)
    obs_log.setLevel(logging.DEBUG)
    rows, results = [], {}
    for statistics in ("float64", "float32"):
        solver = SolverConfig(statistics=statistics)
        previous = None
        for sparsity in args.sparsities:
            checks.errors, checks.fallbacks = [], []
            started = time.perf_counter()
            result = sp.prune(model, batches, sparsity, solver=solver, reuse=previous)
            seconds = time.perf_counter() - started
            previous = result
            results[(statistics, sparsity)] = result
            rows.append({"statistics": statistics, "sparsity": sparsity, "seconds": round(seconds, 1),
                         "eval": gen.ppl(result.model, evals), "stages": result.report.solver["stages"],
                         "block_errors": result.report.solver["block_errors"], "tau": result.report.solver["tau"],
                         "refits_checked": len(checks.errors),
                         "largest_refit_error": max(checks.errors, default=None),
                         "float64_fallbacks": checks.fallbacks})
            print(json.dumps(rows[-1]), flush=True)
    sizes = {g.id: g.size for g in results[("float64", args.sparsities[0])].graph.groups}
    for row in rows:
        if row["statistics"] != "float32":
            continue
        a, b = results[("float32", row["sparsity"])], results[("float64", row["sparsity"])]
        ra, rb = removed_units(a.plan.keep, sizes), removed_units(b.plan.keep, sizes)
        row["removed_in_common"] = round(len(ra & rb) / max(len(rb), 1), 4)
        same = [gid for gid in a.plan.keep if a.plan.keep[gid] == b.plan.keep.get(gid)]
        row["groups_with_the_same_units"] = f"{len(same)} / {len(a.plan.keep)}"
        if a.plan.keep == b.plan.keep:
            wa, wb = a.model.state_dict(), b.model.state_dict()
            row["largest_weight_difference"] = max(float((wa[k].double() - wb[k].double()).norm() /
                                                         wb[k].double().norm().clamp_min(1e-30)) for k in wb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "statistics_precision.json").write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))
    (out / "statistics_precision.md").write_text(table(dense, rows))
    print(table(dense, rows))


def table(dense: dict, rows: list[dict]) -> str:
    lines = ["| sparsity | statistics | austen | pydoc | code | removed units in common with float64 | "
             "groups with the same units | largest relative weight difference | re-fits checked | largest estimated re-fit error | redone in float64 | "
             "dense sweep s | block solve s | total s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| 0% | dense | {dense['austen']:.2f} | {dense['pydoc']:.2f} | {dense['code']:.2f} | | | | | | | | | |"]
    for r in rows:
        e, st = r["eval"], r["stages"]
        err = f"{r['largest_refit_error']:.2g}" if r["largest_refit_error"] is not None else "-"
        lines.append(f"| {r['sparsity']:.0%} | {r['statistics']} | {e['austen']:.2f} | {e['pydoc']:.2f} | {e['code']:.2f} | "
                     f"{r.get('removed_in_common', '-')} | {r.get('groups_with_the_same_units', '-')} | "
                     f"{format(r['largest_weight_difference'], '.2g') if 'largest_weight_difference' in r else '-'} | "
                     f"{r['refits_checked'] if r['statistics'] == 'float32' else '-'} | {err} | "
                     f"{len(r['float64_fallbacks']) if r['statistics'] == 'float32' else '-'} | "
                     f"{st.get('dense_sweep', '-')} | {st.get('block_solve', '-')} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
