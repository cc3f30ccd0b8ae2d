"""The StructPrune solver as one pipeline of passes:

    partition -> block-wise calibrate (score: structured OBS curves) -> softmax allocate
              -> block solve (masks + least squares) -> ADMM -> (rewrite, verify: in ``pruning.prune``)

Global-quality allocation with the memory of one block: the dense model is only ever run one block at a
time (two for the ADMM coupling step), and every block's statistics are dropped before the next block.
``docs/structprune_solver.md`` has the equations and the defaults. The loss each tau is scored by (a model
with units masked and weights swapped in, never modified) is ``trial.py``'s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import nn

from structprune_graph.passes.admm import ADMM_DAMPING, DEFAULT_RHO, AdmmPass, AdmmRequest
from structprune_graph.passes.allocate import prunable_params
from structprune_graph.passes.allocate_softmax import (DEFAULT_TAUS, STRATEGIES, SoftmaxAllocatePass,
                                                       SoftmaxAllocationRequest)
from structprune_graph.passes.blockwise_calibrate import (BLOCK_ENERGIES, BlockCalibratePass, BlockCalibration,
                                                          BlockCalibrationRequest, GroupCurve)
from structprune_graph.passes.calibrate import CalibratePass, CalibrationError, CalibrationRequest
from structprune_graph.passes.obs import CURVE_ERRORS, DEFAULT_DAMPING, STATISTICS_DTYPES
from structprune_graph.passes.partition import Partition, PartitionPass, PartitionRequest, find_block_list
from structprune_graph.passes.coordinate_kl import DEFAULT_KL_STEP, KL_EXITS, KlCoordinationPass, KlCoordinationRequest
from structprune_graph.passes.propagate import DEFAULT_STEP, PropagatePass, PropagateRequest
from structprune_graph.passes.sensitivity import (PRECISIONS, BlockSensitivity, BlockSensitivityPass, NoLossError,
                                                  SensitivityRequest, autocast_dtype)
from structprune_graph.passes.score import ScorePass, ScoreRequest
from structprune_graph.passes.round_widths import RoundRequest, RoundWidthsPass, WidthRule
from structprune_graph.passes.solve import (DEFAULT_REFIT_RIDGE, REFIT_BIASES, REFIT_RIDGE_SCALES, REFIT_TARGETS,
                                           BlockSolution, BlockSolvePass, BlockSolveRequest)

from .blockwise import ActivationStore, BlockInput, capture_block_inputs, chains
from .distributed import LOCAL, Collective, DistributedError
from .errors import StructPruneError
from .evaluate import STAGE_LOG
from .graph import DependencyGraph, Group
from .streaming import resident as in_memory
from .trial import trial_loss

logger = logging.getLogger(__name__)

TAU_SEARCHES = ("refit", "masked")
MASKED_TAU_BATCHES = 4  # SolverConfig.tau_batches=None with tau_search="masked": the batches each tau is scored on
REFIT_TAU_BATCHES = 8  # ... with tau_search="refit": the batches each tau is re-fitted on (then scored held out)
COORDINATIONS = ("admm", "propagate", "kl")
OBS_WEIGHTINGS = ("auto", "none", "fisher")
AUTO_TAYLOR_FIRST = 0.25  # SolverConfig.taylor_first=None on a chain of blocks that gives a loss (else 0)
DEFAULT_PRUNE_MARGIN = 0.2  # SolverConfig.prune_margin
MIN_BLOCK_COVERAGE = 0.9  # below: solve the model as one block rather than leave many groups whole
DEFAULT_PRIOR_WEIGHT = 0.5  # SolverConfig.refit_prior_weight
PRIOR_SCOPES = ("refit", "selection", "scores")  # SolverConfig.prior_scope: what the prior shapes, cumulative


@dataclass(frozen=True)
class SolverConfig:
    """Every default of the method (see docs/structprune_solver.md for why)."""

    # "softmax", "uniform" or "global-threshold" (passes/allocate_softmax.py STRATEGIES). softmax stays the
    # default on the development windows (SmolLM2, 32 windows of Austen, the CLI's prior; docs section 3): 1.392
    # / 1.711 / 2.809 at 20 / 30 / 50% against the global threshold's 1.425 / 1.710 / 2.752 (a wash over the
    # three; the threshold skips the tau search) and uniform's 2.282 / 4.703 at 30 / 50%
    allocation: str = "softmax"
    taus: tuple[float, ...] = DEFAULT_TAUS
    # "masked": the masked model's loss, no re-fit; "refit": each tau's re-fitted model on held-out batches.
    # On SmolLM2 both chose the same tau at 30% and 50% (examples/results/generalization_allocation.md) and
    # "refit" costs 2.4x the time: "masked" stays the default
    tau_search: str = "masked"
    # calibration batches each tau is evaluated on ("masked") or re-fitted on ("refit"); None: MASKED_TAU_BATCHES
    # or REFIT_TAU_BATCHES. "masked" on 4 instead of 8 (since 2026-12-04, for the time bound) chose the same tau
    # at 20 / 30 / 50% on the development runs (SmolLM2, 32 windows of Austen, the CLI's prior; docs section 3)
    tau_batches: Optional[int] = None
    tau_holdout: int = 4  # "refit": the last calibration batches, never fitted, each tau is scored on
    max_prune: float = 0.8  # most of a group's units the allocator may remove (and the dense sweep's curves reach)
    # the allocator removes at most sparsity + prune_margin of any group (never more than max_prune); None:
    # max_prune alone. Chosen on the development windows (SmolLM2, Austen, 16 windows; docs section 3, "How
    # deep one group may be cut"): 0.2 scored 1.586 / 1.974 / 3.603 at 20 / 30 / 50% against max_prune
    # alone's 1.611 / 2.019 / 4.264; 0.3 scored 1.574 / 2.030 / 4.264
    prune_margin: Optional[float] = DEFAULT_PRUNE_MARGIN
    # what the allocator compares blocks by: their OBS errors relative to the input stream's energy ("stream"),
    # to a robust energy blind to massive channels ("robust"), or times the loss's sensitivity at the block's
    # output ("gradient": passes/sensitivity.py; block by block, streamed and distributed runs included).
    # "auto" (default): "gradient" where the model gives a loss, else "stream". Chosen on the development
    # windows: gradient scored 1.702 / 2.405 / 5.10 against stream's 1.706 / 2.559 / 6.16 at 20/30/50%
    # (SmolLM2, Austen calibration; docs/generalization.md, "Where the 20% out-of-domain gap comes from")
    block_energy: str = "auto"
    # what the allocator's curves count (passes/obs.py CURVE_ERRORS): "obs", each removal's error after the
    # optimal re-fit on the calibration tokens; "removal", with no re-fit; "blend", the geometric mean. The
    # order inside a group and the re-fit are OBS in every case. Chosen on the development windows (SmolLM2,
    # Austen calibration): removal scored 1.701 / 2.229 / 4.636 against obs's 1.702 / 2.405 / 5.10 at 20/30/50%
    # (docs/generalization.md, "What the allocator's curves count"); blend 1.756 at 20%
    curve_error: str = "removal"
    # the order the block solve removes each group's allocated units in (the allocation, curves and tau, is
    # OBS's whatever it is; the re-fit follows the units chosen). First up to ``taylor_first`` of a group's
    # units by lowest first-order Taylor saliency |w * dL/dw| (the loss's own sensitivity, from the
    # block-by-block backward sweep: passes/sensitivity.py; 1: Taylor's order alone), then greedy structured
    # OBS, its error tr(D W_C [H^-1]_CC^-1 W_C^T) weighting each output channel of a consumer by d_i:
    # ``obs_weighting`` "none" (d = 1: the error the re-fit cannot undo on the calibration text) or "fisher"
    # (d = the loss's mean squared gradient at the channel, the diagonal Fisher of the layer output, from the
    # same sweep). The defaults (None, "auto") are 0.25 and "fisher" on a chain of blocks that gives a loss,
    # else 0 and "none", as block_energy="auto" falls back. Chosen on the
    # development windows (SmolLM2, Austen calibration, 16 windows; docs section 4d): 0.25 + fisher scored
    # 1.611 / 2.019 / 4.264 at 20 / 30 / 50% against plain OBS's 1.650 / 2.140 / 4.350, 0.5 + fisher 1.587 /
    # 2.095 / 4.207, fisher alone 1.695 / 2.068 / 4.122, Taylor alone 1.583 / 2.117 / 5.028
    taylor_first: Optional[float] = None
    obs_weighting: str = "auto"
    damping: float = DEFAULT_DAMPING  # of H in the OBS selection
    reconstruct: bool = True  # least-squares update of the surviving weights
    refit_ridge: float = DEFAULT_REFIT_RIDGE  # of H in the re-fit: shrinkage toward the dense weights
    # what refit_ridge is relative to (REFIT_RIDGE_SCALES): "mean", r mean(diag H) I; "diagonal", r diag(H)
    # (each input by its own second moment: the inputs' correlations on the calibration text shrunk toward none)
    refit_ridge_scale: str = "mean"
    # a free bias in every linear consumer's fit (REFIT_BIASES): its bias keeps the consumer's output mean
    # ((W - W') mu added; created where the layer has none, as FLAP's compensation is). "refit": the re-fit
    # alone uses the centred H - n mu mu^T (OBS order and curves unchanged); "centred": the OBS order and the
    # curves too (they count the error left after the best bias); "none". With "refit" or "centred",
    # refit_ridge -> inf is FLAP's bias-only compensation of the removed units
    refit_bias: str = "none"
    # what each re-fit matches (REFIT_TARGETS): "block", the dense layer's output on the same pruned-trajectory
    # inputs (each block repairs its own cut); "model", the dense model's own output of the layer, so that each
    # block also undoes the drift the blocks before it left (the dense trajectory runs beside the pruned one).
    # "model" lost on the development windows (SmolLM2, Austen, 16 windows; --probe refit-target): 2.306 and
    # 10.70 at 30% and 50% against "block"'s 2.019 and 4.264, the calibration domain's windows included
    refit_target: str = "block"
    # the share per token of the prior text (``prune(refit_prior=...)``: broad text such as the model's own
    # samples) in the re-fit's least squares, against the calibration text's 1 - refit_prior_weight (and in the
    # OBS selection's H and the order's scores, as prior_scope says); the allocation sees the calibration text
    # only. Chosen on the development windows (SmolLM2, 16 windows of Austen, 16 self-generated; docs section
    # 4f): 0.5 scored 1.515 / 1.831 / 3.191 at 20 / 30 / 50% against 0.67's 1.522 / 1.843 / 3.167 and no
    # prior's 1.586 / 1.974 / 3.603
    refit_prior_weight: float = DEFAULT_PRIOR_WEIGHT
    # what a given prior shapes besides the re-fit: "refit" nothing else (until 2026-12-03, late); "selection"
    # the OBS selection's H, blended as the re-fit's (one H for both; until 2026-12-04); "scores" that and the
    # Taylor prefix's scores and the Fisher weights of the OBS error, (1 - w) calibration + w prior (each a mean
    # per batch or token), from a second sensitivity sweep on the prior windows. The allocation sees the
    # calibration text only. Chosen on the development windows (SmolLM2, 32 windows of Austen, 16
    # self-generated; docs sections 4g-4h): at 20 / 30 / 50% "scores" 1.392 / 1.711 / 2.809, "selection"
    # 1.414 / 1.759 / 2.857, "refit" 1.481 / 1.895 / 3.116
    prior_scope: str = "scores"
    # prior_scope="scores": the prior windows its sensitivity sweep reads (the first N; None: all of them).
    # The sweep is a forward and a backward pass over them, the costliest part of a prior
    prior_score_batches: Optional[int] = None
    # the precision of H, H^-1, the OBS work and the re-fit: "float32" halves the solver's largest memory (the
    # widest layer's H and its inverse) with its error checked, falling back to float64 where the check fails
    # (passes/obs.py). The default since 2026-12-04 (for the time bound): on the development runs (SmolLM2, 32
    # windows of Austen, the CLI's prior) it gave float64's taus, development scores and held-out perplexities at
    # 20 / 30 / 50% (docs section 8); "float64" reproduces the results recorded before
    statistics: str = "float32"
    # what the block-by-block backward sweeps (the block energy's f_b, the Taylor scores, the Fisher weights;
    # calibration and prior) compute the blocks' VJPs in (their re-run forward and backward; passes/sensitivity.py
    # PRECISIONS): "auto" bfloat16 where the device multiplies it natively (CUDA with bf16, a CPU with AVX512-BF16
    # or AMX), else float32. The stored streams, the head's softmax and every sum stay float32. bf16 since
    # 2026-12-04 (evening), for the time bound: on the development runs (SmolLM2, 32 windows of Austen, the CLI's
    # prior) 1.391 / 1.705 / 2.824 at 20 / 30 / 50% against float32's 1.392 / 1.711 / 2.809, the same taus, and
    # the main job's pruning 352 s against 429 s in one spell (docs section 8b)
    sensitivity_precision: str = "auto"
    # what the block solve's forwards run in (the dense block on the pruned trajectory, whose inputs H sums, and the
    # pruned block, whose output is the next block's input; calibration and prior windows; PRECISIONS, resolved as
    # sensitivity_precision): the branches under torch.autocast, H summed in ``statistics`` from their inputs, the
    # residual stream between blocks kept float32. "auto" since 2026-12-05, for the time bound: on the development
    # runs (SmolLM2, 32 windows of Austen, the CLI's prior) 1.389 / 1.701 / 2.809 at 20 / 30 / 50% against
    # float32's 1.391 / 1.705 / 2.824, the same taus (docs section 8c)
    solve_precision: str = "auto"
    # each token's row of a layer's input counts in H (the dense sweep's curves, the OBS selection, the re-fit;
    # calibration and prior) with at most token_cap x the batch's median row energy (passes/obs.py token_capped):
    # the attention sink's first tokens hold up to 99.8% of a SmolLM2 layer's H otherwise. None: raw rows. Off by
    # default: on the development runs (SmolLM2, 32 windows of Austen, the CLI's prior) 10 scored 1.380 / 1.696 /
    # 2.718 at 20 / 30 / 50% against 1.389 / 1.701 / 2.809, held out on 8 windows within the spread but for code
    # at 50% (docs section 4i)
    token_cap: Optional[float] = None
    # ADMM rounds; 0 (sequential solution) by default: on SmolLM2, 2 rounds on 16 batches fit those batches
    # better but lose perplexity on held-out text (README ablation); DEFAULT_ROUNDS when switched on
    rounds: int = 0
    # "admm": the auxiliary/dual rounds (passes/admm.py); "propagate": every block re-fitted toward its share
    # of the output error's gradient in every round, rounds chosen on held-out batches (passes/propagate.py);
    # "kl": every block's exit moved along the gradient of the KL to the dense model's next-token distribution,
    # fitted on the calibration (and prior) windows, rounds chosen on held-out ones (passes/coordinate_kl.py)
    coordination: str = "admm"
    propagate_step: float = DEFAULT_STEP
    kl_step: float = DEFAULT_KL_STEP  # coordination="kl": relative change of the exits' weights at the first trial
    # coordination="kl": the layers the rounds move: "residual" (each block's residual exit, down_proj) or "all"
    # (every linear layer of a block)
    kl_exits: str = "residual"
    rho: float = DEFAULT_RHO
    admm_damping: float = ADMM_DAMPING
    admm_batches: int = 16
    memory_budget: Optional[int] = None  # bytes for one block (two when coupled) + its batch of activations
    buffer_budget: int = 256 * 2**20  # bytes of ADMM buffers kept in memory; the rest go to temporary files

    def __post_init__(self) -> None:
        if self.allocation not in STRATEGIES:
            raise StructPruneError(f"SolverConfig: unknown allocation {self.allocation!r}; choose one of {STRATEGIES}")
        if self.tau_search not in TAU_SEARCHES:
            raise StructPruneError(f"SolverConfig: unknown tau_search {self.tau_search!r}; choose one of {TAU_SEARCHES}")
        if self.coordination not in COORDINATIONS:
            raise StructPruneError(f"SolverConfig: unknown coordination {self.coordination!r}; choose one of "
                                   f"{COORDINATIONS}")
        if self.block_energy not in BLOCK_ENERGIES:
            raise StructPruneError(f"SolverConfig: unknown block_energy {self.block_energy!r}; choose one of "
                                   f"{BLOCK_ENERGIES}")
        if self.taylor_first is not None and not 0.0 <= self.taylor_first <= 1.0:
            raise StructPruneError(f"SolverConfig: taylor_first is a fraction of a group's units, in [0, 1]; got "
                                   f"{self.taylor_first}")
        if self.obs_weighting not in OBS_WEIGHTINGS:
            raise StructPruneError(f"SolverConfig: unknown obs_weighting {self.obs_weighting!r}; choose one of "
                                   f"{OBS_WEIGHTINGS}")
        if self.curve_error not in CURVE_ERRORS:
            raise StructPruneError(f"SolverConfig: unknown curve_error {self.curve_error!r}; choose one of "
                                   f"{CURVE_ERRORS}")
        if self.statistics not in STATISTICS_DTYPES:
            raise StructPruneError(f"SolverConfig: unknown statistics {self.statistics!r}; choose one of "
                                   f"{tuple(STATISTICS_DTYPES)}")
        if self.refit_bias not in REFIT_BIASES:
            raise StructPruneError(f"SolverConfig: unknown refit_bias {self.refit_bias!r}; choose one of {REFIT_BIASES}")
        if self.sensitivity_precision not in PRECISIONS:
            raise StructPruneError(f"SolverConfig: unknown sensitivity_precision {self.sensitivity_precision!r}; "
                                   f"choose one of {PRECISIONS}")
        if self.solve_precision not in PRECISIONS:
            raise StructPruneError(f"SolverConfig: unknown solve_precision {self.solve_precision!r}; choose one of "
                                   f"{PRECISIONS}")
        if self.token_cap is not None and not self.token_cap >= 1.0:
            raise StructPruneError(f"SolverConfig: token_cap is a multiple of the median token's energy, >= 1 (None: "
                                   f"no cap); got {self.token_cap}")
        if self.token_cap is not None and (self.refit_bias != "none" or self.refit_target != "block"):
            raise StructPruneError("SolverConfig: token_cap caps the rows of H only, not the input sums of refit_bias "
                                   "or the targets of refit_target='model'; use refit_bias='none' and "
                                   "refit_target='block', or token_cap=None")
        if self.refit_ridge_scale not in REFIT_RIDGE_SCALES:
            raise StructPruneError(f"SolverConfig: unknown refit_ridge_scale {self.refit_ridge_scale!r}; choose one "
                                   f"of {REFIT_RIDGE_SCALES}")
        if self.refit_target not in REFIT_TARGETS:
            raise StructPruneError(f"SolverConfig: unknown refit_target {self.refit_target!r}; choose one of "
                                   f"{REFIT_TARGETS}")
        if self.refit_target != "block" and self.refit_bias != "none":
            raise StructPruneError("SolverConfig: refit_target='model' re-fits without a free bias; use "
                                   "refit_bias='none'")
        if self.refit_bias != "none" and self.rounds:
            raise StructPruneError("SolverConfig: refit_bias is solved without coordination rounds (their "
                                   "re-fits have no bias); use rounds=0")
        if self.refit_bias != "none" and self.tau_search == "refit":
            raise StructPruneError("SolverConfig: refit_bias scores taus on the masked model; use "
                                   "tau_search='masked'")
        if self.prune_margin is not None and not self.prune_margin > 0.0:
            raise StructPruneError(f"SolverConfig: prune_margin is the share of a group the allocator may remove "
                                   f"beyond the sparsity, > 0 (None: max_prune alone); got {self.prune_margin}")
        if not 0.0 < self.refit_prior_weight < 1.0:
            raise StructPruneError(f"SolverConfig: refit_prior_weight is the prior text's share of the re-fit, in "
                                   f"(0, 1); got {self.refit_prior_weight}")
        if self.prior_scope not in PRIOR_SCOPES:
            raise StructPruneError(f"SolverConfig: unknown prior_scope {self.prior_scope!r}; choose one of "
                                   f"{PRIOR_SCOPES}")
        if self.prior_score_batches is not None and self.prior_score_batches < 1:
            raise StructPruneError(f"SolverConfig: prior_score_batches is a number of prior windows, >= 1 (None: "
                                   f"all); got {self.prior_score_batches}")
        if self.kl_exits not in KL_EXITS:
            raise StructPruneError(f"SolverConfig: unknown kl_exits {self.kl_exits!r}; choose one of {KL_EXITS}")
        if not self.kl_step > 0.0:
            raise StructPruneError(f"SolverConfig: kl_step is a relative weight change, > 0; got {self.kl_step}")
        if (self.tau_batches is not None and self.tau_batches < 1) or self.tau_holdout < 0:
            raise StructPruneError(f"SolverConfig: tau_batches must be >= 1 (None: the search's default) and "
                                   f"tau_holdout >= 0, got {self.tau_batches} and {self.tau_holdout}")

    def tau_batch_count(self) -> int:
        """The calibration batches each tau is evaluated on (``masked``) or re-fitted on (``refit``)."""
        if self.tau_batches is not None:
            return self.tau_batches
        return MASKED_TAU_BATCHES if self.tau_search == "masked" else REFIT_TAU_BATCHES

    def sweep_settings(self) -> dict:
        """The settings the dense sweep's curves depend on: a state is reusable only under the same ones."""
        return {"damping": self.damping, "max_prune": self.max_prune, "block_energy": self.block_energy,
                "curve_error": self.curve_error, "centred": self.refit_bias == "centred",
                "memory_budget": self.memory_budget, "statistics": self.statistics, "taylor": self.taylor_first != 0.0,
                "obs_weighting": self.obs_weighting, "sensitivity_precision": self.sensitivity_precision,
                "token_cap": self.token_cap}

    def label(self) -> str:
        return (f"{self.allocation}, rounds={self.rounds}"
                + (f" ({self.coordination}{', all linear layers' if self.kl_exits == 'all' else ''})"
                   if self.rounds else "") + ", "
                + (f"reconstruct (ridge {self.refit_ridge:g})" if self.reconstruct else "no reconstruction"))


