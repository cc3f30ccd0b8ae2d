"""The ``structprune`` command line. Argument parsing lives here and nowhere else."""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import logging
import re
import sys
import threading
import time
from collections import Counter
from math import prod
from pathlib import Path
from typing import Optional, Sequence

from .errors import StructPruneError

DTYPES = ("stored", "float32", "bfloat16", "float16")  # --dtype: the working precision of streamed weights
# --refit-prior: the re-fit's prior text by default ("auto": windows sampled from the model wherever a re-fit
# runs on a model in memory), and how many windows of it. On SmolLM2 calibrated on Austen, 16 windows at weight
# 0.5 scored best on the development windows, and held out cut pydoc by 9-18% and code by 13-37% at 20-50%
# for 1-3% on Austen (docs/generalization.md, "Prior text in the re-fit"; docs section 4f)
DEFAULT_REFIT_PRIOR = "auto"
DEFAULT_PRIOR_SAMPLES = 16


def _inspect(args: argparse.Namespace) -> int:
    from .graph import trace
    from .models import example_inputs_for, load_model

    t0 = time.perf_counter()
    model = load_model(args.model)
    t1 = time.perf_counter()
    graph = trace(model, example_inputs_for(model), frontend=args.frontend)
    t2 = time.perf_counter()
    if args.json:
        print(json.dumps([{"id": g.id, "kind": g.kind, "size": g.size, "params_per_unit": g.params_per_unit,
                           "heads_per_unit": g.heads_per_unit, "prunable": g.prunable, "reason": g.reason,
                           "mask_exact": g.mask_exact, "members": [m.label for m in g.members]}
                          for g in graph.groups], indent=1))
        return 0
    width = max(len(g.id) for g in graph.groups) if graph.groups else 10
    print(f"{'group':<{width}}  {'kind':<14} {'units':>6} {'params/unit':>11} {'exact':>5}  prunable")
    for g in graph.groups:
        units = f"{g.size}" if g.kind != "kv_group" else f"{g.size}x{g.heads_per_unit}q"
        status = "yes" if g.prunable else f"no: {g.reason}"
        print(f"{g.id:<{width}}  {g.kind:<14} {units:>6} {g.params_per_unit:>11,} {'yes' if g.mask_exact else 'no':>5}  {status}")
    total = sum(prod(s) for s in graph.param_shapes.values())
    prunable = graph.prunable_param_count()
    kinds = Counter(g.kind for g in graph.prunable_groups)
    print(f"\n{type(model).__name__}: {total:,} parameters, {len(graph.fx_graph.nodes):,} graph nodes "
          f"({graph.captured.frontend}), {len(graph.groups)} groups, {len(graph.prunable_groups)} prunable "
          f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    print(f"parameters in prunable head/channel groups (excluding the hidden dim): {prunable:,} "
          f"({prunable / total:.1%})")
    if graph.unsupported:
        print(f"ops without a coupling rule (their groups are unprunable): {', '.join(graph.unsupported)}")
    print(f"load {t1 - t0:.1f} s, trace {t2 - t1:.1f} s")
    return 0


def _prune(args: argparse.Namespace) -> int:
    import torch

    from . import data
    from .evaluate import flops_per_token, perplexity
    from .models import load_model, load_tokenizer, source_file
    from .pruning import prune
    from .storage import check_output_dir, loads_with

    outs = _output_dirs(args)
    inputs = [p for p in (args.model, args.calib, args.eval, args.refit_prior) if p and Path(p).exists()]
    for out in outs:
        check_output_dir(out, args.overwrite, inputs)  # refuse before any model is loaded
    _check_texts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distributed and args.method != "structprune":
        raise StructPruneError(f"--distributed runs the structprune method only (got --method {args.method})")
    if (args.taylor_first is not None or args.obs_weighting) and args.method != "structprune":
        raise StructPruneError(f"--taylor-first and --obs-weighting choose structprune's order inside each layer; "
                               f"--method {args.method} ranks units by its own score (leave them out)")
    if _prior_source(args) and not (args.method == "structprune" or args.refit):
        raise StructPruneError(f"--refit-prior is text the least-squares re-fit fits, and --method {args.method} has "
                               f"no re-fit: add --refit, or use --method structprune (or --refit-prior none)")
    if args.refit_prior_scope and not (_prior_source(args) and args.method == "structprune"):
        raise StructPruneError(f"--refit-prior-scope chooses what structprune's prior text shapes, and this run has "
                               + ("no prior (--refit-prior none)" if not _prior_source(args) else
                                  f"--method {args.method}, whose selection is its own") + ": drop --refit-prior-scope")
    if _prior_source(args) and (args.stream or args.distributed):
        raise StructPruneError(f"--refit-prior is not supported with --{'stream' if args.stream else 'distributed'}; "
                               f"add --refit-prior none")
    t0 = time.perf_counter()
    rank = _init_distributed(args)
    if args.stream:
        return _prune_streamed(args, outs[0], t0, rank)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    batches, eval_windows = _calibration(args, tokenizer, model)
    sampled = time.perf_counter()
    prior = _prior_batches(args, tokenizer, model)
    prior_seconds = round(time.perf_counter() - sampled, 1)
    if rank == 0:
        print(f"calibration: {sum(len(b['input_ids']) for b in batches)} x {args.seqlen} tokens of "
              f"{args.calib or 'pydoc'}; evaluation: {len(eval_windows)} x {args.eval_seqlen} tokens of {args.eval or 'pydoc'}"
              + (f"; re-fit prior: {sum(len(b['input_ids']) for b in prior)} x {args.seqlen} tokens of "
                 f"{_prior_source(args)}" if prior else ""))
    ppl_before = None
    first = None  # several --sparsity values: the later ones reuse the first's trace and dense sweep
    for sparsity, out in zip(args.sparsity, outs):
        result = prune(model, batches, sparsity, args.method, solver=_solver_config(args), round_to=args.round_to,
                       uniform=args.uniform, distributed=args.distributed, kinds=args.kinds, reconstruct=args.refit,
                       refit_prior=prior, reuse=first)
        # what reuse= reads (trace, dense sweep, calibration), without the first model and its re-fitted weights
        first = first or dataclasses.replace(result, model=None, solution=None)
        if rank:  # every rank holds the result; rank 0 evaluates and writes it
            continue
        t_eval = time.perf_counter()  # after pruning: the model is unchanged, and other ranks never wait on it
        ppl_before = perplexity(model, eval_windows) if ppl_before is None else ppl_before
        ppl_after = perplexity(result.model, eval_windows)
        eval_s = time.perf_counter() - t_eval
        report = result.report.with_metrics(
            ppl_before=ppl_before, ppl_after=ppl_after, eval_data=str(args.eval or "pydoc (evaluation half)"),
            eval_windows=len(eval_windows), eval_seqlen=args.eval_seqlen,
            calib_tokens=sum(int(b['input_ids'].numel()) for b in batches),
            refit_prior=(f"{sum(int(b['input_ids'].numel()) for b in prior)} tokens of {_prior_source(args)}"
                         if prior else "none"), refit_prior_seconds=prior_seconds,
            flops_seqlen=128, flops_per_token_before=flops_per_token(model, 128),
            flops_per_token_after=flops_per_token(result.model, 128), eval_seconds=round(eval_s, 1),
            total_seconds=round(time.perf_counter() - t0, 1))  # since the start: the earlier sparsities included
        result = dataclasses.replace(result, report=report)
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out, overwrite=args.overwrite, tokenizer=tokenizer, source=source_file(args.model))
        r = result.report
        print(f"{args.method} at {sparsity:g}: removed {r.sparsity_achieved:.1%} of {r.prunable_params:,} prunable "
              f"parameters; params {r.params_before:,} -> {r.params_after:,}; ppl {ppl_before:.2f} -> {ppl_after:.2f}; "
              f"pruning {r.seconds:.1f} s, peak RSS {r.peak_rss_bytes / 2**30:.2f} GiB; total "
              f"{report.metrics['total_seconds']} s")
        print(f"wrote {out}/ (model.safetensors, plan.json, report.md, kept.png); it loads with {loads_with(out)}")
        if args.onnx:
            _export_and_report(result.model, out, Path(args.onnx))
        del result  # written: the next sparsity's solve does not hold it
    return 0


