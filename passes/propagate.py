"""Target propagation pass: coordination that reaches every block in the first round (issue 12 item 3).

ADMM's warm-started auxiliary step moves only the last blocks (its target residual is zero everywhere but
at the end, and the correction walks back one block per round). Here each round carries the global signal
to every block directly:

  (i)   forward sweep with the current weights on the fitting batches, keeping each block's input x_b
        (CPU, then disk: ``ActivationStore``) and the final output p;
  (ii)  backward sweep: g_{B-1} = p - z (z the dense final output), then g_{b-1} = J_b(x_b)^T g_b, the
        vector-Jacobian product of block b at its own input (autograd on one block at a time);
  (iii) forward sweep of re-fits: block b's residual-exit consumer (``down_proj``; any linear layer whose
        output is added unchanged to the block's output) is re-fitted by least squares so that the block's
        output, on its *current* input, moves by -eta ||p - z|| g_b / ||g_b||, eta = step / (blocks with an
        exit): the gradient's direction at the residual's size, so every block takes an equal share of the
        output correction (a raw J^T product grows toward block 0 and made SmolLM2 diverge in round 1).

After every round the output error is measured on held-out calibration batches that no re-fit saw; the
round with the lowest held-out error is returned, round 0 (the sequential solution) included, so the pass
never returns weights worse than its input on those batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.blockwise import ActivationStore, BlockInput, run_block
from structprune_graph.graph import Group
from structprune_graph.streaming import resident

from ._infra import Pass, PassResult
from .admm import ADMM_DAMPING, DEFAULT_ROUNDS, AdmmResult, exits_of, refit_exit
from .blockwise_calibrate import block_module
from .partition import Partition
from .solve import BlockSolution, block_overrides, relative_error

logger = logging.getLogger(__name__)

DEFAULT_STEP = 1.0


@dataclass(frozen=True)
class PropagateRequest:
    model: nn.Module
    partition: Partition
    groups: Mapping[str, Group]
    inputs: Sequence[BlockInput]  # the first block's inputs for the fitting batches
    dense_final: torch.Tensor  # (batches, ...) dense last-block outputs of the fitting batches
    held_inputs: Sequence[BlockInput]  # batches no re-fit sees: the rounds are chosen on them
    held_final: torch.Tensor
    solution: BlockSolution
    store: ActivationStore = field(compare=False)
    rounds: int = DEFAULT_ROUNDS
    step: float = DEFAULT_STEP
    damping: float = ADMM_DAMPING
    resident: Callable[[nn.Module], nn.Module] = field(default=resident, compare=False)


@dataclass(frozen=True)
class PropagateResult(AdmmResult):
    held_errors: tuple[float, ...] = ()  # output error on the held-out batches per round (0 first)
    weight_changes: tuple[tuple[float, ...], ...] = ()  # per round, per block: ||W - W_prev|| / ||W_prev||


class PropagatePass(Pass[PropagateRequest, PropagateResult]):
    def call(self, state: PropagateRequest) -> PassResult[PropagateResult]:
        blocks = state.partition.blocks
        keep, weights = state.solution.keep, dict(state.solution.new_weights)
        fit_errors = [self._output_error(state, state.inputs, state.dense_final, keep, weights)]
        held_errors = [self._output_error(state, state.held_inputs, state.held_final, keep, weights)]
        exits = exits_of(state.model, state.partition, state.groups, state.inputs[0], keep, weights, state.resident)
        if state.rounds == 0 or not exits:
            return PassResult(PropagateResult(state.solution, tuple(fit_errors), 0, len(exits), tuple(held_errors)),
                              modified=False)
        eta = state.step / len(exits)
        best = (held_errors[0], 0, dict(weights))
        changes = []
        for k in tqdm(range(1, state.rounds + 1), desc="propagate", leave=False):
            residual = self._gradients(state, keep, weights)  # ||p - z||; ("g", b) in the store
            before = dict(weights)
            stream = list(state.inputs)
            for block in blocks:  # (iii) re-fit each exit toward its share of the correction
                module = state.resident(block_module(state.model, block))
                if block.index in exits:
                    g = state.store.get(("g", block.index))
                    # the gradient's direction at the residual's size: products of Jacobians grow toward
                    # block 0 (measured on SmolLM2: |g_0| >> |g_B|), and a raw step there diverges
                    g = g * (residual / max(float(g.norm()), 1e-30))
                    refit_exit(state.model, block, state.groups, module, exits[block.index], stream, -eta * g,
                               keep, weights, state.damping, move=True)
                overrides = block_overrides(state.model, block, state.groups, keep, weights)
                with torch.no_grad():
                    stream = [inp.with_stream(run_block(module, inp, overrides)) for inp in stream] \
                        if block.path else stream
            for block in blocks:
                state.store.drop(("g", block.index))
            changes.append(tuple(weight_change(before, weights, block.path) for block in blocks))
            fit_errors.append(self._output_error(state, state.inputs, state.dense_final, keep, weights))
            held_errors.append(self._output_error(state, state.held_inputs, state.held_final, keep, weights))
            logger.info("propagate round %d: output error %.4g (held-out %.4g)", k, fit_errors[-1], held_errors[-1])
            if held_errors[-1] < best[0]:
                best = (held_errors[-1], k, dict(weights))
        solution = BlockSolution(keep, best[2], state.solution.block_errors)
        return PassResult(PropagateResult(solution, tuple(fit_errors), best[1], len(exits), tuple(held_errors),
                                          tuple(changes)), modified=best[1] > 0)

    @staticmethod
    def _gradients(state: PropagateRequest, keep, weights) -> float:
        """(i) + (ii): the output error's gradient at every block's output, stored as ("g", b); returns the
        size of the output residual ||p - z||."""
        blocks = state.partition.blocks
        stream = list(state.inputs)
        for block in blocks:  # (i) keep each block's input stream
            state.store.put(("x", block.index), torch.stack([inp.stream for inp in stream]))
            module = state.resident(block_module(state.model, block))
            overrides = block_overrides(state.model, block, state.groups, keep, weights)
            with torch.no_grad():
                out = [run_block(module, inp, overrides) for inp in stream]
            stream = [inp.with_stream(o) for inp, o in zip(stream, out)]
        g = torch.stack(out).cpu() - state.dense_final.cpu()  # (batches, tokens, hidden) d/dp of ||p - z||^2 / 2
        residual = float(g.norm())
        for block in reversed(blocks):  # (ii) vector-Jacobian products, one block at a time
            state.store.put(("g", block.index), g)
            x = state.store.get(("x", block.index))
            state.store.drop(("x", block.index))
            if block.index == 0:
                break
            module = state.resident(block_module(state.model, block))
            overrides = block_overrides(state.model, block, state.groups, keep, weights)
            back = []
            for i, inp in enumerate(state.inputs):
                xi = x[i].to(inp.stream.device).detach().requires_grad_(True)
                with torch.enable_grad():
                    out = run_block(module, inp.with_stream(xi), overrides)
                    back.append(torch.autograd.grad(out, xi, g[i].to(out.device))[0].detach().cpu())
            g = torch.stack(back)
        return residual

    def _output_error(self, state: PropagateRequest, inputs: Sequence[BlockInput], final: torch.Tensor,
                      keep, weights) -> float:
        stream = list(inputs)
        out = []
        for block in state.partition.blocks:
            module = state.resident(block_module(state.model, block))
            overrides = block_overrides(state.model, block, state.groups, keep, weights)
            with torch.no_grad():
                out = [run_block(module, inp, overrides) for inp in stream]
            stream = [inp.with_stream(o) for inp, o in zip(stream, out)]
        return relative_error(out, list(final))


def weight_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], path: str) -> float:
    prefix = path + "." if path else ""
    num = den = 0.0
    for name, w in after.items():
        if name.startswith(prefix) and name in before:
            num += float((w.double() - before[name].double()).pow(2).sum())
            den += float(before[name].double().pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0