@dataclass(frozen=True)
class SolverState:
    """What the dense sweep learnt; reusable across sparsities and ablations of the same model and data."""

    partition: Partition
    groups: Mapping[str, Group]
    inputs: tuple[BlockInput, ...]
    calibration: BlockCalibration
    excluded: Mapping[str, str]  # group id -> reason the solver leaves it whole
    block_energy: str = "stream"  # the one the curves were scaled by ("auto" resolved)
    sweep: Mapping[str, Any] = field(default_factory=dict)  # SolverConfig.sweep_settings() of the sweep
    stage_seconds: Mapping[str, float] = field(default_factory=dict)  # wall time: partition, dense sweep, ...
    # group id -> per unit, the Taylor saliency |w * dL/dw| summed over the unit's weights (SolverConfig.taylor_first:
    # the block solve removes the lowest first); empty: not swept
    unit_scores: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # full layer path -> (out,) the loss's mean squared gradient per output channel (obs_weighting="fisher"):
    # the OBS selection's weight of each output channel; empty: unweighted
    output_fisher: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    obs_weighting: str = "none"  # SolverConfig.obs_weighting as resolved ("auto": the model's)
    gradient_precision: Optional[str] = None  # what the sensitivity sweep's VJPs computed in; None: no sweep
    # prior_scope="scores": (the prior windows' fingerprint, their own sensitivity sweep), kept so that another
    # sparsity solved with reuse= on the same prior skips the sweep (``prune`` hands it on); None: not swept
    prior_sweep: Optional[tuple[str, BlockSensitivity]] = field(default=None, compare=False, repr=False)


