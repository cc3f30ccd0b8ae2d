"""Partition pass: split the model into sequential blocks that each fit a memory budget.

The cut points are where one tensor, the residual stream, crosses: the children of the model's block
list (decoder layers), found as the ``nn.ModuleList`` that holds the most selected groups and checked on
a real batch to be called in order, each on the previous one's output. Every selected group lies inside
one block; a group with members in two blocks (the residual hidden dim, tied weights) or outside the
blocks is excluded with its reason. A model without such a list is one block.

A block's footprint is its parameters plus the activations of one calibration batch (the boundary input
and output and two intermediates: ``ACTIVATION_COPIES`` x the stream); the coupling step of the ADMM
pass holds two neighbouring blocks. A budget below the largest footprint is an error naming the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from torch import nn

from structprune_graph.errors import StructPruneError
from structprune_graph.graph import DependencyGraph, Group

from ._infra import Pass, PassResult

ACTIVATION_COPIES = 4


class MemoryBudgetError(StructPruneError, ValueError):
    """The memory budget is below what one block (or two, for the coupling step) needs."""


@dataclass(frozen=True)
class Block:
    index: int
    path: str  # module path of the block ("" for a model that is one block)
    param_bytes: int
    activation_bytes: int
    group_ids: tuple[str, ...]

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.activation_bytes


@dataclass(frozen=True)
class PartitionRequest:
    model: nn.Module
    graph: DependencyGraph
    groups: tuple[Group, ...]
    stream_bytes: int  # one calibration batch of the residual stream at a block boundary
    memory_budget: Optional[int] = None  # bytes; None: unlimited
    coupled: bool = True  # the ADMM coupling step holds two neighbouring blocks
    chain_problem: Optional[str] = None  # why the block list does not chain (from a real batch), if it does not


@dataclass(frozen=True)
class Partition:
    list_path: Optional[str]  # the nn.ModuleList of blocks; None: the whole model is one block
    blocks: tuple[Block, ...]
    excluded: Mapping[str, str]  # group id -> why it is not pruned by the block-wise solver
    peak_bytes: int  # the largest footprint held at once

    def block_of(self, group_id: str) -> Block:
        return next(b for b in self.blocks if group_id in b.group_ids)


def _human(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _owner(name: str, prefixes: list[str]) -> Optional[int]:
    for i, prefix in enumerate(prefixes):
        if name.startswith(prefix + "."):
            return i
    return None


def find_block_list(model: nn.Module, groups: tuple[Group, ...]) -> Optional[str]:
    """The ModuleList (two or more children) whose children each hold whole groups, most groups first."""
    best, best_count = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefixes = [f"{path}.{i}" if path else str(i) for i in range(len(module))]
        count = sum(1 for g in groups if len({_owner(m.name, prefixes) for m in g.members} - {None}) == 1
                    and all(_owner(m.name, prefixes) is not None for m in g.members))
        if count > best_count:
            best, best_count = path, count
    return best


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class PartitionPass(Pass[PartitionRequest, Partition]):
    def call(self, state: PartitionRequest) -> PassResult[Partition]:
        list_path = find_block_list(state.model, state.groups) if state.chain_problem is None else None
        act = ACTIVATION_COPIES * state.stream_bytes
        if list_path is None:
            block = Block(0, "", _param_bytes(state.model), act, tuple(g.id for g in state.groups))
            return PassResult(Partition(None, (block,), {}, block.bytes), modified=False)
        blocks_module = state.model.get_submodule(list_path)
        prefixes = [f"{list_path}.{i}" if list_path else str(i) for i in range(len(blocks_module))]
        owned: dict[int, list[str]] = {i: [] for i in range(len(prefixes))}
        excluded = {}
        for g in state.groups:
            owners = {_owner(m.name, prefixes) for m in g.members}
            if len(owners) == 1 and None not in owners:
                owned[owners.pop()].append(g.id)
            elif len(owners - {None}) > 1:
                excluded[g.id] = (f"spans blocks {sorted(owners - {None})[:4]} of {list_path} (the residual stream): "
                                  f"not pruned by the block-wise solver")
            else:
                outside = next(m.name for m in g.members if _owner(m.name, prefixes) is None)
                excluded[g.id] = f"has members outside the blocks of {list_path} ({outside})"
        blocks = tuple(Block(i, prefixes[i], _param_bytes(blocks_module[i]), act, tuple(owned[i]))
                       for i in range(len(prefixes)))
        held = [b.bytes for b in blocks]
        if state.coupled and len(blocks) > 1:
            held = [blocks[i].bytes + blocks[i + 1].param_bytes for i in range(len(blocks) - 1)]
        return PassResult(Partition(list_path, blocks, excluded, max(held)), modified=False)

    def ensures(self, state: PartitionRequest, result: PassResult[Partition]) -> None:
        part = result.state
        placed = [gid for b in part.blocks for gid in b.group_ids]
        if len(placed) != len(set(placed)):
            raise StructPruneError("partition pass: a group was placed in two blocks")
        if set(placed) | set(part.excluded) != {g.id for g in state.groups}:
            raise StructPruneError("partition pass: some selected groups are neither placed nor excluded")
        budget = state.memory_budget
        if budget is not None and part.peak_bytes > budget:
            largest = max(part.blocks, key=lambda b: b.bytes)
            name = largest.path or type(state.model).__name__
            raise MemoryBudgetError(
                f"partition pass: memory budget {_human(budget)} is below block {name!r}, which needs "
                f"{_human(largest.bytes)} ({_human(largest.param_bytes)} weights + {_human(largest.activation_bytes)} "
                f"activations of one batch; {_human(part.peak_bytes)} with its neighbour for the coupling step). "
                f"Raise --memory-budget to at least {_human(part.peak_bytes)} or use smaller calibration batches.")

