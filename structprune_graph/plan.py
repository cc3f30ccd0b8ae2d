"""A pruning plan: keep-sets plus what identifies the model; JSON so it can be reviewed and replayed."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional, Union

from torch import nn

from .errors import PlanMismatchError
from .graph import DependencyGraph, model_fingerprint

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Plan:
    model_class: str
    fingerprint: str  # model_fingerprint(): class, parameter/buffer names, shapes, dtypes
    keep: Mapping[str, tuple[int, ...]]  # group id -> kept unit indices (only groups that shrink)
    group_sizes: Mapping[str, int]  # units each listed group had, to catch a different model
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form: method, sparsity, ...

    @staticmethod
    def from_keep(graph: DependencyGraph, model: nn.Module, keep: Mapping[str, Any],
                  meta: Optional[Mapping[str, Any]] = None) -> "Plan":
        from structprune_graph.passes import validate_keep

        norm = validate_keep(graph, keep)
        shrinking = {gid: kept for gid, kept in norm.items() if len(kept) < graph.group(gid).size}
        return Plan(type(model).__qualname__, graph.fingerprint, MappingProxyType(shrinking),
                    MappingProxyType({gid: graph.group(gid).size for gid in shrinking}),
                    MappingProxyType(dict(meta or {})))

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "model_class": self.model_class, "fingerprint": self.fingerprint,
                           "meta": dict(self.meta), "groups": {gid: {"size": self.group_sizes[gid], "keep": list(kept)}
                                                               for gid, kept in self.keep.items()}}, indent=1)

    @staticmethod
    def from_json(text: str) -> "Plan":
        data = json.loads(text)
        if data.get("format") != PLAN_FORMAT:
            raise PlanMismatchError(f"plan format {data.get('format')!r} is not supported (expected {PLAN_FORMAT})")
        groups = data["groups"]
        return Plan(data["model_class"], data["fingerprint"],
                    MappingProxyType({gid: tuple(g["keep"]) for gid, g in groups.items()}),
                    MappingProxyType({gid: int(g["size"]) for gid, g in groups.items()}),
                    MappingProxyType(data.get("meta", {})))

    def save(self, path: Union[str, Path]) -> Path:
        """Write atomically: a temporary file in the same folder, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def load(path: Union[str, Path]) -> "Plan":
        path = Path(path)
        try:
            return Plan.from_json(path.read_text())
        except FileNotFoundError:
            raise PlanMismatchError(f"no plan at {path}: a pruned folder holds the plan.json that structprune "
                                    f"wrote; re-run the pruning or restore the file") from None
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise PlanMismatchError(f"{path} is not a valid structprune plan ({type(err).__name__}: {err}); "
                                    f"restore the plan.json that structprune wrote") from None

    def check(self, model: nn.Module, graph: DependencyGraph) -> None:
        """Raise ``PlanMismatchError`` unless this plan was made for a model like ``model``."""
        if type(model).__qualname__ != self.model_class or model_fingerprint(model) != self.fingerprint:
            raise PlanMismatchError(
                f"plan was made for {self.model_class} (fingerprint {self.fingerprint}) but got "
                f"{type(model).__qualname__} (fingerprint {model_fingerprint(model)}): parameter names, shapes or "
                f"dtypes differ. Apply it to the same architecture and configuration.")
        sizes = {g.id: g.size for g in graph.groups}
        for gid, size in self.group_sizes.items():
            if sizes.get(gid) != size:
                raise PlanMismatchError(f"plan group {gid!r} had {size} units; this model's graph has "
                                        f"{sizes.get(gid, 'no such group')}")