def taylor_first(config: SolverConfig, state: SolverState) -> float:
    """The share of each group's units the block solve removes in Taylor order: the config's (None: the
    default) where the sweep gave Taylor scores, else 0 (taylor_first=None on a model without a loss)."""
    if not state.unit_scores:  # not swept: taylor_first=0, or the default on a model without a loss or blocks
        return 0.0
    return AUTO_TAYLOR_FIRST if config.taylor_first is None else config.taylor_first


@dataclass(frozen=True)
class SolverResult:
    keep: Mapping[str, tuple[int, ...]]
    new_weights: Mapping[str, torch.Tensor] = field(repr=False)
    tau: Optional[float] = None
    tau_losses: Mapping[float, float] = field(default_factory=dict)
    block_errors: tuple[float, ...] = ()
    admm_errors: tuple[float, ...] = ()
    admm_best_round: int = 0
    # propagate: per round the output error on the fitted batches and each block's relative weight change
    coordination_fit_errors: tuple[float, ...] = ()
    coordination_weight_changes: tuple[tuple[float, ...], ...] = ()
    removed_params: int = 0
    target_params: int = 0
    excluded: Mapping[str, str] = field(default_factory=dict)
    block_energy: str = "stream"  # what the allocator compared blocks by ("auto" resolved)
    stage_seconds: Mapping[str, float] = field(default_factory=dict)  # wall time: allocation, block solve, rounds
    sequential_weights: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)  # before ADMM
    coordination_seconds: float = 0.0  # wall time of the rounds (ADMM or propagate)
    new_biases: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)  # layer path -> bias += value
    taylor_first: float = 0.0  # the order inside each group as resolved (SolverState)
    obs_weighting: str = "none"
    prior_sweep: Optional[tuple[str, BlockSensitivity]] = field(default=None, repr=False)  # SolverState.prior_sweep