def _output_dirs(args: argparse.Namespace) -> list[Path]:
    """One output folder per --sparsity value: --out itself for one value (default
    ./pruned-MODEL-METHOD-SPARSITY), --out/sparsity-S for several (default ./pruned-MODEL-METHOD-S each).
    Several values are refused where one run cannot share its work between them (--stream, --distributed) and
    with --onnx (one file); a value given twice is refused."""
    values = list(args.sparsity)
    if len(set(values)) != len(values):
        raise StructPruneError(f"--sparsity {','.join(f'{v:g}' for v in values)} repeats a value; give each once")
    name = Path(str(args.model or "smollm2")).name
    if len(values) == 1:
        return [Path(args.out or f"pruned-{name}-{args.method}-{values[0]:g}")]
    for flag, given in (("--stream", args.stream), ("--distributed", args.distributed), ("--onnx", args.onnx)):
        if given:
            raise StructPruneError(f"several --sparsity values are solved in one process sharing the dense sweep, "
                                   f"which {flag} does not: give one --sparsity with {flag}"
                                   + (" (or export each folder: structprune export DIR --onnx FILE)"
                                      if flag == "--onnx" else ""))
    return [Path(args.out) / f"sparsity-{v:g}" if args.out else Path(f"pruned-{name}-{args.method}-{v:g}")
            for v in values]


