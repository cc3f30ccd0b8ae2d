"""SmolLM2-135M pruned and run in llama.cpp (issue 14 item 3): dense, a per-layer pruning (``deci`` arrays),
the same with widths rounded to multiples of 64 channels, and a uniform one (``llama``), each written as
GGUF f32 and f16 and run with ``llama-cpp-python`` beside PyTorch: the largest logit difference on a pydoc
prompt, greedy agreement over 32 steps, the file size, and llama.cpp's prompt (prefill) and per-token
decode latency at batch 1, dense and pruned in the same run.

Needs ``pip install 'structprune-graph[gguf]'`` (builds llama.cpp). Run: ``python examples/gguf_llama_cpp.py
[--sparsity 0.3] [--method structprune] [--calib-samples 8] [--threads 2] [--out examples/results]``; writes
``OUT/gguf_llama_cpp.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _latency(path: Path, prompt: list[int], decode: int, repeats: int, threads: int) -> dict:
    """Median seconds of the prompt's evaluation and per decoded token (greedy, batch 1)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + decode + 8, n_batch=512, verbose=False,
                n_threads=threads, n_threads_batch=threads)
    prefill, per_token = [], []
    for _ in range(repeats):  # llama.cpp's defaults (f16 KV cache), as a user runs it
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(decode):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        per_token.append((time.perf_counter() - t) / decode)
    llm.close()
    return {"prefill_s": round(statistics.median(prefill), 4), "decode_ms_per_token":
            round(1000 * statistics.median(per_token), 2)}


def _default_cache_diff(path: Path, model, prompt: list[int], threads: int) -> float:
    """Largest logit difference from PyTorch with llama.cpp's default (f16) KV cache, which users run."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + 8, n_batch=512, logits_all=True, verbose=False,
                n_threads=threads)
    try:
        llm.eval(prompt)
        got = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))  # (tokens, vocab)
    finally:
        llm.close()
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0].float()  # (tokens, vocab)
    return float((got - want).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--method", default="structprune")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import structprune_graph as sp
    from structprune_graph import data, models
    from structprune_graph.exporters.gguf import export_gguf, validate_gguf

    model, tok = models.load_model(None), models.load_tokenizer(None)
    batches = data.calibration_batches(tok, "pydoc", args.calib_samples)
    prompt = data.tokenize(tok, data.load_text("pydoc", "evaluation"))[: args.prompt_tokens].tolist()
    variants, first = {"dense": model}, None
    for name, uniform, round_to in (("per-layer", False, 1), ("per-layer, round-to 64", False, 64),
                                    ("uniform", True, 1)):
        t = time.perf_counter()
        result = sp.prune(model, batches, args.sparsity, method=args.method, uniform=uniform, round_to=round_to,
                          reuse=first)
        first = first or result  # one dense sweep for both
        print(f"{name}: pruned in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        variants[name] = result.model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in variants.items():
            for file_type in ("f32", "f16"):
                written = export_gguf(m, Path(tmp) / f"{name}-{file_type}.gguf", file_type=file_type,
                                      tokenizer=models.smollm2_gguf())
                check = validate_gguf(written.path, m, prompt[:64], steps=32, file_type=file_type,
                                      threads=args.threads)
                timing = _latency(written.path, prompt, args.decode_tokens, args.repeats, args.threads)
                timing["f16_cache_logit_diff"] = float(f"{_default_cache_diff(written.path, m, prompt[:64], args.threads):.3g}")
                rows.append({"model": name, "file_type": file_type, "architecture": written.architecture,
                             "params": sum(p.numel() for p in m.parameters()), "file_mib": round(written.file_bytes / 2**20, 1),
                             "max_logit_diff": float(f"{check.max_abs_diff:.3g}"), "tolerance": float(f"{check.tolerance:.3g}"),
                             "greedy_steps_equal": check.steps, **timing})
                print(rows[-1], file=sys.stderr)
    dense = {r["file_type"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        d = dense[r["file_type"]]
        r["decode_speedup"] = round(d["decode_ms_per_token"] / r["decode_ms_per_token"], 3)
        r["prefill_speedup"] = round(d["prefill_s"] / r["prefill_s"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"sparsity": args.sparsity, "method": args.method, "calib": f"{args.calib_samples} x 512 pydoc",
            "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "threads": args.threads,
            "repeats": args.repeats}
    (out / "gguf_llama_cpp.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=1))
    lines = [f"# SmolLM2-135M in llama.cpp: dense vs {args.method} {args.sparsity:.0%} (GGUF)", "",
             f"Settings: {json.dumps(meta)}. Check (`validate_gguf`): a 64-token pydoc prompt, llama.cpp with an f32 KV "
             "cache vs PyTorch, and 32 greedy steps, all equal; the f16-cache column is the same prompt with "
             "llama.cpp's default cache. Latency: llama.cpp's defaults at batch 1, median of the repeats; speedups are "
             "against the dense file of the same type, measured in this run.", "",
             "| model | type | llama.cpp arch | params | file MiB | max logit diff, f32 cache (tol) | diff, f16 cache | "
             "greedy equal | prefill s | prefill speedup | decode ms/token | decode speedup |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['file_type']} | {r['architecture']} | {r['params']:,} | {r['file_mib']} | "
                     f"{r['max_logit_diff']:.2g} ({r['tolerance']:.2g}) | {r['f16_cache_logit_diff']:.2g} | "
                     f"{r['greedy_steps_equal']}/32 | {r['prefill_s']} | "
                     f"{r['prefill_speedup']}x | {r['decode_ms_per_token']} | {r['decode_speedup']}x |")
    (out / "gguf_llama_cpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
