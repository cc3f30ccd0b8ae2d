"""Peak memory against model size: structprune streaming a checkpoint vs taylor-global holding the model.

A family of LLaMA-shaped configs, width and depth grown together, from ~10M to ~1.5B parameters, random
init written to sharded safetensors first (never all in memory). Each (size, method) runs in a fresh
subprocess on the same calibration batches (random token ids: memory does not depend on the values):

- ``structprune``: ``prune_checkpoint`` reads blocks from the files, solves them, writes the pruned model
  block by block (the output is written and then deleted);
- ``taylor-global``: the model loaded with ``from_pretrained`` and pruned by ``prune(method="taylor-global")``
  (a full forward and backward: weights plus gradients in memory). Skipped where its predicted peak
  (16 bytes per parameter; 14.5 measured at 410M) would exceed ``--limit-gib`` or 90% of the memory
  available when its run starts.

For each run: peak RSS (``ru_maxrss``, the whole process), the baseline RSS after imports and a warm-up (a
tiny model traced and run forward and backward: the interpreter, torch, transformers and torch.export, the
same for every size), their difference (what the method uses: "net"), peak CUDA memory
on a GPU, and the time. The log-log slope of net peak memory against N is fitted per method. Writes
``OUT/memory_scaling.json``, ``.md`` and ``.png``.

The family's depth grows as width squared (L ~ d^2), so that a block holds ~sqrt(N) parameters: the regime
the O(sqrt N) claim is about. Real families grow depth more slowly (LLaMA 7B->65B: L 32->80, d 4096->8192),
where a block, and so structprune's peak, grows as ~N^0.8 instead; the peak follows the block, not N.

Run: ``python examples/memory_scaling.py [--out results] [--sizes 10M 35M ...] [--device cuda]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB = 8192
SPARSITY = 0.3
CALIB_BATCHES, CALIB_TOKENS = 4, 256
# glibc raises its mmap threshold after large frees and then serves blocks from a heap it rarely returns:
# freed blocks would stay in RSS. A fixed threshold returns them; every method runs with it.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    intermediate: int

    @property
    def heads(self) -> int:
        return self.hidden // 64

    def params(self) -> int:
        per_layer = 4 * self.hidden ** 2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + 2 * VOCAB * self.hidden + self.hidden


SIZES = (  # depth ~ width^2 (L / d^2 ~ 1.1e-4): blocks of ~sqrt(N) parameters
    Size("10M", 256, 8, 688),
    Size("35M", 384, 16, 1024),
    Size("110M", 512, 32, 1376),
    Size("410M", 768, 56, 2048),
    Size("1.5B", 1024, 118, 2752),
)


def config_of(size: Size):
    import transformers

    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=size.hidden, intermediate_size=size.intermediate,
                                    num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                    num_key_value_heads=size.heads, max_position_embeddings=2048,
                                    tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def write_checkpoint(size: Size, folder: Path, shard_bytes: int = 1 << 30) -> None:
    write_random_checkpoint(config_of(size), folder, shard_bytes)


def write_random_checkpoint(config, folder: Path, shard_bytes: int = 1 << 30, dtype=None, tokenizer=None) -> None:
    """Random-init weights (normal, std 0.02; norms 1) of a transformers config, written shard by shard in
    ``dtype`` (default fp32): at most one shard in memory."""
    import torch
    from safetensors.torch import save_file

    from structprune_graph.storage import atomic_folder

    dtype = dtype or torch.float32
    with torch.device("meta"):
        import transformers

        shapes = {n: tuple(p.shape) for n, p in transformers.LlamaForCausalLM(config).named_parameters()}
    with atomic_folder(folder, overwrite=False) as tmp:
        weight_map, shard, used, index = {}, {}, 0, 0
        for i, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(i)
            value = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            shard[name] = value.to(dtype)
            used += value.numel() * shard[name].element_size()
            if used >= shard_bytes or i == len(shapes) - 1:
                file = f"model-{index:05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({n: file for n in shard})
                shard, used, index = {}, 0, index + 1
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def calibration():
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (1, CALIB_TOKENS), generator=g)} for _ in range(CALIB_BATCHES)]


# peak bytes per parameter beyond the baseline: 14.5 measured for taylor-global at 410M (the fp32 weights,
# their gradients and the pruned copy); the guard uses 16 so that a run that cannot fit is not started
BYTES_PER_PARAM = {"taylor-global": 16}


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_up() -> None:
    """Load what every run loads lazily (torch.export, the autograd engine): a tiny model traced, run
    forward and backward. Its memory is the software stack's, the same at every size, and goes into the
    baseline rather than into a method's figure."""
    import torch
    import transformers

    import structprune_graph as sp

    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1))
    ids = torch.zeros(1, 8, dtype=torch.long)
    sp.trace(tiny, {"input_ids": ids})
    tiny(input_ids=ids, labels=ids).loss.backward()
    del tiny


