"""report.json, report.md and a PNG of the fraction of units kept per layer and group kind."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .pruning import PruneReport


def _layer_of(group_id: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", group_id + ".")
    return int(numbers[0]) if numbers else -1


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def markdown(report: PruneReport) -> str:
    r, m = report, report.metrics
    lines = [f"# Pruning report: {r.method}, {r.sparsity_target:.0%} of prunable parameters", "",
             "Sparsity counts the parameters of the pruned groups (attention heads / MLP / conv channels); "
             "embeddings, norms and the LM head are not prunable.", "",
             "| | before | after |", "|---|---|---|",
             f"| parameters | {r.params_before:,} | {r.params_after:,} |"]
    if "ppl_before" in m:
        lines.append(f"| perplexity ({m.get('eval_data', 'eval')}) | {m['ppl_before']:.2f} | {m['ppl_after']:.2f} |")
    if "flops_per_token_before" in m:
        lines.append(f"| GFLOPs per token (seq {m.get('flops_seqlen')}) | {m['flops_per_token_before'] / 1e9:.3f} "
                     f"| {m['flops_per_token_after'] / 1e9:.3f} |")
    lines += ["", f"- prunable parameters: {r.prunable_params:,}; removed {r.sparsity_achieved:.2%} "
                  f"(target {r.sparsity_target:.2%})",
              f"- pruning wall time {r.seconds:.1f} s, peak RSS {_mib(r.peak_rss_bytes)}, "
              f"peak CUDA {_mib(r.peak_cuda_bytes)}; {r.calibration_batches} calibration batches"]
    for key in ("total_seconds", "eval_seconds", "calib_tokens"):
        if key in m:
            lines.append(f"- {key.replace('_', ' ')}: {m[key]}")
    lines += ["", "![fraction kept per layer](kept.png)", "", "| group | kind | kept |", "|---|---|---|"]
    lines += [f"| {gid} | {report.group_kinds[gid]} | {frac:.0%} |" for gid, frac in r.kept_fraction.items()]
    return "\n".join(lines) + "\n"


def plot_kept(report: PruneReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(set(report.group_kinds.values()))
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / max(len(kinds), 1)
    for k, kind in enumerate(kinds):
        items = sorted((_layer_of(gid), frac) for gid, frac in report.kept_fraction.items()
                       if report.group_kinds[gid] == kind)
        xs = list(range(len(items))) if any(layer < 0 for layer, _ in items) else [layer for layer, _ in items]
        ax.bar([x + k * width for x in xs], [f for _, f in items], width=width, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of units kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report.method}: {report.sparsity_achieved:.1%} of prunable parameters removed")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(directory: Path, report: PruneReport) -> None:
    (directory / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    (directory / "report.md").write_text(markdown(report))
    plot_kept(report, directory / "kept.png")
