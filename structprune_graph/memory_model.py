"""How much memory a streamed pruning (``prune_checkpoint``, ``structprune prune --stream``) needs at its
peak, from the block sizes alone: the formula behind the O(one block) claim, checked against measured runs
(``examples/scale_7b.py``, ``tests/test_memory_model.py``).

    peak - baseline = resident + capacity x block + statistics + activations

- resident: the parameters outside the block list (embeddings, final norm, LM head), always in memory;
- block: the largest block's parameters, ``capacity`` of them resident (1; 2 with coordination rounds);
- statistics: the solver's work (float64, or float32 with ``statistics``) on the block with the widest
  consumer layers: every consumer's
  H = X^T X (in x in) of the block held at once, plus, for the widest consumer, ``OBS_COPIES`` more
  matrices of its size: H^-1 and its shrinking copy while the first units leave (H^-1 is factored and
  inverted in place in one copy of H; the last group to read a consumer's H damps it in place, in the dense
  sweep and in the block solve, whose re-fit re-uses it); and ``WEIGHT_COPIES`` copies of its weight in that
  precision (out x in: the original kept for the re-fit, the OBS working copy, its shrinking update, the
  re-fitted result);
- activations: the calibration tokens' residual stream twice (the inputs and outputs of the current
  block for every batch) plus one batch's widest intermediate (the MLP's, three tensors wide).

Not in the formula: a float32 re-fit redone in float64 (its check failed: H nearly singular, as in 9 of the 64
re-fits of the random-init 7B-shaped run with 512 calibration tokens) holds its kept block of H, the right-hand side and
the weight in float64 for that layer (1.23 GiB beyond H and W at the 7B MLP's width,
``examples/solver_memory_7b.py``).

The dense sweep's removal curves (``SolverConfig.curve_error="removal"``, the default) hold one more
matrix the size of the widest consumer's weight, Q = W_S H_S,: (``passes/obs.py``), in the dense sweep only,
whose peak is below the block solve's (7B-shaped run 2: 3.87 against 5.32 GiB net), so the formula is unchanged.

The stored block inputs of the gradient block energy and the re-fitted weights go to temporary files
beyond ``SolverConfig.buffer_budget`` and 0 bytes respectively, so they add at most the buffer budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

OBS_COPIES = 2
WEIGHT_COPIES = 4
INTERMEDIATE_COPIES = 3


@dataclass(frozen=True)
class MemoryEstimate:
    resident: int
    blocks: int
    statistics: int
    activations: int
    buffers: int

    @property
    def total(self) -> int:
        return self.resident + self.blocks + self.statistics + self.activations + self.buffers

    def as_gib(self) -> dict:
        gib = {k: round(v / 2**30, 3) for k, v in vars(self).items()}
        return {**gib, "total_gib": round(self.total / 2**30, 3)}


def streaming_peak(folder: Union[str, Path], calibration_tokens: int, batch_tokens: Optional[int] = None,
                   dtype: Optional[torch.dtype] = None, capacity: int = 1,
                   buffer_budget: int = 256 * 2**20, kinds: Optional[Sequence[str]] = None,
                   statistics: torch.dtype = torch.float32) -> MemoryEstimate:
    """The predicted net peak (bytes over the process's baseline) of pruning the checkpoint ``folder`` with
    ``calibration_tokens`` tokens in batches of ``batch_tokens`` (default: all in one), weights in ``dtype``
    (default: as stored), the groups of ``kinds`` selected (default: the pruning default), the solver's
    matrices in ``statistics`` (``SolverConfig.statistics``)."""
    from .checkpoint import block_list_path
    from .graph import trace
    from .passes.calibrate import consumer_modules
    from .pruning import select_groups
    from .streaming import CheckpointWeights, empty_model, meta_inputs

    model = empty_model(folder, meta_buffers=True)  # shapes only, as prune_checkpoint traces it
    graph = trace(model, meta_inputs({"input_ids": torch.zeros(2, 8, dtype=torch.long)}))
    consumers = consumer_modules(model, select_groups(graph, kinds))  # the layers the solver takes H of
    path = block_list_path(model)
    blocks = model.get_submodule(path)
    if dtype is None:  # as stored
        dtype = CheckpointWeights(folder).dtype_of(f"{path}.0.{next(iter(dict(blocks[0].named_parameters())))}")
    width = dtype.itemsize
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    in_blocks = sum(p.numel() for p in blocks.parameters())
    resident = sum(p.numel() for p in model.parameters()) - in_blocks

    def shapes_in(i: int) -> list[tuple[int, int]]:  # (out, in) of block i's consumer layers
        weights = {c: model.get_submodule(c).weight for c in consumers if c.startswith(f"{path}.{i}.")}
        return [(w.numel() // w.shape[consumers[c]], w.shape[consumers[c]]) for c, w in weights.items()]

    shapes = max((shapes_in(i) for i in range(len(blocks))), key=lambda s: sum(i * i for _, i in s), default=[])
    item = statistics.itemsize
    h = sum(i * i * item for _, i in shapes)
    widest = max(shapes, key=lambda s: s[1], default=(0, 0))
    work = h + OBS_COPIES * widest[1] ** 2 * item + WEIGHT_COPIES * widest[0] * widest[1] * item
    hidden = model.config.hidden_size
    intermediate = max((i for _, i in shapes), default=hidden)
    activations = 2 * calibration_tokens * hidden * 4 + \
        INTERMEDIATE_COPIES * (batch_tokens or calibration_tokens) * intermediate * 4
    return MemoryEstimate(resident * width, capacity * block_params * width, work, activations,
                          min(buffer_budget, calibration_tokens * hidden * 4 * len(blocks)))