def child(method: str, folder: Path, device: str) -> dict:
    """One measured run (in its own process)."""
    import torch
    import transformers  # noqa: F401 - imported before the baseline is taken

    import structprune_graph as sp
    from structprune_graph.checkpoint import prune_checkpoint
    from structprune_graph.solver import SolverConfig

    torch.set_num_threads(int(os.environ.get("SCALING_THREADS", "2")))
    need, available = BYTES_PER_PARAM.get(method, 0) * _params(folder), _available_bytes()
    if need > 0.9 * available:  # it would exceed the machine: stop the method here rather than be killed
        return {"method": method, "skipped": f"skipped: needs ~{need / 2**30:.0f} GiB, "
                                              f"{available / 2**30:.0f} GiB available"}
    batches = calibration()
    _warm_up()
    baseline = _rss_now()
    start = time.perf_counter()
    if method == "structprune":
        with tempfile.TemporaryDirectory(dir=folder.parent) as out:
            result = prune_checkpoint(folder, batches, SPARSITY, Path(out) / "pruned", device=device,
                                      solver=SolverConfig(tau_batches=1))
        before, after = result.report.params_before, result.report.params_after
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device)
        result = sp.prune(model, [{k: v.to(device) for k, v in b.items()} for b in batches], SPARSITY, method=method)
        before, after = result.report.params_before, result.report.params_after
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"method": method, "peak_rss": peak, "baseline_rss": baseline, "net_rss": peak - baseline,
            "peak_cuda": cuda, "seconds": round(seconds, 1), "params_before": before, "params_after": after}


def _measure(method: str, folder: Path, device: str) -> dict:
    """One run in a fresh subprocess; its JSON line, or the error it ended with."""
    proc = subprocess.run([sys.executable, __file__, "--device", device, "--child", method, str(folder)],
                          capture_output=True, text=True, env={**os.environ, **ALLOCATOR})
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode == 0 and last.startswith("{"):
        return json.loads(last)
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else ''}"}


def _params(folder: Path) -> int:
    from structprune_graph.streaming import empty_model

    return sum(p.numel() for p in empty_model(folder, meta_buffers=True).parameters())