def _max_remove(group: Group, max_prune: float) -> int:
    return max(0, min(group.size - group.min_keep, math.floor(max_prune * group.size)))


Resident = Callable[[nn.Module], nn.Module]


def prepare(model: nn.Module, graph: DependencyGraph, groups: Sequence[Group], batches: Sequence[Any],
            config: SolverConfig, resident: Resident = in_memory, collective: Collective = LOCAL) -> SolverState:
    """Partition the model and run the dense block-wise sweep (shared by every sparsity). ``resident``
    makes a block's weights available before a pass reads them (a ``WeightStreamer`` for weights on disk);
    ``collective``: the ranks that share the calibration batches, ``batches`` being this rank's share."""
    if collective.active and config.rounds and config.coordination != "admm":
        raise DistributedError(f"coordination={config.coordination!r} is not distributed; use rounds=0 or "
                               f"coordination='admm' (block-parallel rounds)")
    groups = tuple(groups)
    clock = _StageClock()
    partition, inputs = _blocks(model, graph, groups, batches, config)
    clock.mark("partition")
    by_id = {g.id: g for g in groups}
    placed = [gid for b in partition.blocks for gid in b.group_ids]
    total = _global_count(len(inputs), collective)
    fit, held = _coordination_split(total, config, collective)  # their dense final outputs: the rounds' targets
    # "gradient" and "auto": the dense sweep leaves every block's input for the sensitivity pass's backward
    # sweep. One block: its sensitivity would be a common factor of every curve, changing nothing
    energy = config.block_energy
    chained = _chained(partition)
    weighting = ("fisher" if chained else "none") if config.obs_weighting == "auto" else config.obs_weighting
    # None: AUTO_TAYLOR_FIRST on a chain of blocks (a model solved as one block, mostly a CNN, keeps OBS)
    taylor = config.taylor_first != 0.0 and (chained or config.taylor_first is not None)
    fisher = weighting == "fisher"
    if taylor and not chained and resident is not in_memory:
        raise StructPruneError("taylor_first on a model solved as one block takes the whole model's gradients, "
                               "which a streamed model never holds; use taylor_first=0")
    swept = energy in ("gradient", "auto") or taylor or fisher  # what the backward sweep is for
    streams = ActivationStore(config.buffer_budget) if swept and chained else None
    energy = "stream" if energy == "auto" and streams is None else energy
    unit_scores: Mapping[str, tuple[float, ...]] = {}
    output_fisher: Mapping[str, torch.Tensor] = {}
    precision = None
    if fisher and not chained:
        raise StructPruneError("obs_weighting='fisher' weights each layer's output by the loss gradient swept "
                               "block by block, and this model is solved as one block; use obs_weighting='none'")
    try:
        calib = BlockCalibratePass()(BlockCalibrationRequest(
            model, partition, by_id, inputs, {gid: _max_remove(by_id[gid], config.max_prune) for gid in placed},
            config.damping, keep_final=tuple(sorted(set(fit) | set(held))), block_energy=energy,
            statistics_dtype=STATISTICS_DTYPES[config.statistics], curve_error=config.curve_error,
            centred=config.refit_bias == "centred", token_cap=config.token_cap, resident=resident,
            collective=collective, streams_out=streams)).state
        clock.mark("dense_sweep")
        if streams is not None:
            try:
                sensitivity = BlockSensitivityPass()(SensitivityRequest(
                    model, partition, inputs, batches, resident, collective, streams=streams,
                    groups={gid: by_id[gid] for gid in placed} if taylor or fisher else None,
                    taylor=taylor, output_fisher=fisher, precision=config.sensitivity_precision)).state
                unit_scores, output_fisher = sensitivity.unit_taylor, sensitivity.output_fisher
                precision = sensitivity.precision
                if energy in ("gradient", "auto"):
                    calib, energy = _gradient_scaled(calib, partition, sensitivity), "gradient"
            except NoLossError as err:
                if (taylor and config.taylor_first is not None) or (fisher and config.obs_weighting != "auto"):
                    raise NoLossError(f"taylor_first > 0 and obs_weighting='fisher' need the loss gradient "
                                      f"({err}); use taylor_first=0 and obs_weighting='none'") from err
                if energy == "gradient":
                    raise
                # "auto" on a model without a loss (an encoder, a CNN): the curves as swept, plain OBS
                energy, weighting = "stream", "none"
                logger.info("block energy: stream (%s)", err)
            clock.mark("sensitivity")
        elif taylor:  # one block (an explicit taylor_first only): the whole model's gradients are one block's
            unit_scores = _whole_model_taylor(model, graph, tuple(by_id[gid] for gid in placed), batches)
            clock.mark("taylor")
    finally:
        if streams is not None:
            streams.close()
    excluded = dict(partition.excluded)
    excluded.update({gid: ("whole experts re-route tokens and have no OBS curve (their channels do); prune "
                           "them with --method taylor-global or magnitude" if by_id[gid].kind == "expert"
                           else "no linear or convolution layer reads its channels")
                     for gid in placed if gid not in calib.curves})
    return SolverState(partition, by_id, tuple(inputs), calib, excluded, energy, config.sweep_settings(),
                       clock.seconds, unit_scores, output_fisher, weighting if output_fisher else "none", precision)


