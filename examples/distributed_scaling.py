"""Data-parallel StructPrune on SmolLM2-135M with 1 and 2 processes (issue 15): the same command launched by
``torchrun --nproc-per-node K``, each rank on its share of the calibration windows (gloo, CPU). Per rank:
wall time per stage (dense sweep; allocation and block solve), bytes it sent, peak RSS; rank 0 also the
held-out perplexity (pydoc evaluation half) and the plan, which must equal the 1-process plan.

On this 2-core machine K processes get 2 / K torch threads each, so K = 2 measures the overhead and the
split of the work rather than a speedup; on a GPU machine each rank gets its own device.

With ``--rounds N`` the solver also runs N ADMM rounds, block-parallel across the ranks (block b on rank
b mod K; boundary activations and exit weights broadcast), timed as their own stage.

Run: ``python examples/distributed_scaling.py [--ranks 1 2] [--rounds 0] [--calib-samples 16]
[--out examples/results] [--name distributed_scaling]``; writes ``OUT/NAME.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    world = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, args.cores // world))
    import structprune_graph as sp
    from structprune_graph import data, models
    from structprune_graph.distributed import init_from_env
    from structprune_graph.evaluate import perplexity

    collective = init_from_env("cpu")
    model, tok = models.load_model(None), models.load_tokenizer(None)
    batches = data.calibration_batches(tok, "pydoc", args.calib_samples)
    t = time.perf_counter()
    from structprune_graph.solver import SolverConfig

    result = sp.prune(model, batches, args.sparsity, distributed=True, solver=SolverConfig(rounds=args.rounds))
    row = {"ranks": world, "rank": collective.rank, "threads": torch.get_num_threads(),
           "prune_seconds": round(time.perf_counter() - t, 1), **result.report.solver["stage_seconds"],
           "bytes_sent": result.report.solver.get("distributed", {}).get("bytes_sent", {}),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if collective.rank == 0:
        evals = data.evaluation_windows(data.tokenize(tok, data.load_text("pydoc", "evaluation")), 1024, args.eval_windows)
        row["ppl_pydoc"] = round(perplexity(result.model, evals, progress=False), 4)
        row["tau"] = result.report.solver["tau"]
        row["admm_output_errors"] = result.report.solver["admm_output_errors"]
        row["plan"] = {k: list(v) for k, v in result.plan.keep.items()}
    Path(args.rows, f"{world}-{collective.rank}.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--cores", type=int, default=2, help="cores shared by the ranks of one launch")
    parser.add_argument("--rounds", type=int, default=0, help="ADMM rounds (block-parallel across the ranks)")
    parser.add_argument("--name", default="distributed_scaling", help="file name of the results (JSON and MD)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ranks:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), __file__,
                            "--worker", "--rows", tmp, "--calib-samples", str(args.calib_samples), "--eval-windows",
                            str(args.eval_windows), "--sparsity", str(args.sparsity), "--cores", str(args.cores),
                            "--rounds", str(args.rounds)],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, args.cores // k))})
            launch = round(time.perf_counter() - t, 1)
            for r in range(k):
                row = json.loads(Path(tmp, f"{k}-{r}.json").read_text())
                rows.append({**row, "launch_seconds": launch})
    plans = {r["ranks"]: r.pop("plan") for r in rows if "plan" in r}
    same = all(p == plans[min(plans)] for p in plans.values())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": "SmolLM2-135M", "sparsity": args.sparsity, "calib": f"{args.calib_samples} x 512 pydoc",
                "eval": f"{args.eval_windows} x 1024 pydoc evaluation half", "cores": args.cores,
                "admm_rounds": args.rounds, "plans_equal": same}
    (out / f"{args.name}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    lines = ["# Data-parallel StructPrune: SmolLM2-135M with 1 and 2 processes (gloo, CPU)"
             + (f", {args.rounds} block-parallel ADMM rounds" if args.rounds else ""), "",
             f"Settings: {json.dumps(settings)}. One torchrun launch per process count; each rank's row. "
             f"Bytes sent: all_reduce counts each reduced tensor once per rank; broadcast counts the pickled "
             f"results a rank owns.", "",
             "| ranks | rank | threads | dense sweep s | allocate + solve s | ADMM rounds s | prune s | launch s | "
             "all_reduce MiB | broadcast MiB | all_gather MiB | peak RSS GiB | tau | ppl pydoc |", "|" + "---|" * 14]
    for r in rows:
        sent = r["bytes_sent"]
        lines.append(f"| {r['ranks']} | {r['rank']} | {r['threads']} | {r['dense sweep']} | {r['allocate and solve']} | "
                     f"{r.get('coordinate', 0)} | {r['prune_seconds']} | {r['launch_seconds']} | "
                     f"{sent.get('all_reduce', 0) / 2**20:.1f} | {sent.get('broadcast', 0) / 2**20:.1f} | "
                     f"{sent.get('all_gather', 0) / 2**20:.1f} | {r['peak_rss_gib']} | {r.get('tau', '')} | "
                     f"{r.get('ppl_pydoc', '')} |")
    errors = {r["ranks"]: r["admm_output_errors"] for r in rows if "admm_output_errors" in r}
    lines += ["", f"Plans of every process count equal: {same}."]
    if args.rounds:
        lines += [f"ADMM output error per round (round 0: the sequential solution), by process count: "
                  f"{json.dumps(errors)}."]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
