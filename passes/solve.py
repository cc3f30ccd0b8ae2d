"""Block solve pass: prune each block on its own, in order, with the units the allocator gave it.

For block b, on the *pruned* trajectory (the outputs of the already pruned blocks 0..b-1): collect H of
the block's consumer layers from the dense block; pick each group's units by greedy structured OBS
(``passes/obs.py``), after those another score removes first (``unit_scores``, e.g. Taylor) and with each
output channel's error weighted (``output_weights``, e.g. the loss's output Fisher); re-fit the consumers' kept columns by least squares on the same inputs
(``reconstruct``; otherwise they keep their values); run the pruned block to get the next block's input.
Only one block is being solved at a time. The model is never modified: the result is a keep-set plus
the consumers' new weights, applied by the rewrite pass (``new_weights``) and, while solving, through
``torch.func.functional_call``. Zero ADMM rounds after this pass is sequential local pruning.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.blockwise import ActivationStore, BlockInput, run_block
from structprune_graph.distributed import LOCAL, Collective
from structprune_graph.graph import Group
from structprune_graph.streaming import resident
from structprune_graph.verify import InvariantError

from ._infra import Pass, PassResult
from . import experts as fused
from .blockwise_calibrate import (ModelTargetCollector, StatsCollector, block_module, build_consumers, consumer_width,
                                  consumers_of)
from .obs import (DEFAULT_DAMPING, Consumer, as_out_in, damped, from_out_in, greedy_obs, least_squares, redamped,
                  ridge_shift, ridged)
from .partition import Block, Partition


ERROR_BATCHES = 8  # batches the per-block error is measured on
# The re-fit's own ridge, relative to mean(diag H): V = (H + r I)_KK^-1 ((H + r I)_K,: W^T) shrinks the kept
# weights toward their dense values (r -> inf: no re-fit). Chosen on development windows of the calibration
# source and of another domain (examples/generalization_probes.py --probe refit-bias; docs/structprune_solver.md
# section 4): 0.3 scored best at 20/30/50% calibrated on Austen and on Austen + self (0.01 until 2026-12-03)
DEFAULT_REFIT_RIDGE = 0.3
REFIT_BIASES = ("none", "refit", "centred")
# what the re-fit's ridge is relative to: "mean", r mean(diag H) I (the same ridge on every input:
# relative to its own second moment, strongest on the smallest inputs); "diagonal",
# r diag(H) (each input by its own second moment: the calibration text's correlations between inputs shrunk
# toward none, the same at any scale of the input)
REFIT_RIDGE_SCALES = ("mean", "diagonal")
# what each consumer's re-fit matches on the pruned trajectory's inputs: "block", the dense layer's output on
# those same inputs (each block repairs its own cut); "model", the dense model's own output of the layer (on
# the dense trajectory), so that each block also undoes the drift of the blocks before it
REFIT_TARGETS = ("block", "model")


def _scored_first(scores: Sequence[float], n: int, fraction: float) -> list[int]:
    """The units of a group that leave first in ``scores``' order when ``n`` leave: the lowest
    min(n, floor(fraction x size)) scores, ties by index (``BlockSolveRequest.scored_fraction``)."""
    ranked = sorted(range(len(scores)), key=lambda u: (scores[u], u))
    return ranked[:min(n, math.floor(fraction * len(scores)))]


@dataclass(frozen=True)
class BlockSolveRequest:
    model: nn.Module
    partition: Partition
    groups: Mapping[str, Group]
    inputs: Sequence[BlockInput]  # the first block's inputs, one per calibration batch
    counts: Mapping[str, int]  # group id -> units to remove
    damping: float = DEFAULT_DAMPING
    reconstruct: bool = True
    keep_boundaries: tuple[int, ...] = ()  # batches whose block outputs are stored (ADMM)
    store: Optional[ActivationStore] = field(default=None, compare=False)
    resident: Callable[[nn.Module], nn.Module] = field(default=resident, compare=False)  # streamed weights
    weights_out: Optional[MutableMapping[str, torch.Tensor]] = field(default=None, compare=False)  # e.g. on disk
    fixed_keep: Optional[Mapping[str, tuple[int, ...]]] = None  # another method's keep-set: re-fit only
    refit_ridge: float = DEFAULT_REFIT_RIDGE  # ridge of the re-fit, toward the dense weights (not the OBS damping)
    statistics_dtype: torch.dtype = torch.float64  # of H, the OBS work and the re-fit (passes/obs.py)
    # a free bias in every linear consumer's fit, each consumer's output mean kept by a bias update
    # (SolverConfig.refit_bias, REFIT_BIASES): "refit", the re-fit's H centred; "centred", the OBS order's too
    refit_bias: str = "none"
    collective: Collective = field(default=LOCAL, compare=False)  # ranks sharing the batches (distributed.py)
    # group id -> one score per unit: up to scored_fraction of a group's units are removed lowest score first
    # (another order, e.g. first-order Taylor: SolverConfig.taylor_first), the rest by greedy OBS; same re-fit
    unit_scores: Optional[Mapping[str, tuple[float, ...]]] = None
    scored_fraction: float = 1.0  # at most this fraction of a group's units leave in unit_scores' order; then OBS
    # full layer path -> (out,) weight of each output channel in the OBS selection's error (e.g. the loss's
    # mean squared gradient there: SolverConfig.obs_weighting="fisher"); the re-fit is unweighted (rows fit alone)
    output_weights: Optional[Mapping[str, torch.Tensor]] = None
    refit_target: str = "block"  # REFIT_TARGETS (SolverConfig.refit_target)
    refit_ridge_scale: str = "mean"  # REFIT_RIDGE_SCALES (SolverConfig.refit_ridge_scale)
    # the first block's inputs of broad text (e.g. the model's own samples) that the re-fit fits beside the
    # calibration batches, with weight ``prior_weight`` per token against their 1 - prior_weight; the
    # selection sees them only with ``prior_in_selection`` (SolverConfig.refit_prior_weight, prune(refit_prior=...))
    prior_inputs: Sequence[BlockInput] = ()
    prior_weight: float = 0.5
    # the OBS selection's H blended with the prior's as the re-fit's is (SolverConfig.prior_scope != "refit"):
    # both then see one second moment; unit_scores and output_weights are used as given (the solver blends the
    # prior's into them first with prior_scope="scores")
    prior_in_selection: bool = False
    # autocast dtype of the block's forwards (the dense runs that H is summed over and the pruned runs that give
    # the next block's input; calibration and prior), e.g. bf16 (SolverConfig.solve_precision); None: the
    # model's own. H is summed in ``statistics_dtype`` from the layers' inputs (obs.gram runs outside autocast)
    # and the residual stream between blocks keeps its dtype
    precision: Optional[torch.dtype] = None
    # each token's row of a layer's input at most this x the batch's median row energy in every H (calibration
    # and prior; obs.token_capped, SolverConfig.token_cap); None: raw rows
    token_cap: Optional[float] = None


@dataclass(frozen=True)
class BlockSolution:
    keep: Mapping[str, tuple[int, ...]]  # group id -> kept units
    new_weights: Mapping[str, torch.Tensor]  # parameter name -> re-fitted value (full shape, removed columns 0)
    block_errors: tuple[float, ...]  # per block: ||pruned - dense||^2 / ||dense||^2 on the first inputs
    # layer path -> added to its bias (created where the layer has none): (W - W') mu, the output mean the
    # re-fit moved (``refit_bias``)
    new_biases: Mapping[str, torch.Tensor] = field(default_factory=dict)


def block_overrides(model: nn.Module, block: Block, groups: Mapping[str, Group], keep: Mapping[str, tuple[int, ...]],
                    new_weights: Mapping[str, torch.Tensor], new_biases: Mapping[str, torch.Tensor] = MappingProxyType({})
                    ) -> dict[str, torch.Tensor]:
    """Block-local parameter values of the pruned block: re-fitted weights, removed slices zeroed
    (the mask semantics: a removed unit contributes nothing), biases moved by ``new_biases``."""
    module = block_module(model, block)
    prefix = block.path + "." if block.path else ""
    params = dict(module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for path, delta in new_biases.items():
        if path.startswith(prefix):
            layer = module.get_submodule(path[len(prefix):])
            base = (layer.bias.detach() if getattr(layer, "bias", None) is not None
                    else torch.zeros(delta.shape, dtype=layer.weight.dtype, device=layer.weight.device))
            out[f"{path[len(prefix):]}.bias"] = base + delta.to(base.device, base.dtype)
    for gid in block.group_ids:
        g = groups[gid]
        dropped = sorted(set(range(g.size)) - set(keep.get(gid, range(g.size))))
        for m in g.members:
            local = m.name[len(prefix):]
            if not m.is_param or local not in params:
                continue
            value = out.get(local)
            if value is None:  # re-fitted values may come back from a CPU or disk store: on the block's device
                value = (new_weights[m.name].to(params[local].device, copy=True) if m.name in new_weights
                         else params[local].detach().clone())
            if dropped:
                value.index_fill_(m.dim, torch.tensor([i for u in dropped for i in m.indices[u]], device=value.device),
                                  0.0)
            out[local] = value
    for name in new_weights:  # keys only: a disk-backed store reads just this block's tensors
        local = name[len(prefix):]
        if name.startswith(prefix) and local in params and local not in out:
            out[local] = new_weights[name].to(params[local].device)
    return out


def relative_error(pruned: Sequence[torch.Tensor], dense: Sequence[torch.Tensor],
                   collective: Collective = LOCAL) -> float:
    num = sum(float(((p.double() - d.double()) ** 2).sum()) for p, d in zip(pruned, dense))
    den = sum(float((d.double() ** 2).sum()) for d in dense)
    num, den = collective.sum_floats([num, den], "block error")
    return num / max(den, 1e-30)


def consumer_clusters(block: Block, module: nn.Module, groups: Mapping[str, Group]) -> list[list[str]]:
    """The block's groups in clusters that share no consumer layer (each solved on its own, in block order
    inside a cluster: a later group's OBS sees the earlier groups' re-fitted weights)."""
    clusters: list[tuple[set[str], list[str]]] = []
    for gid in block.group_ids:
        paths = {p for p, _ in consumers_of(block, module, groups[gid])}
        joined = [c for c in clusters if c[0] & paths]
        merged = (paths.union(*(c[0] for c in joined)), [g for c in joined for g in c[1]] + [gid])
        clusters = [c for c in clusters if not any(c is j for j in joined)] + [merged]
    order = {gid: i for i, gid in enumerate(block.group_ids)}
    return sorted((sorted(c[1], key=order.get) for c in clusters), key=lambda c: order[c[0]])


def _model_rhs(stats: StatsCollector, path: str, w: torch.Tensor, h: torch.Tensor, kept_cols: torch.Tensor,
               ridge: float, scale: str = "mean") -> Optional[torch.Tensor]:
    """refit_target="model": the re-fit's right-hand side X_K^T X~ W_dense^T + R W_K^T (the dense model's
    output of the layer as the target, the ridge R still toward the current weights W), (kept, out); None (the
    block's target) where no ModelTargetCollector ran. ``h`` is H + R (redamped), R recovered by ridge_shift."""
    target = stats.targets.get(path)
    if target is None:
        return None
    shift = ridge_shift(h, ridge, scale)
    shift = shift.index_select(0, kept_cols)[:, None] if shift.dim() else shift  # (kept, 1) or ()
    return target.index_select(0, kept_cols).to(h.dtype) + shift * w[:, kept_cols].T.to(h.dtype)  # (kept, out)


def _row_weighted(consumers: Sequence[Consumer], output_weights: Optional[Mapping[str, torch.Tensor]],
                  prefix: str) -> Sequence[Consumer]:
    """Copies of the consumers whose weight rows are scaled by sqrt(d / mean d), so that the OBS error
    tr(D W_C [H^-1]_CC^-1 W_C^T) weights output channel i by d_i; the consumers themselves untouched."""
    if not output_weights:
        return consumers
    weighted = []
    for c in consumers:
        d = output_weights.get(prefix + c.path)
        if d is None or d.numel() != c.weight.shape[0] or not float(d.mean()) > 0:
            weighted.append(c)
            continue
        scale = (d / d.mean()).sqrt().to(c.weight.dtype)  # (out,)
        weighted.append(replace(c, weight=c.weight * scale[:, None], columns=list(c.columns)))
    return weighted


def _run(module: nn.Module, inp: BlockInput, precision: Optional[torch.dtype],
         overrides: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """``run_block`` under ``torch.autocast`` in ``precision`` (None: as the model is), its output in the
    input stream's dtype: the branches compute in bf16, the residual stream between blocks stays float32."""
    first = _first_tensor(inp)
    if precision is None or first is None:
        return run_block(module, inp, overrides)
    with torch.autocast(first.device.type, dtype=precision):
        out = run_block(module, inp, overrides)
    return out.to(first.dtype) if first.is_floating_point() and out.is_floating_point() else out


def _prior_statistics(module: nn.Module, paths: Sequence[str], priors: Sequence[BlockInput], stats: StatsCollector,
                      dtype: torch.dtype, ratio: float, precision: Optional[torch.dtype] = None
                      ) -> dict[str, tuple[torch.Tensor, float]]:
    """Consumer path -> (H of the prior batches on the pruned trajectory, ``ratio``: their tokens relative to
    the calibration's), from a run of the dense block that the calibration's collector does not count."""
    with stats.paused():
        collector = StatsCollector(module, paths, dtype, token_cap=stats.token_cap)
        try:
            with torch.no_grad():
                for inp in priors:
                    _run(module, inp, precision)
        finally:
            collector.close()
    return {path: (h, ratio) for path, h in collector.hessians.items()}


def _first_tensor(inp: BlockInput) -> Optional[torch.Tensor]:
    """The residual stream (a model solved as one block: its first tensor argument, e.g. input_ids)."""
    return next((a for a in inp.args if isinstance(a, torch.Tensor)),
                next((v for v in inp.kwargs.values() if isinstance(v, torch.Tensor)), None))


def _tokens(inp: BlockInput) -> int:
    """Positions of one block input: batch x tokens of the residual stream (a model solved as one block:
    the batch's leading dimension)."""
    first = _first_tensor(inp)
    if first is None:
        return 1
    return int(first.shape[:-1].numel()) if first.dim() >= 2 else int(first.shape[0])


def _blended(h: torch.Tensor, prior: tuple[torch.Tensor, float], weight: float) -> torch.Tensor:
    """(1 - w) H + w (n / n_prior) H_prior, in place on ``h`` (undamped, the calibration's sum over its n
    tokens): per token, the prior text weighs w against the calibration's 1 - w, whatever their sizes."""
    h_prior, ratio = prior
    return h.mul_(1.0 - weight).add_(h_prior.to(h.dtype), alpha=weight / ratio)


def _next_input(inp: BlockInput, out: torch.Tensor, block: Block) -> BlockInput:
    """The next block's input: this block's output stream (a model solved as one block has no next)."""
    return inp.with_stream(out) if block.path else inp


class BlockSolvePass(Pass[BlockSolveRequest, BlockSolution]):
    def call(self, state: BlockSolveRequest) -> PassResult[BlockSolution]:
        keep: dict[str, tuple[int, ...]] = {}
        new_weights = state.weights_out if state.weights_out is not None else {}
        new_biases: dict[str, torch.Tensor] = {}
        errors = []
        inputs = list(state.inputs)
        # refit_target="model": the dense model's own trajectory, run beside the pruned one (one stream per batch)
        trajectory = list(state.inputs) if state.refit_target == "model" and state.reconstruct else None
        measured = {i for i in state.collective.local_positions(range(ERROR_BATCHES)) if i < len(inputs)}  # global 0..7
        priors = list(state.prior_inputs) if state.reconstruct else []
        # the prior's tokens relative to the calibration's (the same at every block)
        ratio = sum(_tokens(inp) for inp in priors) / max(sum(_tokens(inp) for inp in inputs), 1)
        last = state.partition.blocks[-1] if state.partition.blocks else None
        for block in tqdm(state.partition.blocks, desc="solve blocks", leave=False):
            module = state.resident(block_module(state.model, block))
            paths = [p for gid in block.group_ids for p, _ in consumers_of(block, module, state.groups[gid])]
            stats = StatsCollector(module, paths, state.statistics_dtype, state.refit_bias != "none", state.token_cap)
            targets = ModelTargetCollector(module, paths, state.statistics_dtype) if trajectory is not None else None
            dense = []  # kept for the first batches only: the block error
            try:
                prior = (_prior_statistics(module, paths, priors, stats, state.statistics_dtype, ratio, state.precision)
                         if priors else None)
                with torch.no_grad():
                    for i, inp in enumerate(inputs):
                        if targets is not None:  # X~ W^T of this batch, then the run below adds X^T X~ W^T
                            with stats.paused(), targets.dense():
                                trajectory[i] = _next_input(trajectory[i], _run(module, trajectory[i], state.precision),
                                                            block)
                        out = _run(module, inp, state.precision)
                        if i in measured:
                            dense.append(out)
            finally:
                stats.close()
                if targets is not None:
                    targets.close()
            stats.reduce(state.collective, f"solve block {block.index}")
            stats.centre(hessians=state.refit_bias == "centred")
            if targets is not None:
                targets.reduce(state.collective, f"solve block {block.index}")
                stats.targets = targets.targets
            if prior is not None and state.prior_in_selection:  # blended once: the OBS and the re-fit read it
                for path, p in prior.items():
                    _blended(stats.hessians[path], p, state.prior_weight)
            elif prior is not None:
                stats.prior = prior
            self._solve_block(state, block, module, stats, keep, new_weights, new_biases)
            overrides = block_overrides(state.model, block, state.groups, keep, new_weights, new_biases)
            with torch.no_grad():
                pruned = [_run(module, inp, state.precision, overrides) for inp in inputs]
                if block is not last:  # the next block's prior inputs
                    priors = [_next_input(inp, _run(module, inp, state.precision, overrides), block) for inp in priors]
            errors.append(relative_error([pruned[i] for i in sorted(measured)], dense, state.collective))
            del dense
            if state.store is not None and state.keep_boundaries:
                state.store.put(("pruned", block.index), torch.stack([pruned[i] for i in state.keep_boundaries]))
            inputs = [_next_input(inp, out, block) for inp, out in zip(inputs, pruned)]
        return PassResult(BlockSolution(keep, new_weights, tuple(errors), new_biases), modified=False)

    @staticmethod
    def _solve_block(state: BlockSolveRequest, block: Block, module: nn.Module, stats: StatsCollector,
                     keep: dict, new_weights: dict, new_biases: dict) -> None:
        clusters = consumer_clusters(block, module, state.groups)
        costs = [float(sum(consumer_width(module, p) ** 3 for gid in c
                           for p, _ in consumers_of(block, module, state.groups[gid]))) for c in clusters]
        solved = state.collective.map_owned(
            [lambda c=c: BlockSolvePass._solve_cluster(state, block, module, stats, c) for c in clusters], costs,
            f"solve block {block.index}")
        for kept, weights, biases in solved:
            keep.update(kept)
            new_biases.update(biases)
            for name, w in weights.items():
                new_weights[name] = w

    @staticmethod
    def _solve_cluster(state: BlockSolveRequest, block: Block, module: nn.Module, stats: StatsCollector,
                       gids: Sequence[str]
                       ) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Keep-sets, re-fitted weights (parameter name -> tensor) and bias updates (layer path -> tensor) of
        groups sharing consumer layers."""
        prefix = block.path + "." if block.path else ""
        keep: dict[str, tuple[int, ...]] = {}
        dropped_cols: dict[str, set[int]] = {}
        current: dict[str, torch.Tensor] = {}  # consumer path -> (out, in) in the statistics dtype, group by group
        paths_of = {gid: [p for p, _ in consumers_of(block, module, state.groups[gid])] for gid in gids}
        last = {p: gid for gid in gids for p in paths_of[gid]}
        # consumer -> its H, damped in place by the last group that reads it (the 7B MLP's H is 0.45 GB in
        # float32): the OBS and then the re-fit use it, and no damped copy is held beside it
        owned: dict[str, torch.Tensor] = {}
        for gid in gids:
            group = state.groups[gid]
            fixed = state.fixed_keep.get(gid) if state.fixed_keep is not None else None
            n = group.size - len(fixed) if fixed is not None else state.counts.get(gid, 0)
            consume = {p for p in paths_of[gid] if last[p] == gid}
            consumers = build_consumers(block, module, group, stats, state.damping, weights=current, consume=consume)
            if not consumers or n == 0:
                keep[gid] = tuple(fixed) if fixed is not None else tuple(range(group.size))
                continue
            originals = {c.path: c.weight.clone() for c in consumers}
            if fixed is not None:
                removed = set(range(group.size)) - set(fixed)
            elif state.unit_scores is not None and gid in state.unit_scores:
                first = _scored_first(state.unit_scores[gid], n, state.scored_fraction)
                if len(first) == n:
                    removed = set(first)
                else:  # the rest by greedy OBS, after the scored ones have left
                    order, _ = greedy_obs(_row_weighted(consumers, state.output_weights, prefix), group.size, n,
                                          first=first)
                    removed = set(order[:n])
            else:
                order, _ = greedy_obs(_row_weighted(consumers, state.output_weights, prefix), group.size, n)
                removed = set(order[:n])
            keep[gid] = tuple(u for u in range(group.size) if u not in removed)
            second_order = {c.path: c.hessian is not None for c in consumers}
            for c in consumers:  # a damped copy is done with (not held beside the re-fit's); an owned H is re-used
                if c.hessian is not None and c.path.partition(fused.SEP)[0] in consume:
                    owned[c.path] = c.hessian
                c.hessian = None
            for c in consumers:
                gone = dropped_cols.setdefault(c.path, set())
                gone.update(int(i) for u in removed for i in c.columns[u])
                w = originals[c.path]
                h = owned.pop(c.path, None)
                if state.reconstruct and second_order[c.path]:
                    kept_cols = torch.tensor([i for i in range(w.shape[1]) if i not in gone], dtype=torch.long)
                    scale = state.refit_ridge_scale
                    if c.path in stats.prior:  # broad text beside the calibration's: blended, then the ridge
                        h = _blended(redamped(h, state.damping, 0.0) if h is not None else
                                     stats.hessians[c.path].clone(), stats.prior[c.path], state.prior_weight)
                        h = redamped(damped(h, 0.0, inplace=True), 0.0, state.refit_ridge, scale)
                    else:
                        h = redamped(h, state.damping, state.refit_ridge, scale) if h is not None else \
                            ridged(stats.hessians[c.path], state.refit_ridge, scale)
                    mu = stats.means.get(c.path)
                    if state.refit_bias == "refit" and mu is not None:  # the fit with a free bias: H - n mu mu^T
                        h.addr_(mu.to(h.dtype), mu.to(h.dtype), alpha=-float(stats.tokens[c.path]))
                    w = least_squares(w, h, kept_cols, rhs=_model_rhs(stats, c.path, w, h, kept_cols,
                                                                      state.refit_ridge, scale))
                else:
                    w = w.clone()
                    w[:, sorted(gone)] = 0.0
                h = None  # an owned H is released after its last consumer's re-fit
                if not torch.isfinite(w).all():
                    raise InvariantError(f"block solve pass: non-finite weights in {prefix}{c.path} after the "
                                         f"solve of group {gid}; raise damping (now {state.damping})")
                current[c.path] = w
        weights, biases = {}, {}
        fused_params = {}
        for path, w in current.items():
            if path in stats.means:  # the output mean the fit moved: (W - W') mu, (out,)
                dense_w = as_out_in(module.get_submodule(path), module.get_submodule(path).weight, w.dtype)
                mu = stats.means[path].to(w.dtype)
                biases[f"{prefix}{path}"] = ((dense_w - w) @ mu).to(module.get_submodule(path).weight.dtype)
            base = path.partition(fused.SEP)[0]
            if fused.is_fused_path(module, base):
                fused_params[base] = module.get_parameter(base)
                continue
            layer = module.get_submodule(path)
            weights[f"{prefix}{path}.weight"] = from_out_in(layer, w, layer.weight)
        for base, w in fused.assemble(current, fused_params).items():  # (experts, out, in)
            weights[f"{prefix}{base}"] = w
        return keep, weights, biases
