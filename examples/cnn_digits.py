"""Real weights, CNN: a small residual CNN trained in-process on scikit-learn's digits, pruned 50% by each
method, test accuracy before and after, with and without reconstruction; over several training seeds.

The CNN (stem conv, a residual block, a strided conv, a second residual block, global pooling, linear head)
trains in seconds on 8x8 digits (70% train / 30% test, stratified). Every method gets the same 512 training
images as calibration, no labels: taylor-global's loss is the cross-entropy against the dense model's own
predictions. Methods: structprune (block-wise OBS + least squares on unfolded conv patches), structprune
without reconstruction (masks only), wanda-sp, magnitude, taylor-global, the same three followed by
structprune's least-squares re-fit (``prune(..., reconstruct=True)``: selection and reconstruction
measured apart), and Torch-Pruning (L2 magnitude, ``MetaPruner``) at the channel ratio whose parameter
count is closest to structprune's (its ratio is per channel; conv parameters shrink with its square). Writes ``OUT/cnn_digits.json`` and ``.md``.

Run: ``pip install -e ".[test,bench]" && python examples/cnn_digits.py [--out results] [--seeds 3]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import structprune_graph as sp
from structprune_graph.evaluate import count_params
from structprune_graph.solver import SolverConfig

SPARSITY = 0.5
WIDTH = 32


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class DigitsCNN(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = Residual(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = Residual(2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, 8, 8) -> (batch, 10)
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def data(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.3, stratify=digits.target, random_state=seed)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 30) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i: i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def torch_pruning(model: nn.Module, example: torch.Tensor, target_params: int) -> tuple[nn.Module, float]:
    """Torch-Pruning at the channel ratio whose parameter count is closest to ``target_params``."""
    import torch_pruning as tp

    best = None
    for ratio in [r / 100 for r in range(5, 80, 5)]:
        pruned = copy.deepcopy(model)
        tp.pruner.MetaPruner(pruned, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                             ignored_layers=[pruned.head]).step()
        gap = abs(count_params(pruned) - target_params)
        if best is None or gap < best[0]:
            best = (gap, pruned, ratio)
    return best[1], best[2]


def run_seed(seed: int) -> list[dict]:
    x_train, y_train, x_test, y_test = data(seed)
    dense = train(x_train, y_train, seed)
    calib = [x_train[i: i + 64] for i in range(0, 512, 64)]
    rows = [{"seed": seed, "method": "dense", "accuracy": accuracy(dense, x_test, y_test), "params": count_params(dense)}]

    def self_distillation(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = dense(batch).argmax(1)
        return nn.functional.cross_entropy(model(batch), target)

    runs = {
        "structprune": lambda: sp.prune(dense, calib, SPARSITY, method="structprune").model,
        # the allocator's cap per group as it was until 2026-12-03 (max_prune = 0.8 at every sparsity)
        "structprune, cap 0.8 (prune_margin=None)": lambda: sp.prune(dense, calib, SPARSITY, method="structprune",
                                                                     solver=SolverConfig(prune_margin=None)).model,
        "structprune (no reconstruction)": lambda: sp.prune(dense, calib, SPARSITY, method="structprune",
                                                            solver=SolverConfig(reconstruct=False)).model,
        "wanda-sp": lambda: sp.prune(dense, calib, SPARSITY, method="wanda-sp").model,
        "magnitude": lambda: sp.prune(dense, calib, SPARSITY, method="magnitude").model,
        "taylor-global": lambda: sp.prune(dense, calib, SPARSITY, method="taylor-global",
                                          loss_fn=self_distillation).model,
        # the same selections, then structprune's least-squares re-fit of the consuming layers
        "wanda-sp + reconstruction": lambda: sp.prune(dense, calib, SPARSITY, method="wanda-sp",
                                                      reconstruct=True).model,
        "magnitude + reconstruction": lambda: sp.prune(dense, calib, SPARSITY, method="magnitude",
                                                       reconstruct=True).model,
        "taylor-global + reconstruction": lambda: sp.prune(dense, calib, SPARSITY, method="taylor-global",
                                                           loss_fn=self_distillation, reconstruct=True).model,
    }
    for method, run in runs.items():
        t = time.perf_counter()
        model = run()
        rows.append({"seed": seed, "method": method, "accuracy": accuracy(model, x_test, y_test),
                     "params": count_params(model), "seconds": time.perf_counter() - t})
    target = next(r["params"] for r in rows if r["method"] == "structprune")
    t = time.perf_counter()
    model, ratio = torch_pruning(dense, calib[0], target)
    rows.append({"seed": seed, "method": f"torch-pruning (magnitude, ratio {ratio:.2f})", "accuracy":
                 accuracy(model, x_test, y_test), "params": count_params(model), "seconds": time.perf_counter() - t})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    methods = list(dict.fromkeys(r["method"].split(" (magnitude")[0] for r in rows))
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"].split(" (magnitude")[0] == method]
        acc = [r["accuracy"] for r in mine]
        out.append({"method": method, "accuracy_mean": statistics.mean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "params_mean": statistics.mean(r["params"] for r in mine), "seeds": len(mine),
                    "detail": sorted({r["method"] for r in mine})})
    return out


def table(summary_rows: list[dict]) -> str:
    dense = summary_rows[0]["accuracy_mean"]
    lines = ["| method | params | test accuracy (mean +- std over seeds) | drop vs dense |", "|---|---|---|---|"]
    for s in summary_rows:
        lines.append(f"| {s['method']} | {s['params_mean']:,.0f} | {s['accuracy_mean']:.2%} +- {s['accuracy_std']:.2%} | "
                     f"{(dense - s['accuracy_mean']) * 100:+.2f} pt |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(seed)
        for r in rows[-10:]:
            print(json.dumps(r), flush=True)
    summ = summary(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"data": "sklearn digits, 70/30 stratified split per seed", "sparsity": SPARSITY,
            "calibration": "512 training images, no labels", "date": time.strftime("%Y-%m-%d")}
    (out / "cnn_digits.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summ}, indent=1))
    (out / "cnn_digits.md").write_text(table(summ))
    print(table(summ))


if __name__ == "__main__":
    main()
