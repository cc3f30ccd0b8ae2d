"""Probes on the development windows of the generalization protocol (issue 12): which part of the solver
loses perplexity on text it was not calibrated on? SmolLM2-135M, calibration on Austen (16 x 512), scored
on the development windows of Austen and pydoc (never on an evaluation window); the score is the geometric
mean over the two of ppl / dense ppl, as in ``generalization.py``.

``--probe selection``: selection against compensation, at one sparsity. FLAP's keep-set and structprune's,
each with the other's compensation (FLAP: bias compensation; structprune: the least-squares re-fit) and
with none; then the two halves of a keep-set apart: FLAP's counts per group with structprune's OBS order
inside each group (and the re-fit), structprune's counts with FLAP's order; and structprune on MLP channels
only, at the sparsity that removes the same number of parameters (no attention heads).

``--probe damping``: the OBS selection's damping d (``SolverConfig.damping``: H + d mean(diag H) I), the
re-fit's ridge left at its default.

``--probe allocation-source``: the allocation (the dense sweep's OBS curves and the tau search) computed on
other text than the block solve (OBS order and re-fit, always on Austen): on Austen itself, on the model's
own samples (``self``), and on Austen mixed with them, at every ``--sparsities``.

``--probe curve-error``: what the allocator's curves count (``SolverConfig.curve_error``): each removal's
error after the optimal re-fit on the calibration tokens (``obs``, the default then), the error of dropping the
units with no re-fit (``removal``), or their geometric mean (``blend``). The OBS curves assume that the
re-fit's gain carries over to any text; where it does not, they invite deep cuts in the layers whose
calibration activations are most redundant. Order, re-fit and block energy (``auto``) stay the defaults.

``--probe tau``: the softmax temperature (default curves and energy): each of ``--taus`` alone, then the
masked tau search over those and the default grid together. At 50% the search chose 0.25, the grid's
smallest value: is the grid wide enough? Its recorded rows re-fit with the ridge at 0.01; ``--ridges 0.3``
(today's default) for new ones.

``--probe refit-bias``: a free bias in every linear consumer's fit (``SolverConfig(refit_bias=...)``), the
consumer's output mean kept by a bias (FLAP's compensation, the robust end, is this with the re-fit's ridge
-> inf): ``refit``, the re-fit's statistics centred; ``centred``, the OBS order's and the curves' too (they
count the error left after the best bias); ``none``, no bias (the ridge alone). Every ``--biases`` at every
``--ridges`` (the re-fit's ridge; one dense sweep per --biases). ``--biases none`` is the ridge's own probe:
it chose ``refit_ridge=0.3`` (docs/structprune_solver.md, section 4). ``--calib`` calibrates every probe on
another source (the development windows stay Austen's and pydoc's).

``--probe calib-size``: how many calibration windows (``--sizes``, of 512 tokens each, drawn from the same
seeded permutation so that a smaller set is the start of a larger one) the whole solver sees, defaults
otherwise, at every ``--sparsities``. The re-fit solves for a layer's weights from its inputs' second
moments: 16 x 512 tokens are about 5 tokens per input of the widest layer (``down_proj``, 1,536 inputs), far
fewer than SparseGPT's 128 x 2,048; too few tokens fit the calibration text and not the language.
``--tau-batches N`` scores the masked tau search on N calibration windows instead of the library's default (4 since 2026-12-04, 8 before).

``--probe counts``: each of ``--methods``' counts per group (its allocation) with structprune's OBS order
inside each group and the re-fit (today's ridge), its keep-set as is with the re-fit, and (``--parts order``)
structprune's counts with the method's order inside each group and the re-fit, beside the method itself;
``--calib-samples`` windows.
With 64 windows global Taylor leads out of domain at 20% and 30% (README): is it its allocation?

``--probe refit-target``: what the re-fit matches (``SolverConfig.refit_target``, every ``--targets``, one
dense sweep): ``block``, the dense layer's output on the pruned trajectory's own inputs, or ``model``, the
dense model's output of the layer, so that each block also undoes the drift left by the blocks before it.

``--probe ridge-scale``: what the re-fit's ridge is relative to (``SolverConfig.refit_ridge_scale``, every
``--scales`` at every ``--ridges``, one dense sweep): ``mean``, r mean(diag H) I (the default), or ``diagonal``,
r diag(H): each input shrunk by its own second moment, so that the calibration text's correlations between
inputs are shrunk toward none whatever the input's scale (where a few inputs are much larger than the rest,
they set mean(diag H): the mean scale then leaves them almost unregularised and holds the small inputs near
their dense weights).

``--probe max-prune``: the most of a group the allocator may remove (``SolverConfig.max_prune``, every
``--caps``; 0.8 by default, never tuned before 2026-12-03). At 50% on SmolLM2 18 of the 30 MLP layers sit at
the cap. ``--probe prune-margin``: the cap as sparsity + ``--margins`` (``SolverConfig.prune_margin``, at
most max_prune = 0.8; one dense sweep for every margin).

``--probe order``: the order the block solve removes each group's allocated units in (the allocation
stays OBS's): the first ``SolverConfig.taylor_first`` (every ``--taylor-firsts``) of a group's units by lowest
first-order Taylor saliency |w * dL/dw|, swept block by block in the library (the counts probe's ``order``
part took it from a whole-model ``taylor-global`` run), then greedy OBS, its error unweighted or weighted
per output channel by the loss's mean squared gradient there (``--weightings fisher``: the diagonal Fisher
of the layer output, from the same sweep).

``--probe block-energy``: what a block's OBS errors are divided by before the allocator compares blocks
(``SolverConfig.block_energy``): the energy of the block's input stream, or a robust one (channels x the
median channel's energy) that the massive channels of the middle and late blocks do not inflate; and
``gradient``: a block's errors times the mean squared loss gradient per channel at its output (a
diagonal-Fisher estimate of the loss increase an error of that size causes there), from one backward pass
of the calibration batches (``passes/sensitivity.py``; the whole model in memory). The gradient rows in
the results file were first measured with this probe's own copy of that computation (commit 9f4a3f2);
the library option, re-run at 30%, gives the same row to the last digit (the last gradient row).

``--probe refit-prior``: the model's own samples as prior text of the re-fit (``prune(refit_prior=...)``):
the first ``--prior-samples`` of the 16 self-generated windows of 512 tokens are fitted beside the
calibration text, with each ``--prior-weights`` of the weight per token (``SolverConfig.refit_prior_weight``);
the selection, allocation and scores see the calibration text only (one dense sweep for every row) with
``--prior-scopes refit`` (the default here, as the recorded rows); with ``selection`` the OBS selection's H
blends the prior's too, and with ``scores`` the Taylor prefix's scores and the Fisher weights as well
(``SolverConfig.prior_scope``), read off the first ``--prior-score-windows`` prior windows
(``SolverConfig.prior_score_batches``; all by default) with the tau search on ``--tau-batches`` windows.

Run: ``python examples/generalization_probes.py --probe selection --sparsity 0.2`` (about 17 min on 2
cores); rows go to ``OUT/generalization_probes.jsonl`` (appended) and the table to ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


# the selection, damping and allocation-source probes were recorded when the stream energy was the default
# (before 2026-12-02); they keep it, so that their rows reproduce
RECORDED_ENERGY = "stream"
# every probe before the curve-error one was recorded with the OBS curves (the default until 2026-12-02, evening)
RECORDED_CURVES = "obs"
# every probe before the refit-bias one was recorded with the re-fit's ridge at 0.01 (the default until 2026-12-03)
RECORDED_RIDGE = 0.01


# the order inside each group today (rows recorded before 2026-12-03 without this label used plain OBS)
DEFAULT_ORDER = "Taylor 25% then Fisher-weighted OBS"
# --prior-scopes: what the prior text shapes (the row's wording)
SCOPES = {"refit": "re-fit", "selection": "OBS selection and re-fit",
          "scores": "Taylor and Fisher scores, OBS selection and re-fit"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", choices=("selection", "damping", "allocation-source", "block-energy", "curve-error",
                                            "tau", "refit-bias", "calib-size", "counts", "order", "refit-target",
                                            "ridge-scale", "max-prune", "prune-margin", "refit-prior", "coordination"),
                        required=True)
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--sources", nargs="+", default=["austen", "self", "austen+self"])
    parser.add_argument("--energies", nargs="+", default=["robust"])
    parser.add_argument("--errors", nargs="+", default=["removal", "blend"])
    parser.add_argument("--taus", type=float, nargs="+", default=[0.125])
    parser.add_argument("--caps", type=float, nargs="+", default=[0.7, 0.9], help="max-prune: SolverConfig.max_prune")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.2],
                        help="prune-margin: SolverConfig.prune_margin")
    parser.add_argument("--scales", nargs="+", default=["diagonal"], choices=("mean", "diagonal"))
    parser.add_argument("--targets", nargs="+", default=["model", "block"], choices=("block", "model"))
    parser.add_argument("--calib", default="austen", choices=("austen", "self", "austen+self", "pydoc", "mix"),
                        help="calibration text (default Austen; the development windows are always Austen's and pydoc's)")
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.01])
    parser.add_argument("--biases", nargs="+", default=["refit", "centred"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--methods", nargs="+", default=["taylor-global"])
    parser.add_argument("--parts", nargs="+", choices=("counts", "keep-set", "order"), default=["counts", "keep-set"],
                        help="counts: the method's counts with the OBS order + re-fit; keep-set: its keep-set + re-fit; "
                             "order: structprune's counts with the method's order + re-fit")
    parser.add_argument("--tau-batches", type=int, default=None, help="calib-size and refit-prior: the masked tau search's windows "
                        "(default: the library's, 8)")
    parser.add_argument("--taylor-firsts", type=float, nargs="+", default=[1.0])
    parser.add_argument("--weightings", nargs="+", default=["none"], choices=("none", "fisher"))
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.01, 1.0])
    parser.add_argument("--prior-samples", type=int, nargs="+", default=[16],
                        help="refit-prior: self-generated windows of 512 tokens fitted beside the calibration")
    parser.add_argument("--prior-weights", type=float, nargs="+", default=[0.5],
                        help="refit-prior: SolverConfig.refit_prior_weight")
    parser.add_argument("--prior-scopes", nargs="+", default=["refit"], choices=SCOPES,
                        help="what the prior text shapes: 'refit' alone (as the recorded rows; "
                             "SolverConfig(prior_scope='refit')), the OBS selection's H too ('selection', the "
                             "default 2026-12-03 to -04), or also the Taylor and Fisher scores ('scores', the default "
                             "since); refit-prior: every one given; coordination: the first")
    parser.add_argument("--prior-score-windows", type=int, nargs="+", default=[0],
                        help="refit-prior with the scores scope: the prior windows its sensitivity sweep reads "
                             "(SolverConfig.prior_score_batches; 0: all, the recorded rows)")
    parser.add_argument("--rounds", type=int, nargs="+", default=[2], help="coordination: KL rounds")
    parser.add_argument("--kl-steps", type=float, nargs="+", default=[0.01],
                        help="coordination: SolverConfig.kl_step, the first trial's relative change of the exits")
    parser.add_argument("--kl-exits", choices=("residual", "all"), default="residual",
                        help="coordination: SolverConfig.kl_exits, the layers the KL rounds move")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import generalization as G
    import structprune_graph as sp
    from structprune_graph.passes.allocate import prunable_params
    from structprune_graph.passes.rewrite import ApplyPass, RewriteRequest
    from structprune_graph.passes.score import ScorePass, ScoreRequest
    from structprune_graph.passes.solve import BlockSolvePass, BlockSolveRequest
    from structprune_graph.pruning import refit, select_groups
    from structprune_graph.solver import SolverConfig

    out = Path(args.out)
    setup = argparse.Namespace(calib_samples=args.calib_samples, seqlen=512, eval_windows=4, out=str(out),
                               self_calibration=args.calib_samples == 16 or "self" in args.calib or args.calib == "mix"
                               or args.probe in ("refit-prior", "coordination"))
    model, calib, dev, _ = G.setup(setup)  # the evaluation windows are never touched here
    batches = G.batches_of(calib[args.calib])
    dense = G.ppl(model, dev)
    rows_path, md_path = out / "generalization_probes.jsonl", out / "generalization_probes.md"

    windows = {"calib_samples": args.calib_samples}  # the calib-size probe changes it

    def emit(run: str, pruned, started: float, sparsity: float = args.sparsity, **extra) -> None:
        d = G.ppl(pruned, dev)
        score = G.dev_score(d, dense)
        row = {"probe": args.probe, "run": run, "sparsity": sparsity, "calib": args.calib, **windows, "dev": d,
               "dense_dev": dense, "score": round(score, 4), "seconds": round(time.perf_counter() - started), **extra}
        print(json.dumps(row), flush=True)
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        md_path.write_text(table([json.loads(line) for line in rows_path.read_text().splitlines()]))

    if args.probe == "damping":
        for d in args.dampings:
            t = time.perf_counter()
            r = sp.prune(model, batches, args.sparsity, solver=SolverConfig(damping=d, block_energy=RECORDED_ENERGY,
                                                                         curve_error=RECORDED_CURVES, refit_ridge=RECORDED_RIDGE))
            emit(f"structprune, OBS damping {d:g}", r.model, t, tau=r.report.solver["tau"])
        return

    def per_config(name: str, config, reuse=None, prior=None):  # one dense sweep (or reuse's), every --sparsities
        for s in args.sparsities:
            t = time.perf_counter()
            r = sp.prune(model, batches, s, solver=config, reuse=reuse, refit_prior=prior)
            reuse = r
            emit(name, r.model, t, s, tau=r.report.solver["tau"],
                 tau_losses={str(k): round(v, 4) for k, v in r.report.solver["tau_losses"].items()},
                 removed_per_group={g: r.graph.group(g).size - len(k) for g, k in r.plan.keep.items()})
        return reuse

    if args.probe == "max-prune":  # the cap on a group's removed share is a sweep setting: one sweep per cap
        for cap in args.caps:
            per_config(f"structprune, at most {cap:g} of a group removed, {DEFAULT_ORDER}",
                       SolverConfig(max_prune=cap, prune_margin=None))
        return

    if args.probe == "prune-margin":  # the allocator's cap, sparsity + margin (not a sweep setting: one sweep)
        shared = None
        for margin in args.margins:
            shared = per_config(f"structprune, at most the sparsity + {margin:g} of a group removed (max 0.8), "
                                f"{DEFAULT_ORDER}", SolverConfig(prune_margin=margin), shared)
        return

    if args.probe == "ridge-scale":  # the re-fit's ridge is not a sweep setting: one dense sweep for every row
        shared = None
        for scale in args.scales:
            for ridge in args.ridges:
                shared = per_config(f"structprune, ridge {ridge:g} x {'diag(H)' if scale == 'diagonal' else 'mean(diag H) I'}"
                                    f", {DEFAULT_ORDER}", SolverConfig(refit_ridge=ridge, refit_ridge_scale=scale), shared)
        return

    if args.probe == "refit-prior":  # the prior is not a sweep setting: one dense sweep for every row
        shared = None
        tau = {} if args.tau_batches is None else {"tau_batches": args.tau_batches}
        for n in args.prior_samples:
            for weight in args.prior_weights:
                for scope in args.prior_scopes:
                    for swept in args.prior_score_windows if scope == "scores" else [0]:
                        shared = per_config(
                            f"structprune, {SCOPES[scope]} also on {n} x 512 self-generated tokens, weight {weight:g}"
                            + (f" (scores from the first {swept})" if swept else "")
                            + (f", tau searched on {args.tau_batches} windows" if tau else "") + f", {DEFAULT_ORDER}",
                            SolverConfig(refit_prior_weight=weight, prior_scope=scope,
                                         prior_score_batches=swept or None, **tau),
                            shared, G.batches_of(calib["self"][:n]))
        return

    if args.probe == "coordination":  # KL rounds after the block solve (with the CLI's prior): one sweep for all
        shared = None
        prior = G.batches_of(calib["self"][:args.prior_samples[0]])
        for rounds in args.rounds:
            for step in args.kl_steps:
                for s in args.sparsities:
                    t = time.perf_counter()
                    config = SolverConfig(rounds=rounds, coordination="kl", kl_step=step, kl_exits=args.kl_exits,
                                          prior_scope=args.prior_scopes[0])
                    r = sp.prune(model, batches, s, solver=config, reuse=shared, refit_prior=prior)
                    shared, solver = r, r.report.solver
                    exits = "" if args.kl_exits == "residual" else f", {args.kl_exits} linear layers moved"
                    exits += {"refit": "", "selection": ", the prior in the OBS selection",
                              "scores": ", the prior in the OBS selection and scores"}[args.prior_scopes[0]]
                    emit(f"structprune + {rounds} KL rounds (step {step:g}{exits}), prior {args.prior_samples[0]} "
                         f"self windows, {DEFAULT_ORDER}", r.model, t, s, tau=solver["tau"], best_round=solver["admm_best_round"],
                         held_kl=solver["admm_output_errors"], fit_kl=solver.get("coordination_fit_errors"),
                         weight_changes=solver.get("coordination_weight_changes"),
                         coordination_seconds=solver.get("stage_seconds", {}).get("coordinate"))
        return

    if args.probe == "refit-target":  # one dense sweep shared by every --targets
        shared = None
        for target in args.targets:
            shared = per_config(f"structprune, re-fit toward the {target}'s output", SolverConfig(refit_target=target),
                                shared)
        return

    if args.probe == "block-energy":  # recorded with the OBS curves
        for how in args.energies:
            per_config(f"structprune, block energy {how}", SolverConfig(block_energy=how, curve_error=RECORDED_CURVES,
                                                                               refit_ridge=RECORDED_RIDGE))
        return

    if args.probe == "order":  # one dense sweep per --weightings, shared by its --taylor-firsts
        for weighting in args.weightings:
            shared = None
            for first in args.taylor_firsts:
                name = ("structprune, " + {0.0: "OBS order", 1.0: "Taylor order"}.get(
                    first, f"Taylor order for the first {first:g} of a group, then OBS")
                        + (f" (OBS weighted by the output's {weighting})" if weighting != "none" and first < 1 else ""))
                shared = per_config(name, SolverConfig(taylor_first=first, obs_weighting=weighting), shared)
        return

    if args.probe == "curve-error":
        for error in args.errors:
            per_config(f"structprune, curve error {error}", SolverConfig(curve_error=error, refit_ridge=RECORDED_RIDGE))
        return

    if args.probe == "refit-bias":  # the ridge is not a sweep setting: one centred sweep for every ridge
        for how in args.biases:
            shared = None
            for ridge in args.ridges:
                name = {"none": "re-fit without a bias", "refit": "re-fit with a bias"}.get(
                    how, "centred OBS, curves and re-fit with a bias")
                shared = per_config(f"structprune, {name}, ridge {ridge:g}, {DEFAULT_ORDER}",
                                    SolverConfig(refit_bias=how, refit_ridge=ridge), shared)
        return

    if args.probe == "calib-size":  # the windows of each size: the first `size` of one seeded permutation
        for size in args.sizes:
            sized = G.setup(argparse.Namespace(calib_samples=size, seqlen=512, eval_windows=4, out=str(out),
                                               self_calibration=False))[1]
            batches = G.batches_of(sized[args.calib])
            windows["calib_samples"] = size
            config = SolverConfig() if args.tau_batches is None else SolverConfig(tau_batches=args.tau_batches)
            per_config(f"structprune, {size} x 512 calibration tokens"
                       + (f", tau searched on {config.tau_batches} windows" if args.tau_batches else ""), config, None)
        return

    if args.probe == "counts":  # each --methods' counts per group, structprune's OBS order inside each + re-fit
        from structprune_graph.solver import prepare

        graph = sp.trace(model, batches[0])
        groups = select_groups(graph, None)
        default = SolverConfig()
        t = time.perf_counter()  # the block inputs; the curves are not used (stream energy: no gradient sweep)
        state = prepare(model, graph, groups, batches, SolverConfig(block_energy="stream")) if "counts" in args.parts else None
        prepared = time.perf_counter() - t
        ours = {}  # sparsity -> structprune's result (the first one's dense sweep shared)
        for method in args.methods:
            reuse = None
            for s in args.sparsities:
                t = time.perf_counter()
                other = sp.prune(model, batches, s, method=method, reuse=reuse)
                reuse = reuse or other
                counts = {g.id: g.size - len(other.plan.keep.get(g.id, range(g.size))) for g in groups}
                emit(method, other.model, t, s, removed_per_group=counts)
                if "keep-set" in args.parts:  # its keep-set as is, with the re-fit
                    t = time.perf_counter()
                    w = refit(model, graph, groups, other.plan.keep, batches, default)
                    emit(f"{method} keep-set + re-fit", ApplyPass()(RewriteRequest(model, graph, other.plan.keep, {},
                                                                                   w)).state, t, s)
                if "order" in args.parts:  # structprune's counts, the method's order inside each group + re-fit
                    t = time.perf_counter()
                    if s not in ours:  # one structprune run per sparsity, whatever the --methods
                        ours[s] = sp.prune(model, batches, s, reuse=next(iter(ours.values()), None))
                    per_unit = ScorePass()(ScoreRequest(model, tuple(groups), sp.METHODS[method].score,
                                                        other.calibration)).state.per_unit
                    keep = keep_in_order(groups, per_unit, {g.id: len(ours[s].plan.keep.get(g.id, range(g.size)))
                                                            for g in groups})
                    w = refit(model, graph, groups, keep, batches, default)
                    emit(f"structprune counts, {method} order + re-fit", ApplyPass()(RewriteRequest(
                        model, graph, keep, {}, w)).state, t, s)
                if "counts" not in args.parts:
                    continue
                t = time.perf_counter() - prepared
                sol = BlockSolvePass()(BlockSolveRequest(model, state.partition, state.groups, state.inputs,
                                                         {g: n for g, n in counts.items() if g in state.groups},
                                                         default.damping, True, refit_ridge=default.refit_ridge)).state
                emit(f"{method} counts, OBS order + re-fit", ApplyPass()(RewriteRequest(
                    model, graph, dict(sol.keep), {}, dict(sol.new_weights))).state, t, s)
        return

    if args.probe == "tau":  # each --taus alone, then searched together with the default grid (one sweep)
        from structprune_graph.solver import DEFAULT_TAUS

        wide = tuple(sorted(set(args.taus) | set(DEFAULT_TAUS)))
        shared = None
        for name, taus in [(f"tau {t:g}", (t,)) for t in args.taus] + [
                ("tau searched on " + ", ".join(f"{t:g}" for t in wide), wide)]:
            ridge = args.ridges[0]
            shared = per_config(f"structprune, {name}" + (f", ridge {ridge:g}" if ridge != RECORDED_RIDGE else ""),
                                SolverConfig(taus=taus, refit_ridge=ridge), shared)
        return

    if args.probe == "allocation-source":
        from structprune_graph.solver import allocate, prepare, solve

        config = SolverConfig(block_energy=RECORDED_ENERGY, curve_error=RECORDED_CURVES, refit_ridge=RECORDED_RIDGE)
        graph = sp.trace(model, batches[0])
        groups = select_groups(graph, None)
        t = time.perf_counter()
        solve_state = prepare(model, graph, groups, batches, config)
        prepared = time.perf_counter() - t
        for source in args.sources:
            t = time.perf_counter()
            source_batches = batches if source == "austen" else G.batches_of(calib[source])
            state = solve_state if source == "austen" else prepare(model, graph, groups, source_batches, config)
            sweep = time.perf_counter() - t + (prepared if source == "austen" else 0.0)
            for s in args.sparsities:
                t = time.perf_counter()
                alloc = allocate(model, state, source_batches, s, config, groups)
                result = solve(model, solve_state, batches, s, config, groups, allocation=alloc)
                pruned = ApplyPass()(RewriteRequest(model, graph, dict(result.keep), {}, dict(result.new_weights))).state
                emit(f"allocation on {source}, solve on austen", pruned, t - sweep, s, tau=alloc.tau,
                     removed_per_group=dict(alloc.counts))
        return

    t = time.perf_counter()
    flap = sp.prune(model, batches, args.sparsity, method="flap")
    emit("flap: FLAP keep-set + bias compensation", flap.model, t)
    t = time.perf_counter()
    ours = sp.prune(model, batches, args.sparsity, solver=SolverConfig(block_energy=RECORDED_ENERGY,
                                                                      curve_error=RECORDED_CURVES,
                                                                      refit_ridge=RECORDED_RIDGE))
    emit("structprune: OBS keep-set + re-fit", ours.model, t, tau=ours.report.solver["tau"])
    graph, groups = ours.graph, select_groups(ours.graph, None)
    removed = {name: {g.id: g.size - len(r.plan.keep.get(g.id, range(g.size))) for g in groups}
               for name, r in (("flap", flap), ("structprune", ours))}
    kind_of = {g.id: g.kind for g in groups}
    by_kind = {name: dict(sum((Counter({kind_of[gid]: n}) for gid, n in c.items()), Counter())) for name, c in removed.items()}

    t = time.perf_counter()
    w = refit(model, graph, groups, flap.plan.keep, batches, SolverConfig(refit_ridge=RECORDED_RIDGE))
    emit("FLAP keep-set + re-fit", ApplyPass()(RewriteRequest(model, graph, flap.plan.keep, {}, w)).state, t)
    t = time.perf_counter()
    emit("FLAP keep-set, no compensation", ApplyPass()(RewriteRequest(model, graph, flap.plan.keep, {}, {})).state, t)

    t = time.perf_counter()  # FLAP's counts, the OBS order inside each group, the re-fit
    st = ours.solver_state
    sol = BlockSolvePass()(BlockSolveRequest(model, st.partition, st.groups, st.inputs,
                                             {g: n for g, n in removed["flap"].items() if g in st.groups},
                                             SolverConfig().damping, True,
                                             refit_ridge=RECORDED_RIDGE)).state
    emit("FLAP counts, OBS order + re-fit", ApplyPass()(RewriteRequest(model, graph, dict(sol.keep), {},
                                                                       dict(sol.new_weights))).state, t)
    t = time.perf_counter()  # structprune's counts, FLAP's order inside each group, the re-fit
    scores = ScorePass()(ScoreRequest(model, tuple(groups), "flap", flap.calibration)).state.per_unit
    keep = keep_in_order(groups, scores, {g.id: g.size - removed["structprune"][g.id] for g in groups})
    w = refit(model, graph, groups, keep, batches, SolverConfig(refit_ridge=RECORDED_RIDGE))
    emit("structprune counts, FLAP order + re-fit", ApplyPass()(RewriteRequest(model, graph, keep, {}, w)).state, t)

    t = time.perf_counter()  # no attention heads: MLP channels only, the same parameters removed
    mlp = [g for g in groups if g.kind == "mlp_channel"]
    shapes = graph.param_shapes
    share = prunable_params(tuple(groups), shapes) / prunable_params(tuple(mlp), shapes)
    r = sp.prune(model, batches, args.sparsity * share, kinds=["mlp_channel"],
                 solver=SolverConfig(block_energy=RECORDED_ENERGY, curve_error=RECORDED_CURVES,
                                     refit_ridge=RECORDED_RIDGE))
    emit("structprune, MLP channels only (same parameters removed)", r.model, t, tau=r.report.solver["tau"],
         removed_units={"flap": by_kind["flap"], "structprune": by_kind["structprune"]},
         removed_per_group={gid: [removed["flap"][gid], removed["structprune"][gid]] for gid in removed["flap"]})


def keep_in_order(groups, per_unit: dict, kept: dict) -> dict:
    """Each group's ``kept[g.id]`` units of highest ``per_unit`` score (another method's order, our counts)."""
    return {g.id: tuple(sorted(sorted(range(g.size), key=lambda u: -per_unit[g.id][u])[:kept[g.id]])) for g in groups}


def table(rows: list[dict]) -> str:
    lines = ["Development windows only (calibration: Austen unless the row says otherwise, 16 x 512; score: geometric "
             "mean of ppl / dense ppl over the two development domains).", "",
             "| probe | sparsity | run | tau | dev austen | dev pydoc | score | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run = r["run"] + (f" (calibration: {r['calib']})" if r.get("calib", "austen") != "austen" else "")
        if r.get("calib_samples", 16) != 16 and r["probe"] != "calib-size":  # its runs name their size
            run += f" ({r['calib_samples']} x 512)"
        tau = "-" if r.get("tau") is None else f"{r['tau']:g}"
        lines.append(f"| {r['probe']} | {r['sparsity']:.0%} | {run} | {tau} | {r['dev']['austen']:.2f} | "
                     f"{r['dev']['pydoc']:.2f} | {r['score']:.3f} | {r['seconds']} |")
    dense = rows[0]["dense_dev"] if rows else {}
    if dense:
        lines += ["", f"Dense: austen {dense['austen']:.2f}, pydoc {dense['pydoc']:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
