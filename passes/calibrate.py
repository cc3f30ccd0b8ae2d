"""Calibration pass: run calibration inputs through the model and collect what scoring needs.

- input statistics of every *consumer* layer of the selected groups (the layer that reads a group's
  channels: an MLP's down projection, an attention output projection, the next convolution): per input
  channel, the sum and the sum of squares over all calibration tokens (for Wanda-sp and FLAP);
- gradients of the calibration loss for first-order Taylor importance (the whole model's gradients are
  held at once: the O(N)-memory global baseline).

The model's weights are never changed; gradients are computed on a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import DependencyGraph, Group
from structprune_graph.module_attrs import input_dim

from ._infra import Pass, PassResult

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class CalibrationError(StructPruneError, ValueError):
    """Calibration data is empty, or a loss is needed and cannot be computed."""


@dataclass(frozen=True)
class InputStats:
    """Per input channel of one consumer layer, over every calibration token."""

    total: torch.Tensor  # (channels,) float64 sum of x
    total_sq: torch.Tensor  # (channels,) float64 sum of x^2
    count: int  # tokens (positions) seen

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def l2(self) -> torch.Tensor:  # ||x_j||_2 over all tokens
        return self.total_sq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        return (self.total_sq / self.count - self.mean ** 2).clamp_min(0.0)


@dataclass(frozen=True)
class CalibrationRequest:
    model: nn.Module
    graph: DependencyGraph
    groups: tuple[Group, ...]
    batches: tuple[Any, ...]  # model inputs: tensors (positional) or dicts (keyword)
    input_stats: bool = False
    gradients: bool = False
    loss_fn: Optional[LossFn] = None


@dataclass(frozen=True)
class Calibration:
    inputs: Mapping[str, InputStats] = field(default_factory=dict)  # consumer module path -> stats
    gradients: Mapping[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> d loss / d w
    tokens: int = 0


def consumer_modules(model: nn.Module, groups: Iterable[Group]) -> dict[str, int]:
    """Module path -> input dim of the weight, for every layer that reads some group's channels."""
    found = {}
    for g in groups:
        for m in g.members:
            path, _, attr = m.name.rpartition(".")
            if attr != "weight" or not m.is_param:
                continue
            module = model.get_submodule(path)
            if input_dim(module) == m.dim:
                found[path] = m.dim
    return found


def run_batch(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(*batch) if isinstance(batch, tuple) else model(batch)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Next-token loss for a causal LM fed ``{"input_ids": ...}``; a model's own ``loss`` otherwise."""
    if isinstance(batch, Mapping) and "input_ids" in batch and "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    out = run_batch(model, batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise CalibrationError("taylor-global needs a loss: the model returned none for the calibration batch; "
                               "pass loss_fn=(model, batch) -> scalar tensor")
    return loss


class CalibratePass(Pass[CalibrationRequest, Calibration]):
    def requires(self, state: CalibrationRequest) -> None:
        if not state.batches:
            raise CalibrationError("calibration pass: no calibration batches were given")

    def call(self, state: CalibrationRequest) -> PassResult[Calibration]:
        inputs = self._input_stats(state) if state.input_stats else {}
        gradients = self._gradients(state) if state.gradients else {}
        tokens = next(iter(inputs.values())).count if inputs else 0
        return PassResult(Calibration(inputs, gradients, tokens), modified=False)

    @staticmethod
    def _input_stats(state: CalibrationRequest) -> dict[str, InputStats]:
        consumers = consumer_modules(state.model, state.groups)
        sums: dict[str, list] = {}
        hooks = []

        def hook_for(path: str, dim: int):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].detach()
                channels = x.shape[-1] if isinstance(module, nn.Linear) or dim == 0 else x.shape[1]
                flat = (x.reshape(-1, channels) if isinstance(module, nn.Linear) or dim == 0
                        else x.transpose(0, 1).reshape(channels, -1).T).double()  # (tokens, channels)
                entry = sums.setdefault(path, [torch.zeros(channels, dtype=torch.float64),
                                               torch.zeros(channels, dtype=torch.float64), 0])
                entry[0] += flat.sum(0).cpu()
                entry[1] += (flat * flat).sum(0).cpu()
                entry[2] += flat.shape[0]
            return hook

        for path, dim in consumers.items():
            hooks.append(state.model.get_submodule(path).register_forward_pre_hook(hook_for(path, dim)))
        try:
            with torch.no_grad():
                for batch in tqdm(state.batches, desc="calibrate", leave=False):
                    run_batch(state.model, batch)
        finally:
            for h in hooks:
                h.remove()
        return {path: InputStats(s, sq, n) for path, (s, sq, n) in sums.items()}

    @staticmethod
    def _gradients(state: CalibrationRequest) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(state.model)  # gradients never touch the caller's model
        model.train(False)
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        loss_fn = state.loss_fn or default_loss
        for batch in tqdm(state.batches, desc="gradients", leave=False):
            (loss_fn(model, batch) / len(state.batches)).backward()
        return {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
