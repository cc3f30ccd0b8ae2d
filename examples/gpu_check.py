"""The CUDA check of the streaming solver, prepared to run in one go on a lent GPU (a few minutes).

1. ``memory_scaling.py --device cuda`` on the sizes that fit the time: peak CUDA memory
   (``torch.cuda.max_memory_allocated``) and peak RSS per size and method, the fitted exponents.
2. The streamed pruning on CUDA equals the CPU one on a tiny checkpoint (same plan, weights within 1e-4).

Writes ``OUT/gpu_check.json`` (plus the scaling files); paste its summary into the README with the date.
Run: ``python examples/gpu_check.py [--out results/gpu] [--sizes 10M 35M 110M 410M]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def cuda_equals_cpu() -> dict:
    import transformers

    import structprune_graph as sp

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (2, 12), generator=g)} for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(config).save_pretrained(Path(tmp) / "ckpt")
        cpu = sp.prune_checkpoint(Path(tmp) / "ckpt", batches, 0.3, Path(tmp) / "cpu", device="cpu")
        gpu = sp.prune_checkpoint(Path(tmp) / "ckpt", batches, 0.3, Path(tmp) / "gpu", device="cuda")
        a, b = sp.load(Path(tmp) / "cpu").state_dict(), sp.load(Path(tmp) / "gpu").state_dict()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    return {"same_plan": cpu.plan.keep == gpu.plan.keep, "max_weight_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu")
    parser.add_argument("--sizes", nargs="*", default=["10M", "35M", "110M", "410M"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a machine with a GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    check = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), **cuda_equals_cpu()}
    print(json.dumps(check), flush=True)
    subprocess.run([sys.executable, str(Path(__file__).parent / "memory_scaling.py"), "--device", "cuda",
                    "--out", str(out), "--sizes", *args.sizes], check=True)
    check["seconds"] = round(time.perf_counter() - t, 1)
    (out / "gpu_check.json").write_text(json.dumps(check, indent=1))
    print((out / "memory_scaling.md").read_text())


if __name__ == "__main__":
    main()
