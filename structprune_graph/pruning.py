"""``prune``: choose keep-sets from calibration data with a method, apply them, and report.

The pipeline reads like the product: trace -> calibrate -> score -> allocate -> rewrite. Methods are
rows of one table (``METHODS``); each names its score, its allocation and what calibration it needs.
Sparsity is the fraction of the *prunable* parameters removed: the parameters of the selected groups
(attention heads and MLP channels of a transformer, conv channels of a CNN); embeddings, norms and the
LM head are not prunable by default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from structprune_graph.passes import ApplyPass, RewriteRequest
from structprune_graph.passes.allocate import AllocatePass, AllocationRequest, prunable_params, removal_order
from structprune_graph.passes.calibrate import Calibration, CalibratePass, CalibrationRequest, LossFn
from structprune_graph.passes.round_widths import RoundRequest, RoundWidthsPass, WidthRule
from structprune_graph.passes.score import ScorePass, ScoreRequest

from .distributed import LOCAL, Collective
from .errors import StructPruneError
from .evaluate import count_params, track_peak_memory
from .graph import OPT_IN_KINDS, DependencyGraph, Group, trace
from .plan import Plan
from .solver import SolverConfig, SolverResult, SolverState, check_prior, prepare, solve, solve_dtype
from .solver import reconstruct as refit
from .verify import nonfinite_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    score: str  # see passes/score.py
    allocation: str  # "uniform" (local) or "global"
    per_param: bool = True  # global ranking by score per parameter
    input_stats: bool = False
    gradients: bool = False
    bias_compensation: bool = False
    summary: str = ""


METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method("magnitude", "magnitude", "uniform", summary="L2 norm of each unit's weights, same fraction per group"),
    Method("wanda-sp", "wanda-sp", "uniform", input_stats=True,
           summary="|W| x ||X|| of the consuming layer's input channels, same fraction per group"),
    Method("flap", "flap", "global", per_param=False, input_stats=True, bias_compensation=True,
           summary="input-fluctuation metric, standardised per group, ranked globally, bias compensation"),
    Method("taylor-global", "taylor", "global", gradients=True,
           summary="first-order Taylor |w * dL/dw| from a full backward pass, ranked globally per parameter"),
    Method("structprune", "obs", "softmax",
           summary="block-wise structured OBS masks + least squares, softmax allocation of one global budget, "
                   "ADMM across blocks (one block in memory at a time)"),
)})
DEFAULT_METHOD = "structprune"


@dataclass(frozen=True)
class PruneReport:
    method: str
    sparsity_target: float
    sparsity_achieved: float  # removed / prunable parameters
    prunable_params: int
    params_before: int
    params_after: int
    seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: Optional[int]
    calibration_batches: int
    kept_fraction: Mapping[str, float]  # group id -> fraction of units kept
    group_kinds: Mapping[str, str]
    metrics: Mapping[str, Any] = field(default_factory=dict)  # evaluation added by the caller (ppl, FLOPs, ...)
    solver: Mapping[str, Any] = field(default_factory=dict)  # structprune: tau, ADMM errors, excluded groups

    def with_metrics(self, **metrics: Any) -> "PruneReport":
        return PruneReport(**{**asdict(self), "metrics": {**self.metrics, **metrics}})

    def to_dict(self) -> dict:
        return asdict(self)


def select_groups(graph: DependencyGraph, kinds: Optional[Sequence[str]] = None) -> tuple[Group, ...]:
    """The groups a method prunes: by default every prunable group except the opt-in kinds (the hidden dim,
    whole experts); for grouped-query attention the query-head slots (KV heads stay) rather than whole KV
    groups."""
    chosen = [g for g in graph.prunable_groups if (g.kind in kinds if kinds else g.kind not in OPT_IN_KINDS)]
    slot_modules = {g.module for g in chosen if g.kind == "query_head"}
    if not kinds or "kv_group" not in kinds or "query_head" in kinds:
        chosen = [g for g in chosen if not (g.kind == "kv_group" and g.module in slot_modules)]
    if not chosen:
        raise StructPruneError(f"no prunable groups of kinds {list(kinds) if kinds else 'any but hidden'}; "
                               f"run `structprune inspect` to see the model's groups and why they are pinned")
    return tuple(chosen)


def _bias_compensation(model: nn.Module, groups: Sequence[Group], keep: Mapping[str, Sequence[int]],
                       inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """FLAP: a removed input channel j of a layer contributes W[:, j] * mean(x_j) on average; add it to
    the layer's bias so the output keeps its mean."""
    from .module_attrs import input_dim

    updates: dict[str, torch.Tensor] = {}
    for g in groups:
        dropped = [u for u in range(g.size) if u not in set(keep[g.id])]
        for m in g.members:
            path, _, attr = m.name.rpartition(".")
            if attr != "weight" or path not in inputs or not dropped:
                continue
            layer = model.get_submodule(path)
            if not isinstance(layer, nn.Linear) and input_dim(layer) != 0:
                continue  # convolutions: the mean over a receptive field is not a bias (padding)
            channels = torch.tensor([i for u in dropped for i in m.indices[u]], dtype=torch.long)
            mean = inputs[path].mean[channels].to(layer.weight.dtype)  # (removed,)
            w = layer.weight.detach().index_select(m.dim, channels)
            delta = w @ mean if m.dim == 1 else mean @ w  # (out,)
            updates[path] = updates.get(path, 0) + delta
    return updates


