"""One rank of a distributed pruning in the tests (run as a subprocess by test_distributed.py):
``python distributed_worker.py RANK WORLD INIT_FILE OUT MODE`` with MODE ``prune`` (rank 0 saves the plan
and weights to OUT), ``admm`` (the same with 3 block-parallel ADMM rounds), ``fail`` (rank 1 raises inside its first re-fit) or ``stream`` (prune_checkpoint of the
folder in OUT's parent, written by rank 0 to OUT). Errors go to OUT.rankN.err and exit 1."""

from __future__ import annotations

import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    rank, world, init, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        import structprune_graph as sp
        from structprune_graph.solver import SolverConfig
        from test_pruning import lm_batches

        if mode == "fail" and rank == 1:
            import structprune_graph.passes.solve as solve_pass

            def broken(*args, **kwargs):
                raise ValueError("rank 1 broke in its re-fit")
            solve_pass.least_squares = broken
        # float64 statistics: the ranks' sums equal the one process's to its precision
        config = SolverConfig(tau_batches=4, rounds=3 if mode == "admm" else 0, statistics="float64")
        if mode == "stream":
            sp.prune_checkpoint(out.parent / "checkpoint", lm_batches(8), 0.4, out, solver=config, distributed=True)
            return 0
        from structprune_graph.zoo import ZOO, build_eval

        model = build_eval(next(e for e in ZOO if e.name == "llama"))
        result = sp.prune(model, lm_batches(8), 0.4, solver=config, distributed=True)
        if rank == 0:
            torch.save({"keep": dict(result.plan.keep), "state": result.model.state_dict(),
                        "tau": result.report.solver["tau"], "block_errors": result.report.solver["block_errors"],
                        "admm": result.report.solver["admm_output_errors"],
                        "traffic": dict(result.report.solver["distributed"]["bytes_sent"])}, out)
        return 0
    except Exception as err:  # noqa: BLE001 - the test reads what each rank raised
        Path(f"{out}.rank{rank}.err").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
