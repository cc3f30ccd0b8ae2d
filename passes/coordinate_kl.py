"""KL coordination pass: every block's exit moves along the whole model's loss gradient (issue 12 item 3).

ADMM and target propagation (``admm.py``, ``propagate.py``) coordinate the blocks on the squared error of
the last block's output. On SmolLM2 that error is dominated by one channel of the residual stream (a massive
activation, ~97% of its energy from block 12 on), which the final norm divides away, so matching it does
not lower the loss. Here the objective is what the user sees: the KL divergence of the pruned model's
next-token distribution from the dense model's, averaged over tokens and windows,

    L(W) = mean_j mean_t KL( softmax(head(z_jt)) || softmax(head(p_jt(W))) ),

z the dense last-block output, p the pruned one, head = final norm + LM head. Each round:

  (i)   forward sweep with the current weights on the fitting windows, keeping each block's input x_b
        (``ActivationStore``: memory, then files) and the final output p;
  (ii)  dL/dp through the head (the model's own forward with the blocks as pass-throughs);
  (iii) backward sweep, one block at a time: block b runs on x_b with autograd; each of its exits (``exits=
        "residual"``: the residual-exit consumer, ``down_proj``, whose output is added unchanged to the
        block's output; ``"all"``: every linear layer of the block) gets its weight gradient G = dL/dW
        = sum_t g_t a_t^T (g_t the gradient at the layer's output, a_t its input) and H = sum_t a_t a_t^T over
        its kept inputs, and the vector-Jacobian product carries g_b to g_{b-1}. The direction is the
        input-preconditioned gradient D = -G (H + d mean(diag H) I)^-1 (a descent direction: <G, D> < 0),
        the step an ordinary least-squares re-fit of the layer makes when its output's target moves by -g;
        it is zero on removed rows and columns, so the units removed stay removed;
  (iv)  every block at once: W_b + a D_b, with a scaled so that the exits' weights change by ``step``
        (relative, all exits together) times 1, 1/4 and 1/16; the one with the lowest fitting KL is taken if
        it lowers it, and the next round starts from twice its scale. None lowering it ends the rounds. Each
        trial's forward stores its block inputs (the leader's kept, the others dropped), so the trial taken is
        the next round's forward (i): one forward of the fitting windows per round saved.

The backward sweep's blocks may run under ``torch.autocast`` (``precision``, e.g. bf16 where the device
multiplies it natively, as the sensitivity pass's sweeps): the gradients and H are statistics of a step
whose length the trials choose in float32, and the head, the gradient carried between blocks and every sum
stay float32.

After every round the KL is measured on held-out windows that no step saw; the round with the lowest
held-out KL is returned, round 0 (the block solve's weights) included, so the pass never returns weights
worse than its input on those windows. Masks are not re-selected: the units kept stay kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from structprune_graph.blockwise import ActivationStore, BlockInput, run_block
from structprune_graph.errors import StructPruneError
from structprune_graph.verify import InvariantError
from structprune_graph.graph import Group
from structprune_graph.streaming import resident

from ._infra import Pass, PassResult
from .admm import ADMM_DAMPING, exits_of
from .blockwise_calibrate import block_module
from .calibrate import run_batch
from .obs import as_out_in, damped, from_out_in, gram, is_linear
from .partition import Partition
from .propagate import weight_change
from .sensitivity import head_only
from .solve import BlockSolution, block_overrides

logger = logging.getLogger(__name__)

DEFAULT_KL_STEP = 0.01  # relative change of all exits' weights at the first trial of round 1
KL_EXITS = ("residual", "all")  # which linear layers of a block the rounds move
TRIALS = (1.0, 0.25, 0.0625)  # multiples of the scale tried along each round's direction


class NoLogitsError(StructPruneError):
    """The model's output has no ``logits``: there is no next-token distribution to coordinate on."""


