"""Generalization protocol (issue 12): choose the solver's defaults on development windows, evaluate on
held-out windows of three domains, one of which plays no part in any choice.

Domains (SmolLM2-135M-Instruct, no BOS, windows of 1,024 tokens for evaluation):
- austen: calibration windows from the first 90% of *Emma* + *Sense and Sensibility*; development windows
  from their last 10%; evaluation on *Pride and Prejudice* (first 40,961 tokens, as llm_baselines.py).
- pydoc: calibration windows from the first 90% of pydoc's calibration half; development windows from its
  last 10%; evaluation on pydoc's evaluation half.
- code: Python standard-library source (a fixed list of modules that ship with Python): evaluation only,
  never used to choose anything.
- self: windows sampled from the model itself (top-p 0.95, from BOS); calibration only.
- pride-rest (``--sources pride-rest``, a bound, never a choice): calibration windows from the rest of *Pride and
  Prejudice*, after the tokens the Austen evaluation reads: the same book as the held-out text, other passages,
  so its rows say what the closest calibration text a user could have gives.

Phase A (development): structprune at ``--dev-sparsity`` for every calibration policy of
``--dev-sources`` (what a user with one text, Austen, could run: the text alone, ``self`` alone, or the
text mixed with ``self``) and every ridge of ``--ridges``; the (policy, ridge) with the lowest geometric
mean of (dev ppl / dense dev ppl) over the two development domains is chosen. Phase B (evaluation): for
each calibration source of ``--sources`` (``chosen`` is the chosen policy; ``mix`` is austen + pydoc +
self), structprune with the chosen ridge and with the previous default, and the ``--baselines``, at every
``--sparsities``, on the three evaluation domains. Every row is written to ``OUT/NAME.json`` as it is
measured, and the table to ``OUT/NAME.md``.

Phases A and B use the library's defaults; rows recorded before 2026-12-02 (evening) had the OBS curves
(``SolverConfig(curve_error="obs")``), those before the gradient energy the stream energy, and those before
2026-12-04 (afternoon) float64 statistics, those before 2026-12-04 (evening) float32 gradient sweeps. Phase C's
entries keep float64, the masked tau search on 8 batches and float32 gradient sweeps unless they name their own
(``...-float32-tau4-bf16`` is today's library defaults on a CPU with native bf16).

``--paired`` also records every evaluation window's loss, and the table gains each ratio to dense with its
95% interval over the windows (paired: both models see the same windows, so the windows' own difficulty
cancels), and a table of where structprune stands in each cell (its ratio to dense, then its paired ratio to
the lowest of the other methods of that cell); with ``--eval-windows 32`` it says which of the 4-window
figures a gap of a few percent can be trusted on. ``--dev-windows`` keeps the development windows apart from ``--eval-windows``. ``--compare-with
NAME ...`` pairs this run's rows against earlier ``--paired`` runs' rows of the same sparsity and
calibration (refused unless the dense model's window losses match exactly), so that a new setting needs
no re-run of the others. Phase C's ``...-priorN`` allocations fit the first N self-generated windows in the
re-fit beside the calibration text (``prune(refit_prior=...)``, weight 0.5 per token).

Run: ``python examples/generalization.py [--calib-samples 16] [--eval-windows 4] [--out examples/results]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared Torch-Pruning peer
import torch_pruning_peer as peer  # noqa: E402

EVAL_AUSTEN_TOKENS = 40961  # the Austen evaluation's tokens: the start of *Pride and Prejudice*
AUSTEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen"
CODE_MODULES = ("argparse", "dataclasses", "typing", "enum", "functools", "pathlib", "subprocess", "logging",
                "collections", "json.decoder", "email.message", "http.client")
OLD_RIDGE = 0.01  # the re-fit used the OBS damping before: the "before" rows
# phase C: how the budget is spread (issue 12, item 4); tau searched with or without the re-fit in the loop;
# blocks compared by their errors relative to the stream's energy (the rows measured before "gradient") or
# times the loss sensitivity at their output (block_energy="gradient", the default for a causal LM since)
# (the rows recorded before the removal curves became the default keep the OBS curves: curve_error="obs")
ALLOCATIONS = {"softmax-refit": dict(allocation="softmax", tau_search="refit", block_energy="stream", curve_error="obs"),
               "softmax-masked": dict(allocation="softmax", tau_search="masked", block_energy="stream", curve_error="obs"),
               "softmax-gradient": dict(allocation="softmax", tau_search="masked", block_energy="gradient",
                                        curve_error="obs"),
               "uniform": dict(allocation="uniform", block_energy="stream", curve_error="obs"),
               "global-threshold": dict(allocation="global-threshold", block_energy="stream", curve_error="obs"),
               "global-threshold-gradient": dict(allocation="global-threshold", block_energy="gradient",
                                                 curve_error="obs"),
               # the curves' error without the re-fit, or between (SolverConfig.curve_error; probes: --probe curve-error)
               "softmax-gradient-removal": dict(allocation="softmax", tau_search="masked", block_energy="gradient",
                                                curve_error="removal"),
               "softmax-gradient-blend": dict(allocation="softmax", tau_search="masked", block_energy="gradient",
                                              curve_error="blend"),
               # a free bias in the re-fit (SolverConfig.refit_bias; probes: --probe refit-bias)
               "softmax-gradient-removal-bias": dict(allocation="softmax", tau_search="masked", block_energy="gradient",
                                                     curve_error="removal", refit_bias="refit"),
               "softmax-gradient-removal-centred": dict(allocation="softmax", tau_search="masked",
                                                        block_energy="gradient", curve_error="removal",
                                                        refit_bias="centred"),
               # the order inside each group (SolverConfig.taylor_first, obs_weighting; probes: --probe order)
               "softmax-gradient-removal-obs": dict(allocation="softmax", tau_search="masked", block_energy="gradient",
                                                    curve_error="removal", taylor_first=0.0, obs_weighting="none"),
               "softmax-gradient-removal-taylor0.25-fisher": dict(allocation="softmax", tau_search="masked",
                                                                  block_energy="gradient", curve_error="removal",
                                                                  taylor_first=0.25, obs_weighting="fisher"),
               # the allocator's cap per group at sparsity + 0.2 (SolverConfig.prune_margin; --probe prune-margin)
               "softmax-gradient-removal-taylor0.25-fisher-margin0.2": dict(
                   allocation="softmax", tau_search="masked", block_energy="gradient", curve_error="removal",
                   taylor_first=0.25, obs_weighting="fisher", prune_margin=0.2)}
# the re-fit's prior text (prune(refit_prior=...); --probe refit-prior): the first N self-generated windows
# fitted beside the calibration text, with SolverConfig.refit_prior_weight per token
for _n in (8, 16):
    ALLOCATIONS[f"softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior{_n}"] = dict(
        ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2"], prior_samples=_n, refit_prior_weight=0.5,
        prior_scope="refit")  # as recorded: the prior in the re-fit alone
# the prior text in the OBS selection too, then in the order's scores too (SolverConfig.prior_scope; --probe
# refit-prior --prior-scopes selection scores)
for _scope in ("selection", "scores"):
    ALLOCATIONS[f"softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-{_scope}"] = dict(
        ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16"], prior_scope=_scope)
# KL coordination after the block solve (SolverConfig(coordination="kl"); --probe coordination): N rounds
for _r in (2, 3):
    ALLOCATIONS[f"softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-kl{_r}"] = dict(
        ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16"], rounds=_r, coordination="kl")
    # the same on today's defaults (the prior in the scores too)
    ALLOCATIONS[f"softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-kl{_r}"] = dict(
        ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores"], rounds=_r, coordination="kl")
# item 4 on today's defaults: the same solver with the budget spread uniformly, or by one global threshold on the
# marginal error per parameter (no tau search)
for _alloc in ("uniform", "global-threshold"):
    ALLOCATIONS[f"{_alloc}-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores"] = dict(
        ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores"], allocation=_alloc)


# the time bound (issue 12: pruning within 10x one calibration forward; examples/prune_time.py): today's
# defaults with the statistics in float32 (checked, redone in float64 where the check fails), the prior's
# sensitivity sweep on its first 8 windows (of 16), each tau scored on 4 calibration batches (of 8), or two of these
_DEFAULTS = ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores"]
for _label, _change in (("float32", dict(statistics="float32")), ("pscore8", dict(prior_score_batches=8)),
                        ("tau4", dict(tau_batches=4)), ("float32-tau4", dict(statistics="float32", tau_batches=4))):
    ALLOCATIONS[f"softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-{_label}"] = dict(_DEFAULTS,
                                                                                                      **_change)
# and the gradient sweeps' blocks in bf16 (SolverConfig.sensitivity_precision; "auto" picks it on a CPU with
# AVX512-BF16, as this one has)
ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4-bf16"] = dict(
    ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4"],
    sensitivity_precision="bfloat16")
# and the block solve's forwards in bf16 too (SolverConfig.solve_precision)
ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4-bf16-solvebf16"] = dict(
    ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4-bf16"],
    solve_precision="bfloat16")
# token rows capped in every H at C x the batch's median row energy (SolverConfig.token_cap)
_SOLVE_BF16 = "softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4-bf16-solvebf16"
for _cap in (10, 100):
    ALLOCATIONS[f"{_SOLVE_BF16}-cap{_cap}"] = dict(ALLOCATIONS[_SOLVE_BF16], token_cap=float(_cap))
# no prior text: the calibration text alone in the selection, the scores and the re-fit
ALLOCATIONS[_SOLVE_BF16.replace("prior16", "prior0")] = dict(ALLOCATIONS[_SOLVE_BF16], prior_samples=0)
# and half the prior windows: with --seqlen 1024 --calib-samples 16, the calibration and prior tokens of the
# defaults' 32 + 16 windows of 512 in windows as long as the evaluation's
ALLOCATIONS[_SOLVE_BF16.replace("prior16", "prior8")] = dict(ALLOCATIONS[_SOLVE_BF16], prior_samples=8)
# those defaults with N KL rounds (their backward sweep in bf16 too, SolverConfig.sensitivity_precision)
for _r in (3, 5, 6, 8):
    ALLOCATIONS[f"softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4-bf16-kl{_r}"] = dict(
        ALLOCATIONS["softmax-gradient-removal-taylor0.25-fisher-margin0.2-prior16-scores-float32-tau4-bf16"],
        rounds=_r, coordination="kl")


def code_text() -> str:
    import importlib

    texts = []
    for name in CODE_MODULES:
        module = importlib.import_module(name)
        texts.append(Path(module.__file__).read_text())
    return "\n\n".join(texts)


def split_tokens(tokens: torch.Tensor, dev_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(tokens.numel() * (1 - dev_fraction))
    return tokens[:cut], tokens[cut:]


def setup(args):
    from structprune_graph import data, models

    model, tok = models.load_model(None), models.load_tokenizer(None)
    austen = data.tokenize(tok, "\n\n".join((AUSTEN / n).read_text() for n in ("emma.txt", "sensesensibility.txt")))
    pydoc = data.tokenize(tok, data.load_text("pydoc", "calibration"))
    a_cal, a_dev = split_tokens(austen)
    p_cal, p_dev = split_tokens(pydoc)
    spec = data.WindowSpec(args.calib_samples, args.seqlen, 0)
    calib = {"austen": data.calibration_windows(a_cal, spec), "pydoc": data.calibration_windows(p_cal, spec)}
    pride = data.tokenize(tok, (AUSTEN / "prideprejudice.txt").read_text())
    if "pride-rest" in args.sources:  # a bound: the held-out book's other passages (module docstring)
        calib["pride-rest"] = data.calibration_windows(pride[EVAL_AUSTEN_TOKENS:], spec)
    if getattr(args, "self_calibration", True):  # sampling the model takes minutes per 16 windows: skippable
        self_path = Path(args.out) / f"self_calibration_{args.calib_samples}x{args.seqlen}.pt"
        if self_path.is_file():
            self_windows = torch.load(self_path)
        else:
            t = time.perf_counter()
            self_windows = data.self_generated(model, tok, spec, batch_size=16)
            print(f"self-generated {tuple(self_windows.shape)} in {time.perf_counter() - t:.0f} s", flush=True)
            torch.save(self_windows, self_path)
        calib["mix"] = data.mixed_windows([calib["austen"], calib["pydoc"], self_windows], args.calib_samples)
        calib["self"] = self_windows
        calib["austen+self"] = data.mixed_windows([calib["austen"], self_windows], args.calib_samples)
    dev_windows = getattr(args, "dev_windows", None) or args.eval_windows
    dev = {"austen": data.evaluation_windows(a_dev, 1024, dev_windows),
           "pydoc": data.evaluation_windows(p_dev, 1024, dev_windows)}
    evals = {"austen": data.evaluation_windows(pride[:EVAL_AUSTEN_TOKENS], 1024, args.eval_windows),
             "pydoc": data.evaluation_windows(data.tokenize(tok, data.load_text("pydoc", "evaluation")), 1024,
                                              args.eval_windows),
             "code": data.evaluation_windows(data.tokenize(tok, code_text()), 1024, args.eval_windows)}
    return model, calib, dev, evals


def ppl(model, windows) -> dict:
    from structprune_graph.evaluate import perplexity

    return {name: round(perplexity(model, w, progress=False), 3) for name, w in windows.items()}


def held_out(model, windows, paired: bool) -> dict:
    """The row's evaluation fields: {"eval": ppl per domain}, and with ``paired`` each window's loss too."""
    from structprune_graph.evaluate import window_losses

    if not paired:
        return {"eval": ppl(model, windows)}
    losses = {name: window_losses(model, w, progress=False) for name, w in windows.items()}
    return {"eval": {name: round(math.exp(sum(v) / len(v)), 3) for name, v in losses.items()},
            "eval_nll": {name: [round(x, 6) for x in v] for name, v in losses.items()}}


def dev_score(d: dict, dense: dict) -> float:
    """The development score: the geometric mean over the domains of ppl / dense ppl."""
    return math.exp(sum(math.log(d[k] / dense[k]) for k in d) / len(d))


def batches_of(windows):
    return [{"input_ids": windows[i: i + 1]} for i in range(len(windows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--dev-sparsity", type=float, default=0.3)
    parser.add_argument("--ridges", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--dev-sources", nargs="+", default=["austen"])
    parser.add_argument("--name", default="generalization", help="file name of the results (JSON and MD)")
    parser.add_argument("--summary", nargs="*", metavar="NAME",
                        help="only merge the results of earlier runs (names of OUT/NAME.json) into "
                             "OUT/generalization_summary.md: development scores, then every evaluation cell")
    parser.add_argument("--no-dev", action="store_true", help="skip phase A: the first --dev-sources and --ridges "
                        "are taken as given (a choice made by an earlier run)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--sources", nargs="+", default=["austen", "mix"])
    parser.add_argument("--baselines", nargs="*", default=["flap", "taylor-global"],
                        help="our baselines (magnitude, wanda-sp, flap, taylor-global; NAME+refit re-fits NAME's "
                             "keep-set) and the Torch-Pruning peers (" + ", ".join(peer.PEERS) + ")")
    parser.add_argument("--tau-batches", type=int, default=4)
    parser.add_argument("--allocations", nargs="*", default=[], choices=sorted(ALLOCATIONS),
                        help="phase C: structprune with each allocation on the --sources at every --sparsities "
                             "(chosen ridge), measured on the development and the evaluation windows")
    parser.add_argument("--no-structprune", action="store_true", help="phase B: the --baselines only")
    parser.add_argument("--paired", action="store_true", help="record every evaluation window's loss and "
                        "report each ratio to dense with its paired 95%% interval")
    parser.add_argument("--dev-windows", type=int, default=None, help="development windows per domain "
                        "(default: --eval-windows)")
    parser.add_argument("--compare-with", nargs="*", default=[], metavar="NAME",
                        help="with --paired: earlier runs (OUT/NAME.json, recorded with --paired on the same "
                             "evaluation windows: their dense rows must match this run's window by window) whose "
                             "rows this run's rows are paired against, as if measured in one run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import structprune_graph as sp
    from structprune_graph.solver import SolverConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summary is not None:
        runs = [json.loads((out / f"{name}.json").read_text())["rows"] for name in args.summary]
        (out / "generalization_summary.md").write_text(summary(runs))
        return print(summary(runs))
    rows: list[dict] = []
    path_json, path_md = out / f"{args.name}.json", out / f"{args.name}.md"

    earlier = [dict(r, run=name) for name in args.compare_with  # each row named by the run it came from
               for r in json.loads((out / f"{name}.json").read_text())["rows"]]

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        path_json.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        path_md.write_text(table(rows) + compared_table(rows, earlier))

    # sampling the model's own text takes minutes: only when a source uses it
    args.self_calibration = (any(s == "mix" or "self" in s for s in args.sources + args.dev_sources)
                             or any("prior_samples" in ALLOCATIONS[a] for a in args.allocations))
    model, calib, dev, evals = setup(args)
    emit({"phase": "dense", "method": "dense", "calib": "-", "sparsity": 0.0, "dev": ppl(model, dev),
          **held_out(model, evals, args.paired)})
    dense_dev = rows[0]["dev"]

    # Phase A: calibration policy and ridge, on development windows only
    scores = {}
    for source in args.dev_sources if not args.no_dev else ():
        first = None
        for ridge in args.ridges:
            t = time.perf_counter()
            config = SolverConfig(refit_ridge=ridge, tau_batches=args.tau_batches)
            result = sp.prune(model, batches_of(calib[source]), args.dev_sparsity, reuse=first, solver=config)
            first = first or result
            d = ppl(result.model, dev)
            scores[(source, ridge)] = dev_score(d, dense_dev)
            emit({"phase": "dev", "method": f"structprune ridge={ridge:g}", "calib": source,
                  "sparsity": args.dev_sparsity, "dev": d, "dev_score": round(scores[(source, ridge)], 4),
                  "tau": result.report.solver["tau"], "seconds": round(time.perf_counter() - t, 1)})
    chosen_source, chosen = min(scores, key=scores.get) if scores else (args.dev_sources[0], args.ridges[0])
    emit({"phase": "choice", "method": "chosen", "calib": chosen_source, "ridge": chosen,
          "scores": {f"{k[0]} ridge={k[1]:g}": v for k, v in scores.items()}})

    # Phase B: evaluation on three domains, the third never used for a choice
    ridges = [chosen] + ([OLD_RIDGE] if OLD_RIDGE != chosen else []) if not (args.allocations or args.no_structprune) else []
    for source in dict.fromkeys(chosen_source if s == "chosen" else s for s in args.sources):
        batches = batches_of(calib[source])
        first = None
        for s in args.sparsities:
            for ridge in ridges:
                t = time.perf_counter()
                config = SolverConfig(refit_ridge=ridge, tau_batches=args.tau_batches)
                result = sp.prune(model, batches, s, reuse=first, solver=config)
                first = first or result
                emit({"phase": "eval", "method": f"structprune ridge={ridge:g}" + (" (chosen)" if ridge == chosen else ""),
                      "calib": source, "sparsity": s, **held_out(result.model, evals, args.paired),
                      "tau": result.report.solver["tau"], "seconds": round(time.perf_counter() - t, 1)})
        if args.allocations:
            allocation_rows(model, batches, source, chosen, args, dev, evals, dense_dev, emit, calib.get("self"))
        grads = None  # the Torch-Pruning peers' Taylor gradients, once per calibration source
        for method in args.baselines:  # "NAME+refit": NAME's keep-set, re-fitted as structprune re-fits
            reuse, name = None, method.removesuffix("+refit")
            for s in args.sparsities:
                t = time.perf_counter()
                if method in peer.PEERS:
                    if "taylor" in method and grads is None:
                        grads = peer.calibration_gradients(model, batches)
                    pruned = peer.prune(model, batches, s, method, grads)
                else:
                    result = sp.prune(model, batches, s, method=name, reuse=reuse, reconstruct=method != name)
                    reuse, pruned = reuse or result, result.model
                seconds = round(time.perf_counter() - t, 1)
                d = ppl(pruned, dev)
                emit({"phase": "eval", "method": method, "calib": source, "sparsity": s, "dev": d,
                      "dev_score": round(dev_score(d, dense_dev), 4),
                      **held_out(pruned, evals, args.paired), "seconds": seconds})
    print(table(rows) + compared_table(rows, earlier))


def allocation_rows(model, batches, source, ridge, args, dev, evals, dense_dev, emit, self_windows=None) -> None:
    """Phase C: one structprune run per allocation and sparsity (the dense sweep shared), each measured on
    the development windows (where a default may be chosen) and the evaluation windows (reported only)."""
    import structprune_graph as sp
    from structprune_graph.solver import SolverConfig

    sweeps = {}  # one dense sweep per sweep settings (block energy, curve error, centred statistics)
    for s in args.sparsities:
        for name in args.allocations:
            t = time.perf_counter()
            # an entry recorded before SolverConfig.prune_margin was capped by max_prune alone, and still is
            # unless it names a margin; every entry was recorded with float64 statistics and the masked tau search
            # on 8 batches (the defaults until 2026-12-04), and the gradient sweeps in float32 (until 2026-12-04,
            # evening), and the block solve's forwards in float32 (until 2026-12-05), and keeps them unless it names
            # its own
            settings = dict(ALLOCATIONS[name])
            n_prior = settings.pop("prior_samples", 0)
            config = SolverConfig(refit_ridge=ridge, **{"prune_margin": None, "statistics": "float64", "tau_batches": 8,
                                                        "sensitivity_precision": "float32",
                                                        "solve_precision": "float32", **settings})
            sweep = tuple(sorted(config.sweep_settings().items()))  # runs with the same sweep settings share one
            prior = batches_of(self_windows[:n_prior]) if n_prior else None
            result = sp.prune(model, batches, s, reuse=sweeps.get(sweep), solver=config, refit_prior=prior)
            seconds = round(time.perf_counter() - t, 1)
            sweeps.setdefault(sweep, result)
            d = ppl(result.model, dev)
            emit({"phase": "eval", "method": f"structprune, {name}", "calib": source, "sparsity": s, "dev": d,
                  "dev_score": round(dev_score(d, dense_dev), 4),
                  **held_out(result.model, evals, args.paired), "tau": result.report.solver["tau"],
                  "tau_losses": {str(k): round(v, 4) for k, v in result.report.solver["tau_losses"].items()},
                  **({"best_round": result.report.solver["admm_best_round"],
                      "held_kl": result.report.solver["admm_output_errors"]} if config.rounds else {}),
                  "seconds": seconds})


CALIB_ORDER = {"austen": 0, "austen+self": 1, "self": 2, "pydoc": 3, "mix": 4, "pride-rest": 5}


def summary(runs: list[list[dict]]) -> str:
    """Several runs' rows in two tables; the dense row of the first run (every run measures the same)."""
    dense = runs[0][0]
    dev = {(r["calib"], r["method"]): r for rows in runs for r in rows if r["phase"] == "dev"}
    lines = ["Development (score: geometric mean over the two domains of ppl / dense ppl):", "",
             "| calibration | re-fit ridge | dev austen | dev pydoc | score |", "|---|---|---|---|---|",
             f"| dense | - | {dense['dev']['austen']:.2f} | {dense['dev']['pydoc']:.2f} | 1.00 |"]
    for (calib, method), r in sorted(dev.items()):
        lines.append(f"| {calib} | {method.split('=')[1]} | {r['dev']['austen']:.2f} | {r['dev']['pydoc']:.2f} | "
                     f"{r['dev_score']:.2f} |")
    cells = {(r["sparsity"], r["calib"], r["method"].replace(" (chosen)", "")): r["eval"]
             for rows in runs for r in rows if r["phase"] == "eval"}
    d = dense["eval"]
    lines += ["", "Evaluation (held-out windows; `code` played no part in any choice):", "",
              "| sparsity | calibration | method | austen | pydoc | code | austen / dense | pydoc / dense | "
              "code / dense |", "|---|---|---|---|---|---|---|---|---|",
              f"| 0% | - | dense | {d['austen']:.2f} | {d['pydoc']:.2f} | {d['code']:.2f} | 1.00 | 1.00 | 1.00 |"]
    for (s, calib, method), e in sorted(cells.items(), key=lambda kv: (kv[0][0], CALIB_ORDER.get(kv[0][1], 9), kv[0][2])):
        name = method.replace("structprune ridge=", "structprune, ridge ")
        lines.append(f"| {s:.0%} | {calib} | {name} | {e['austen']:.2f} | {e['pydoc']:.2f} | {e['code']:.2f} | "
                     f"{e['austen'] / d['austen']:.2f} | {e['pydoc'] / d['pydoc']:.2f} | {e['code'] / d['code']:.2f} |")
    alloc = [r for rows in runs for r in rows if r["phase"] == "eval" and "dev_score" in r]
    if alloc:
        lines += ["", "Allocation (structprune, one dense sweep; baselines measured on the development windows too; "
                  "dev score as above):", "",
                  "| sparsity | calibration | allocation | tau | dev austen | dev pydoc | dev score | austen | pydoc | "
                  "code | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in alloc:
            e = r["eval"]
            label = r["method"].split(", ")[1] if ", " in r["method"] else r["method"]  # a baseline: its name
            lines.append(f"| {r['sparsity']:.0%} | {r['calib']} | {label} | {r.get('tau', '-')} | "
                         f"{r['dev']['austen']:.2f} | {r['dev']['pydoc']:.2f} | {r['dev_score']:.2f} | "
                         f"{e['austen']:.2f} | {e['pydoc']:.2f} | {e['code']:.2f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict]) -> str:
    """Each row with per-window losses: ppl / dense with its 95% interval over the windows, per domain."""
    from structprune_graph.evaluate import paired_ratio

    dense = next((r for r in rows if r["method"] == "dense" and "eval_nll" in r), None)
    measured = [r for r in rows if r["phase"] == "eval" and "eval_nll" in r]
    if dense is None or not measured:
        return ""
    domains = list(dense["eval_nll"])
    lines = ["", f"Paired ratios to dense on the evaluation windows ({len(dense['eval_nll'][domains[0]])} per domain; "
             "95% interval over the windows):", "",
             "| sparsity | calibration | method | " + " | ".join(f"{d} / dense" for d in domains) + " |",
             "|---|---|---|" + "---|" * len(domains)]
    for r in sorted(measured, key=lambda r: (r["sparsity"], r["calib"], r["method"])):
        cells = []
        for d in domains:
            ratio, low, high = paired_ratio(r["eval_nll"][d], dense["eval_nll"][d])
            cells.append(f"{ratio:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"| {r['sparsity']:.0%} | {r['calib']} | {r['method']} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for a in measured for b in measured if a["method"].startswith("structprune")
             and not b["method"].startswith("structprune") and (a["sparsity"], a["calib"]) == (b["sparsity"], b["calib"])]
    if pairs:  # below 1 with the interval below 1: structprune lower on those windows beyond their spread
        lines += ["", "structprune against each other method, paired on the same windows (ppl ratio, 95% interval):",
                  "", "| sparsity | calibration | ratio | " + " | ".join(domains) + " |",
                  "|---|---|---|" + "---|" * len(domains)]
        for a, b in pairs:
            cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(a["eval_nll"][d], b["eval_nll"][d])) for d in domains]
            lines.append(f"| {a['sparsity']:.0%} | {a['calib']} | {a['method']} / {b['method']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compared_table(rows: list[dict], earlier: list[dict]) -> str:
    """This run's rows paired against earlier runs' rows of the same sparsity and calibration, window by
    window; refused unless every run's dense model read the same windows with the same losses."""
    from structprune_graph.evaluate import paired_ratio

    if not earlier:
        return ""
    dense = next((r for r in rows if r["method"] == "dense" and "eval_nll" in r), None)
    theirs = [r for r in earlier if r["method"] == "dense" and "eval_nll" in r]
    if dense is None or not theirs or any(r["eval_nll"] != dense["eval_nll"] for r in theirs):
        raise SystemExit("--compare-with: an earlier run's dense losses differ from this run's (other windows or "
                         "another model): pair only runs recorded with --paired on the same evaluation windows")
    domains = list(dense["eval_nll"])
    ours = [r for r in rows if r["phase"] == "eval" and "eval_nll" in r]
    others = [r for r in earlier if r["phase"] == "eval" and "eval_nll" in r]
    lines = ["", "This run's rows against earlier runs' rows (--compare-with), paired on the same windows (ppl "
             "ratio, 95% interval):", "", "| sparsity | calibration | ratio | " + " | ".join(domains) + " |",
             "|---|---|---|" + "---|" * len(domains)]
    for a in ours:
        for b in others:
            if (a["sparsity"], a["calib"]) == (b["sparsity"], b["calib"]):
                cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*paired_ratio(a["eval_nll"][d], b["eval_nll"][d]))
                         for d in domains]
                theirs_name = f"{_short(b['method'])} ({b['run']})" if "run" in b else _short(b["method"])
                lines.append(f"| {a['sparsity']:.0%} | {a['calib']} | {_short(a['method'])} / {theirs_name} | "
                             + " | ".join(cells) + " |")
    if any(_short(r["method"]) != r["method"] for r in ours + others):
        lines += ["", f"(structprune's entries without their common prefix: \"...\" stands for \"{_ENTRY_PREFIX}\")"]
    return "\n".join(lines) + "\n"