@dataclass(frozen=True)
class PruneResult:
    model: nn.Module
    plan: Plan
    report: PruneReport
    graph: DependencyGraph = field(repr=False)
    example_inputs: Any = field(repr=False, default=None)
    calibration: Optional[Calibration] = field(repr=False, default=None)  # reusable for other sparsities
    solver_state: Optional[SolverState] = field(repr=False, default=None)  # structprune's dense sweep, reusable
    solution: Optional[SolverResult] = field(repr=False, default=None)  # structprune: weights before/after ADMM

    def save(self, directory: Union[str, Path], overwrite: bool = False, tokenizer: Any = None,
             stock: bool = True, source: Union[str, Path] = "") -> Path:
        """Write the folder; with ``stock`` and the same widths in every layer, a config that stock
        ``from_pretrained`` loads (checked by loading it so). ``source``: the model file pruned (recorded)."""
        from .storage import save_pruned

        return save_pruned(self, Path(directory), overwrite=overwrite, tokenizer=tokenizer, stock=stock,
                           source=str(source))


def make_report(method: str, sparsity: float, removed: int, groups: Sequence[Group], graph: DependencyGraph,
                keep: Mapping[str, Sequence[int]], params_before: int, params_after: int, peak: Any, batches: int,
                solver: Mapping[str, Any]) -> PruneReport:
    total = prunable_params(groups, graph.param_shapes)
    by_id = {g.id: g for g in groups}
    return PruneReport(
        method=method, sparsity_target=sparsity, sparsity_achieved=removed / total,
        prunable_params=total, params_before=params_before, params_after=params_after,
        seconds=peak.seconds, peak_rss_bytes=peak.rss_bytes, peak_cuda_bytes=peak.cuda_bytes,
        calibration_batches=batches,
        kept_fraction={gid: len(kept) / by_id[gid].size for gid, kept in keep.items()},
        group_kinds={g.id: g.kind for g in groups}, solver=dict(solver))


def solver_details(config: SolverConfig, solved: SolverResult, state: SolverState, sweep_stages: bool = True) -> dict:
    """The report's solver section; ``sweep_stages``: the dense sweep's stage seconds too (False where this call
    reused another's sweep)."""
    return {"config": config.label(), "block_energy": solved.block_energy, "statistics": config.statistics,
            "taylor_first": solved.taylor_first, "obs_weighting": solved.obs_weighting,
            # what the loss-gradient sweeps' blocks computed in (SolverConfig.sensitivity_precision resolved; None:
            # no sweep)
            "gradient_precision": state.gradient_precision,
            # what the block solve's forwards computed in (SolverConfig.solve_precision resolved)
            "solve_precision": str(solve_dtype(config, state.partition, state.inputs) or torch.float32
                                   ).removeprefix("torch."),
            "refit_target": config.refit_target, "refit_ridge": config.refit_ridge,
            "refit_ridge_scale": config.refit_ridge_scale, "token_cap": config.token_cap,
            # the allocator's cap per group: min(sparsity + prune_margin, max_prune) (None: max_prune alone)
            "prune_margin": config.prune_margin, "max_prune": config.max_prune,
            # wall seconds per stage of the solver (the dense sweep's only where this call ran it)
            "stages": {**(state.stage_seconds if sweep_stages else {}), **solved.stage_seconds},
            "tau": solved.tau, "tau_losses": dict(solved.tau_losses),
            "block_errors": list(solved.block_errors), "admm_output_errors": list(solved.admm_errors),
            "admm_best_round": solved.admm_best_round, "excluded": dict(solved.excluded),
            **({"coordination_fit_errors": list(solved.coordination_fit_errors),
                "coordination_weight_changes": [list(c) for c in solved.coordination_weight_changes]}
               if solved.coordination_weight_changes else {})}