@dataclass(frozen=True)
class KlCoordinationRequest:
    model: nn.Module
    partition: Partition
    groups: Mapping[str, Group]
    fit_inputs: Sequence[BlockInput]  # the first block's inputs of the fitting windows
    fit_batches: Sequence[Any]  # the same windows, as the model is called (the head reads them)
    held_inputs: Sequence[BlockInput]  # windows no step sees: the rounds are chosen on them
    held_batches: Sequence[Any]
    solution: BlockSolution
    store: ActivationStore = field(compare=False)
    rounds: int = 2
    step: float = DEFAULT_KL_STEP
    damping: float = ADMM_DAMPING
    exits: str = "residual"  # one of KL_EXITS
    resident: Callable[[nn.Module], nn.Module] = field(default=resident, compare=False)
    precision: Optional[torch.dtype] = None  # autocast dtype of the backward sweep's blocks (None: float32)
    statistics_dtype: torch.dtype = torch.float64  # of the exits' H and G (the direction is solved in float64)


@dataclass(frozen=True)
class KlCoordinationResult:
    solution: BlockSolution
    fit_kl: tuple[float, ...]  # mean KL to the dense model on the fitting windows, per round (0 first)
    held_kl: tuple[float, ...]  # the same on the held-out windows
    best_round: int
    coordinated_blocks: int  # blocks with at least one exit
    weight_changes: tuple[tuple[float, ...], ...] = ()  # per round, per block: ||W - W_prev|| / ||W_prev||
    scales: tuple[float, ...] = ()  # per round, the relative change of all exits taken (0: no trial helped)


