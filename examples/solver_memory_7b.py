"""Peak memory of the solver's matrix work at the width of LLaMA-2-7B's MLP (``down_proj``: in 11,008, out
4,096; 30% of its columns removed), H from 512 calibration tokens (rank-deficient, damped 0.01) in float32
statistics: the checked float32 re-fit, the re-fit redone in float64 (forced here with a tolerance of 0; the
32-layer run of ``scale_7b.py`` met it in 9 of its 64 re-fits), and H^-1 (the OBS inverse).

Each operation runs in a fresh process whose resident memory is sampled every 1 ms; the figure is the peak
over what the process held before the call (H, W and the kept columns: "extra"), in GiB. ``--obs FILE``
measures another version of ``passes/obs.py`` (e.g. ``git show REV:passes/obs.py > old_obs.py``) beside the
installed one, in the same run.

Run: ``python examples/solver_memory_7b.py [--obs old_obs.py --obs-label before]``; writes
``OUT/solver_memory_7b.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OPS = ("refit_float32", "refit_float64", "inverse")
CHILD = r'''
import importlib.util, json, os, sys, threading, time, ctypes, torch
ctypes.CDLL("libc.so.6").mallopt(-3, 131072)  # as the CLI: freed blocks leave the RSS
torch.set_num_threads(2)
source, op = sys.argv[1], sys.argv[2]
if source == "installed":
    import structprune_graph.passes.obs as obs
else:
    spec = importlib.util.spec_from_file_location("obs_under_test", source)
    obs = importlib.util.module_from_spec(spec)
    sys.modules["obs_under_test"] = obs
    spec.loader.exec_module(obs)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
n, out, tokens = 11008, 4096, 512
g = torch.Generator().manual_seed(0)
x = torch.randn(tokens, n, generator=g)  # (tokens, in)
h = obs.damped(x.T @ x, 0.01, inplace=True)  # (in, in) float32
del x
w = torch.randn(out, n, generator=g) * 0.02  # (out, in)
keep = torch.sort(torch.randperm(n, generator=g)[: int(0.7 * n)]).values
if op == "refit_float64":
    obs.FLOAT32_TOLERANCE = 0.0
base, peak, stop = rss(), [0], threading.Event()
def sample():
    while not stop.wait(0.001):
        peak[0] = max(peak[0], rss())
thread = threading.Thread(target=sample, daemon=True)
thread.start()
started = time.perf_counter()
result = obs._inverse(h) if op == "inverse" else obs.least_squares(w, h, keep)
seconds = time.perf_counter() - started
stop.set(); thread.join()
print(json.dumps({"op": op, "extra_gib": round((max(peak[0], rss()) - base) / 2**30, 3),
                  "seconds": round(seconds, 1), "h_gib": round(h.numel() * 4 / 2**30, 3)}))
'''


def measure(source: str, op: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, source, op], capture_output=True, text=True,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{op} ({source}) failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--obs", default=None, help="another passes/obs.py to measure beside the installed one")
    parser.add_argument("--obs-label", default="other", help="its name in the table")
    parser.add_argument("--out", default="examples/results")
    args = parser.parse_args()
    sources = ([(args.obs_label, str(Path(args.obs).resolve()))] if args.obs else []) + [("this version", "installed")]
    rows = [{"code": label, **measure(source, op)} for op in OPS for label, source in sources]
    out = Path(args.out)
    (out / "solver_memory_7b.json").write_text(json.dumps({"rows": rows}, indent=1))
    lines = ["| operation | code | peak beyond H and W (GiB) | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['code']} | {r['extra_gib']} | {r['seconds']} |" for r in rows]
    text = (f"H (11,008 x 11,008, float32) is {rows[0]['h_gib']} GiB; one run, alone on the 2 cores.\n\n"
            + "\n".join(lines) + "\n")
    (out / "solver_memory_7b.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
