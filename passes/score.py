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


class ScorePass(Pass[ScoreRequest, Scores]):
    def requires(self, state: ScoreRequest) -> None:
        if state.score not in SCORES:
            raise StructPruneError(f"score pass: unknown score {state.score!r}; choose one of {SCORES}")
        if state.score in ("wanda-sp", "flap") and not state.calibration.inputs:
            raise StructPruneError(f"score pass: {state.score} needs calibration input statistics")
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
                    scores += self._member_scores(state, params, m.name, m.dim, m.indices, g.kind)
                if state.score == "magnitude":  # members returned squared norms: L2 of the whole unit
                    scores = scores.sqrt()
                per_unit[g.id] = tuple(scores.tolist())
        return PassResult(Scores(per_unit), modified=False)

    @staticmethod
    def _member_scores(state: ScoreRequest, params: Mapping[str, torch.Tensor], name: str, dim: int,
                       indices: tuple[tuple[int, ...], ...], kind: str) -> torch.Tensor:
        w = params[name].detach()
        if state.score == "magnitude":  # squared: rooted once all members are summed
            return torch.tensor([float((s.double() ** 2).sum()) for s in _unit_slices(w, dim, indices)])
        if state.score == "taylor":
            sal = (w * state.calibration.gradients[name]).abs().double()
            return torch.tensor([float(s.sum()) for s in _unit_slices(sal, dim, indices)])
        path = name.rpartition(".")[0]
        stats = state.calibration.inputs.get(path)
        if stats is None or not name.endswith(".weight") or input_dim(state.model.get_submodule(path)) != dim:
            return torch.zeros(len(indices), dtype=torch.float64)  # not the input side of a consuming layer
        per_channel_axes = [d for d in range(w.dim()) if d != dim]
        if state.score == "wanda-sp":
            col = w.abs().double().sum(per_channel_axes) * stats.l2  # (channels,)
            return torch.tensor([float(col[list(u)].sum()) for u in indices])
        col = (w.double() ** 2).sum(per_channel_axes) * stats.variance  # flap: (channels,)
        if kind in ("attention_head", "query_head", "kv_group"):
            col = col ** 2
        col = (col - col.mean()) / col.std().clamp_min(1e-12)
        return torch.tensor([float(col[list(u)].mean()) for u in indices])
