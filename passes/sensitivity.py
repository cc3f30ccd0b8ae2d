"""Block sensitivity pass (analysis): how much the loss feels an error at each block's output.

For block b with output h_b (the residual stream it hands on), the mean squared loss gradient per channel
and token, f_b = E[ ||dL/dh_b||^2 ] / (tokens x channels), on the calibration batches. An error e at h_b
raises the loss by about 1/2 e^T F e with F the Fisher of h_b; with its diagonal averaged, by f_b ||e||^2 / 2.
``SolverConfig(block_energy="gradient")`` multiplies each block's OBS errors by f_b (instead of dividing
them by the energy of the block's input stream), so that the allocator compares blocks by the loss they
cost. One forward and backward pass of the whole model per batch: the model must be in memory (not
streamed) and give a loss. The model's parameters and gradients are left as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from structprune_graph.errors import StructPruneError

from ._infra import Pass, PassResult
from .blockwise_calibrate import block_module
from .calibrate import CalibrationError, default_loss
from .partition import Partition


@dataclass(frozen=True)
class SensitivityRequest:
    model: nn.Module
    partition: Partition
    batches: Sequence[Any]


@dataclass(frozen=True)
class BlockSensitivity:
    per_block: tuple[float, ...]  # f_b: mean squared loss gradient per channel and token at block b's output


def _stream(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class BlockSensitivityPass(Pass[SensitivityRequest, BlockSensitivity]):
    def requires(self, state: SensitivityRequest) -> None:
        if not state.batches:
            raise StructPruneError("block sensitivity pass: no calibration batches")
        if any(p.is_meta for p in state.model.parameters()):
            raise StructPruneError("block sensitivity pass: block_energy='gradient' runs the whole model forward "
                                   "and backward, and this model's weights are streamed; use block_energy='stream'")

    def call(self, state: SensitivityRequest) -> PassResult[BlockSensitivity]:
        blocks = state.partition.blocks
        sums = [0.0] * len(blocks)
        counts = [0] * len(blocks)

        def watch(i: int):
            def add(grad: torch.Tensor) -> None:
                sums[i] += float((grad.double() ** 2).sum())
                counts[i] += grad.numel()

            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                h = _stream(out)
                if isinstance(h, torch.Tensor) and h.requires_grad:
                    h.register_hook(add)
            return hook

        def track(module: nn.Module, args: tuple, out: torch.Tensor) -> None:  # the graph starts here
            out.requires_grad_(True)

        model = state.model
        saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        handles = [block_module(model, b).register_forward_hook(watch(i)) for i, b in enumerate(blocks)]
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embed is not None:
            handles.append(embed.register_forward_hook(track))
        try:
            for p in model.parameters():  # gradients flow to the activations only
                p.requires_grad_(False)
                p.grad = None
            for batch in state.batches:
                with torch.enable_grad():
                    try:
                        loss = default_loss(model, batch)
                    except CalibrationError as err:
                        raise StructPruneError("block sensitivity pass: block_energy='gradient' needs a model that "
                                               "returns a loss for the calibration batches (a causal LM fed "
                                               "input_ids); use block_energy='stream'") from err
                    loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, requires, grad in saved:
                p.requires_grad_(requires)
                p.grad = grad
        if not all(counts):
            missing = [b.path for b, c in zip(blocks, counts) if not c]
            raise StructPruneError(f"block sensitivity pass: no loss gradient reached the output of {missing[:3]}; "
                                   f"use block_energy='stream'")
        return PassResult(BlockSensitivity(tuple(s / c for s, c in zip(sums, counts))), modified=False)
