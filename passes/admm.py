"""ADMM pass: coordinate the separately solved blocks so that the pruned model's *output* (not each block's)
matches the dense one. See ``docs/structprune_solver.md`` for the derivation; in short, with a_b the
auxiliary output of block b, u_b its scaled dual, z the dense model's last-block output and f_b the pruned
block (masks fixed, the residual-exit consumer's kept weights free), each round does

  (i)   block step, b = 0..B-1: re-fit block b's residual-exit consumer (``down_proj``) by least squares so
        that f_b(a_{b-1}) moves to the target a_b - u_b (z for the last block), then p_b = f_b(a_{b-1});
  (ii)  auxiliary step, b = 0..B-2, using blocks b and b+1 only, with f_{b+1} linearised as a residual map
        (f_{b+1}(a) ~ q_b + (a - a_b), q_b = f_{b+1}(a_b)):
        a_b <- ((p_b + u_b) + (a_b + a_{b+1} - u_{b+1} - q_b)) / 2, and for the last auxiliary
        a_{B-2} <- (rho (p + u) + 2 (a + z - q)) / (rho + 2);
  (iii) dual step: u_b <- u_b + p_b - a_b.

A block's residual-exit consumer is found by perturbation: adding delta to its output must add exactly
delta to the block's output; a block without one only takes part in steps (ii) and (iii). The pass works
on ``batches`` (a subset of the calibration data); a, u and p live in an ``ActivationStore`` (CPU, then
disk). After the rounds, the weights of the round with the lowest output error on the subset are kept
(round 0 is the sequential solution itself). Zero rounds returns the solution unchanged.

Given a and u, the block steps are independent, and so are the q_b: with several ranks (``collective``)
block b is re-fitted on rank b mod K, which then broadcasts its exit weight, p_b and q_{b-1}; the cheap
element-wise steps (ii)-(iii) run on every rank, so a and u stay identical everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.blockwise import ActivationStore, BlockInput, run_block
from structprune_graph.distributed import LOCAL, Collective
from structprune_graph.graph import Group
from structprune_graph.streaming import resident
from structprune_graph.verify import InvariantError

from ._infra import Pass, PassResult
from .blockwise_calibrate import block_module
from .obs import as_out_in, damped, from_out_in, gram, is_linear
from .partition import Block, Partition
from .solve import BlockSolution, block_overrides, relative_error

logger = logging.getLogger(__name__)

DEFAULT_RHO = 1.0
DEFAULT_ROUNDS = 2
ADMM_DAMPING = 0.1  # stronger than the block solve's: the subset has fewer tokens than the calibration


@dataclass(frozen=True)
class AdmmRequest:
    model: nn.Module
    partition: Partition
    groups: Mapping[str, Group]
    inputs: Sequence[BlockInput]  # the first block's inputs for the ADMM batches
    dense_final: torch.Tensor  # (batches, ...) the dense last-block outputs for the same batches
    solution: BlockSolution
    store: ActivationStore = field(compare=False)  # holds ("pruned", b): the sequential solution's outputs
    rounds: int = DEFAULT_ROUNDS
    rho: float = DEFAULT_RHO
    damping: float = ADMM_DAMPING
    resident: Callable[[nn.Module], nn.Module] = field(default=resident, compare=False)  # streamed weights
    # ranks sharing the batches: each holds its share of inputs, dense_final and ("pruned", b); the rounds
    # gather them and solve block b on rank b mod K
    collective: Collective = field(default=LOCAL, compare=False)


@dataclass(frozen=True)
class AdmmResult:
    solution: BlockSolution
    output_errors: tuple[float, ...]  # relative error of the final output on the ADMM batches, per round (0 first)
    best_round: int
    coordinated_blocks: int  # blocks with a residual-exit consumer


def residual_exit(module: nn.Module, inp: BlockInput, overrides: Mapping[str, torch.Tensor],
                  candidates: Sequence[str]) -> Optional[str]:
    """The last candidate layer whose output is added unchanged to the block's output."""
    with torch.no_grad():
        base = run_block(module, inp, overrides)
        for path in reversed(candidates):
            layer = module.get_submodule(path)
            delta = torch.randn(layer.weight.shape[0] if isinstance(layer, nn.Linear) else layer.weight.shape[1],
                                generator=torch.Generator().manual_seed(0)) * float(base.abs().mean())
            handle = layer.register_forward_hook(lambda m, a, out: out + delta)
            try:
                moved = run_block(module, inp, overrides)
            finally:
                handle.remove()
            if torch.allclose(moved - base, delta.expand_as(base), rtol=1e-3, atol=1e-4 * float(delta.abs().max())):
                return path
    return None


