"""Data-parallel StructPrune on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs, nothing else).

Every rank holds (or streams) the same model and a share of the calibration batches: global batch i goes
to rank i mod K. What the solver reduces across ranks, block by block:

- the per-layer statistics (H = X^T X, channel energies) and the block's input energy: ``all_reduce``
  (sum), so every rank holds the same H; with 2 ranks the sum is exact and identical on both (a + b = b + a);
  with more it is NCCL's/gloo's fixed reduction order, deterministic for a given world size;
- the loss of a tau trial and the block errors: sums of per-rank sums (one ``all_reduce``);
- the work on those statistics: each independent task of a block (a group's OBS curve in calibration, a
  cluster of groups that share consumer layers in the solve) is owned by one rank, balanced by its cost
  (the cube of its matrix sizes), computed there and broadcast to all, so every rank continues with the
  same curves, keep-sets and re-fitted weights;
- ADMM rounds (passes/admm.py) run block-parallel: the coordination batches are gathered on every rank
  once, block b's re-fit runs on rank b mod K, and only block-boundary activations and the re-fitted exit
  weights are broadcast.

The allocation is computed on every rank from identical curves and losses. Rank 0 alone writes output.
A rank that fails makes its collectives fail on the others; that is reported as ``DistributedError``
naming this rank, the stage and the peer error, and no output is written (rank 0 writes last).
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from .errors import StructPruneError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(StructPruneError):
    """A collective failed: a peer rank exited, timed out, or the ranks disagree."""


@dataclass(frozen=True)
class Collective:
    """This process's place among the ranks; ``Collective()`` is a single process (every method a no-op)."""

    rank: int = 0
    world: int = 1
    # bytes this rank sent by kind (all_reduce counts the tensor once; broadcast counts the owner's pickle)
    traffic: Counter = field(default_factory=Counter, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_process_group(cls) -> "Collective":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError("distributed=True needs an initialised process group: launch with torchrun and "
                                   "call torch.distributed.init_process_group (the CLI's --distributed does both)")
        return cls(dist.get_rank(), dist.get_world_size())

    def shard(self, n: int) -> tuple[int, ...]:
        """The global indices of the batches this rank runs (round robin)."""
        if self.active and n < self.world:
            raise DistributedError(f"{self.world} ranks but {n} calibration batches: every rank needs at least one "
                                   f"(pass more windows or launch fewer processes)")
        return tuple(range(self.rank, n, self.world))

    def local_positions(self, global_indices: Sequence[int]) -> list[int]:
        """Positions in this rank's shard of those global batch indices that it holds."""
        return sorted((g - self.rank) // self.world for g in set(global_indices) if g % self.world == self.rank)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Collectives inside fail as one ``DistributedError`` naming this rank and the stage."""
        if not self.active:
            yield
            return
        try:
            yield
        except RuntimeError as err:
            peers = [r for r in range(self.world) if r != self.rank]
            who = f"rank {peers[0]}" if len(peers) == 1 else f"one of ranks {peers}"
            raise DistributedError(f"rank {self.rank} of {self.world}: {name}: a collective failed: a peer rank "
                                   f"({who}) exited or timed out ({str(err).splitlines()[0][:200]}); no output is "
                                   f"written") from err

    def sum_tensors_(self, tensors: Mapping[Any, torch.Tensor], stage: str) -> None:
        """Sum each tensor over the ranks in place (the same keys on every rank, in sorted order)."""
        if not self.active:
            return
        import torch.distributed as dist

        keys = sorted(tensors, key=str)
        self._same_keys([str(k) for k in keys], stage)
        with self.stage(stage):
            for key in keys:
                dist.all_reduce(tensors[key])
                self.traffic["all_reduce"] += tensors[key].numel() * tensors[key].element_size()

    def sum_floats(self, values: Sequence[float], stage: str) -> list[float]:
        if not self.active:
            return [float(v) for v in values]
        import torch.distributed as dist

        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        with self.stage(stage):
            dist.all_reduce(total)
        self.traffic["all_reduce"] += 8 * len(values)
        return total.cpu().tolist()

    def owners(self, costs: Sequence[float]) -> list[int]:
        """Rank that computes each task: largest first, to the least loaded rank (ties: lowest rank)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += costs[i]
        return owner

    def map_owned(self, tasks: Sequence[Callable[[], T]], costs: Sequence[float], stage: str) -> list[T]:
        """Run each task on its owner and give every rank every result (broadcast from the owner)."""
        if not self.active:
            return [task() for task in tasks]
        owner = self.owners(costs)
        results: list[Any] = [tasks[i]() if owner[i] == self.rank else None for i in range(len(tasks))]
        return [self.broadcast(results[i], owner[i], stage) for i in range(len(tasks))]

    def broadcast(self, value: T, src: int, stage: str) -> T:
        """``value`` from rank ``src`` on every rank (the others pass anything, e.g. None)."""
        if not self.active:
            return value
        import torch.distributed as dist

        if self.rank == src:
            self.traffic["broadcast"] += len(pickle.dumps(value))
        box = [value if self.rank == src else None]
        with self.stage(stage):
            dist.broadcast_object_list(box, src=src, device=self._device())
        return box[0]

    def gather_shards(self, local: Sequence[T], stage: str) -> list[T]:
        """Every rank's share of a round-robin sharded list, as the whole list in global order on every rank
        (global item g is item g // world of rank g % world)."""
        if not self.active:
            return list(local)
        import torch.distributed as dist

        shards: list[Any] = [None] * self.world
        self.traffic["all_gather"] += len(pickle.dumps(list(local)))
        with self.stage(stage):
            dist.all_gather_object(shards, list(local))
        total = sum(len(s) for s in shards)
        return [shards[g % self.world][g // self.world] for g in range(total)]

    def barrier(self, stage: str) -> None:
        if self.active:
            import torch.distributed as dist

            with self.stage(stage):
                dist.barrier()

    def _same_keys(self, keys: list[str], stage: str) -> None:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        with self.stage(stage):
            dist.all_gather_object(gathered, keys)
        if any(g != keys for g in gathered):
            raise DistributedError(f"rank {self.rank}: {stage}: the ranks collected statistics of different layers "
                                   f"({keys[:3]} here); every rank must run the same model and settings")

    @staticmethod
    def _device() -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


LOCAL = Collective()


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> Collective:
    """``init_process_group`` from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL for
    ``cuda`` (one GPU per local rank), gloo otherwise."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"--distributed needs torchrun's environment ({', '.join(missing)} unset): run "
                               f"torchrun --nproc-per-node K -m structprune_graph.cli prune ... --distributed")
    backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Collective.from_process_group()