class KlCoordinationPass(Pass[KlCoordinationRequest, KlCoordinationResult]):
    def requires(self, state: KlCoordinationRequest) -> None:
        if state.partition.list_path is None or len(state.partition.blocks) < 2:
            raise StructPruneError("KL coordination pass: needs a model solved as a chain of blocks")
        if not state.fit_inputs or not state.held_inputs:
            raise StructPruneError("KL coordination pass: needs fitting windows and held-out windows "
                                   f"(got {len(state.fit_inputs)} and {len(state.held_inputs)})")
        if state.exits not in KL_EXITS:
            raise StructPruneError(f"KL coordination pass: unknown exits {state.exits!r}; choose one of {KL_EXITS}")
        if state.step <= 0 or state.damping <= 0:
            raise StructPruneError(f"KL coordination pass: step and damping must be > 0 "
                                   f"(got {state.step}, {state.damping})")

    def call(self, state: KlCoordinationRequest) -> PassResult[KlCoordinationResult]:
        keep, weights = state.solution.keep, dict(state.solution.new_weights)
        as_tuple = self._as_tuple(state)
        fit = (state.fit_batches, self._finals(state, state.fit_inputs, keep, None))  # z: (batch, tokens, hidden)
        held = (state.held_batches, self._finals(state, state.held_inputs, keep, None))
        exits = self._exits(state, keep, weights)  # block index -> layer paths (``weights`` gains new exits)
        # round 0's fitting KL comes from round 1's forward (``_directions``), unless no round runs
        fit_kl = [] if exits and state.rounds else [self._kl(state, state.fit_inputs, fit, keep, weights, as_tuple)]
        held_kl = [self._kl(state, state.held_inputs, held, keep, weights, as_tuple)]
        changes: list[tuple[float, ...]] = []
        scales: list[float] = []
        best = (held_kl[0], 0, dict(state.solution.new_weights))
        scale = state.step
        finals, tag = None, 0  # the current weights' last-block outputs, their block inputs stored under ``tag``
        for k in tqdm(range(1, state.rounds + 1), desc="kl coordination", leave=False) if exits else ():
            if finals is None:  # (i)
                finals = self._finals(state, state.fit_inputs, keep, weights, store_tag=tag)
            directions, start = self._directions(state, keep, weights, exits, fit, finals, tag, as_tuple)
            if k == 1:
                fit_kl.append(start)
            norm = sum(float(d.pow(2).sum()) for d in directions.values()) ** 0.5
            size = sum(float(weights[n].double().pow(2).sum()) for n in directions) ** 0.5
            lead = None  # (iv) the best trial so far: (KL, multiple, weights, finals, tag); only its inputs stay stored
            for i, m in enumerate(TRIALS):
                moved = _moved(weights, directions, scale * m * size / max(norm, 1e-30))
                trial_tag = tag + 1 + i
                stored = self._finals(state, state.fit_inputs, keep, moved, store_tag=trial_tag)
                trial = (self._kl_of(state, fit, stored, as_tuple), m, moved, stored, trial_tag)
                if lead is not None and trial[0] >= lead[0]:  # ties keep the longer step, tried first
                    self._drop(state, trial_tag)
                    continue
                if lead is not None:
                    self._drop(state, lead[4])
                lead = trial
            kl, m, moved, stored, trial_tag = lead
            if kl >= fit_kl[-1]:
                self._drop(state, trial_tag)
                logger.info("kl coordination round %d: no step lowers the fitting KL (%.4g); stopped", k, fit_kl[-1])
                break
            changes.append(tuple(weight_change(weights, moved, b.path) for b in state.partition.blocks))
            scales.append(scale * m)
            weights, finals, tag = moved, stored, trial_tag
            fit_kl.append(kl)
            held_kl.append(self._kl(state, state.held_inputs, held, keep, weights, as_tuple))
            logger.info("kl coordination round %d: step %.3g, KL %.4g (held-out %.4g)", k, scale * m, kl, held_kl[-1])
            if held_kl[-1] < best[0]:
                best = (held_kl[-1], k, dict(weights))
            scale = 2 * scale * m
        self._drop(state, tag)  # the last round's taken trial
        solution = BlockSolution(keep, best[2], state.solution.block_errors)
        return PassResult(KlCoordinationResult(solution, tuple(fit_kl), tuple(held_kl), best[1], len(exits),
                                               tuple(changes), tuple(scales)), modified=best[1] > 0)

    @staticmethod
    def _as_tuple(state: KlCoordinationRequest) -> bool:
        block = state.partition.blocks[-1]
        module = state.resident(block_module(state.model, block))
        first = state.fit_inputs[0]
        with torch.no_grad():
            return isinstance(module(*first.args, **first.kwargs), (tuple, list))

    @staticmethod
    def _finals(state: KlCoordinationRequest, inputs: Sequence[BlockInput], keep, weights,
                store_tag: Optional[int] = None) -> list[torch.Tensor]:
        """The last block's output per window: dense (``weights`` None) or pruned; with ``store_tag``, each
        block's input stream kept in the store as ("x", tag, block, window)."""
        stream = [inp.stream for inp in inputs]
        for block in state.partition.blocks:
            module = state.resident(block_module(state.model, block))
            overrides = None if weights is None else block_overrides(state.model, block, state.groups, keep, weights)
            with torch.no_grad():
                for j, inp in enumerate(inputs):
                    if store_tag is not None:
                        state.store.put(("x", store_tag, block.index, j), stream[j])
                    stream[j] = run_block(module, inp.with_stream(stream[j]), overrides)
        return stream

    @staticmethod
    def _drop(state: KlCoordinationRequest, tag: int) -> None:
        """Frees the block inputs a forward stored under ``tag``."""
        for block in state.partition.blocks:
            for j in range(len(state.fit_inputs)):
                state.store.drop(("x", tag, block.index, j))

    @staticmethod
    def _logits(state: KlCoordinationRequest, batch: Any, final: torch.Tensor, as_tuple: bool) -> torch.Tensor:
        with head_only(state.model, state.partition.list_path, final, as_tuple):
            logits = getattr(run_batch(state.model, batch), "logits", None)
        if logits is None:
            raise NoLogitsError("KL coordination pass: the model's output has no logits; use coordination='admm' "
                                "or 'propagate', or rounds=0")
        return logits.float()  # (batch, tokens, vocab)

    def _kl(self, state: KlCoordinationRequest, inputs: Sequence[BlockInput],
            windows: tuple[Sequence[Any], Sequence[torch.Tensor]], keep, weights, as_tuple: bool) -> float:
        """Mean KL to the dense model over ``inputs``; ``windows``: their batches and dense last-block outputs."""
        return self._kl_of(state, windows, self._finals(state, inputs, keep, weights), as_tuple)

    def _kl_of(self, state: KlCoordinationRequest, windows: tuple[Sequence[Any], Sequence[torch.Tensor]],
                finals: Sequence[torch.Tensor], as_tuple: bool) -> float:
        """Mean KL to the dense model of the last-block outputs ``finals``."""
        batches, dense = windows
        with torch.no_grad():
            return sum(float(_kl(self._logits(state, b, d, as_tuple), self._logits(state, b, p, as_tuple)))
                       for b, d, p in zip(batches, dense, finals)) / len(finals)

    @staticmethod
    def _exits(state: KlCoordinationRequest, keep, weights: dict) -> dict[int, tuple[str, ...]]:
        """Block index -> the paths (in the block) of the linear layers the rounds move. ``weights`` gains the
        effective weight (removed slices zeroed) of every exit the block solve did not re-fit."""
        if state.exits == "residual":
            found = exits_of(state.model, state.partition, state.groups, state.fit_inputs[0], keep, weights,
                             state.resident)
            return {b: (path,) for b, path in found.items()}
        exits = {}
        for block in state.partition.blocks:
            module = state.resident(block_module(state.model, block))
            prefix = block.path + "." if block.path else ""
            overrides = block_overrides(state.model, block, state.groups, keep, weights)
            params = dict(module.named_parameters())
            paths = tuple(n for n, m in module.named_modules()
                          if n and is_linear(m) and params.get(f"{n}.weight") is m.weight)
            for path in paths:
                local = f"{path}.weight"
                if prefix + local not in weights:
                    weights[prefix + local] = overrides.get(local, params[local]).detach().to("cpu", copy=True)
            if paths:
                exits[block.index] = paths
        return exits

    def _directions(self, state: KlCoordinationRequest, keep, weights, exits: Mapping[int, tuple[str, ...]],
                    windows: tuple[Sequence[Any], Sequence[torch.Tensor]], finals: Sequence[torch.Tensor], tag: int,
                    as_tuple: bool) -> tuple[dict[str, torch.Tensor], float]:
        """(ii)-(iii): every exit's preconditioned descent direction D (in the weight's own layout), zero on
        removed rows and columns, and the fitting KL at the current weights, whose last-block outputs are
        ``finals`` (their block inputs stored under ``tag``, which this sweep frees)."""
        batches, dense = windows
        n = len(state.fit_inputs)
        grads, total = [], 0.0
        for j, (batch, z, p) in enumerate(zip(batches, dense, finals)):  # (ii) dL/dp per window
            with torch.no_grad():
                target = F.log_softmax(self._logits(state, batch, z, as_tuple), dim=-1)
            h = p.detach().float().clone().requires_grad_(True)
            with torch.enable_grad():
                with head_only(state.model, state.partition.list_path, h, as_tuple):
                    logits = run_batch(state.model, batch).logits.float()
                kl = _kl(target, logits, log_target=True)
                (g,) = torch.autograd.grad(kl / n, h)
            total += float(kl.detach())
            grads.append(g.to(p.dtype))
        directions = {}
        for block in tqdm(state.partition.blocks[::-1], desc="kl coordination: backward", leave=False):
            module = state.resident(block_module(state.model, block))
            overrides = block_overrides(state.model, block, state.groups, keep, weights)
            prefix = block.path + "." if block.path else ""
            paths = exits.get(block.index, ())
            stats = {path: _ExitStats(module.get_submodule(path), weights[f"{prefix}{path}.weight"],
                                      state.statistics_dtype) for path in paths}
            handles = [s.layer.register_forward_pre_hook(s.capture) for s in stats.values()]
            # the exits' weights as leaves of every window's graph: autograd gives each window's dL/dW
            leaves = {f"{path}.weight": overrides[f"{path}.weight"].detach().requires_grad_(True) for path in paths}
            try:
                for j, inp in enumerate(state.fit_inputs):
                    x = state.store.get(("x", tag, block.index, j))
                    state.store.drop(("x", tag, block.index, j))
                    x = x.to(inp.stream.device).detach().requires_grad_(block.index > 0)
                    with torch.enable_grad(), torch.autocast(x.device.type, dtype=state.precision or torch.bfloat16,
                                                             enabled=state.precision is not None):
                        out = run_block(module, inp.with_stream(x), {**overrides, **leaves})
                        wrt = ([x] if block.index > 0 else []) + list(leaves.values())
                        got = torch.autograd.grad(out, wrt, grads[j].to(out.device, out.dtype)) if wrt else ()
                    for s, g in zip(stats.values(), got[1:] if block.index > 0 else got):
                        s.add(g)
                    if block.index > 0:
                        grads[j] = got[0].detach().float()
            finally:
                for handle in handles:
                    handle.remove()
            for path, s in stats.items():
                directions[f"{prefix}{path}.weight"] = s.direction(state.damping)
        return directions, total / n