class AdmmPass(Pass[AdmmRequest, AdmmResult]):
    def call(self, state: AdmmRequest) -> PassResult[AdmmResult]:
        blocks = state.partition.blocks
        col = state.collective
        if col.active:
            state = _gathered(state)
        store = state.store
        keep, weights = state.solution.keep, dict(state.solution.new_weights)
        errors = [self._output_error(state, weights)]
        if state.rounds == 0 or len(blocks) < 2:
            return PassResult(AdmmResult(state.solution, tuple(errors), 0, 0), modified=False)
        exits = exits_of(state.model, state.partition, state.groups, state.inputs[0], keep, weights, state.resident)
        for b in range(len(blocks) - 1):
            store.put(("a", b), store.get(("pruned", b)))
            store.put(("u", b), torch.zeros_like(store.get(("pruned", b))))
        best = (errors[0], 0, dict(weights))
        mine = [block for block in blocks if _owner(block.index, col) == col.rank]  # every block in one process
        for k in tqdm(range(1, state.rounds + 1), desc="admm", leave=False):
            for block in mine:  # (i) block step: independent given a and u; buffers on the CPU, blocks on their device
                target = (store.get(("a", block.index)) - store.get(("u", block.index))
                          if block.index < len(blocks) - 1 else state.dense_final.cpu())
                if exits.get(block.index):
                    refit_exit(state.model, block, state.groups, state.resident(block_module(state.model, block)),
                               exits[block.index], self._inputs(state, block.index), target, keep, weights,
                               state.damping)
                p = self._forward(state, block, self._inputs(state, block.index), keep, weights)
                if block.index < len(blocks) - 1:
                    store.put(("p", block.index), p)
            if col.active:  # q_b = f_{b+1}(a_b) on block b+1's owner, then shared (one process: inline below)
                for b in range(len(blocks) - 1):
                    if _owner(b + 1, col) == col.rank:
                        store.put(("q", b), self._q(state, b, keep, weights))
                self._share_round(state, exits, weights, k)
            for b in range(len(blocks) - 1):  # (ii) auxiliary step on blocks b and b+1, (iii) dual step
                a, u, p = (store.get((name, b)) for name in ("a", "u", "p"))
                q = store.get(("q", b)) if col.active else self._q(state, b, keep, weights)
                if b + 1 < len(blocks) - 1:  # a_{b+1} is still the previous round's: a Jacobi sweep
                    nxt = store.get(("a", b + 1)) - store.get(("u", b + 1))
                    a_new = ((p + u) + (a + nxt - q)) / 2
                else:
                    a_new = (state.rho * (p + u) + 2 * (a + state.dense_final.cpu() - q)) / (state.rho + 2)
                store.put(("u", b), u + p - a_new)
                store.put(("a", b), a_new)
                del a, u, p, q, a_new
            errors.append(self._output_error(state, weights))
            logger.info("admm round %d: output error %.4g", k, errors[-1])
            if errors[-1] < best[0]:
                best = (errors[-1], k, dict(weights))
        solution = BlockSolution(keep, best[2], state.solution.block_errors)
        return PassResult(AdmmResult(solution, tuple(errors), best[1], len(exits)), modified=best[1] > 0)

    def _q(self, state: AdmmRequest, b: int, keep, weights) -> torch.Tensor:
        """q_b = f_{b+1}(a_b): block b+1 with its new weights on the current auxiliary a_b (on the CPU)."""
        return self._forward(state, state.partition.blocks[b + 1], self._inputs(state, b + 1), keep, weights).cpu()

    @staticmethod
    def _share_round(state: AdmmRequest, exits: Mapping[int, str], weights: dict, k: int) -> None:
        """Block-parallel rounds: each block's re-fitted exit weight and boundary activations (p_b, and
        q_{b-1} = f_b(a_{b-1})) go from the block's owner to every rank."""
        col, blocks, store = state.collective, state.partition.blocks, state.store
        for block in blocks:
            src, where = _owner(block.index, col), f"admm round {k}: block {block.index}"
            if exits.get(block.index):
                name = f"{block.path + '.' if block.path else ''}{exits[block.index]}.weight"
                weights[name] = col.broadcast(weights[name] if col.rank == src else None, src, where)
            if block.index < len(blocks) - 1:
                store.put(("p", block.index), col.broadcast(
                    store.get(("p", block.index)) if col.rank == src else None, src, where))
            if block.index > 0:
                store.put(("q", block.index - 1), col.broadcast(
                    store.get(("q", block.index - 1)) if col.rank == src else None, src, where))

    @staticmethod
    def _inputs(state: AdmmRequest, b: int) -> list[BlockInput]:
        if b == 0:
            return list(state.inputs)
        a = state.store.get(("a", b - 1))
        return [inp.with_stream(a[i].to(inp.stream.device)) for i, inp in enumerate(state.inputs)]

    @staticmethod
    def _forward(state: AdmmRequest, block: Block, inputs: Sequence[BlockInput], keep, weights) -> torch.Tensor:
        module = state.resident(block_module(state.model, block))
        overrides = block_overrides(state.model, block, state.groups, keep, weights)
        with torch.no_grad():
            return torch.stack([run_block(module, inp, overrides) for inp in inputs])

    def _output_error(self, state: AdmmRequest, weights) -> float:
        """Relative error of the pruned model's final output; with several ranks each runs its share of
        the (gathered) batches through every block and the sums are added."""
        col = state.collective
        share = range(col.rank, len(state.inputs), col.world)  # global indices, this rank's round-robin share
        inputs = [state.inputs[i] for i in share]
        out = None
        for block in state.partition.blocks:
            out = self._forward(state, block, inputs, state.solution.keep, weights)
            inputs = [inp.with_stream(out[i]) for i, inp in enumerate(inputs)]
        return relative_error(list(out) if out is not None else [], [state.dense_final[i] for i in share], col)


