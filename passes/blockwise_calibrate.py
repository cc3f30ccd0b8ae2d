"""Block-wise calibration pass: one sweep of the calibration data through the dense blocks, one block at
a time, collecting each block's second-order statistics and turning them into per-group error curves.

For every block: H = X^T X of the input of each consumer layer of the block's groups (the layer that reads
a group's channels: ``down_proj``, ``o_proj``, the next linear layer), from the block's own input (the
dense trajectory); the greedy structured-OBS order of each group's units and the error of removing the
first k of them (``passes/obs.py``), divided by the energy of the block's input stream so that blocks
compare (a relative perturbation of the residual stream). The statistics of one block are dropped before
the next block runs: only one block's H matrices exist at a time. The model is never modified.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.blockwise import BlockInput, run_block
from structprune_graph.distributed import LOCAL, Collective
from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group
from structprune_graph.module_attrs import input_dim
from structprune_graph.streaming import resident
from structprune_graph.units import unit_tensors

from . import experts as fused
from ._infra import Pass, PassResult
from .obs import (DEFAULT_DAMPING, Consumer, as_out_in, damped, gram, greedy_obs, is_linear, kernel_size, token_capped,
                  unfold, unfoldable)
from .partition import Block, Partition


@dataclass(frozen=True)
class GroupCurve:
    """The greedy removal order of a group's units and the relative error each removal adds."""

    order: tuple[int, ...]
    increments: tuple[float, ...]  # error added by order[i], relative to the block input energy

    def error(self, k: int) -> float:
        return float(sum(self.increments[:k]))


@dataclass(frozen=True)
class BlockCalibrationRequest:
    model: nn.Module
    partition: Partition
    groups: Mapping[str, Group]
    inputs: Sequence[BlockInput]  # the first block's inputs, one per calibration batch
    max_remove: Mapping[str, int]  # group id -> most units the allocator may remove
    damping: float = DEFAULT_DAMPING
    keep_final: tuple[int, ...] = ()  # batch indices whose dense final output is kept (ADMM targets)
    block_energy: str = "stream"  # what a block's errors are relative to (``stream_energy``)
    statistics_dtype: torch.dtype = torch.float64  # of H, H^-1 and the OBS work (passes/obs.py)
    curve_error: str = "obs"  # what the curves count (obs.CURVE_ERRORS): with the re-fit, without, or between
    centred: bool = False  # linear consumers' H centred: errors after the best bias (refit_bias="centred")
    token_cap: Optional[float] = None  # each token's row of X at most this x the median row's energy (obs.token_capped)
    resident: Callable[[nn.Module], nn.Module] = field(default=resident, compare=False)  # streamed weights
    collective: Collective = field(default=LOCAL, compare=False)  # ranks sharing the batches (distributed.py)
    # where the sweep leaves every block's input stream, key (block, batch), and the last block's output, key
    # ("final", batch), for a later pass that re-runs blocks (passes/sensitivity.py); None: kept nowhere
    streams_out: Optional[MutableMapping] = field(default=None, compare=False)


@dataclass(frozen=True)
class BlockCalibration:
    curves: Mapping[str, GroupCurve]
    input_energy: tuple[float, ...]  # per block: sum of x^2 over the calibration tokens of its input
    final_outputs: Mapping[int, torch.Tensor] = field(default_factory=dict)  # batch -> dense last-block output


def block_module(model: nn.Module, block: Block) -> nn.Module:
    return model.get_submodule(block.path) if block.path else model


def consumers_of(block: Block, module: nn.Module, group: Group) -> list[tuple[str, torch.Tensor]]:
    """(path inside the block, column indices per unit) of every layer reading the group's channels."""
    found = []
    for m in group.members:
        path, _, attr = m.name.rpartition(".")
        local = path[len(block.path) + 1:] if block.path else path
        if m.is_param and attr != "weight" and fused.fused_input(module.get_submodule(local), attr, m.dim):
            found.append((f"{local}.{attr}", unit_tensors(m.indices)))
            continue  # fused experts: one consumer per expert (passes/experts.py)
        if not m.is_param or attr != "weight":
            continue
        layer = module.get_submodule(local)
        if getattr(layer, "groups", 1) > 1:
            continue  # a grouped convolution maps each channel group on its own: not columns of one matrix
        if input_dim(layer) == m.dim:
            found.append((local, unit_tensors(m.indices)))
    return found


