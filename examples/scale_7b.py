"""The headline at real scale (issue 16): `structprune prune DIR --stream` on a model with LLaMA-2-7B's exact
shapes (hidden 4096, 32 heads, MLP 11,008, vocabulary 32,000; 32 layers: 6.7B parameters, 27 GB of fp32
weights, more than this machine's 24 GiB of RAM), random init written shard by shard first.

The checkpoint gets a byte-level BPE tokenizer of 32,000 ids trained on pydoc's text (offline, seconds), so
that the command is exactly what a user runs: calibration windows from pydoc's calibration half, the
dense and pruned perplexity streamed on its evaluation half. The pruning runs in a child process (the
CLI's own ``main``) whose resident memory is sampled every 20 ms; the solver, the writer and the CLI log
one record per finished stage (``evaluate.STAGE_LOG``), so the peak of each stage is measured, not
estimated. Also measured: the whole process's peak (``ru_maxrss``), the memory after imports (the software
baseline), bytes the process read from storage (``/proc/self/io``; the page cache is dropped first when
the machine allows it), and each stage's wall time. The prediction of ``memory_model.streaming_peak``
(a formula in the block sizes) is written beside the measurement.

``--layers`` keeps the 7B block shapes with fewer layers (the peak does not depend on depth; time grows
linearly with it); ``--dtype bfloat16`` writes (and prunes) a bf16 copy.

Run: ``python examples/scale_7b.py --folder /big/disk/llama7b [--layers 32] [--dtype float32]``; rows are
appended to ``OUT/scale_7b.json`` and the table written to ``OUT/scale_7b.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
              vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # as the CLI sets it: freed blocks leave the RSS


def config_of(layers: int):
    import transformers

    return transformers.LlamaConfig(num_hidden_layers=layers, architectures=["LlamaForCausalLM"], **SHAPES)


def tokenizer_32k():
    """A byte-level BPE of 32,000 ids trained on pydoc's text (ships with Python)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from structprune_graph import data

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SHAPES["vocab_size"], special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([data.load_text("pydoc", "calibration")], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def write(folder: Path, layers: int, dtype: str) -> float:
    import torch

    from memory_scaling import write_random_checkpoint

    started = time.perf_counter()
    write_random_checkpoint(config_of(layers), folder, dtype=getattr(torch, dtype), tokenizer=tokenizer_32k())
    return time.perf_counter() - started


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])