def fit_exponent(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of log(memory) against log(N)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(m) for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fit_all(rows: list[dict], methods: list[str]) -> dict:
    """Per method: the exponent over every size it ran at, and over the sizes every method ran at."""
    measured = {m: {r["size"]: r for r in rows if r["method"] == m and "net_rss" in r["result"] and not r.get("extra")}
                for m in methods}
    common = set.intersection(*(set(v) for v in measured.values())) if measured else set()
    fits = {}
    for method, by_size in measured.items():
        for label, names in (("", list(by_size)), (" (common sizes)", sorted(common))):
            ok = [by_size[n] for n in names]
            if len(ok) >= 2 and (label == "" or len(common) < len(by_size)):
                fits[method + label] = {"net": fit_exponent([(r["params"], r["result"]["net_rss"]) for r in ok]),
                                        "total": fit_exponent([(r["params"], r["result"]["peak_rss"]) for r in ok]),
                                        "sizes": len(ok)}
    return fits


def regenerate(path: Path) -> None:
    """Table, fits and plot again from a finished run's JSON (no new measurement)."""
    data = json.loads(path.read_text())
    methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
    data["fits"] = fit_all(data["rows"], methods)
    path.write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text(table(data["rows"], data["fits"]))
    plot(data["rows"], path.with_suffix(".png"))
    print(table(data["rows"], data["fits"]))


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict], fits: dict) -> str:
    lines = ["| size | params | block params | fp32 weights GiB | method | peak RSS GiB | net GiB | peak CUDA GiB | "
             "weights / peak | time s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["result"]
        weights = r["params"] * 4
        cells = ([_gib(m["peak_rss"]), _gib(m["net_rss"]), _gib(m.get("peak_cuda")),
                  f"{weights / m['peak_rss']:.2f}x", f"{m['seconds']:.0f}"] if "peak_rss" in m
                 else [m.get("skipped") or m.get("error", "failed")[:80], "-", "-", "-", "-"])
        block = f"{r['block_params']:,}" if r.get("block_params") else "-"
        lines.append(f"| {r['size']} | {r['params']:,} | {block} | {_gib(weights)} | {r['method']} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for method, fit in fits.items():
        lines.append(f"- {method}: peak memory ~ N^{fit['net']:.2f} (net of the after-import RSS), "
                     f"N^{fit['total']:.2f} (whole process), over {fit['sizes']} sizes")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("structprune", "o"), ("taylor-global", "s")):
        pts = [(r["params"], r["result"]["net_rss"]) for r in rows
               if r["method"] == method and "net_rss" in r["result"] and not r.get("extra")]
        if pts:
            ax.loglog(*zip(*pts), marker=marker, label=f"{method} (net peak RSS)")
    sizes = sorted({r["params"] for r in rows if not r.get("extra")})
    ax.loglog(sizes, [4 * n for n in sizes], "k--", lw=0.8, label="fp32 weights (N x 4 B)")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("bytes")
    ax.legend(fontsize=8)
    ax.set_title("Peak memory of pruning 30% vs model size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--sizes", nargs="*", help=f"subset of {[s.name for s in SIZES]}")
    parser.add_argument("--methods", nargs="*", default=["structprune", "taylor-global"])
    parser.add_argument("--cache", default=None, help="where the random checkpoints are written (default: a temp dir)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--limit-gib", type=float, default=20.0, help="skip a run predicted to exceed this")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="NAME=FOLDER",
                        help="also measure these checkpoints (e.g. the cached SmolLM2); not in the fit")
    parser.add_argument("--from-json", help="rewrite the table, fits and plot of a finished run's JSON")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.device)))
        return
    if args.from_json:
        regenerate(Path(args.from_json))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="structprune-scaling-"))
    sizes = [s for s in SIZES if not args.sizes or s.name in args.sizes]
    rows = []
    for size in sizes:
        folder = cache / f"llama-{size.name}"
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            write_checkpoint(size, folder)
            print(f"wrote {folder} ({size.params():,} params) in {time.perf_counter() - t:.0f} s", flush=True)
        for method in args.methods:
            predicted = BYTES_PER_PARAM.get(method, 0) * size.params()
            row = {"size": size.name, "params": size.params(), "layers": size.layers, "hidden": size.hidden,
                   "block_params": (size.params() - 2 * VOCAB * size.hidden) // size.layers, "method": method}
            if predicted > args.limit_gib * 2**30:
                row["result"] = {"skipped": f"skipped: predicted {predicted / 2**30:.0f} GiB > {args.limit_gib:g}"}
            else:
                row["result"] = _measure(method, folder, args.device)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.keep_checkpoints and args.cache is None:
            shutil.rmtree(folder, ignore_errors=True)
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        for method in args.methods:
            rows.append({"size": name, "params": _params(Path(path)), "layers": None, "hidden": None, "block_params": None,
                         "method": method, "extra": True, "result": _measure(method, Path(path), args.device)})
            print(json.dumps(rows[-1]), flush=True)
    fits = fit_all(rows, args.methods)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "allocator_env": ALLOCATOR, "sparsity": SPARSITY,
            "calibration": f"{CALIB_BATCHES} x {CALIB_TOKENS} random tokens", "vocab": VOCAB,
            "sizes": [asdict(s) for s in sizes], "torch_threads": int(os.environ.get("SCALING_THREADS", "2"))}
    (out / "memory_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows, "fits": fits}, indent=1))
    (out / "memory_scaling.md").write_text(table(rows, fits))
    plot(rows, out / "memory_scaling.png")
    print(table(rows, fits))
    if args.cache is None and not args.keep_checkpoints:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