class StatsCollector:
    """Forward pre-hooks accumulating H = X^T X (linear layers, in ``dtype``: the solver's working precision)
    or per-channel sum x^2 (others). ``centred``: linear layers also sum x, and ``centre`` turns H into the
    centred H - n mu mu^T (the statistics of a fit with a free bias) and keeps mu. ``token_cap``: every H sums
    token rows capped at that many times the batch's median row energy (``obs.token_capped``); not with
    ``centred`` (a capped mean would need capped sums and counts too)."""

    def __init__(self, module: nn.Module, paths: Sequence[str], dtype: torch.dtype = torch.float64,
                 centred: bool = False, token_cap: Optional[float] = None) -> None:
        if centred and token_cap is not None:
            raise StructPruneError("StatsCollector: token_cap with centred statistics is not supported; use one")
        self.dtype = dtype
        self.centred = centred
        self.token_cap = token_cap
        self.hessians: dict[str, torch.Tensor] = {}
        self.energies: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}  # linear layer -> (in,) sum of x over the tokens (centred only)
        self.tokens: dict[str, torch.Tensor] = {}  # linear layer -> tokens counted, a 1-element float64 tensor
        self.means: dict[str, torch.Tensor] = {}  # after ``centre``: linear layer -> (in,) mean input
        # refit_target="model": linear layer -> (in, out) X^T X~ W^T (a ModelTargetCollector's, set by the solve)
        self.targets: Mapping[str, torch.Tensor] = {}
        # refit_prior: linear layer -> (H of the prior batches, their tokens / the calibration's) (set by the solve)
        self.prior: Mapping[str, tuple[torch.Tensor, float]] = {}
        self._module, self._paths = module, sorted(set(paths))
        self._handles = []
        self._register()

    def _register(self) -> None:
        for p in self._paths:
            if fused.is_fused_path(self._module, p):  # H per expert, under "path#e"
                self._handles.append(fused.hook_experts(self._module.get_submodule(p.rpartition(".")[0]), p,
                                                        self.hessians, self.dtype, self.token_cap))
            else:
                self._handles.append(self._module.get_submodule(p).register_forward_pre_hook(self._hook(p)))

    @contextmanager
    def paused(self):
        """Runs of the block inside count nothing (e.g. the dense trajectory's, for ModelTargetCollector)."""
        self.close()
        try:
            yield
        finally:
            self._register()

    def _hook(self, path: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if is_linear(layer) or unfoldable(layer):
                flat = unfold(layer, x).float() if unfoldable(layer) else x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
                h = gram(token_capped(flat, self.token_cap)).to(self.dtype)  # (in, in)
                self.hessians[path] = self.hessians[path] + h if path in self.hessians else h
                if self.centred and not unfoldable(layer):  # a convolution's patch mean is not a bias (padding)
                    total = flat.double().sum(0)  # (in,)
                    self.sums[path] = self.sums[path] + total if path in self.sums else total
                    n = torch.tensor([float(flat.shape[0])], dtype=torch.float64)
                    self.tokens[path] = self.tokens[path] + n if path in self.tokens else n
            else:
                flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()  # (channels, positions)
                e = (flat ** 2).sum(1)
                self.energies[path] = self.energies[path] + e if path in self.energies else e
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reduce(self, collective: Collective, stage: str) -> None:
        """Sum the statistics over the ranks (each ran its share of the batches)."""
        collective.sum_tensors_(self.hessians, f"{stage}: H")
        collective.sum_tensors_(self.energies, f"{stage}: channel energies")
        if self.centred:
            collective.sum_tensors_(self.sums, f"{stage}: input sums")
            collective.sum_tensors_(self.tokens, f"{stage}: token counts")

    def centre(self, hessians: bool = True) -> None:
        """After ``reduce``: mu = s / n kept in ``means`` for every layer with sums, and with ``hessians`` H ->
        H - n mu mu^T in place (no second matrix: the 7B MLP's H is 0.9 GB in float64)."""
        for path, s in self.sums.items():
            n = float(self.tokens[path])
            self.means[path] = s / n  # (in,) float64
            if hessians:
                self.hessians[path].addr_(s.to(self.dtype), s.to(self.dtype), alpha=-1.0 / n)


class ModelTargetCollector:
    """The right-hand side of a re-fit toward the dense *model's* activations (``refit_target="model"``):
    P = X^T (X~ W^T) per linear (or unfoldable convolution) consumer, X its input on the pruned trajectory
    (the dense block on the pruned blocks' output, the X of H = X^T X), X~ its input in the dense model, W its
    dense weight. Inside ``dense()`` a run of the block on the dense trajectory records X~ W^T; the next run,
    on the pruned trajectory (the same batch), adds X^T X~ W^T. Fused experts get none (the block's target)."""

    def __init__(self, module: nn.Module, paths: Sequence[str], dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.targets: dict[str, torch.Tensor] = {}  # consumer path -> (in, out)
        self._outputs: dict[str, list[torch.Tensor]] = {}  # consumer path -> this batch's X~ W^T, (tokens, out)
        self._recording = False
        self._handles = []
        for p in sorted(set(paths)):
            if fused.is_fused_path(module, p):
                continue
            layer = module.get_submodule(p)
            if is_linear(layer) or unfoldable(layer):
                self._handles.append(layer.register_forward_pre_hook(self._hook(p)))

    def _hook(self, path: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            with torch.autocast(args[0].device.type, enabled=False):  # float32 products in a bf16 forward
                record(layer, args[0].detach())

        def record(layer: nn.Module, x: torch.Tensor) -> None:
            flat = unfold(layer, x).float() if unfoldable(layer) else x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
            if self._recording:
                self._outputs.setdefault(path, []).append(flat @ as_out_in(layer, layer.weight, torch.float32).T)
                return
            waiting = self._outputs.get(path)
            if not waiting:
                raise StructPruneError(f"refit_target='model': {path} ran on the pruned trajectory without a run "
                                       f"on the dense one first; run the block inside dense() first")
            p = (flat.T @ waiting.pop(0)).to(self.dtype)  # (in, out)
            self.targets[path] = self.targets[path] + p if path in self.targets else p
        return hook

    @contextmanager
    def dense(self):
        """Record X~ W^T: the block runs on the dense trajectory's input."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def reduce(self, collective: Collective, stage: str) -> None:
        """Sum over the ranks (each ran its share of the batches)."""
        collective.sum_tensors_(self.targets, f"{stage}: dense-model targets")


def consumer_width(module: nn.Module, path: str) -> int:
    """Input width of a consumer: a layer's weight's last dim, or a fused expert tensor's."""
    if fused.is_fused_path(module, path):
        return int(module.get_parameter(path).shape[-1])
    return int(module.get_submodule(path).weight.shape[-1])


def build_consumers(block: Block, module: nn.Module, group: Group, stats: StatsCollector, damping: float,
                    weights: Optional[Mapping[str, torch.Tensor]] = None, consume: Collection[str] = ()) -> list[Consumer]:
    """The group's consumers with their damped H. ``consume``: consumer paths whose H this group is the last
    to read: taken out of ``stats`` and damped in place instead of copied (one H less at the peak)."""
    def hessian(key: str, path: str) -> Optional[torch.Tensor]:
        return stats.hessians.pop(key, None) if path in consume else stats.hessians.get(key)

    out = []
    for path, columns in consumers_of(block, module, group):
        if fused.is_fused_path(module, path):  # one consumer per expert; an expert no token reached costs nothing
            for e, w in enumerate(fused.expert_weights(path, module.get_parameter(path), weights, stats.dtype)):
                h = hessian(f"{path}{fused.SEP}{e}", path)
                h = h if h is not None and bool(h.any()) else torch.eye(w.shape[1], dtype=stats.dtype) * 1e-12
                out.append(Consumer(f"{path}{fused.SEP}{e}", w.clone(), damped(h, damping, path in consume), columns))
            continue
        layer = module.get_submodule(path)
        w = weights[path] if weights is not None and path in weights else as_out_in(layer, layer.weight, stats.dtype)
        h = hessian(path, path)
        energy = stats.energies.get(path)
        k = kernel_size(layer)
        if k > 1:  # a channel of a convolution is its k kernel columns (see as_out_in)
            columns = [(c[:, None] * k + torch.arange(k)).reshape(-1) for c in columns]
            energy = energy.repeat_interleave(k) if energy is not None else None
        out.append(Consumer(path, w.clone(), damped(h, damping, path in consume) if h is not None else None, columns,
                            energy=energy))
    return out


# "gradient" divides by the stream energy here like "stream"; the solver then multiplies that energy back
# out and scales by the block's loss sensitivity (passes/sensitivity.py). "auto": "gradient" where the
# model gives a loss for the calibration batches (a causal LM), else "stream"
BLOCK_ENERGIES = ("auto", "stream", "robust", "gradient")


def channel_energy(inputs: Sequence[BlockInput]) -> torch.Tensor:
    """Sum of x^2 of the block's input stream per channel (the last dim; dim 1 of a conv net's maps)."""
    total = None
    for i in inputs:
        if not i.args:
            continue
        x = i.stream.double()
        x = x.movedim(1, -1) if x.dim() == 4 else x
        e = (x ** 2).reshape(-1, x.shape[-1]).sum(0)  # (channels,)
        total = e if total is None else total + e
    return total if total is not None else torch.zeros(1, dtype=torch.float64)


def stream_energy(per_channel: torch.Tensor, how: str = "stream") -> float:
    """The energy a block's errors are relative to: ``stream``, the sum over channels; ``robust``, channels
    x the median channel's, blind to the few massive channels that hold most of a transformer's stream
    from a middle layer on (SmolLM2: one channel holds 97% from block 12), which make every error there
    look small."""
    if how == "robust":
        return float(per_channel.median()) * per_channel.numel()
    return float(per_channel.sum())


class BlockCalibratePass(Pass[BlockCalibrationRequest, BlockCalibration]):
    def requires(self, state: BlockCalibrationRequest) -> None:
        if not state.inputs:
            raise StructPruneError("block-wise calibration pass: no calibration batches reached the first block")

    def call(self, state: BlockCalibrationRequest) -> PassResult[BlockCalibration]:
        curves: dict[str, GroupCurve] = {}
        energies = []
        finals = {}
        inputs = list(state.inputs)
        blocks = state.partition.blocks
        for block in tqdm(blocks, desc="calibrate blocks", leave=False):
            module = state.resident(block_module(state.model, block))
            paths = [p for gid in block.group_ids for p, _ in consumers_of(block, module, state.groups[gid])]
            stats = StatsCollector(module, paths, state.statistics_dtype, state.centred, state.token_cap)
            outputs = []
            try:
                with torch.no_grad():
                    for j, inp in enumerate(inputs):
                        if state.streams_out is not None:
                            state.streams_out[(block.index, j)] = inp.stream
                        outputs.append(run_block(module, inp))
            finally:
                stats.close()
            where = f"calibrate block {block.index}"
            stats.reduce(state.collective, where)
            stats.centre()
            per_channel = torch.tensor(state.collective.sum_floats(channel_energy(inputs).tolist(), where),
                                       dtype=torch.float64)
            energy = stream_energy(per_channel, state.block_energy) if block.path else 1.0
            energies.append(energy)
            # consumers built one group at a time, inside its OBS task: only that group's damped H exist, and
            # the last group to read a consumer's H damps it in place
            paths_of = {gid: [p for p, _ in consumers_of(block, module, state.groups[gid])] for gid in block.group_ids}
            work = [gid for gid in block.group_ids if paths_of[gid]]  # else the allocator gives the reason
            last = {p: gid for gid in work for p in paths_of[gid]}

            def curve(gid: str, stats: StatsCollector = stats) -> tuple[list[int], list[float]]:
                consumers = build_consumers(block, module, state.groups[gid], stats, state.damping,
                                            consume={p for p in paths_of[gid] if last[p] == gid})
                return greedy_obs(consumers, state.groups[gid].size, state.max_remove[gid], error=state.curve_error)

            found = state.collective.map_owned(
                [lambda gid=gid: curve(gid) for gid in work],
                [float(sum(consumer_width(module, p) ** 3 for p in paths_of[gid])) for gid in work],
                f"{where}: OBS curves")
            for gid, (order, inc) in zip(work, found):
                curves[gid] = GroupCurve(tuple(order), tuple(i / energy for i in inc))
            del stats
            if block.index == len(blocks) - 1:
                finals = {i: outputs[i] for i in state.keep_final}
                for j, out in enumerate(outputs if state.streams_out is not None else ()):
                    state.streams_out[("final", j)] = out
            inputs = [inp.with_stream(out) for inp, out in zip(inputs, outputs)] if block.path else inputs
        return PassResult(BlockCalibration(curves, tuple(energies), finals), modified=False)
