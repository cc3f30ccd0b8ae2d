"""Score pass: an importance per unit of every selected group (analysis only, weights untouched).

- ``magnitude``: L2 norm of all the unit's weights (group magnitude).
- ``wanda-sp``: Wanda made structured (as in the FLAP paper's baseline): for each input channel j of a
  consumer layer, sum_i |W_ij| * ||X_j||_2, summed over the unit's channels.
- ``flap``: FLAP's fluctuation metric Var(X_j) * ||W_:,j||^2 per input channel of the consumer layer
  (squared once more for attention, as FLAP's code does), standardised (z-score) over that layer's
  channels, and averaged over the unit's channels: comparable across layers and kinds for a global ranking.
- ``taylor``: first-order Taylor, sum over the unit's weights of |w * dL/dw|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group
from structprune_graph.module_attrs import input_dim
from structprune_graph.units import per_unit_sum

from ._infra import Pass, PassResult
from .calibrate import Calibration

SCORES = ("magnitude", "wanda-sp", "flap", "taylor")


@dataclass(frozen=True)
class ScoreRequest:
    model: nn.Module
    groups: tuple[Group, ...]
    score: str
    calibration: Calibration


@dataclass(frozen=True)
class Scores:
    per_unit: Mapping[str, tuple[float, ...]]  # group id -> one score per unit (higher: more important)


def _unit_slices(weight: torch.Tensor, dim: int, indices: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
    return [weight.index_select(dim, torch.tensor(u, dtype=torch.long)) for u in indices]


def taylor_saliency(weight: torch.Tensor, grad: torch.Tensor, dim: int,
                    indices: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Per unit, sum over its slices of ``weight`` along ``dim`` of |w * dL/dw|: (units,) float64."""
    sal = (weight.detach() * grad.to(weight.dtype)).abs().double()  # the weight's shape
    per_channel = sal.sum([d for d in range(sal.dim()) if d != dim]) if sal.dim() > 1 else sal  # (channels,)
    return per_unit_sum(per_channel, indices)


class ScorePass(Pass[ScoreRequest, Scores]):
    def requires(self, state: ScoreRequest) -> None:
        if state.score not in SCORES:
            raise StructPruneError(f"score pass: unknown score {state.score!r}; choose one of {SCORES}")
        if state.score in ("wanda-sp", "flap"):  # else such a group scores 0 everywhere: pruned blindly
            blind = [g for g in state.groups if not any(self._read_by_calibrated_layer(state, m) for m in g.members)]
            if blind:
                raise StructPruneError(
                    f"score pass: {state.score} scores a unit by the input statistics of the layer that reads it, "
                    f"and no calibrated layer reads group {blind[0].id} (kind {blind[0].kind}"
                    f"{f', and {len(blind) - 1} more' if len(blind) > 1 else ''}); use --method magnitude or "
                    f"taylor-global for it, or leave kind {blind[0].kind!r} out of kinds")
        if state.score == "taylor" and not state.calibration.gradients:
            raise StructPruneError("score pass: taylor needs calibration gradients")

    def call(self, state: ScoreRequest) -> PassResult[Scores]:
        params = dict(state.model.named_parameters())
        per_unit = {}
        with torch.no_grad():
            for g in state.groups:
                scores = torch.zeros(g.size, dtype=torch.float64)
                for m in g.members:
                    if not m.is_param:
                        continue
                    scores += self._member_scores(state, params, m, g.kind)
                if state.score == "magnitude":  # members returned squared norms: L2 of the whole unit
                    scores = scores.sqrt()
                per_unit[g.id] = tuple(scores.tolist())
        return PassResult(Scores(per_unit), modified=False)

    @staticmethod
    def _read_by_calibrated_layer(state: ScoreRequest, m) -> bool:
        """Whether member ``m`` is the input side of a layer with calibration input statistics, one column per
        channel (a grouped convolution's weight holds in / groups columns: it maps each group on its own)."""
        path, _, attr = m.name.rpartition(".")
        if not (m.is_param and attr == "weight" and path in state.calibration.inputs):
            return False
        layer = state.model.get_submodule(path)
        return input_dim(layer) == m.dim and getattr(layer, "groups", 1) == 1

    @staticmethod
    def _member_scores(state: ScoreRequest, params: Mapping[str, torch.Tensor], member,
                       kind: str) -> torch.Tensor:
        name, dim, indices = member.name, member.dim, member.indices
        w = params[name].detach()
        if state.score == "magnitude":  # squared: rooted once all members are summed
            return torch.tensor([float((s.double() ** 2).sum()) for s in _unit_slices(w, dim, indices)])
        if state.score == "taylor":
            return taylor_saliency(w, state.calibration.gradients[name], dim, indices)
        if not ScorePass._read_by_calibrated_layer(state, member):
            return torch.zeros(len(indices), dtype=torch.float64)  # not the input side of a consuming layer
        stats = state.calibration.inputs[name.rpartition(".")[0]]
        per_channel_axes = [d for d in range(w.dim()) if d != dim]
        if state.score == "wanda-sp":
            col = w.abs().double().sum(per_channel_axes) * stats.l2  # (channels,)
            return torch.tensor([float(col[list(u)].sum()) for u in indices])
        col = (w.double() ** 2).sum(per_channel_axes) * stats.variance  # flap: (channels,)
        if kind in ("attention_head", "query_head", "kv_group"):
            col = col ** 2
        col = (col - col.mean()) / col.std().clamp_min(1e-12)
        return torch.tensor([float(col[list(u)].mean()) for u in indices])