def _chained(partition: Partition) -> bool:
    """Whether the model runs as a chain of several blocks (what every block-by-block sweep needs)."""
    return partition.list_path is not None and len(partition.blocks) > 1


def _whole_model_taylor(model: nn.Module, graph: Optional[DependencyGraph], groups: tuple[Group, ...],
                        batches: Sequence[Any]) -> Mapping[str, tuple[float, ...]]:
    """``method="taylor-global"``'s per-unit scores (one backward pass of the whole model per batch)."""
    try:
        calibration = CalibratePass()(CalibrationRequest(model, graph, groups, tuple(batches), gradients=True)).state
    except CalibrationError as err:
        raise NoLossError(f"taylor_first > 0 needs the loss gradient and the model gives no loss ({err}); use "
                          f"taylor_first=0") from err
    return ScorePass()(ScoreRequest(model, groups, "taylor", calibration)).state.per_unit


class _StageClock:
    """Wall time of consecutive stages: ``mark(name)`` closes the stage that ran since the last mark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now
        logger.info(STAGE_LOG, stage, self.seconds[stage])


def _gradient_scaled(calib: BlockCalibration, partition: Partition, sensitivity: BlockSensitivity) -> BlockCalibration:
    """Block errors relative to the input energy -> times the block's loss sensitivity f_b."""
    curves = dict(calib.curves)
    for block, energy, f in zip(partition.blocks, calib.input_energy, sensitivity.per_block):
        for gid in block.group_ids:
            if gid in curves:
                curve = curves[gid]
                curves[gid] = GroupCurve(curve.order, tuple(x * energy * f for x in curve.increments))
    return replace(calib, curves=curves)


def reconstruct(model: nn.Module, graph: DependencyGraph, groups: Sequence[Group], keep: Mapping[str, Sequence[int]],
                batches: Sequence[Any], config: SolverConfig, resident: Resident = in_memory,
                prior: Sequence[Any] = ()) -> Mapping[str, torch.Tensor]:
    """The least-squares re-fit of the block solve for a keep-set chosen by another method: consumer
    weights (full shape, removed columns zero) re-fitted block by block on the pruned trajectory (and on
    ``prior``'s batches, as ``solve``'s). Groups the partition excludes (spanning blocks) are removed
    without a re-fit."""
    check_prior(prior, config, LOCAL)
    if config.refit_bias != "none":  # the fixed keep-set's re-fit has no bias: refuse rather than ignore it
        raise StructPruneError(f"reconstruct: refit_bias={config.refit_bias!r} applies to method='structprune' "
                               "only; another method's keep-set is re-fitted without a bias (use refit_bias='none')")
    groups = tuple(groups)
    partition, inputs = _blocks(model, graph, groups, batches, config)
    fixed = {gid: tuple(kept) for gid, kept in keep.items()}
    return BlockSolvePass()(BlockSolveRequest(model, partition, {g.id: g for g in groups}, inputs, {}, config.damping,
                                              True, resident=resident, fixed_keep=fixed,
                                              refit_ridge=config.refit_ridge, refit_ridge_scale=config.refit_ridge_scale,
                                              refit_target=config.refit_target,
                                              statistics_dtype=STATISTICS_DTYPES[config.statistics],
                                              prior_inputs=_first_inputs(model, partition.list_path, prior) if prior
                                              else (), prior_weight=config.refit_prior_weight,
                                              precision=solve_dtype(config, partition, inputs),
                                              token_cap=config.token_cap)).state.new_weights


def _blocks(model: nn.Module, graph: DependencyGraph, groups: tuple[Group, ...], batches: Sequence[Any],
            config: SolverConfig) -> tuple[Partition, list[BlockInput]]:
    """The partition and the first block's inputs (one per batch); the whole model is one block when its
    block list does not chain on a real batch."""
    list_path = find_block_list(model, groups)
    problem = chains(model, model.get_submodule(list_path), batches[0]) if list_path else "no block list"
    if list_path and not problem and _coverage(model, list_path, groups) < MIN_BLOCK_COVERAGE:
        problem = f"its blocks hold less than {MIN_BLOCK_COVERAGE:.0%} of the prunable parameters"
    if list_path and problem:
        logger.warning("the blocks of %s are not used (%s): the model is solved as one block", list_path, problem)
    inputs = _first_inputs(model, list_path if not problem else None, batches)
    if list_path and not problem:
        stream_bytes = inputs[0].stream.numel() * inputs[0].stream.element_size()
    else:
        stream_bytes = max(t.numel() * t.element_size() for t in _tensors(batches[0]))
    partition = PartitionPass()(PartitionRequest(model, graph, groups, stream_bytes, config.memory_budget,
                                                 coupled=config.rounds > 0, chain_problem=problem)).state
    return partition, list(inputs)