def _rounded_keep(groups: Sequence[Group], scores: Any, keep: Mapping[str, Sequence[int]],
                  shapes: Mapping[str, tuple[int, ...]], target: int, widths: WidthRule) -> tuple[dict, int]:
    """A score-based allocation's keep-sets with rounded widths: units leave in score order."""
    groups = tuple(groups)
    order = {g.id: removal_order(scores, g) for g in groups}
    costs = {gid: [max(float(scores.per_unit[gid][u]), 0.0) for u in units] for gid, units in order.items()}
    counts = {g.id: g.size - len(keep[g.id]) for g in groups}
    rounded = RoundWidthsPass()(RoundRequest(groups, counts, order, costs, shapes, target, widths,
                                             {g.id: g.size - g.min_keep for g in groups})).state
    gone = {gid: set(order[gid][:n]) for gid, n in rounded.counts.items()}
    return ({g.id: tuple(u for u in range(g.size) if u not in gone[g.id]) for g in groups},
            rounded.removed_params)


def _as_batches(calibration: Iterable[Any]) -> tuple[Any, ...]:
    batches = tuple(calibration)
    if not batches:
        raise StructPruneError("calibration is empty: pass an iterable of model inputs (tensors or dicts)")
    return batches


def _tracing_inputs(batch: Any) -> Any:
    """Two examples of the first calibration batch suffice to trace (labels are per dimension)."""
    if isinstance(batch, Mapping):
        return {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return (batch[:2],)
    return tuple(batch)


def prune(model: nn.Module, calibration: Iterable[Any], sparsity: float, method: str = DEFAULT_METHOD, *,
          kinds: Optional[Sequence[str]] = None, example_inputs: Any = None, loss_fn: Optional[LossFn] = None,
          graph: Optional[DependencyGraph] = None, reuse: Optional[PruneResult] = None,
          solver: Optional[SolverConfig] = None, reconstruct: bool = False, round_to: int = 1,
          uniform: bool = False, distributed: bool = False, refit_prior: Optional[Iterable[Any]] = None
          ) -> PruneResult:
    """Prune ``sparsity`` of the prunable parameters of ``model`` with ``method`` (see ``METHODS``),
    calibrated on ``calibration`` (an iterable of model inputs: tensors or dicts of keyword tensors).
    ``reuse``: a previous result of the same method and model whose graph and calibration statistics
    are used again (another sparsity without another calibration pass). ``solver``: the structprune
    method's settings (ablations). ``reconstruct``: after another method chose its units, re-fit the
    consuming layers by least squares, block by block, as structprune does (selection and reconstruction
    measured apart). ``round_to``: every kept width is a multiple of that many channels (or the whole
    group); ``uniform``: every layer keeps the same width per kind (budget met to within one step of
    either). ``distributed``: this process is one rank of an initialised ``torch.distributed`` group; every
    rank passes the same model and calibration, runs its share of the batches (``distributed.py``) and
    returns the same result (structprune only). ``refit_prior``: batches of broad text (e.g. the model's own
    samples, ``data.self_generated``) that the least-squares re-fit fits beside ``calibration``, with
    ``SolverConfig.refit_prior_weight`` of the weight per token, and with structprune the selection's second
    moments and scores as ``SolverConfig.prior_scope`` says (another method's selection, with
    ``reconstruct=True``, is its own); the allocation sees ``calibration`` only. The input model is not
    modified."""
    if method not in METHODS:
        raise StructPruneError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    spec = METHODS[method]
    if not 0.0 <= sparsity < 1.0:
        raise StructPruneError(f"sparsity must be in [0, 1) (a fraction of the prunable parameters), got {sparsity}")
    bad = nonfinite_weights(model)
    if bad:
        raise StructPruneError(f"the model has non-finite weights (NaN or inf) in {', '.join(bad)}: fix or reload "
                               f"the checkpoint before pruning")
    batches = _as_batches(calibration)
    example_inputs = example_inputs if example_inputs is not None else _tracing_inputs(batches[0])
    collective = LOCAL
    if distributed:
        if spec.score != "obs" or reuse is not None:
            raise StructPruneError(f"distributed=True runs the structprune solver (method {method!r}"
                                   + (", reuse=" if reuse is not None else "") + " is not distributed)")
        collective = Collective.from_process_group()
    all_batches = len(batches)
    batches = tuple(batches[i] for i in collective.shard(len(batches)))
    if reuse is not None and (reuse.report.method != method or reuse.plan.fingerprint != reuse.graph.fingerprint):
        raise StructPruneError("reuse= needs a result of the same method on the same model")
    solver = solver or SolverConfig()
    widths = WidthRule(round_to, uniform)
    if reconstruct and (spec.score == "obs" or spec.bias_compensation):
        raise StructPruneError(f"reconstruct=True re-fits another method's selection; {method} "
                               + ("re-fits already (SolverConfig(reconstruct=...))" if spec.score == "obs"
                                  else "compensates biases, which a re-fit would undo"))
    prior = tuple(refit_prior) if refit_prior is not None else ()
    if prior and spec.score != "obs" and not reconstruct:
        raise StructPruneError(f"refit_prior is text the re-fit fits, and method {method!r} has no re-fit: use "
                               f"method='structprune' or reconstruct=True")
    check_prior(prior, solver, collective)  # before the sweep: a setting that cannot honour it is named now
    calib, state, solved, details, updates, weights = None, None, None, {}, {}, {}
    with track_peak_memory() as peak:
        graph = graph or (reuse.graph if reuse is not None else trace(model, example_inputs))
        groups = select_groups(graph, kinds)
        if spec.score == "obs":
            started = time.perf_counter()
            if reuse is not None and reuse.solver_state.sweep != solver.sweep_settings():
                raise StructPruneError(f"reuse= holds a dense sweep made with {dict(reuse.solver_state.sweep)}; this "
                                       f"call's SolverConfig asks for {solver.sweep_settings()}: use the same "
                                       f"settings, or reuse=None for a new sweep")
            state = reuse.solver_state if reuse is not None else prepare(model, graph, groups, batches, solver,
                                                                         collective=collective)
            prepared = time.perf_counter()
            solved = solve(model, state, batches, sparsity, solver, groups, widths=widths, collective=collective,
                           prior=prior)
            keep, weights, removed = solved.keep, solved.new_weights, solved.removed_params
            updates = dict(solved.new_biases)  # SolverConfig.refit_bias: each consumer's output mean kept
            solving = time.perf_counter() - prepared - solved.coordination_seconds
            details = {**solver_details(solver, solved, state, sweep_stages=reuse is None), "stage_seconds": {
                "dense sweep": round(prepared - started, 2), "allocate and solve": round(solving, 2),
                "coordinate": round(solved.coordination_seconds, 2)}}
            if collective.active:
                details["distributed"] = {"ranks": collective.world, "rank": collective.rank,
                                          "bytes_sent": dict(collective.traffic)}
        else:
            calib = reuse.calibration if reuse is not None else CalibratePass()(CalibrationRequest(
                model, graph, groups, batches, spec.input_stats, spec.gradients, loss_fn)).state
            scores = ScorePass()(ScoreRequest(model, groups, spec.score, calib)).state
            allocation = AllocatePass()(AllocationRequest(groups, scores, sparsity, graph.param_shapes, spec.allocation,
                                                          spec.per_param)).state
            keep, removed = allocation.keep, allocation.removed_params
            if not widths.identity:
                keep, removed = _rounded_keep(groups, scores, keep, graph.param_shapes, allocation.target_params, widths)
            updates = _bias_compensation(model, groups, keep, calib.inputs) if spec.bias_compensation else {}
            if reconstruct:
                weights = refit(model, graph, groups, keep, batches, solver, prior=prior)
                details = {"reconstruct": f"least squares on {len(weights)} consumer layers"}
        pruned = ApplyPass()(RewriteRequest(model, graph, keep, updates, weights)).state
    if not widths.identity:
        details = {**details, "widths": {"round_to": round_to, "uniform": uniform}}
    if prior:  # what the re-fit fitted beside the calibration batches; whether the selection saw it (structprune)
        details = {**details, "refit_prior": {"batches": len(prior), "weight": solver.refit_prior_weight,
                                                   "scope": solver.prior_scope if spec.score == "obs" else "refit",
                                                   **({"score_batches": min(solver.prior_score_batches, len(prior))}
                                                      if solver.prior_score_batches and spec.score == "obs"
                                                      and solver.prior_scope == "scores" else {})}}
    report = make_report(method, sparsity, removed, groups, graph, keep, count_params(model), count_params(pruned),
                         peak, all_batches, details)
    plan = Plan.from_keep(graph, model, keep,
                          meta={"method": method, "sparsity": sparsity, "bias_compensated": sorted(updates)})
    if solved is not None and solved.prior_sweep is not None:  # the prior's sweep, for another sparsity's reuse=
        state = replace(state, prior_sweep=solved.prior_sweep)
    return PruneResult(pruned, plan, report, graph, example_inputs, calib, state, solved)