def _init_distributed(args: argparse.Namespace) -> int:
    """This process's rank: 0 without --distributed; else the process group is set up from torchrun's
    environment (gloo on CPUs, NCCL with --device cuda) and torn down when the process exits."""
    if not args.distributed:
        return 0
    import atexit

    import torch.distributed as dist

    from .distributed import init_from_env

    collective = init_from_env(args.device)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return collective.rank


def _calib_sources(calib: Optional[str]) -> list[Optional[str]]:
    """``--calib`` as a list of sources: one source, or several joined by '+' (a path with a '+' in its
    name that exists is one source)."""
    if calib is None or Path(calib).exists() or "+" not in calib:
        return [calib]
    return [part or None for part in calib.split("+")]


def _check_texts(args: argparse.Namespace) -> None:
    """Before any model is loaded: calibration and evaluation files must be text, and ``self`` needs the
    model in memory."""
    for flag, value in [("--calib", c) for c in _calib_sources(args.calib)] + [("--eval", args.eval),
                                                                                ("--refit-prior", args.refit_prior)]:
        path = Path(value) if value else None
        if path is None or not path.exists():
            continue
        for file in ([path] if path.is_file() else sorted(path.glob("*.txt"))):
            head = file.read_bytes()[:65536]
            try:  # incremental: a multi-byte character cut at the end of the sample is fine
                codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
                if b"\0" in head:
                    raise UnicodeDecodeError("utf-8", head, head.index(b"\0"), head.index(b"\0") + 1, "NUL byte")
            except UnicodeDecodeError:
                raise StructPruneError(f"{flag} {file} is not UTF-8 text; give a .txt file or a folder of them") from None
    sources = _calib_sources(args.calib)
    if args.kl_rounds and args.method != "structprune":
        raise StructPruneError(f"--kl-rounds coordinates the blocks of structprune's solve; --method {args.method} has "
                               f"none: drop --kl-rounds or use --method structprune")
    if args.allocation is not None and args.method != "structprune":
        raise StructPruneError(f"--allocation spreads structprune's budget; --method {args.method} allocates its own: "
                               f"drop --allocation or use --method structprune")
    if args.token_cap is not None and args.method != "structprune" and not args.refit:
        raise StructPruneError(f"--token-cap caps the tokens of the solver's second moments; --method {args.method} "
                               f"without --refit computes none: drop --token-cap, add --refit or use --method "
                               f"structprune")
    if args.kl_exits != "residual" and not args.kl_rounds:
        raise StructPruneError(f"--kl-exits {args.kl_exits} chooses the layers the KL rounds move; add --kl-rounds N")
    if args.kl_rounds and (args.stream or args.distributed):
        raise StructPruneError("--kl-rounds runs on a model in memory in one process; drop --stream and --distributed "
                               "or --kl-rounds")
    if args.dtype != "stored" and not args.stream:
        raise StructPruneError(f"--dtype {args.dtype} sets the precision of streamed weights; add --stream (a model "
                               f"loaded whole keeps its own precision)")
    if args.stream and "self" in sources:
        raise StructPruneError("--calib self samples from the model, which --stream never loads whole; give "
                               "calibration text with --stream")
    if args.eval and Path(args.eval).exists() and any(
            c and Path(c).exists() and Path(c).resolve() == Path(args.eval).resolve() for c in sources):
        logging.getLogger(__name__).warning("--calib and --eval are the same file: the evaluation is not held out")


