"""Pass infrastructure: ``__call__`` runs ``requires -> call -> ensures`` and returns a typed result
(in the manner of torch.fx's ``passes/infra/pass_base.py`` and onnx-ir's ``_pass_infra.py``)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Generic, TypeVar

StateIn = TypeVar("StateIn")
StateOut = TypeVar("StateOut")


@dataclass(frozen=True)
class PassResult(Generic[StateOut]):
    state: StateOut
    modified: bool


class Pass(abc.ABC, Generic[StateIn, StateOut]):
    """One job. ``requires`` and ``ensures`` raise a typed error when an invariant does not hold."""

    def requires(self, state: StateIn) -> None:  # noqa: B027 - optional hook
        """Check preconditions on the input state."""

    @abc.abstractmethod
    def call(self, state: StateIn) -> PassResult[StateOut]:
        """Do the pass's work."""

    def ensures(self, state: StateIn, result: PassResult[StateOut]) -> None:  # noqa: B027 - optional hook
        """Check postconditions on the result."""

    def __call__(self, state: StateIn) -> PassResult[StateOut]:
        self.requires(state)
        result = self.call(state)
        self.ensures(state, result)
        return result