def _first_inputs(model: nn.Module, list_path: Optional[str], batches: Sequence[Any]) -> list[BlockInput]:
    """The first block's inputs, one per batch (the batches themselves for a model solved as one block)."""
    if list_path:
        return capture_block_inputs(model, model.get_submodule(list_path), batches)
    return [BlockInput((), b) if isinstance(b, Mapping) else BlockInput(b if isinstance(b, tuple) else (b,))
            for b in batches]


def check_prior(prior: Sequence[Any], config: SolverConfig, collective: Collective = LOCAL) -> None:
    """refit_prior fits the plain re-fit: refused where the re-fit is something else, or not run (before any
    pass runs: ``prune`` calls it first)."""
    if not prior:
        return
    problem = ("reconstruct=False (no re-fit)" if not config.reconstruct else
               f"refit_bias={config.refit_bias!r}" if config.refit_bias != "none" else
               f"refit_target={config.refit_target!r}" if config.refit_target != "block" else
               "distributed=True" if collective.active else None)
    if problem:
        raise StructPruneError(f"refit_prior: prior text is blended into the plain least-squares re-fit, and "
                               f"this run has {problem}; drop refit_prior or that setting")


def _coverage(model: nn.Module, list_path: str, groups: tuple[Group, ...]) -> float:
    """Fraction of the groups' parameters in groups that lie inside one child of the block list."""
    prefixes = [f"{list_path}.{i}." for i in range(len(model.get_submodule(list_path)))]
    inside = sum(sum(g.unit_params) for g in groups
                 if len({p for m in g.members for p in prefixes if m.name.startswith(p)}) == 1
                 and all(any(m.name.startswith(p) for p in prefixes) for m in g.members))
    return inside / max(sum(sum(g.unit_params) for g in groups), 1)


def _tensors(batch: Any) -> list[torch.Tensor]:
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple) else (batch,)
    return [v for v in values if isinstance(v, torch.Tensor)]