def child(cli_args: list[str]) -> dict:
    """One measured CLI run in this process: stage records, RSS samples, the CLI's exit code."""
    import torch
    import transformers  # noqa: F401 - imported before the baseline is taken, as the CLI imports it

    from structprune_graph import cli
    from structprune_graph.evaluate import STAGE_LOG

    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", "2")))
    baseline, start, read0 = _rss(), time.perf_counter(), _read_bytes()
    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            samples.append((time.perf_counter() - start, _rss()))

    fallbacks: dict[str, int] = {}  # solver work redone in float64 (passes/obs.py logs each at INFO)

    class Stages(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == STAGE_LOG:
                marks.append((time.perf_counter() - start, str(record.args[0])))
            elif "redone in float64" in str(record.msg):
                what = next((k for k in ("re-fit", "Cholesky", "down-date") if k in str(record.msg)), "other")
                fallbacks[what] = fallbacks.get(what, 0) + 1

    handler = Stages(level=logging.INFO)
    root = logging.getLogger("structprune_graph")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        code = cli.main(cli_args)
    finally:
        stop.set()
        thread.join()
        root.removeHandler(handler)
    end = time.perf_counter() - start
    stages, previous = [], 0.0
    for t, name in marks + [(end, "rest (report, checks, exit)")]:
        inside = [r for s, r in samples if previous <= s <= t]
        stages.append({"stage": name, "seconds": round(t - previous, 1),
                       "peak_net_gib": round((max(inside) - baseline) / 2**30, 3) if inside else None})
        previous = t
    return {"exit": code, "seconds": round(end, 1), "baseline_gib": round(baseline / 2**30, 3),
            "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
            "read_gib": round((_read_bytes() - read0) / 2**30, 2), "stages": stages, "float64_fallbacks": fallbacks}


def _drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="where the checkpoint is written (kept for later runs)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the checkpoint")
    parser.add_argument("--work-dtype", choices=("stored", "float32", "bfloat16"), default="stored",
                        help="the CLI's --dtype: the precision the streamed weights are computed in")
    parser.add_argument("--statistics", choices=("float64", "float32"), default="float32",
                        help="the CLI's --statistics: the precision of the solver's H and its inverse")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--keep-output", action="store_true", help="keep the pruned folder (else deleted)")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--label", default="", help="what this run measures (shown in the table)")
    if sys.argv[1:2] == ["--child"]:  # the measured process: everything after it is the CLI's arguments
        return print(json.dumps(child(sys.argv[2:])))
    args = parser.parse_args()
    folder, out = Path(args.folder), Path(args.out)
    wrote = None
    if not (folder / "config.json").is_file():
        wrote = round(write(folder, args.layers, args.dtype), 1)
    import torch

    from structprune_graph.memory_model import streaming_peak

    pruned = folder.parent / f"{folder.name}-pruned"
    shutil.rmtree(pruned, ignore_errors=True)
    cli_args = ["prune", str(folder), "--stream", "--sparsity", str(args.sparsity), "--calib", "pydoc",
                "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen), "--eval", "pydoc",
                "--eval-windows", str(args.eval_windows), "--eval-seqlen", str(args.eval_seqlen), "--out", str(pruned),
                "--dtype", args.work_dtype, "--statistics", args.statistics]
    dropped = _drop_page_cache()
    proc = subprocess.run([sys.executable, __file__, "--child", *cli_args],
                          capture_output=True, text=True, env={**os.environ, **ALLOCATOR})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"the run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    row = json.loads(lines[-1])
    report = json.loads((pruned / "report.json").read_text()) if (pruned / "report.json").is_file() else {}
    work = getattr(torch, args.dtype if args.work_dtype == "stored" else args.work_dtype)
    row.update({"label": args.label, "layers": args.layers, "dtype": args.dtype, "sparsity": args.sparsity,
                "work_dtype": args.work_dtype, "statistics": args.statistics,
                "calibration": f"{args.calib_samples} x {args.seqlen}", "checkpoint_gib": round(
                    sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30, 2),
                "write_checkpoint_s": wrote, "page_cache_dropped": dropped,
                "cli_summary": next((ln for ln in proc.stdout.splitlines() if ln.startswith("structprune (")), ""),
                "params_before": report.get("params_before"), "params_after": report.get("params_after"),
                "pruned_ppl": report.get("ppl_after"), "dense_ppl": report.get("ppl_before"),
                "predicted": streaming_peak(folder, args.calib_samples * args.seqlen, args.seqlen, work,
                                            statistics=getattr(torch, args.statistics)).as_gib()})
    if not args.keep_output:
        shutil.rmtree(pruned, ignore_errors=True)
    path = out / "scale_7b.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows.append(row)
    path.write_text(json.dumps({"rows": rows}, indent=1))
    (out / "scale_7b.md").write_text(table(rows))
    print(table(rows))


def _fallbacks(row: dict) -> str:
    if "float64_fallbacks" not in row:
        return "not counted"
    return ", ".join(f"{k} {v}" for k, v in row["float64_fallbacks"].items()) or "none"


def table(rows: list[dict]) -> str:
    lines = ["| run | layers | checkpoint | weights computed in | statistics | GiB on disk | calibration | peak RSS GiB | "
             "baseline GiB | predicted net GiB | read GiB | total s | stages (s; net peak GiB) | redone in float64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = "; ".join(f"{s['stage']} {s['seconds']} ({s['peak_net_gib']})" for s in r["stages"])
        lines.append(f"| {r.get('label', '')} | {r['layers']} | {r['dtype']} | {r.get('work_dtype', 'stored')} | "
                     f"{r.get('statistics', 'float64')} | {r['checkpoint_gib']} | {r['calibration']} | {r['peak_gib']} | "
                     f"{r['baseline_gib']} | {r['predicted']['total_gib']} | {r['read_gib']} | {r['seconds']} | "
                     f"{stages} | {_fallbacks(r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