def _solver_config(args: argparse.Namespace):
    from .solver import SolverConfig

    weight = {} if args.refit_prior_weight is None else {"refit_prior_weight": args.refit_prior_weight}
    if args.refit_prior_scope is not None:
        weight["prior_scope"] = args.refit_prior_scope
    rounds = {"rounds": args.kl_rounds, "coordination": "kl", "kl_exits": args.kl_exits} if args.kl_rounds else {}
    given = {name: value for name, value in (("allocation", args.allocation), ("solve_precision", args.solve_precision),
                                             ("token_cap", args.token_cap))
             if value is not None}  # else SolverConfig's own
    return SolverConfig(memory_budget=args.memory_budget, statistics=args.statistics,
                        sensitivity_precision=args.gradient_precision, taylor_first=args.taylor_first,
                        obs_weighting=args.obs_weighting or "auto", **weight, **rounds, **given)


def _prior_source(args: argparse.Namespace) -> Optional[str]:
    """--refit-prior as given, None for 'none'; 'auto': 'self' where a re-fit runs on a model in memory
    (structprune, or --refit), else None."""
    if args.refit_prior == "auto":
        refits = args.method == "structprune" or args.refit
        return "self" if refits and not (args.stream or args.distributed) else None
    return None if args.refit_prior in (None, "none") else args.refit_prior


def _prior_batches(args: argparse.Namespace, tokenizer, model) -> Optional[list]:
    """The re-fit's prior text (--refit-prior): --refit-prior-samples windows of --seqlen tokens sampled from
    the model ('self') or read from a text, in batches of --batch-size; None without one."""
    from . import data

    source = _prior_source(args)
    if source is None:
        return None
    spec = data.WindowSpec(args.refit_prior_samples, args.seqlen, args.seed)
    windows = (data.self_generated(model, tokenizer, spec) if source == "self" else
               data.calibration_windows(data.tokenize(tokenizer, data.load_text(source, "calibration")), spec))
    return _batched(windows, args.batch_size)


def _batched(windows: "torch.Tensor", size: int) -> list:
    """(windows, seqlen) token ids -> model inputs of ``size`` windows each."""
    return [{"input_ids": windows[i: i + size]} for i in range(0, len(windows), size)]


def _calibration(args: argparse.Namespace, tokenizer, model=None) -> tuple[list, "torch.Tensor"]:
    """Calibration batches and evaluation windows. ``--calib A+B+...`` mixes sources uniformly (the same
    number of windows from each); ``self`` is text sampled from the model itself."""
    from . import data

    spec = data.WindowSpec(args.calib_samples, args.seqlen, args.seed)
    sources = _calib_sources(args.calib)
    parts = []
    for source in sources:
        if source == "self":  # never with --stream (refused in _check_texts)
            parts.append(data.self_generated(model, tokenizer, spec))
        else:
            parts.append(data.calibration_windows(data.tokenize(tokenizer, data.load_text(source, "calibration")),
                                                  spec))
    windows = parts[0] if len(parts) == 1 else data.mixed_windows(parts, args.calib_samples, args.seed)
    batches = _batched(windows, args.batch_size)
    eval_windows = data.evaluation_windows(data.tokenize(tokenizer, data.load_text(args.eval, "evaluation")),
                                           args.eval_seqlen, args.eval_windows)
    return batches, eval_windows