class _ExitStats:
    """One exit's H = sum_t a_t a_t^T over its kept inputs and G = dL/dW, accumulated window by window."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
        self.layer, self.weight, self.dtype = layer, weight, dtype
        w = as_out_in(layer, weight)  # (out, in)
        self.rows = (w != 0).any(1).nonzero().flatten()  # removed rows and columns are exactly zero
        self.cols = (w != 0).any(0).nonzero().flatten()
        self.h: torch.Tensor | None = None  # (kept in, kept in)
        self.g: torch.Tensor | None = None  # (out, in)
        self._inputs: list[torch.Tensor] = []

    def capture(self, module: nn.Module, args: tuple) -> None:
        self._inputs.append(args[0].detach())

    def add(self, grad: torch.Tensor) -> None:
        a = self._inputs.pop()
        a = a.reshape(-1, a.shape[-1])[:, self.cols.to(a.device)].to(self.dtype)  # (tokens, kept in)
        g = as_out_in(self.layer, grad).to(self.dtype)  # (out, in)
        self.h = gram(a) if self.h is None else self.h + gram(a)  # (kept in, kept in)
        self.g = g if self.g is None else self.g + g

    def direction(self, damping: float) -> torch.Tensor:
        """D = -G_K (H_K + d mean(diag H_K) I)^-1 in the weight's layout (zero on removed rows and columns),
        solved in float64."""
        w = as_out_in(self.layer, self.weight)
        rows, cols = self.rows.to(self.g.device), self.cols.to(self.g.device)
        g = self.g[rows][:, cols].double()  # (kept out, kept in)
        step = torch.cholesky_solve(g.T, torch.linalg.cholesky(damped(self.h.double(), damping)))  # (kept in, kept out)
        d = torch.zeros(w.shape, dtype=torch.float64, device=step.device)  # (out, in)
        d[rows.unsqueeze(1), cols] = -step.T
        return from_out_in(self.layer, d, self.weight.double())  # the weight's own layout


def _kl(target: torch.Tensor, logits: torch.Tensor, log_target: bool = False) -> torch.Tensor:
    """Mean over tokens of KL(target || softmax(logits)); ``target`` as logits or (``log_target``) log-probs."""
    log_p = target if log_target else F.log_softmax(target, dim=-1)
    log_q = F.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # (batch, tokens) -> ()


def _moved(weights: Mapping[str, torch.Tensor], directions: Mapping[str, torch.Tensor], a: float) -> dict:
    """``weights`` with every exit moved by ``a`` times its direction (in the weight's own layout and dtype)."""
    out = dict(weights)
    for name, d in directions.items():
        w = weights[name]
        moved = w.double() + a * d.to(w.device)
        if not torch.isfinite(moved).all():
            raise InvariantError(f"KL coordination pass: non-finite weights in {name}; lower the step")
        out[name] = moved.to(w.dtype)
    return out
