"""Coverage over a zoo of transformers architectures, side by side with Torch-Pruning, in one run.

Each model class is built from a small random-init config (no download). Ours, stage by stage: trace ->
prune 30% with ``structprune`` on random calibration inputs -> apply == mask of the same keep-set on the
original weights (mask-exact groups only; 1e-4) -> ONNX export validated in onnxruntime -> every kind: half
the units of every selected group at once (attention included), finite and equal to the mask. Torch-Pruning:
``DependencyGraph`` + ``MetaPruner`` (magnitude, 30%, attention heads pruned where it knows the module,
LM head / classifier ignored) -> a forward pass. The first failing stage and its error are recorded.
Writes ``OUT/zoo_coverage.json`` and ``OUT/zoo_coverage.md``.

Run: ``pip install -e ".[bench]" && python examples/zoo_coverage.py [--out results] [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from structprune_graph.zoo import ZooEntry, _hf, _pixels, _tokens, build_eval

DEC = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
ENC = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=32)
VIT = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_labels=5)


def _features(seed: int, mel: int = 16, frames: int = 32, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(batch, mel, frames, generator=g)}


def _t5_inputs(seed: int) -> dict:
    tokens = _tokens(seed)
    return {**tokens, "decoder_input_ids": tokens["input_ids"].flip(1)}


def _text_and_pixels(seed: int) -> dict:
    return {**_tokens(seed), **_pixels(seed)}


def _entry(name: str, model_cls: str, config_cls: str, inputs: Callable[[int], Any] = _tokens, **config) -> ZooEntry:
    return ZooEntry(name, _hf(model_cls, config_cls, **config), inputs)


BENCH: tuple[ZooEntry, ...] = (
    _entry("llama", "LlamaForCausalLM", "LlamaConfig", **DEC, num_key_value_heads=2),
    _entry("mistral", "MistralForCausalLM", "MistralConfig", **DEC, num_key_value_heads=2, head_dim=16),
    _entry("qwen2", "Qwen2ForCausalLM", "Qwen2Config", **DEC, num_key_value_heads=2),
    _entry("qwen3", "Qwen3ForCausalLM", "Qwen3Config", **DEC, num_key_value_heads=2, head_dim=16),
    _entry("gemma", "GemmaForCausalLM", "GemmaConfig", **DEC, num_key_value_heads=2, head_dim=16),
    _entry("gemma2", "Gemma2ForCausalLM", "Gemma2Config", **DEC, num_key_value_heads=2, head_dim=16),
    _entry("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", **DEC, num_key_value_heads=2, head_dim=16,
           sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    _entry("mixtral", "MixtralForCausalLM", "MixtralConfig", **DEC, num_key_value_heads=2, num_local_experts=4,
           num_experts_per_tok=2),
    _entry("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", **DEC, num_key_value_heads=2, num_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    _entry("olmoe", "OlmoeForCausalLM", "OlmoeConfig", **DEC, num_key_value_heads=2, num_experts=4,
           num_experts_per_tok=2, pad_token_id=0),
    _entry("phi", "PhiForCausalLM", "PhiConfig", **DEC),
    _entry("phi3", "Phi3ForCausalLM", "Phi3Config", **DEC, num_key_value_heads=2, pad_token_id=0),
    _entry("stablelm", "StableLmForCausalLM", "StableLmConfig", **DEC, num_key_value_heads=2),
    _entry("olmo", "OlmoForCausalLM", "OlmoConfig", **DEC, pad_token_id=0),
    _entry("gpt2", "GPT2LMHeadModel", "GPT2Config", vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32),
    _entry("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", **DEC),
    _entry("gptj", "GPTJForCausalLM", "GPTJConfig", vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32,
           rotary_dim=8),
    _entry("opt", "OPTForCausalLM", "OPTConfig", vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64),
    _entry("falcon", "FalconForCausalLM", "FalconConfig", vocab_size=96, hidden_size=64, num_hidden_layers=2,
           num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
    _entry("bloom", "BloomForCausalLM", "BloomConfig", vocab_size=96, hidden_size=64, n_layer=2, n_head=4),
    _entry("bert", "BertModel", "BertConfig", **ENC),
    _entry("roberta", "RobertaModel", "RobertaConfig", **{**ENC, "max_position_embeddings": 40}, pad_token_id=1),
    _entry("distilbert", "DistilBertModel", "DistilBertConfig", vocab_size=96, dim=64, hidden_dim=96, n_layers=2,
           n_heads=4, max_position_embeddings=32),
    _entry("albert", "AlbertModel", "AlbertConfig", **ENC, embedding_size=32),
    _entry("electra", "ElectraModel", "ElectraConfig", **ENC, embedding_size=32),
    _entry("bart", "BartModel", "BartConfig", vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
           max_position_embeddings=32),
    _entry("t5", "T5ForConditionalGeneration", "T5Config", _t5_inputs, vocab_size=96, d_model=64, d_kv=16, d_ff=96,
           num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8),
    _entry("whisper_encoder", "WhisperForAudioClassification", "WhisperConfig", _features, num_mel_bins=16,
           d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96, max_source_positions=16,
           decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96, num_labels=5),
    _entry("clip", "CLIPModel", "CLIPConfig", _text_and_pixels, projection_dim=32,
           text_config=dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=32),
           vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4)),
    _entry("segformer", "SegformerForSemanticSegmentation", "SegformerConfig", _pixels, num_encoder_blocks=2,
           depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2], patch_sizes=[7, 3],
           strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=5),
    _entry("vit", "ViTForImageClassification", "ViTConfig", _pixels, **VIT),
    _entry("deit", "DeiTForImageClassification", "DeiTConfig", _pixels, **VIT),
    _entry("dinov2", "Dinov2Model", "Dinov2Config", _pixels, **{k: v for k, v in VIT.items() if k != "num_labels"},
           mlp_ratio=2),
    _entry("swin", "SwinForImageClassification", "SwinConfig", _pixels, image_size=32, patch_size=4, embed_dim=16,
           depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=5),
    _entry("convnext", "ConvNextForImageClassification", "ConvNextConfig", _pixels, num_stages=2,
           hidden_sizes=[16, 32], depths=[1, 1], num_labels=5),
    _entry("resnet", "ResNetForImageClassification", "ResNetConfig", _pixels, embedding_size=16,
           hidden_sizes=[16, 32], depths=[1, 1], num_labels=5),
    _entry("regnet", "RegNetForImageClassification", "RegNetConfig", _pixels, embedding_size=16,
           hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=5),
    _entry("mobilenet_v2", "MobileNetV2ForImageClassification", "MobileNetV2Config", _pixels, image_size=32,
           depth_multiplier=0.35, num_labels=5),
    _entry("efficientnet", "EfficientNetForImageClassification", "EfficientNetConfig", _pixels, image_size=32,
           width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5),
)


def _main(output):
    from structprune_graph.evaluate import main_output

    return main_output(output)


def _run(model, inputs):
    with torch.no_grad():
        return _main(model(**inputs) if isinstance(inputs, dict) else model(*inputs))


def ours(entry: ZooEntry) -> dict:
    import structprune_graph as sp

    row: dict[str, Any] = {"stage": "build"}
    try:
        model = build_eval(entry)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["stage"] = "trace"
        t = time.perf_counter()
        graph = sp.trace(model, entry.inputs(0))
        row["trace_s"] = round(time.perf_counter() - t, 2)
        row["stage"] = "prune"
        result = sp.prune(model, [entry.inputs(s) for s in range(4)], 0.3, method="structprune", graph=graph,
                          example_inputs=entry.inputs(0))
        row["params_after"] = result.report.params_after
        row["sparsity"] = round(result.report.sparsity_achieved, 3)
        row["stage"] = "apply == mask"
        row["apply_vs_mask"] = apply_vs_mask(model, graph, result.plan.keep, entry)
        row["stage"] = "onnx"
        with tempfile.TemporaryDirectory() as tmp:
            exported = sp.export_onnx(result.model, entry.inputs(0), Path(tmp) / "m.onnx")
        row["onnx_max_diff"] = exported.max_abs_diff
        row["kinds_pruned"] = sorted({graph.group(gid).kind for gid, kept in result.plan.keep.items()
                                      if len(kept) < graph.group(gid).size})
        row["stage"] = "every kind"  # a pass counts only with every kind the method may prune, attention included
        row["kinds_forced"] = every_kind(model, graph, entry)
        row["stage"] = "ok"
    except Exception as err:  # the benchmark records the first failing stage and goes on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        row["trace"] = traceback.format_exc(limit=-2)[-600:]
    return row


def every_kind(model, graph, entry: ZooEntry) -> list[str]:
    """Half the units of every group a default pruning selects (every kind at once): the pruned model runs
    with finite outputs and equals the masked one on the mask-exact groups. Returns the kinds."""
    import structprune_graph as sp
    from structprune_graph.pruning import select_groups

    groups = select_groups(graph)
    gen = torch.Generator().manual_seed(0)
    keep = {g.id: sorted(torch.randperm(g.size, generator=gen)[:max(g.min_keep, g.size // 2)].tolist())
            for g in groups}
    if not torch.isfinite(_run(sp.apply(model, graph, keep), entry.inputs(9))).all():
        raise AssertionError("non-finite output with every kind pruned")
    apply_vs_mask(model, graph, keep, entry)
    return sorted({g.kind for g in groups})


def apply_vs_mask(model, graph, keep, entry: ZooEntry) -> float:
    """Largest difference between the sliced and the masked model on the mask-exact groups of ``keep``
    (raises above 1e-4)."""
    import structprune_graph as sp

    exact = {gid: kept for gid, kept in keep.items() if graph.group(gid).mask_exact}
    diff = float((_run(sp.apply(model, graph, exact), entry.inputs(9))
                  - _run(sp.mask(model, graph, exact), entry.inputs(9))).abs().max())
    if diff > 1e-4:
        raise AssertionError(f"apply differs from mask by {diff:.2e}")
    return diff


PEER_TIMEOUT_S = 60  # Torch-Pruning's graph search never ends on some models (Llama's RoPE path, #527)


def _timeout(signum, frame):
    raise TimeoutError(f"no result within {PEER_TIMEOUT_S} s")


def peer(entry: ZooEntry) -> dict:
    import torch_pruning as tp

    row: dict[str, Any] = {"stage": "build"}
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(PEER_TIMEOUT_S)
    try:
        model = build_eval(entry)
        inputs = entry.inputs(0)
        heads = {}
        for m in model.modules():  # attention modules Torch-Pruning can prune as heads, when it knows them
            q = getattr(m, "q_proj", None) or getattr(m, "query", None)
            n = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None)
            if isinstance(q, torch.nn.Linear) and isinstance(n, int):
                heads[q] = n
        ignored = [m for name, m in model.named_modules()
                   if name.split(".")[-1] in ("lm_head", "classifier", "pooler")]
        row["stage"] = "prune"
        pruner = tp.pruner.MetaPruner(model, example_inputs=inputs,
                                      importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.3,
                                      ignored_layers=ignored, num_heads=heads, prune_head_dims=False,
                                      prune_num_heads=bool(heads), head_pruning_ratio=0.3,
                                      forward_fn=lambda m, x: _main(m(**x) if isinstance(x, dict) else m(*x)))
        before = sum(p.numel() for p in model.parameters())
        pruner.step()
        row["params"], row["params_after"] = before, sum(p.numel() for p in model.parameters())
        row["stage"] = "forward"
        out = _run(model, entry.inputs(9))
        if not torch.isfinite(out).all():
            raise AssertionError("non-finite output")
        row["stage"] = "ok" if row["params_after"] < before else "no-op"
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    finally:
        signal.alarm(0)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | ours | kinds pruned at 30% (of the kinds pruned together) | params ours (before -> after) | "
             "Torch-Pruning | params TP | reason |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        o, p = r["ours"], r["torch_pruning"]
        ours_cell = "pass" if o["stage"] == "ok" else f"fails at {o['stage']}"
        tp_cell = {"ok": "pass", "no-op": "runs, prunes nothing"}.get(p["stage"], f"fails at {p['stage']}")
        reason = "; ".join(x for x in (o.get("error") and f"ours: {o['error']}", p.get("error") and f"TP: {p['error']}") if x)
        fmt = lambda d: f"{d['params']:,} -> {d['params_after']:,}" if "params_after" in d else "-"  # noqa: E731
        kinds = f"{', '.join(o.get('kinds_pruned', []))} ({', '.join(o.get('kinds_forced', [])) or '-'})"
        lines.append(f"| {r['model']} | {ours_cell} | {kinds} | {fmt(o)} | {tp_cell} | {fmt(p)} | "
                     f"{reason.replace('|', '/')} |")
    ok = sum(r["ours"]["stage"] == "ok" for r in rows)
    tp_ok = sum(r["torch_pruning"]["stage"] == "ok" for r in rows)
    lines.append(f"\nCoverage: ours {ok}/{len(rows)} ({ok / len(rows):.0%}), Torch-Pruning {tp_ok}/{len(rows)} "
                 f"({tp_ok / len(rows):.0%}) pass every stage.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    entries = [e for e in BENCH if not args.only or e.name in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in entries:
        rows.append({"model": entry.name, "ours": ours(entry), "torch_pruning": peer(entry)})
        print(json.dumps({k: (v if k == "model" else {kk: vv for kk, vv in v.items() if kk != "trace"})
                          for k, v in rows[-1].items()}), flush=True)
        _write(out / "zoo_coverage.json", json.dumps(rows, indent=1))  # after every model: a long run can stop
        _write(out / "zoo_coverage.md", table(rows))
    print(table(rows))


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    main()