def _owner(block_index: int, collective: Collective) -> int:
    return block_index % collective.world


def _gathered(state: AdmmRequest) -> AdmmRequest:
    """The request with every rank's share of the coordination batches (inputs, dense final outputs and the
    sequential solution's block outputs) gathered on every rank, in global batch order."""
    col = state.collective
    where = "admm: gather the coordination batches"

    def rows(stacked: torch.Tensor) -> list[torch.Tensor]:  # one storage each: a pickled view sends its whole base
        return [row.clone() for row in stacked]

    inputs = col.gather_shards(list(state.inputs), where)
    finals = torch.stack(col.gather_shards(rows(state.dense_final), where))
    for b in range(len(state.partition.blocks) - 1):
        state.store.put(("pruned", b), torch.stack(col.gather_shards(rows(state.store.get(("pruned", b))), where)))
    return replace(state, inputs=inputs, dense_final=finals)


def exits_of(model: nn.Module, partition: Partition, groups: Mapping[str, Group], first_input: BlockInput,
             keep, weights: Mapping[str, torch.Tensor], resident_fn: Callable[[nn.Module], nn.Module]) -> dict[int, str]:
    """Block index -> the re-fitted linear layer whose output is added unchanged to the block's output."""
    exits = {}
    for block in partition.blocks:
        module = resident_fn(block_module(model, block))
        prefix = block.path + "." if block.path else ""
        candidates = [n[len(prefix):].rpartition(".")[0] for n in weights if n.startswith(prefix)]
        candidates = [c for c in candidates if is_linear(module.get_submodule(c))]
        overrides = block_overrides(model, block, groups, keep, weights)
        found = residual_exit(module, first_input, overrides, candidates) if candidates else None
        if found:
            exits[block.index] = found
        else:
            logger.info("block %s has no residual-exit consumer; it is not re-fitted", block.path)
    return exits


def refit_exit(model: nn.Module, block: Block, groups: Mapping[str, Group], module: nn.Module, path: str,
               inputs: Sequence[BlockInput], target: torch.Tensor, keep, weights: dict, damping: float,
               move: bool = False) -> None:
    """Least squares on ``inputs``: the kept columns of ``path`` move so that the block's output moves to
    ``target`` (batches, ...), or with ``move`` by ``target`` itself; ``weights[path's weight]`` is replaced."""
    prefix = block.path + "." if block.path else ""
    name = f"{prefix}{path}.weight"
    layer = module.get_submodule(path)
    w = as_out_in(layer, weights[name])  # (out, in)
    kept = (w != 0).any(0).nonzero().flatten()  # removed columns are exactly zero
    overrides = block_overrides(model, block, groups, keep, weights)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    h = cross = None  # on the block's device
    try:
        with torch.no_grad():
            for i, inp in enumerate(inputs):
                out = run_block(module, inp, overrides)
                x = captured.pop().reshape(-1, w.shape[1])[:, kept.to(out.device)].double()  # (tokens, kept)
                d = (target[i].to(out.device) - (0 if move else out)).reshape(-1, w.shape[0]).double()  # (tokens, out)
                h = gram(x) if h is None else h + gram(x)  # (kept, kept)
                cross = x.T @ d if cross is None else cross + x.T @ d
    finally:
        handle.remove()
    step = torch.cholesky_solve(cross, torch.linalg.cholesky(damped(h, damping)))  # (kept, out)
    w = w.to(step.device)
    w[:, kept.to(step.device)] += step.T
    if not torch.isfinite(w).all():
        raise InvariantError(f"non-finite weights in {name} at a coordination re-fit; raise the damping")
    weights[name] = from_out_in(layer, w, weights[name])
