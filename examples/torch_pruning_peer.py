"""Torch-Pruning 1.6 as a peer on a LLaMA-family model (SmolLM2), shared by llm_baselines.py and
generalization.py.

Torch-Pruning cannot prune Llama attention heads (its dependency graph never finishes on the RoPE path,
upstream issue #527), so it prunes MLP channels only, at the ratio that removes the same number of
parameters as our methods' budget (the query-head slots of q/o plus the MLP: 99.5M of SmolLM2's 134.5M).
"""

from __future__ import annotations

import copy
import warnings

import torch

PEERS = ("tp-magnitude-local", "tp-magnitude-global", "tp-taylor-local", "tp-taylor-global")


def prunable_params(model) -> int:
    """The budget our methods count: per layer, q_proj and o_proj of the query heads plus the three MLP
    projections (99,532,800 for SmolLM2-135M)."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q_width = c.num_attention_heads * head_dim
    return c.num_hidden_layers * (2 * c.hidden_size * q_width + 3 * c.hidden_size * c.intermediate_size)


def calibration_gradients(model, batches) -> dict[str, torch.Tensor]:
    """The mean next-token loss's gradient over the calibration batches (Taylor importance), on a copy."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    for batch in batches:
        (m(**batch, labels=batch["input_ids"], use_cache=False).loss / len(batches)).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


def prune(model, batches, sparsity: float, job: str, grads: dict | None = None):
    """``job`` is one of PEERS; returns a pruned copy (the input is untouched). ``grads`` (from
    calibration_gradients) is required for the Taylor importance."""
    if job not in PEERS:
        raise ValueError(f"unknown Torch-Pruning peer {job!r}; one of {PEERS}")
    _, importance, scope = job.split("-")
    if importance == "taylor" and grads is None:
        raise ValueError(f"{job}: pass grads=calibration_gradients(model, batches)")
    import torch_pruning as tp  # the bench extra

    m = copy.deepcopy(model)
    if importance == "taylor":
        for n, p in m.named_parameters():
            p.grad = grads.get(n)
        imp = tp.importance.GroupTaylorImportance()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    mlp_params = sum(p.numel() for n, p in m.named_parameters() if ".mlp." in n)
    ignored = [m.lm_head, m.model.embed_tokens] + [layer.self_attn for layer in m.model.layers]
    ratio = min(0.99, sparsity * prunable_params(m) / mlp_params)
    with warnings.catch_warnings():  # the norms' weights: MLP channels only, so the hidden dim is never pruned
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(m, example_inputs=batches[0]["input_ids"][:, :64], importance=imp,
                                      pruning_ratio=ratio, global_pruning=scope == "global",
                                      ignored_layers=ignored,
                                      forward_fn=lambda mod, x: mod(input_ids=x, use_cache=False).logits)
        pruner.step()
    for layer in m.model.layers:  # transformers reads these sizes in forward
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
    m.zero_grad(set_to_none=True)
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # run what we return: a width read from a stale attribute fails here, not later
        logits = m(input_ids=batches[0]["input_ids"][:, :64], use_cache=False).logits  # (batch, 64, vocab)
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{job} at {sparsity:.0%}: the pruned copy's first forward gave non-finite logits")
    return m