def _prune_streamed(args: argparse.Namespace, out: Path, t0: float, rank: int) -> int:
    """--stream: the checkpoint is never loaded whole; dense and pruned perplexity run block by block."""
    from .checkpoint import prune_checkpoint, streamed
    from .streaming import check_checkpoint
    from .evaluate import STAGE_LOG, perplexity
    from .models import checkpoint_folder, load_tokenizer

    if args.method != "structprune":
        raise StructPruneError(f"--stream runs the structprune method only (got --method {args.method})")
    _return_freed_memory()
    folder = checkpoint_folder(args.model)
    check_checkpoint(folder)  # a damaged config or shard is named before the tokenizer reads the config
    tokenizer = load_tokenizer(args.model)
    batches, eval_windows = _calibration(args, tokenizer)
    import torch

    dtype = None if args.dtype == "stored" else getattr(torch, args.dtype)
    if dtype in (torch.bfloat16, torch.float16) and args.device == "cpu":
        logging.getLogger(__name__).warning(
            "--dtype %s on a CPU: half-precision matrix products can be two orders of magnitude slower than "
            "float32 without native support; --dtype float32 is the CPU path (the output keeps the checkpoint's "
            "precision)", args.dtype)
    result = prune_checkpoint(folder, batches, args.sparsity[0], out, solver=_solver_config(args), device=args.device,
                              overwrite=args.overwrite, tokenizer=tokenizer, round_to=args.round_to,
                              uniform=args.uniform, distributed=args.distributed, dtype=dtype, kinds=args.kinds)
    if rank:  # rank 0 wrote the folder and evaluates it
        return 0
    started = time.perf_counter()
    with streamed(folder, args.device, dtype) as dense:
        ppl_before = perplexity(dense, eval_windows.to(args.device))
    logging.getLogger(__name__).info(STAGE_LOG, "evaluate dense", time.perf_counter() - started)
    started = time.perf_counter()
    with streamed(out, args.device, dtype) as pruned:
        ppl_after = perplexity(pruned, eval_windows.to(args.device))
    logging.getLogger(__name__).info(STAGE_LOG, "evaluate pruned", time.perf_counter() - started)
    r = result.report
    print(f"structprune (streamed from {folder}): removed {r.sparsity_achieved:.1%} of {r.prunable_params:,} prunable "
          f"parameters; params {r.params_before:,} -> {r.params_after:,}; ppl {ppl_before:.2f} -> {ppl_after:.2f}; "
          f"pruning {r.seconds:.1f} s, peak RSS {r.peak_rss_bytes / 2**30:.2f} GiB; "
          f"total {time.perf_counter() - t0:.1f} s")
    print(f"wrote {out}/ (one safetensors shard per block, plan.json, report.md); load it with structprune_graph.load()")
    return 0


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold after large frees and then keeps freed blocks in a heap it rarely
    returns, so dropped blocks would stay in RSS; a fixed threshold returns them (measured on a 110M model:
    peak 588 -> 266 MiB over the baseline). Set here, not in the library: the CLI owns its process."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _open_share(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a share of the re-fit's weight, in (0, 1), e.g. 0.5")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a share of each layer's units, in [0, 1], e.g. 0.25")
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a sparsity is a fraction in [0, 1), e.g. 0.3")
    return value


def _fractions(text: str) -> list[float]:
    """--sparsity: one fraction or several separated by commas (one argument, so that a MODEL given after it
    is never read as a sparsity)."""
    return [_fraction(part.strip()) for part in text.split(",")]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive whole number")
    return value


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use bytes or a number with KiB, MiB, GiB "
                                         f"(or KB, MB, GB), e.g. 2GiB")
    value = float(match.group(1)) * units[match.group(2)]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory budget must be positive")
    return int(value)


def _export_and_report(model, folder: Path, onnx_path: Path) -> None:
    from .exporters import export_onnx
    from .storage import example_inputs_of

    result = export_onnx(model, example_inputs_of(folder), onnx_path)
    print(f"wrote {result.path} ({result.file_bytes / 2**20:,.1f} MiB, opset {result.opset}, {result.seconds:.1f} s); "
          f"onnxruntime ({', '.join(result.providers)}) matches PyTorch on {len(result.checked_shapes)} input shapes, "
          f"max |diff| {result.max_abs_diff:.2g}")


def _export(args: argparse.Namespace) -> int:
    from .storage import load

    if not (args.onnx or args.onnx_decoder or args.gguf):
        raise ValueError("export: name a target, --onnx FILE, --onnx-decoder FILE and/or --gguf FILE")
    folder = Path(args.folder).resolve()
    for target in filter(None, (args.onnx, args.onnx_decoder, args.gguf)):
        path = Path(target).resolve()
        if path.exists() and folder in path.parents:  # never replace a file of the folder being exported
            raise ValueError(f"export: {target} is a file of {args.folder}; write the export elsewhere")
    model = load(args.folder)
    if args.onnx:
        _export_and_report(model, Path(args.folder), Path(args.onnx))
    if args.onnx_decoder:
        from .exporters.onnx_decoder import export_decoder

        result = export_decoder(model, args.onnx_decoder)
        print(f"wrote {result.path} ({result.file_bytes / 2**20:,.1f} MiB, KV heads per layer "
              f"{sorted(set(result.layout.kv_heads))}, {result.seconds:.1f} s); onnxruntime generates PyTorch's "
              f"{len(result.greedy_tokens)} greedy tokens with its cache, max |diff| {result.max_abs_diff:.2g}")
    if args.gguf:
        _export_gguf(model, Path(args.folder), args)
    return 0


