"""The loss of a model with some units masked and some weights replaced, without modifying it: what the
allocator's tau search scores each candidate by (``solver.allocate``). A removed unit's channels are zeroed
at its consumers' inputs; replacement weights are swapped in around each layer's forward and back after, so
a disk-backed store holds one layer's tensor at a time and streamed weights work too."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from structprune_graph.passes.blockwise_calibrate import block_module, consumers_of
from structprune_graph.passes.calibrate import CalibrationError, default_loss
from structprune_graph.passes.experts import is_fused_path
from structprune_graph.passes.partition import Partition

from .blockwise import run_model
from .distributed import LOCAL, Collective
from .evaluate import main_output
from .graph import Group


def takes_labels(model: nn.Module, batch: Any) -> bool:
    """A keyword batch of a model whose forward accepts ``labels`` (transformers LMs)."""
    if not isinstance(batch, Mapping):
        return False
    params = inspect.signature(model.forward).parameters
    return "labels" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def trial_loss(model: nn.Module, partition: Partition, groups: Mapping[str, Group], batches: Sequence[Any],
               collective: Collective = LOCAL) -> Callable[[Mapping[str, Sequence[int]], Mapping[str, torch.Tensor]], float]:
    """(removed units, replacement weights) -> loss on ``batches`` of the model with those units masked (a
    removed unit's channels zeroed at its consumers' inputs) and those weights in place of the dense ones.
    The LM loss when the model gives one, else the relative error of its main output against the dense
    model's. Replacements are swapped in around each layer's forward, so streamed weights work too."""
    with torch.no_grad():
        dense = None
        try:
            if not batches or not takes_labels(model, batches[0]):
                raise CalibrationError("the model takes no labels")
            default_loss(model, batches[0])
        except CalibrationError:
            dense = [main_output(run_model(model, b)) for b in batches]

    def masks_of(removed: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for block in partition.blocks:
            module = block_module(model, block)
            prefix = block.path + "." if block.path else ""
            for gid in block.group_ids:
                units = removed.get(gid, ())
                if not units:
                    continue
                for path, columns in consumers_of(block, module, groups[gid]):
                    full = prefix + path
                    if is_fused_path(module, path):  # (experts, out, in): masked on its last dim
                        width = module.get_parameter(path).shape[-1]
                    else:
                        layer = model.get_submodule(full)
                        width = layer.weight.shape[1] if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) else layer.weight.shape[0]
                    mask = masks.setdefault(full, torch.ones(width))
                    mask[torch.cat([columns[u] for u in units])] = 0.0
        return masks

    def score(removed: Mapping[str, Sequence[int]], weights: Mapping[str, torch.Tensor]) -> float:
        handles = []
        masked_params = set()
        for full, mask in masks_of(removed).items():
            if is_fused_path(model, full):
                handles += swap_weight(model, full, weights, scale=mask)  # a removed channel's column is zero
                masked_params.add(full)
                continue
            layer = model.get_submodule(full)
            dim_last = not isinstance(layer, nn.modules.conv._ConvNd)
            shaped = mask if dim_last else mask.view(1, -1, *([1] * (layer.weight.dim() - 2)))
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, s=shaped: (a[0] * s.to(a[0].device, a[0].dtype), *a[1:])))
        for name in weights:
            if name not in masked_params:
                handles += swap_weight(model, name, weights)
        try:
            with torch.no_grad():  # sums over this rank's batches, then over the ranks
                if dense is None:
                    total, count = collective.sum_floats(
                        [sum(float(default_loss(model, b)) for b in batches), len(batches)], "tau trial loss")
                    return total / count
                outs = [main_output(run_model(model, b)) for b in batches]
                num, den = collective.sum_floats([sum(float(((o - d) ** 2).sum()) for o, d in zip(outs, dense)),
                                                  sum(float((d ** 2).sum()) for d in dense)], "tau trial error")
                return num / max(den, 1e-30)
        finally:
            for h in handles:
                h.remove()
    return score


def swap_weight(model: nn.Module, name: str, weights: Mapping[str, torch.Tensor],
                 scale: Optional[torch.Tensor] = None) -> list:
    """Hooks that put ``weights[name]`` (the parameter itself when absent) times ``scale`` (on its last
    dim) in place of the parameter for the layer's forward (read when the layer runs: a disk-backed store
    holds one layer's tensor at a time) and put the parameter back after."""
    path, attr = name.rsplit(".", 1)
    layer = model.get_submodule(path)
    saved: list = []

    def swap_in(module, args):
        current = module._parameters[attr]
        saved.append(current)
        value = weights[name].to(current.device, current.dtype) if name in weights else current.detach()
        module._parameters[attr] = value * scale.to(value.device, value.dtype) if scale is not None else value

    def swap_back(module, args, output):
        module._parameters[attr] = saved.pop()
    return [layer.register_forward_pre_hook(swap_in), layer.register_forward_hook(swap_back)]