def _tau_split(n: int, config: SolverConfig) -> tuple[list[int], list[int]]:
    """Calibration batches the tau search re-fits on, and the held-out ones it scores on (never fitted;
    the last ones). With ``tau_holdout=0`` or a single batch, the fitted batches are scored (in-domain)."""
    held = min(config.tau_holdout, n // 2)
    fit = list(range(min(config.tau_batch_count(), n - held)))
    return fit, list(range(n - held, n)) if held else fit


def _global_count(n: int, collective: Collective) -> int:
    """The number of batches of all ranks together (``n`` on this one)."""
    return int(collective.sum_floats([n], "count batches")[0]) if collective.active else n


def _coordination_split(total: int, config: SolverConfig, collective: Collective = LOCAL) -> tuple[list[int], list[int]]:
    """Positions (in this rank's share of ``total`` batches) of the batches the coordination rounds fit on,
    and (``propagate``) of the held-out ones its rounds are chosen on: the last ``tau_holdout`` calibration
    batches, never fitted. The split is over the global batch indices."""
    if config.coordination == "admm":
        fit, held = range(min(config.admm_batches, total)), range(0)
    else:
        h = min(config.tau_holdout, total // 2)
        fit, held = range(min(config.admm_batches, total - h)), range(total - h, total)
    if collective.active and config.rounds:
        _every_rank_has(collective.local_positions(fit), collective, "admm_batches")
    return collective.local_positions(fit), collective.local_positions(held)


def _every_rank_has(positions: Sequence[int], collective: Collective, setting: str) -> None:
    if collective.active and not positions:
        raise DistributedError(f"rank {collective.rank}: SolverConfig.{setting} leaves this rank no batch: "
                               f"SolverConfig.{setting} must be at least the number of ranks ({collective.world})")


def tau_loss(model: nn.Module, state: SolverState, batches: Sequence[Any], config: SolverConfig,
             resident: Resident = in_memory, collective: Collective = LOCAL) -> Callable[[Mapping[str, int]], float]:
    """counts -> the loss the allocator ranks taus by.

    ``masked``: the calibration loss on ``tau_batches`` batches of the model with the first units of each
    greedy OBS order masked, without the re-fit (cheap, but a different regime from what is returned). The
    sweep's OBS order even where the solve removes a Taylor prefix first: masked in that order, the search
    chose tau = inf at 20% on SmolLM2 (masked loss 4.429 against tau 1's 4.517), and the re-fitted model then
    scored 1.950 on the development windows against tau 1's 1.611 (docs/structprune_solver.md, section 3).
    ``refit``: the block solve itself (masks re-selected on the pruned trajectory, least-squares re-fit)
    on ``tau_batches`` batches, scored on ``tau_holdout`` held-out calibration batches: the re-fitted model
    the run returns, judged on text it was not fitted on."""
    # the split is over the global batch indices; this rank uses the ones it holds
    total = _global_count(len(batches), collective)
    if config.tau_search == "masked":
        mine = collective.local_positions(range(min(config.tau_batch_count(), total)))
        _every_rank_has(mine, collective, "tau_batches")
        score = trial_loss(model, state.partition, state.groups, [batches[i] for i in mine], collective)
        return lambda counts: score({gid: state.calibration.curves[gid].order[:n] for gid, n in counts.items()}, {})
    fit, held = (collective.local_positions(indices) for indices in _tau_split(total, config))
    _every_rank_has(fit, collective, "tau_batches")
    _every_rank_has(held, collective, "tau_holdout")
    score = trial_loss(model, state.partition, state.groups, [batches[i] for i in held], collective)
    inputs = [state.inputs[i] for i in fit]
    if state.unit_scores or state.output_fisher:  # the order's statistics from the fitted batches alone
        state = _order_statistics(model, state, [batches[i] for i in fit], inputs, resident, collective,
                                  config.sensitivity_precision)

    def evaluate(counts: Mapping[str, int]) -> float:
        store = ActivationStore(budget_bytes=config.buffer_budget)  # the trial's re-fitted weights
        try:
            solution = BlockSolvePass()(BlockSolveRequest(
                model, state.partition, state.groups, inputs, counts, config.damping, config.reconstruct,
                resident=resident, weights_out=store, refit_ridge=config.refit_ridge,
                refit_ridge_scale=config.refit_ridge_scale, collective=collective,
                statistics_dtype=STATISTICS_DTYPES[config.statistics],
                unit_scores=state.unit_scores or None, scored_fraction=taylor_first(config, state),
                output_weights=state.output_fisher or None,
                refit_target=config.refit_target, token_cap=config.token_cap,
                precision=solve_dtype(config, state.partition, state.inputs))).state  # no refit_bias here
            removed = {gid: sorted(set(range(state.groups[gid].size)) - set(kept)) for gid, kept in solution.keep.items()}
            return score(removed, store)
        finally:
            store.close()
    return evaluate


def _order_statistics(model: nn.Module, state: SolverState, batches: Sequence[Any], inputs: Sequence[BlockInput],
                      resident: Resident, collective: Collective, precision: str) -> SolverState:
    """``state`` with the Taylor scores and output Fisher (those it has) measured on ``batches`` only: a tau
    trial fitted on them then never sees its held-out batches, and equals the model a run on them returns."""
    groups = {gid: state.groups[gid] for b in state.partition.blocks for gid in b.group_ids}
    if _chained(state.partition):
        swept = BlockSensitivityPass()(SensitivityRequest(
            model, state.partition, inputs, batches, resident, collective, groups=groups,
            taylor=bool(state.unit_scores), output_fisher=bool(state.output_fisher), precision=precision)).state
        return replace(state, unit_scores=swept.unit_taylor, output_fisher=swept.output_fisher)
    return replace(state, unit_scores=_whole_model_taylor(model, None, tuple(groups.values()), batches))


def _prior_scored(model: nn.Module, state: SolverState, prior: Sequence[Any], prior_inputs: Sequence[BlockInput],
                  config: SolverConfig, resident: Resident) -> SolverState:
    """``state`` with its Taylor scores and output Fisher blended with the prior windows' own
    (``SolverConfig(prior_scope="scores")``): per unit and per output channel, (1 - w) calibration + w prior,
    each a mean over its own batches (Taylor: |w * dL/dw| of each text's mean loss) or tokens (Fisher), w the
    prior's share per token as in the blended H. Unchanged where the order has neither score (plain OBS) or
    the model is solved as one block (its Taylor scores are the whole model's gradients, no block sweep)."""
    if not ((state.unit_scores or state.output_fisher) and _chained(state.partition)):
        return state
    n = len(prior) if config.prior_score_batches is None else config.prior_score_batches
    key = _fingerprint(prior[:n], (bool(state.unit_scores), bool(state.output_fisher), config.sensitivity_precision))
    if state.prior_sweep is not None and state.prior_sweep[0] == key:  # another sparsity, the same prior: swept
        swept = state.prior_sweep[1]
    else:
        groups = {gid: state.groups[gid] for b in state.partition.blocks for gid in b.group_ids}
        swept = BlockSensitivityPass()(SensitivityRequest(  # the prior is never sharded (check_prior): local sums
            model, state.partition, prior_inputs[:n], prior[:n], resident, buffer_budget=config.buffer_budget,
            groups=groups, taylor=bool(state.unit_scores), output_fisher=bool(state.output_fisher),
            precision=config.sensitivity_precision)).state
    w = config.refit_prior_weight
    scores = {gid: tuple((1.0 - w) * c + w * p for c, p in zip(own, swept.unit_taylor[gid]))
              for gid, own in state.unit_scores.items()}
    fisher = {path: (1.0 - w) * own + w * swept.output_fisher[path] for path, own in state.output_fisher.items()}
    return replace(state, unit_scores=scores, output_fisher=fisher, prior_sweep=(key, swept))


def _fingerprint(batches: Sequence[Any], settings: tuple) -> str:
    """A digest of the batches' tensors (names, shapes, dtypes, values) and ``settings``: equal digests, equal
    inputs to a sweep of the same model and partition."""
    digest = hashlib.sha256(repr(settings).encode())
    for batch in batches:
        items = (sorted(batch.items()) if isinstance(batch, Mapping)
                 else enumerate(batch if isinstance(batch, (tuple, list)) else (batch,)))
        for name, value in items:
            digest.update(f"{name}:".encode())
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Allocation:
    """Units to remove per group (rounded when a ``WidthRule`` asks), the parameters that removes, and the
    softmax temperature with the loss of every tau tried."""

    counts: Mapping[str, int]
    removed_params: int
    target_params: int
    tau: Optional[float] = None
    tau_losses: Mapping[float, float] = field(default_factory=dict)


def allocate(model: nn.Module, state: SolverState, batches: Sequence[Any], sparsity: float, config: SolverConfig,
             budget_groups: Sequence[Group], resident: Resident = in_memory, widths: WidthRule = WidthRule(),
             collective: Collective = LOCAL) -> Allocation:
    """Spread the budget over the groups from the dense sweep's OBS curves (softmax over tau, scored on
    ``batches``); the model is not modified."""
    groups = _solvable(state)
    shapes = _shapes(model, tuple(budget_groups) + groups)
    cap = allocation_cap(config, sparsity)
    curves = {g.id: _capped(state.calibration.curves[g.id], _max_remove(g, cap)) for g in groups}
    target = round(sparsity * prunable_params(tuple(budget_groups), shapes))

    def rounded(counts: Mapping[str, int]):  # -> RoundedCounts
        return RoundWidthsPass()(RoundRequest(groups, counts, {g.id: curves[g.id].order for g in groups},
                                              {g.id: curves[g.id].increments for g in groups}, shapes, target,
                                              widths)).state

    evaluate = tau_loss(model, state, batches, config, resident, collective) if config.allocation == "softmax" else None
    if evaluate is not None and not widths.identity:  # each tau is scored as it will be returned: rounded
        unrounded = evaluate
        evaluate = lambda counts: unrounded(rounded(counts).counts)  # noqa: E731
    alloc = SoftmaxAllocatePass()(SoftmaxAllocationRequest(
        groups, curves, sparsity, shapes, config.allocation, config.taus, evaluate,
        budget_of=tuple(budget_groups))).state
    counts, removed = alloc.counts, alloc.removed_params
    if not widths.identity:
        final = rounded(alloc.counts)
        counts, removed = final.counts, final.removed_params
    return Allocation(dict(counts), removed, alloc.target_params, alloc.tau, dict(alloc.losses))


def allocation_cap(config: SolverConfig, sparsity: float) -> float:
    """The most of any group the allocator may remove at this sparsity: sparsity + prune_margin, at most
    max_prune (the dense sweep's curves reach no further)."""
    return config.max_prune if config.prune_margin is None else min(config.max_prune, sparsity + config.prune_margin)


def _capped(curve: GroupCurve, most: int) -> GroupCurve:
    """The curve's first ``most`` removals (the allocator's cap for this sparsity)."""
    return curve if most >= len(curve.order) else GroupCurve(curve.order[:most], curve.increments[:most])


def _solvable(state: SolverState) -> tuple[Group, ...]:
    groups = tuple(g for gid, g in state.groups.items() if gid not in state.excluded)
    if not groups:
        raise StructPruneError("structprune: every selected group is excluded: " +
                               "; ".join(f"{k}: {v}" for k, v in list(state.excluded.items())[:3]))
    return groups


def solve(model: nn.Module, state: SolverState, batches: Sequence[Any], sparsity: float, config: SolverConfig,
          budget_groups: Sequence[Group], resident: Resident = in_memory,
          weights_out: Optional[MutableMapping[str, torch.Tensor]] = None, widths: WidthRule = WidthRule(),
          collective: Collective = LOCAL, allocation: Optional[Allocation] = None,
          prior: Sequence[Any] = ()) -> SolverResult:
    """Allocate the budget, solve the blocks and coordinate them; the model is not modified.
    ``weights_out`` receives the re-fitted weights block by block (e.g. an ``ActivationStore`` on disk);
    ``widths`` rounds the allocation (multiples of N channels, the same width in every layer);
    ``collective``: as for ``prepare`` (every rank returns the same result); ``allocation``: counts
    already chosen (e.g. on other calibration text), solved here on ``state``'s batches; ``prior``: batches of
    broad text the re-fit also fits (``refit_prior_weight``) and the selection reads (``prior_scope``), never
    the allocation."""
    check_prior(prior, config, collective)
    clock = _StageClock()
    alloc = allocation or allocate(model, state, batches, sparsity, config, budget_groups, resident, widths, collective)
    clock.mark("allocation")  # the tau search: one masked forward pass per tau
    counts, removed = alloc.counts, alloc.removed_params
    fit_idx, held_idx = _coordination_split(_global_count(len(state.inputs), collective), config, collective)
    admm_idx = tuple(fit_idx) if config.rounds and config.coordination == "admm" else ()
    buffers = config.buffer_budget if config.memory_budget is None else \
        min(config.buffer_budget, max(0, config.memory_budget - state.partition.peak_bytes))
    prior_inputs = _first_inputs(model, state.partition.list_path, prior) if prior else ()  # before the store opens
    if prior and config.prior_scope == "scores":  # after the allocation, which keeps the calibration's scores
        state = _prior_scored(model, state, prior, prior_inputs, config, resident)
        clock.mark("prior_scores")  # the prior windows' sensitivity sweep (or the one reuse= holds)
    store = ActivationStore(budget_bytes=buffers)
    try:
        solution: BlockSolution = BlockSolvePass()(BlockSolveRequest(
            model, state.partition, state.groups, state.inputs, counts, config.damping, config.reconstruct,
            admm_idx, store, resident, weights_out, refit_ridge=config.refit_ridge,
            refit_ridge_scale=config.refit_ridge_scale, collective=collective,
            statistics_dtype=STATISTICS_DTYPES[config.statistics], refit_bias=config.refit_bias,
            unit_scores=state.unit_scores or None, scored_fraction=taylor_first(config, state),
            output_weights=state.output_fisher or None, refit_target=config.refit_target,
            prior_inputs=prior_inputs, prior_weight=config.refit_prior_weight,
            prior_in_selection=config.prior_scope != "refit", token_cap=config.token_cap,
            precision=solve_dtype(config, state.partition, state.inputs))).state
        sequential = solution.new_weights
        clock.mark("block_solve")
        admm_errors, best, coordination = (), 0, ((), ())
        started = time.perf_counter()
        if config.rounds and len(state.partition.blocks) > 1 and config.coordination != "admm" and not held_idx:
            raise StructPruneError(f"coordination={config.coordination!r} chooses its rounds on held-out calibration "
                                   "batches: pass at least 2 batches and tau_holdout >= 1")
        if config.rounds and len(state.partition.blocks) > 1 and config.coordination == "kl":
            result = KlCoordinationPass()(_kl_request(model, state, batches, prior, prior_inputs, fit_idx, held_idx,
                                                      solution, store, config, resident)).state
            solution, admm_errors, best = result.solution, result.held_kl, result.best_round
            coordination = (result.fit_kl, result.weight_changes)
        elif config.rounds and len(state.partition.blocks) > 1 and config.coordination == "propagate":
            finals = state.calibration.final_outputs
            result = PropagatePass()(PropagateRequest(
                model, state.partition, state.groups, [state.inputs[i] for i in fit_idx],
                torch.stack([finals[i] for i in fit_idx]), [state.inputs[i] for i in held_idx],
                torch.stack([finals[i] for i in held_idx]), solution, store, config.rounds,
                config.propagate_step, config.admm_damping, resident)).state
            solution, admm_errors, best = result.solution, result.held_errors, result.best_round
            coordination = (result.output_errors, result.weight_changes)
        elif config.rounds and len(state.partition.blocks) > 1:
            finals = torch.stack([state.calibration.final_outputs[i] for i in admm_idx])
            result = AdmmPass()(AdmmRequest(model, state.partition, state.groups, [state.inputs[i] for i in admm_idx],
                                            finals, solution, store, config.rounds, config.rho,
                                            config.admm_damping, resident, collective)).state
            solution, admm_errors, best = result.solution, result.output_errors, result.best_round
        rounds_seconds = time.perf_counter() - started
        if config.rounds:
            clock.mark("coordination")
    finally:
        store.close()
    keep = {gid: solution.keep.get(gid, tuple(range(g.size))) for gid, g in state.groups.items()}
    return SolverResult(keep, solution.new_weights, alloc.tau, alloc.tau_losses, solution.block_errors, admm_errors,
                        best, *coordination, removed, alloc.target_params, dict(state.excluded), state.block_energy,
                        clock.seconds, sequential, rounds_seconds, dict(solution.new_biases),
                        taylor_first(config, state), state.obs_weighting, state.prior_sweep)


def solve_dtype(config: SolverConfig, partition: Partition, inputs: Sequence[BlockInput]) -> Optional[torch.dtype]:
    """The autocast dtype of the block solve's forwards: ``solve_precision`` resolved on the calibration's device
    for a chain of blocks with a float32 residual stream. None (the model's own precision) for a model solved as
    one block (its output is the model's, not a stream the next block reads), a half-precision model (half
    already), and under ADMM rounds (their warm start is the block outputs the solve stores, which the rounds'
    own float32 forwards must reproduce)."""
    if not _chained(partition) or (config.rounds and config.coordination == "admm"):
        return None
    stream = inputs[0].stream
    return autocast_dtype(config.solve_precision, stream.device) if stream.dtype == torch.float32 else None


def _kl_request(model: nn.Module, state: SolverState, batches: Sequence[Any], prior: Sequence[Any],
                prior_inputs: Sequence[BlockInput], fit_idx: Sequence[int], held_idx: Sequence[int],
                solution: BlockSolution, store: ActivationStore, config: SolverConfig,
                resident: Resident) -> KlCoordinationRequest:
    """The KL rounds fit the calibration batches the split gives them and the prior windows (broad text, as in
    the re-fit), and are chosen on the held-out calibration batches and the last ``tau_holdout`` prior
    windows (at most half of them): both texts, neither fitted."""
    cut = len(prior) - min(config.tau_holdout, len(prior) // 2)
    return KlCoordinationRequest(
        model, state.partition, state.groups,
        [state.inputs[i] for i in fit_idx] + list(prior_inputs[:cut]), [batches[i] for i in fit_idx] + list(prior[:cut]),
        [state.inputs[i] for i in held_idx] + list(prior_inputs[cut:]), [batches[i] for i in held_idx] + list(prior[cut:]),
        solution, store, config.rounds, config.kl_step, config.admm_damping, config.kl_exits, resident,
        precision=autocast_dtype(config.sensitivity_precision, state.inputs[0].stream.device),
        statistics_dtype=STATISTICS_DTYPES[config.statistics])


def _shapes(model: nn.Module, groups: Sequence[Group]) -> dict[str, tuple[int, ...]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    return {m.name: tuple(params[m.name].shape) for g in groups for m in g.members if m.is_param}
