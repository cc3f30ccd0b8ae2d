"""A written plan for a 70B-class model on 8 GPUs (issue 15 item 4), extrapolated from per-block costs
measured here. A plan, not a run: the assumptions are printed with the numbers.

Measured (this machine): on one SmolLM2-135M decoder block and ``--tokens`` calibration tokens, the time of
(a) the block's forward with the H = X^T X accumulation of its consumer layers (``o_proj``, ``down_proj``)
and (b) the OBS work on those H (``greedy_obs`` curves and the least-squares re-fit), each turned into a
rate (flop/s) with the flop counts below. Extrapolated: the same work for a Llama-3-70B block (hidden 8192,
80 layers, 64 heads / 8 KV heads, MLP 28,672, vocabulary 128,256) on K ranks, each with 128 x 2048 / K
calibration tokens, at the measured rates (this CPU) and at assumed GPU rates.

Flop model per block and rank: forward 2 P t, statistics 2 t sum(d^2), OBS + re-fit c sum(d^3) (c fitted
here), with P the block's parameters, t the rank's tokens and d the consumers' input widths.

Run: ``python examples/plan_70b.py [--tokens 8192] [--out examples/results]``; writes ``OUT/plan_70b.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# assumed sustained rates of one H100-class GPU: half the TF32 dense peak for the forward and X^T X,
# half the FP64 tensor-core peak for the factorisations; NCCL all_reduce bus bandwidth inside one node
GPU_MATMUL_FLOPS = 200e12
GPU_FP64_FLOPS = 30e12
NVLINK_BUS_BYTES = 300e9


def block_shape(hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int) -> dict:
    attn = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    return {"params": attn + 3 * hidden * mlp, "consumers": [heads * head_dim, mlp], "hidden": hidden, "mlp": mlp}


SMOLLM2 = block_shape(576, 9, 3, 64, 1536)
LLAMA70B = block_shape(8192, 64, 8, 128, 28672)
LLAMA70B_LAYERS, LLAMA70B_VOCAB = 80, 128256


def measure(tokens: int) -> dict:
    """Seconds of one SmolLM2 block's forward + statistics and of its OBS work, on real weights."""
    from structprune_graph import models
    from structprune_graph.graph import trace
    from structprune_graph.models import example_inputs_for
    from structprune_graph.passes.blockwise_calibrate import StatsCollector, build_consumers
    from structprune_graph.passes.obs import damped, greedy_obs, least_squares
    from structprune_graph.passes.partition import Block

    model = models.load_model(None)
    graph = trace(model, example_inputs_for(model))
    layer = model.model.layers[10]
    x = torch.randn(tokens // 512, 512, 576) * 0.5  # (windows, tokens, hidden): the cost does not depend on values
    position = torch.arange(512)[None]
    emb = model.model.rotary_emb(x, position)
    stats = StatsCollector(layer, ["self_attn.o_proj", "mlp.down_proj"])
    t = time.perf_counter()
    with torch.no_grad():
        for window in x:
            layer(window[None], position_embeddings=emb, attention_mask=None)
    forward = time.perf_counter() - t
    stats.close()
    block = Block(0, "model.layers.10", 0, 0, tuple(g.id for g in graph.prunable_groups if ".layers.10." in g.id))
    groups = [g for g in graph.prunable_groups if ".layers.10." in g.id and g.kind in ("kv_group", "mlp_channel")]
    t = time.perf_counter()
    for g in groups:
        consumers = build_consumers(block, layer, g, stats, 0.01)
        n = int(0.3 * g.size)
        greedy_obs(consumers, g.size, n)
        for c in consumers:
            keep = torch.arange(int(c.weight.shape[1] * 0.7))
            least_squares(c.weight, damped(stats.hessians[c.path], 0.01), keep)
    obs = time.perf_counter() - t
    h = torch.randn(1536, 1536, dtype=torch.float64)
    h = h @ h.T + 1536 * torch.eye(1536, dtype=torch.float64)
    t = time.perf_counter()
    for _ in range(3):
        torch.linalg.cholesky(h)
    fp64 = 3 * 1536 ** 3 / 3 / (time.perf_counter() - t)  # a Cholesky factorisation is d^3 / 3 flop
    return {"fp64_flops": fp64,"tokens": tokens, "forward_and_stats_s": forward, "obs_and_refit_s": obs,
            "threads": torch.get_num_threads()}


def flops(shape: dict, tokens: float) -> tuple[float, float]:
    """(forward + statistics, OBS + re-fit without the constant c) for one block."""
    return (2 * shape["params"] * tokens + 2 * tokens * sum(d * d for d in shape["consumers"]),
            float(sum(d ** 3 for d in shape["consumers"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--calib-tokens", type=int, default=128 * 2048)
    args = parser.parse_args()
    torch.set_num_threads(2)
    m = measure(args.tokens)
    fwd_flops, obs_cubes = flops(SMOLLM2, args.tokens)
    cpu_matmul = fwd_flops / m["forward_and_stats_s"]
    # the OBS work in Cholesky-equivalent flop per d^3 of its consumers, at the measured FP64 rate
    obs_flop_per_cube = m["obs_and_refit_s"] * m["fp64_flops"] / obs_cubes
    k, t = args.ranks, args.calib_tokens / args.ranks
    fwd70, obs70 = flops(LLAMA70B, t)
    h_bytes = sum(8 * d * d for d in LLAMA70B["consumers"])  # float64 H of the block's consumers
    stream_bytes = 4 * t * LLAMA70B["hidden"]  # fp32 residual stream of the rank's tokens
    # per rank: two resident blocks (bf16), embeddings and head (bf16), H and one factorisation of the widest
    memory = {"blocks (2, bf16)": 2 * 2 * LLAMA70B["params"], "embeddings + head (bf16)": 2 * 2 * LLAMA70B_VOCAB * 8192,
              "statistics H (float64)": h_bytes, "widest factorisation (float64)": 8 * LLAMA70B["mlp"] ** 2,
              "activations in + out (fp32)": 2 * stream_bytes,
              "MLP intermediate of one 2048-token window (fp32)": 4 * 2048 * LLAMA70B["mlp"]}
    allreduce = 2 * (k - 1) / k * h_bytes  # ring all_reduce bytes a rank sends per sweep
    broadcast = 4 * LLAMA70B["hidden"] * sum(LLAMA70B["consumers"])  # re-fitted o_proj + down_proj, fp32
    per_block = {
        "forward + statistics s (this CPU)": fwd70 / cpu_matmul,
        "forward + statistics s (GPU, assumed rate)": fwd70 / GPU_MATMUL_FLOPS,
        "OBS + re-fit s (this CPU, whole block on one rank)": obs70 * obs_flop_per_cube / m["fp64_flops"],
        "OBS + re-fit s (GPU; MLP and attention on 2 owners: the MLP's share)":
            LLAMA70B["mlp"] ** 3 * obs_flop_per_cube / GPU_FP64_FLOPS,
        "all_reduce of H s (NVLink, assumed bus bandwidth)": allreduce / NVLINK_BUS_BYTES,
        "broadcast of re-fitted weights s": broadcast / NVLINK_BUS_BYTES,
    }
    sweeps = 2  # the dense sweep and the solve sweep each run every block's forward and statistics
    gpu_block = sweeps * (per_block["forward + statistics s (GPU, assumed rate)"]
                          + per_block["all_reduce of H s (NVLink, assumed bus bandwidth)"]) \
        + sweeps * per_block["OBS + re-fit s (GPU; MLP and attention on 2 owners: the MLP's share)"] \
        + per_block["broadcast of re-fitted weights s"]
    result = {"measured": m, "rates": {"cpu_matmul_flops": cpu_matmul, "obs_flop_per_cube": obs_flop_per_cube},
              "assumptions": {"gpu_matmul_flops": GPU_MATMUL_FLOPS, "gpu_fp64_flops": GPU_FP64_FLOPS,
                              "nvlink_bus_bytes_per_s": NVLINK_BUS_BYTES, "ranks": k,
                              "calibration_tokens": args.calib_tokens, "layers": LLAMA70B_LAYERS},
              "memory_per_rank_bytes": memory, "bytes_sent_per_block": {"all_reduce (2 sweeps)": sweeps * allreduce,
                                                                       "broadcast (owner)": broadcast},
              "per_block_s": per_block, "gpu_total_s": LLAMA70B_LAYERS * gpu_block}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_70b.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Plan: Llama-3-70B-shaped StructPrune on {k} GPUs (extrapolated, not run)", "",
             f"Measured here: one SmolLM2 block, {m['tokens']} tokens, {m['threads']} threads: forward + statistics "
             f"{m['forward_and_stats_s']:.2f} s ({cpu_matmul / 1e9:.1f} Gflop/s), OBS + re-fit {m['obs_and_refit_s']:.2f} s "
             f"({obs_flop_per_cube:.2f} Cholesky-flop per d^3 at the measured {m['fp64_flops'] / 1e9:.1f} Gflop/s FP64). "
             f"Assumed GPU: {GPU_MATMUL_FLOPS / 1e12:.0f} Tflop/s matmul, {GPU_FP64_FLOPS / 1e12:.0f} Tflop/s FP64, "
             f"{NVLINK_BUS_BYTES / 1e9:.0f} GB/s all_reduce bus bandwidth; {args.calib_tokens:,} calibration tokens, "
             f"{t:,.0f} per rank.", "", "| memory per rank | GiB |", "|---|---|"]
    lines += [f"| {name} | {b / 2**30:.2f} |" for name, b in memory.items()]
    lines += [f"| total | {sum(memory.values()) / 2**30:.1f} |", "", "| per block | value |", "|---|---|"]
    lines += [f"| {name} | {v:,.3g} |" for name, v in per_block.items()]
    lines += [f"| bytes a rank sends (all_reduce, 2 sweeps) | {sweeps * allreduce / 2**30:.1f} GiB |",
              f"| bytes the owner broadcasts | {broadcast / 2**30:.2f} GiB |", "",
              f"Whole model on {k} GPUs: about {LLAMA70B_LAYERS * gpu_block / 60:.0f} min for the two sweeps and "
              f"the solves (the tau search adds one masked forward of the whole model per tau)."]
    (out / "plan_70b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