# the prefix every recent allocation entry shares, shortened in the paired table (its lines ran to 300+
# characters with two full entry names)
_ENTRY_PREFIX = "softmax-gradient-removal-taylor0.25-fisher-margin0.2-"


def _short(method: str) -> str:
    return method.replace(_ENTRY_PREFIX, "...")


PEER_NAMES = {"magnitude": "magnitude", "wanda-sp": "Wanda-sp", "flap": "FLAP", "taylor-global": "global Taylor",
              "tp-magnitude-local": "TP local magnitude", "tp-magnitude-global": "TP global magnitude",
              "tp-taylor-local": "TP local Taylor", "tp-taylor-global": "TP global Taylor"}


def standing_table(rows: list[dict]) -> str:
    """One cell per (sparsity, calibration, domain): structprune's ppl / dense, then its paired ratio (95%
    interval) to the method of that cell with the lowest perplexity among all the others in these rows; bold
    where structprune is lowest beyond the windows' spread (the interval's upper end below 1)."""
    from structprune_graph.evaluate import paired_ratio

    dense = next((r for r in rows if r["method"] == "dense" and "eval_nll" in r), None)
    measured = [r for r in rows if r["phase"] == "eval" and "eval_nll" in r]
    ours = [r for r in measured if r["method"].startswith("structprune")]
    if dense is None or not ours:
        return ""
    domains = list(dense["eval_nll"])
    lines = ["", "Where structprune stands (ppl / dense; then its paired ratio to the lowest other method of the "
             "cell, 95% interval over the windows; bold: lower beyond the spread):", "",
             "| sparsity | calibration | method | " + " | ".join(domains) + " |", "|---|---|---|" + "---|" * len(domains)]
    wins = cells = 0
    for a in sorted(ours, key=lambda r: (r["sparsity"], CALIB_ORDER.get(r["calib"], 9), r["method"])):
        others = [b for b in measured if not b["method"].startswith("structprune")
                  and (b["sparsity"], b["calib"]) == (a["sparsity"], a["calib"])]
        parts = []
        for d in domains:
            text = f"{a['eval'][d] / dense['eval'][d]:.2f}x"
            if others:
                best = min(others, key=lambda b: b["eval"][d])
                ratio, low, high = paired_ratio(a["eval_nll"][d], best["eval_nll"][d])
                pair = f"{ratio:.3f} [{low:.3f}, {high:.3f}]"
                cells, wins = cells + 1, wins + (high < 1)
                text += f"; {f'**{pair}**' if high < 1 else pair} ({PEER_NAMES.get(best['method'], best['method'])})"
            parts.append(text)
        lines.append(f"| {a['sparsity']:.0%} | {a['calib']} | {a['method']} | " + " | ".join(parts) + " |")
    lines += ["", f"structprune lower than every other method beyond the spread in {wins} of {cells} cells."]
    return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
    return summary([rows]) + standing_table(rows) + paired_table(rows)


if __name__ == "__main__":
    sys.exit(main())