def _export_gguf(model, folder: Path, args: argparse.Namespace) -> None:
    from .exporters.gguf import export_gguf, validate_gguf
    from .storage import source_of

    tokenizer = args.tokenizer
    if tokenizer is None:  # the source GGUF's own vocabulary when it was one, else the saved tokenizer
        source = source_of(folder)
        tokenizer = source if source is not None and source.suffix == ".gguf" else (
            folder / "tokenizer" if (folder / "tokenizer" / "tokenizer.json").is_file() else None)
    result = export_gguf(model, args.gguf, file_type=args.gguf_type, tokenizer=tokenizer)
    widths = sorted({(w.heads, w.kv_heads, w.ffn) for w in result.layers})
    print(f"wrote {result.path} ({result.file_bytes / 2**20:,.1f} MiB, {result.file_type}, llama.cpp architecture "
          f"'{result.architecture}', {len(widths)} distinct layer widths (heads, KV heads, MLP); tokenizer "
          f"{result.tokenizer}; {result.seconds:.1f} s)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("not run in llama.cpp: pip install 'structprune-graph[gguf]' to validate the file against PyTorch")
        return
    prompt = list(range(1, 33)) if args.prompt is None else _prompt_ids(args.prompt, folder)
    check = validate_gguf(result.path, model, prompt, steps=32, file_type=args.gguf_type)
    print(f"llama.cpp matches PyTorch: max |logit diff| {check.max_abs_diff:.2g} (tolerance {check.tolerance:.2g}) "
          f"on {len(prompt)} prompt tokens, same greedy tokens for {check.steps} steps")


def _prompt_ids(text: str, folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer").is_dir():
        raise ValueError(f"--prompt needs the tokenizer saved in {folder / 'tokenizer'}")
    return AutoTokenizer.from_pretrained(str(folder / "tokenizer"))(text)["input_ids"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description="Structured pruning through a traced "
                                     "dependency graph of coupled channel and head groups.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="trace a model and print its coupled groups")
    inspect.add_argument("model", nargs="?", default=None,
                         help="transformers folder, .gguf file, or 'smollm2' (default: the embedded SmolLM2-135M)")
    inspect.add_argument("--frontend", choices=("auto", "export", "fx"), default="auto")
    inspect.add_argument("--json", action="store_true", help="print the groups as JSON")
    inspect.set_defaults(func=_inspect)

    from .pruning import DEFAULT_METHOD, METHODS

    prune = sub.add_parser("prune", help="prune a language model and report its perplexity before and after")
    prune.add_argument("model", nargs="?", default=None, help="as for inspect (default: the embedded SmolLM2-135M)")
    prune.add_argument("--sparsity", type=_fractions, default=[0.3],
                       help="fraction of prunable parameters to remove; several, comma-separated (e.g. 0.2,0.3,0.5), "
                            "share one calibration, trace and dense sweep and write one folder each (--out DIR: "
                            "DIR/sparsity-S)")
    prune.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD)
    prune.add_argument("--calib", default=None, help="calibration text: .txt file, folder, 'pydoc' (default), "
                       "'self' (sampled from the model), 'wikitext2' or 'c4'; several joined by '+' are mixed "
                       "uniformly, e.g. emma.txt+self")
    prune.add_argument("--eval", default=None, help="evaluation text (default: the held-out pydoc half)")
    prune.add_argument("--calib-samples", type=_positive_int, default=32,
                       help="calibration windows (default 32; 64 pays at 50%% sparsity and above: README)")
    prune.add_argument("--seqlen", type=_positive_int, default=512, help="calibration window length")
    prune.add_argument("--batch-size", type=_positive_int, default=1, help="calibration windows per forward pass")
    prune.add_argument("--eval-seqlen", type=_positive_int, default=1024)
    prune.add_argument("--eval-windows", type=_positive_int, default=24, help="at most this many evaluation windows")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    prune.add_argument("--out", default=None, help="output folder (default: ./pruned-MODEL-METHOD-SPARSITY)")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prune.add_argument("--onnx", default=None, help="also export the pruned model to this ONNX file (validated)")
    prune.add_argument("--memory-budget", type=parse_bytes, default=None,
                       help="bytes the solver may hold at once (one block, two with ADMM, plus activations), "
                            "e.g. 2GiB; an error names the block when one does not fit (structprune)")
    prune.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                       help="group kinds to prune (default: every prunable kind but the opt-in 'hidden' and "
                            "'expert'); e.g. --kinds expert mlp_channel. `structprune inspect MODEL` lists them")
    prune.add_argument("--round-to", type=_positive_int, default=1, metavar="N",
                       help="every kept width a multiple of N channels (or the whole group), e.g. 8 or 64")
    prune.add_argument("--refit", action="store_true",
                       help="after another method chose the units (e.g. --method taylor-global), re-fit the layers "
                            "that read them by least squares, as structprune does (not with structprune or flap)")
    prune.add_argument("--uniform", action="store_true",
                       help="the same width in every layer of a kind: a config.json that stock from_pretrained "
                            "loads (LLaMA-family models)")
    prune.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where blocks are solved")
    prune.add_argument("--stream", action="store_true",
                       help="never load the model whole: read each block from the safetensors checkpoint when it "
                            "is needed and write the pruned model block by block (structprune)")
    prune.add_argument("--dtype", default="stored", choices=DTYPES,
                       help="--stream: the precision the weights are computed in (statistics: --statistics; the "
                            "output keeps the checkpoint's precision): 'stored' (default) as in the checkpoint, "
                            "bfloat16 or float16 to halve an fp32 checkpoint's memory on a GPU, float32 for a half-"
                            "precision checkpoint on a CPU (half-precision matrix products are up to 300x slower "
                            "on CPUs without native bf16)")
    prune.add_argument("--statistics", default="float32", choices=("float64", "float32"),
                       help="structprune: the precision of the solver's H, its inverse and the re-fit; float32 "
                            "(default) halves the solver's largest memory (0.9 GiB per H at a 7B MLP's width) with "
                            "its error checked and float64 redone where the check fails; float64 reproduces the "
                            "results recorded before 2026-12-04")
    prune.add_argument("--gradient-precision", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="structprune: the precision of the loss-gradient sweeps (block energies, Taylor and "
                            "Fisher scores); 'auto' (default) bfloat16 where the device multiplies it natively "
                            "(CUDA with bf16, a CPU with AVX512-BF16 or AMX), else float32")
    prune.add_argument("--solve-precision", default=None, choices=("auto", "float32", "bfloat16"),
                       help="structprune: the precision of the block solve's forwards (the dense block whose inputs "
                            "H sums, the pruned block whose output is the next block's input); H, its inverse and "
                            "the re-fit stay in --statistics; 'auto' bfloat16 where the device multiplies it "
                            "natively, else float32; default: SolverConfig.solve_precision's")
    prune.add_argument("--token-cap", type=float, default=None, metavar="C",
                       help="structprune: each token counts in the solver's second moments H with at most C times "
                            "the median token's energy (the attention sink's first tokens otherwise dominate some "
                            "layers' H); off by default (docs/structprune_solver.md, section 4i)")
    prune.add_argument("--allocation", choices=("softmax", "global-threshold", "uniform"), default=None,
                       help="structprune: how the budget is spread over the (layer, kind) cells: 'softmax' (default) "
                            "by their error energies, tau chosen on the masked calibration loss; 'global-threshold', "
                            "one threshold on every unit's marginal error per parameter, no tau search (on SmolLM2 "
                            "34-60 s less, equal held out at 30%%, lower at 50%%, higher at 20%%: "
                            "docs/generalization.md, 'The allocators on today's defaults'); 'uniform', the same "
                            "share of every cell")
    prune.add_argument("--taylor-first", type=_share, default=None, metavar="F",
                       help="structprune: up to F of each layer's units (channels, heads) leave by lowest first-order "
                            "Taylor saliency |w * dL/dw| (a backward sweep, block by block), any more by OBS "
                            "(default: 0.25 on a model that gives a loss, else 0)")
    prune.add_argument("--obs-weighting", choices=("none", "fisher"), default=None,
                       help="structprune: weight each output channel in the OBS error by the loss's mean squared "
                            "gradient there ('fisher', the default on a model that gives a loss) or not ('none')")
    prune.add_argument("--refit-prior", default=DEFAULT_REFIT_PRIOR, metavar="SOURCE",
                       help="broad text the least-squares re-fit also fits, so that it does not fit the calibration "
                            "text alone: 'self' (sampled from the model: no data needed), a .txt file, a folder or "
                            "'pydoc'; 'none' to fit the calibration text only; 'auto' (default): 'self' where a "
                            "re-fit runs on a model in memory (structprune or --refit; not --stream or "
                            "--distributed), else none. The OBS selection and its scores see it too "
                            "(--refit-prior-scope); the allocation sees the calibration text only "
                            "(docs/generalization.md, 'Prior text in the re-fit')")
    prune.add_argument("--refit-prior-samples", type=_positive_int, default=DEFAULT_PRIOR_SAMPLES, metavar="N",
                       help=f"windows of --seqlen tokens of the prior text (default {DEFAULT_PRIOR_SAMPLES})")
    prune.add_argument("--refit-prior-weight", type=_open_share, default=None, metavar="W",
                       help="the prior text's share of the re-fit per token, in (0, 1) (default 0.5)")
    prune.add_argument("--refit-prior-scope", choices=("scores", "selection", "refit"), default=None,
                       help="what the prior text shapes besides the re-fit: 'scores' (default), the OBS "
                            "selection's second moments and the Taylor and Fisher scores of the order inside each "
                            "layer (a second gradient sweep, on the prior windows); 'selection', the second moments "
                            "alone (the default until 2026-12-04); 'refit', nothing else (until 2026-12-03)")
    prune.add_argument("--kl-rounds", type=_positive_int, default=0, metavar="N",
                       help="structprune: after the block solve, N rounds that move every block's residual exit "
                            "(down_proj) along the gradient of the KL to the dense model's next-token distribution, "
                            "fitted on the calibration and prior windows and chosen on held-out ones "
                            "(docs/generalization.md, 'Coordination on the loss'; default 0: each round costs about 8 "
                            "forward passes)")
    prune.add_argument("--kl-exits", choices=("residual", "all"), default="residual",
                       help="the layers the --kl-rounds move: each block's residual exit (default) or every linear "
                            "layer of every block (the units kept stay kept)")
    prune.add_argument("--distributed", action="store_true",
                       help="one rank of a torchrun launch (torchrun --nproc-per-node K -m structprune_graph.cli "
                            "prune ... --distributed): each rank runs a share of the calibration windows, rank 0 "
                            "writes the output (structprune; gloo on CPUs, NCCL with --device cuda)")
    prune.set_defaults(func=_prune)

    export = sub.add_parser("export", help="export a pruned output folder to ONNX (validated with onnxruntime) "
                            "and/or GGUF (validated in llama.cpp when llama-cpp-python is installed)")
    export.add_argument("folder", help="a folder written by `structprune prune`")
    export.add_argument("--onnx", default=None, help="path of the .onnx file to write")
    export.add_argument("--onnx-decoder", default=None, help="path of an .onnx decoder with past/present key-value "
                        "inputs and outputs, for token-by-token generation (causal LMs; validated by a greedy generation)")
    export.add_argument("--gguf", default=None, help="path of the .gguf file to write (LLaMA-family models)")
    export.add_argument("--gguf-type", choices=("f32", "f16"), default="f16", help="GGUF weight type")
    export.add_argument("--tokenizer", default=None, help="GGUF vocabulary: a .gguf to copy it from, or a folder "
                        "with tokenizer.json (default: the source .gguf recorded in the folder, else its tokenizer/)")
    export.add_argument("--prompt", default=None, help="text whose tokens validate the GGUF file (default: ids 1-32)")
    export.set_defaults(func=_export)
    return parser


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that temporary output folders are removed (``atomic_folder``)."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_on_sigterm()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except Exception as err:  # one line for the user; the traceback only with --debug
        if args.debug:
            raise
        known = isinstance(err, (StructPruneError, OSError, ValueError))
        print(f"structprune: error: {err}" if known else f"structprune: error: {type(err).__name__}: {err} "
              f"(run again with --debug for the traceback and report it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
