"""Token-by-token generation in onnxruntime, dense vs pruned SmolLM2-135M (issue 14 item 4): each model exported
as a decoder with past/present key-value tensors (``exporters/onnx_decoder.py``, validated by a greedy
generation against PyTorch), then timed at batch 1: the prefill of a 128- and a 512-token pydoc prefix and
the per-token decode latency of the next ``--decode-tokens`` tokens after each, median of ``--repeats``.
Pruned: FLAP at each ``--sparsities`` (fast to calibrate; the speed depends on the widths, not the method),
free widths and ``--round-to 64``. Ideal decode speedup: the ratio of parameters (decode at batch 1 reads
every weight once per token).

Run: ``python examples/onnx_decode.py [--sparsities 0.3 0.5] [--threads 2] [--out examples/results]``;
writes ``OUT/onnx_decode.json`` and ``.md``.
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


def _timings(generator, prefix: list[int], decode: int, repeats: int) -> dict:
    prefill, per_token = [], []
    for _ in range(repeats):
        past = [t.numpy() for t in generator.layout.empty()]
        t = time.perf_counter()
        logits, past = generator.step(np.array([prefix], dtype=np.int64), past)
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(decode):
            logits, past = generator.step(np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64), past)
        per_token.append((time.perf_counter() - t) / decode)
    return {"prefill_ms": round(1000 * statistics.median(prefill), 1),
            "decode_ms_per_token": round(1000 * statistics.median(per_token), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--prefixes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import structprune_graph as sp
    from structprune_graph import data, models
    from structprune_graph.exporters.onnx_decoder import OnnxGenerator, export_decoder

    model, tok = models.load_model(None), models.load_tokenizer(None)
    batches = data.calibration_batches(tok, "pydoc", args.calib_samples)
    text = data.tokenize(tok, data.load_text("pydoc", "evaluation")).tolist()
    variants = {"dense": model}
    first = None
    for s in args.sparsities:
        for round_to in (1, 64):
            result = sp.prune(model, batches, s, method="flap", round_to=round_to, reuse=first)
            first = first or result
            variants[f"flap {s:.0%}" + (f", round-to {round_to}" if round_to > 1 else "")] = result.model
    dense_params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in variants.items():
            written = export_decoder(m, Path(tmp) / "decoder.onnx", prompt=text[:32], steps=16)
            generator = OnnxGenerator(written.path, written.layout, threads=args.threads)
            params = sum(p.numel() for p in m.parameters())
            row = {"model": name, "params": params, "ideal_decode_speedup": round(dense_params / params, 3),
                   "greedy_tokens_equal": len(written.greedy_tokens), "max_abs_diff": float(f"{written.max_abs_diff:.3g}"),
                   "kv_heads": sorted(set(written.layout.kv_heads))}
            for prefix in args.prefixes:
                for key, value in _timings(generator, text[:prefix], args.decode_tokens, args.repeats).items():
                    row[f"{key}@{prefix}"] = value
            rows.append(row)
            print(row, file=sys.stderr)
    dense = rows[0]
    for r in rows:
        for prefix in args.prefixes:
            r[f"decode_speedup@{prefix}"] = round(dense[f"decode_ms_per_token@{prefix}"] / r[f"decode_ms_per_token@{prefix}"], 3)
            r[f"prefill_speedup@{prefix}"] = round(dense[f"prefill_ms@{prefix}"] / r[f"prefill_ms@{prefix}"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"threads": args.threads, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                "calib": f"{args.calib_samples} x 512 pydoc", "batch": 1}
    (out / "onnx_decode.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    head = ["model", "params", "KV heads", "greedy equal"]
    for prefix in args.prefixes:
        head += [f"prefill ms @{prefix}", f"prefill speedup @{prefix}", f"decode ms/token @{prefix}",
                 f"decode speedup @{prefix}"]
    lines = ["# Generation in onnxruntime with a KV cache: SmolLM2-135M dense vs FLAP-pruned", "",
             f"Settings: {json.dumps(settings)}. Every decoder passed `validate_decoder` (16 greedy tokens equal to "
             "PyTorch's with a cache; logits and presents within 1e-4). Speedups against the dense decoder in the "
             "same run; the ideal decode speedup is the parameter ratio.", "",
             "| " + " | ".join(head + ["ideal decode speedup"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", str(r["kv_heads"]), f"{r['greedy_tokens_equal']}/16"]
        for prefix in args.prefixes:
            cells += [str(r[f"prefill_ms@{prefix}"]), f"{r[f'prefill_speedup@{prefix}']}x",
                      str(r[f"decode_ms_per_token@{prefix}"]), f"{r[f'decode_speedup@{prefix}']}x"]
        lines.append("| " + " | ".join(cells + [f"{r['ideal_decode_speedup']}x"]) + " |")
    (out / "onnx_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
