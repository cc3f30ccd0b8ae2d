"""Data-parallel StructPrune (issue 15) with 2 gloo processes on CPU: each rank runs half of the calibration
batches, the statistics and losses are summed across ranks, and the result equals the single-process run:
the same plan and tau, weights within 1e-6. A rank that fails makes the other exit with an error naming
itself and the stage; too many ranks for the batches is a clear error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import structprune_graph as sp
from conftest import traced
from structprune_graph.distributed import Collective, DistributedError
from structprune_graph.solver import SolverConfig
from test_pruning import lm_batches

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run_ranks(tmp_path: Path, mode: str, world: int = 2) -> tuple[list[int], Path]:
    out = tmp_path / "result.pt"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(tmp_path / "rendezvous"),
                               str(out), mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    codes = [p.wait(timeout=300) for p in procs]
    return codes, out


def test_two_ranks_give_the_single_process_plan_tau_and_admm_weights(tmp_path):
    """Each rank runs half of the batches (sweep, tau search, block solve: the same plan, tau and block
    errors), then ADMM rounds with block b re-fitted on rank b mod 2, boundary activations and exit weights
    exchanged; the output errors of every round and the final weights equal the 1-process rounds. (Without
    rounds, streamed: tests/test_cli_prune.py's torchrun launch.)"""
    codes, out = _run_ranks(tmp_path, "admm")
    assert codes == [0, 0], [p.read_text() for p in sorted(tmp_path.glob("*.err"))]
    got = torch.load(out, weights_only=False)
    _, model, _ = traced("llama")
    want = sp.prune(model, lm_batches(8), 0.4, solver=SolverConfig(tau_batches=4, rounds=3, statistics="float64"))
    assert want.report.solver["admm_best_round"] > 0  # the rounds moved the weights: a real comparison
    assert got["keep"] == dict(want.plan.keep)
    assert got["tau"] == want.report.solver["tau"]
    assert got["block_errors"] == pytest.approx(want.report.solver["block_errors"], rel=1e-9)
    assert got["admm"] == pytest.approx(want.report.solver["admm_output_errors"], rel=1e-6)
    assert got["traffic"]["broadcast"] > 0 and got["traffic"]["all_gather"] > 0
    for name, value in want.model.state_dict().items():
        torch.testing.assert_close(got["state"][name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_a_failing_rank_stops_the_other_with_its_name_and_stage(tmp_path):
    codes, out = _run_ranks(tmp_path, "fail")
    assert codes == [1, 1]
    assert not out.exists()
    rank0, rank1 = (Path(f"{out}.rank{r}.err").read_text() for r in (0, 1))
    assert rank1.startswith("ValueError: rank 1 broke in its re-fit")
    assert rank0.startswith("DistributedError: rank 0 of 2: solve block") and "a peer rank (rank 1) exited" in rank0


def test_shards_are_round_robin_and_too_many_ranks_is_refused():
    assert Collective(rank=1, world=3).shard(8) == (1, 4, 7)
    assert Collective(rank=1, world=3).local_positions(range(5)) == [0, 1]  # global 1 and 4
    with pytest.raises(DistributedError, match="4 ranks but 3 calibration batches"):
        Collective(rank=0, world=4).shard(3)
    assert Collective(world=2).owners([1.0, 8.0, 1.0, 1.0]) == [1, 0, 1, 1]


def test_settings_that_cannot_be_shared_across_ranks_are_refused_before_any_work():
    from structprune_graph.pruning import select_groups
    from structprune_graph.solver import _coordination_split, _every_rank_has, prepare

    with pytest.raises(DistributedError, match="SolverConfig.tau_batches must be at least the number of ranks"):
        _every_rank_has([], Collective(rank=1, world=2), "tau_batches")
    _, model, graph = traced("llama")
    with pytest.raises(DistributedError, match="coordination='propagate' is not distributed"):
        prepare(model, graph, select_groups(graph), lm_batches(2), SolverConfig(rounds=1, coordination="propagate"),
                collective=Collective(rank=0, world=2))
    with pytest.raises(DistributedError, match="SolverConfig.admm_batches must be at least the number of ranks"):
        _coordination_split(4, SolverConfig(rounds=1, admm_batches=1), Collective(rank=1, world=2))


def test_distributed_without_a_process_group_is_a_clear_error():
    _, model, _ = traced("llama")
    with pytest.raises(DistributedError, match="needs an initialised process group"):
        sp.prune(model, lm_batches(2), 0.3, distributed=True)
    with pytest.raises(sp.StructPruneError, match="runs the structprune solver"):
        sp.prune(model, lm_batches(2), 0.3, method="wanda-sp", distributed=True)
