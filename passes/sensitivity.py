"""Block sensitivity pass (analysis): how much the loss feels an error at each block's output.

For block b with output h_b (the residual stream it hands on), the mean squared loss gradient per channel
and token, f_b = E[ ||dL/dh_b||^2 ] / (tokens x channels), on the calibration batches. An error e at h_b
raises the loss by about 1/2 e^T F e with F the Fisher of h_b; with its diagonal averaged, by f_b ||e||^2 / 2.
``SolverConfig(block_energy="gradient")`` multiplies each block's OBS errors by f_b (instead of dividing
them by the energy of the block's input stream), so that the allocator compares blocks by the loss they
cost.

Block by block, with the memory of one block (the streaming solver's rule): a forward sweep stores every
block's input stream (in an ``ActivationStore``: memory up to a budget, then temporary files; or the dense
calibration sweep has stored them already, ``streams``); the head
(everything after the block list: final norm, LM head, loss) runs on the last block's output with the
blocks stood in for by pass-throughs that read no weights, giving dL/dh at the last block; then a backward
sweep from the last block to the first re-runs each block on its stored input and carries the gradient
back through the block's vector-Jacobian product. Each block is made resident twice (forward, backward).
The model's parameters, gradients and block list are left as they were. Half-precision weights (a bf16
checkpoint streamed as it is) are computed in float32 for the head and the VJPs (the VJPs' products as
``precision`` says, below): the gradient is a statistic, and a bf16 backward matrix product took 84 s on an
AVX2 CPU against 0.26 s in float32.

``precision``: the blocks' VJPs (their re-run forward and their backward) run under ``torch.autocast`` in
bfloat16 ("bfloat16"), in float32 ("float32"), or in bfloat16 where the device multiplies bf16 natively
("auto": a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX; ``native_bf16``), else float32. The forward
sweep that stores the block inputs (the same streams the dense sweep hands on), the head (the logits'
softmax needs float32: a logit near 20 is rounded by up to 0.06 in bf16), the gradient handed from block
to block and every sum stay float32. On SmolLM2 (2 CPU cores with AVX512-BF16) one block's forward and
backward took 0.62-0.66x the float32 time, each weight's gradient within 0.6-2.1% and the units' Taylor
saliency ranked alike (rank correlation 0.9999); docs/structprune_solver.md, section 8b.

With ``groups``, the same VJPs also give (``taylor``; ``SolverConfig.taylor_first``) dL/dw of the block's
weights, and each group's units get their first-order Taylor saliency, sum over the unit's weights of
|w * dL/dw| with dL/dw of the mean calibration loss: the score of ``method="taylor-global"``, without ever
holding more than one block's gradients; and (``output_fisher``; ``SolverConfig.obs_weighting="fisher"``)
the mean squared loss gradient per output channel of every linear consumer of the groups, the weights of
the block solve's OBS error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.blockwise import ActivationStore, BlockInput, run_block
from structprune_graph.distributed import LOCAL, Collective
from structprune_graph.errors import StructPruneError
from structprune_graph.graph import Group
from structprune_graph.streaming import resident as in_memory

from ._infra import Pass, PassResult
from .blockwise_calibrate import block_module, consumers_of
from .experts import is_fused_path
from .obs import is_linear
from .calibrate import CalibrationError, default_loss
from .partition import Partition
from .score import taylor_saliency

logger = logging.getLogger(__name__)


class NoLossError(StructPruneError):
    """The model gives no loss for the calibration batches, so there is no loss gradient to measure."""


@dataclass(frozen=True)
class SensitivityRequest:
    model: nn.Module
    partition: Partition
    inputs: Sequence[BlockInput]  # the first block's inputs, one per calibration batch
    batches: Sequence[Any]  # the same batches: the head's loss reads their labels
    resident: Callable[[nn.Module], nn.Module] = field(default=in_memory, compare=False)  # streamed weights
    collective: Collective = field(default=LOCAL, compare=False)  # ranks sharing the batches
    buffer_budget: Optional[int] = None  # bytes of stored block inputs kept in memory; the rest go to files
    # every block's input stream, key (block, batch), and the last block's output, key ("final", batch), as
    # ``BlockCalibratePass(streams_out=...)`` leaves them (consumed: dropped as the backward sweep passes);
    # None: this pass runs its own forward sweep
    streams: Optional[MutableMapping] = field(default=None, compare=False)
    # the groups whose units also get their Taylor saliency (those each block holds: ``Block.group_ids``)
    groups: Optional[Mapping[str, Group]] = None
    taylor: bool = True  # with groups: each unit's Taylor saliency
    output_fisher: bool = False  # with groups: each linear consumer's output Fisher (BlockSensitivity.output_fisher)
    precision: str = "float32"  # PRECISIONS: what the blocks' VJPs compute in (module docstring)


@dataclass(frozen=True)
class BlockSensitivity:
    per_block: tuple[float, ...]  # f_b: mean squared loss gradient per channel and token at block b's output
    # group id -> per unit, sum of |w * dL/dw| over its weights (``groups`` and ``taylor``; higher: more important)
    unit_taylor: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    # full layer path -> (out,) mean over tokens of (dL/dy)^2 per output channel of every linear consumer of
    # the groups (``groups`` and ``output_fisher``): the diagonal Fisher of the layer's output
    output_fisher: Mapping[str, torch.Tensor] = field(default_factory=dict)
    precision: str = "float32"  # what the blocks' VJPs computed in (SensitivityRequest.precision resolved)


class _PassThrough(nn.Module):
    """Stands in for a block while only the head runs: hands on its input stream (the last block: a given
    tensor) in the block's output format, reading none of the block's weights (so no streamer loads them).
    Attributes the model's loop reads from its blocks (``attention_type``) come from the block itself."""

    def __init__(self, block: nn.Module, as_tuple: bool, value: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its weights stay out of this module
        object.__setattr__(self, "_as_tuple", as_tuple)
        object.__setattr__(self, "_value", value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        stream = self._value if self._value is not None else (args[0] if args else next(iter(kwargs.values())))
        return (stream,) if self._as_tuple else stream


HALF = (torch.float16, torch.bfloat16)
PRECISIONS = ("auto", "float32", "bfloat16")  # SensitivityRequest.precision, SolverConfig.sensitivity_precision


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (faster than float32): a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 or AMX tiles. Elsewhere bf16 products are emulated, up to 300x slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes if probe is not None)
    return False


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype the blocks' sweeps run under ``torch.autocast`` in for ``precision`` on ``device``; None: float32."""
    if precision not in PRECISIONS:
        raise StructPruneError(f"block sensitivity pass: unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "bfloat16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


def _float32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in HALF else value


@contextmanager
def _half_as_float32(module: nn.Module, skip: Optional[nn.Module] = None) -> Iterator[None]:
    """``module``'s half-precision parameters and buffers (outside ``skip``) in float32 for the duration;
    the original tensors are put back after."""
    skipped = {id(t) for t in (list(skip.parameters()) + list(skip.buffers()) if skip is not None else [])}
    swapped = [(t, t.data) for t in list(module.parameters()) + list(module.buffers())
               if t.dtype in HALF and id(t) not in skipped]
    try:
        for t, data in swapped:
            t.data = data.float()
        yield
    finally:
        for t, data in swapped:
            t.data = data


@contextmanager
def head_only(model: nn.Module, list_path: str, final: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Within: the model's own forward with every block a pass-through and the last block's output
    ``final`` (batch, tokens, hidden), so only the embeddings and the head compute (half-precision weights
    in float32); the block list is put back after."""
    blocks = model.get_submodule(list_path)
    originals = list(blocks)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _PassThrough(block, as_tuple, final if i == len(originals) - 1 else None)
        with _half_as_float32(model, skip=blocks):
            yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def head_gradient(model: nn.Module, list_path: str, batch: Any, final: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """dL/dh for the last block's output h = ``final`` (batch, tokens, hidden), L the model's own loss."""
    h = _float32(final.detach()).clone().requires_grad_(True)
    with head_only(model, list_path, h, as_tuple), torch.enable_grad():
        try:
            loss = default_loss(model, batch)
        except CalibrationError as err:
            raise NoLossError("block sensitivity pass: block_energy='gradient' needs a model that returns "
                              "a loss for the calibration batches (a causal LM fed input_ids); use "
                              "block_energy='stream'") from err
        (grad,) = torch.autograd.grad(loss, h, allow_unused=True)
    if grad is None:
        raise StructPruneError(f"block sensitivity pass: the loss does not depend on the output of the last block "
                               f"of {list_path!r}; use block_energy='stream'")
    return grad  # (batch, tokens, hidden)


class BlockSensitivityPass(Pass[SensitivityRequest, BlockSensitivity]):
    def requires(self, state: SensitivityRequest) -> None:
        if not state.inputs or len(state.inputs) != len(state.batches):
            raise StructPruneError(f"block sensitivity pass: needs one first-block input per calibration batch, "
                                   f"got {len(state.inputs)} inputs for {len(state.batches)} batches")

    def call(self, state: SensitivityRequest) -> PassResult[BlockSensitivity]:
        blocks = state.partition.blocks
        if state.partition.list_path is None or len(blocks) == 1:
            # one block: a common factor of every curve, which cannot change the allocation
            if state.groups:
                raise StructPruneError("block sensitivity pass: Taylor saliency and output Fisher are swept block "
                                       "by block and this model is solved as one block; take the whole model's "
                                       "gradients (solver.prepare does for taylor_first) or pass no groups")
            return PassResult(BlockSensitivity((1.0,) * len(blocks)), modified=False)
        own = state.streams is None
        store = ActivationStore(state.buffer_budget) if own else state.streams
        try:
            if own:
                self._forward(state, store)
            per_block = self._backward(state, store)
        finally:
            if own:
                store.close()
        return PassResult(per_block, modified=False)

    @staticmethod
    def _forward(state: SensitivityRequest, store: MutableMapping) -> None:
        blocks = state.partition.blocks
        current = list(state.inputs)
        with torch.no_grad():  # in the model's precision: the same streams as the dense sweep hands on
            for block in tqdm(blocks, desc="sensitivity: forward", leave=False):
                module = state.resident(block_module(state.model, block))
                for j, inp in enumerate(current):
                    store[(block.index, j)] = inp.stream  # (batch, tokens, hidden)
                    current[j] = inp.with_stream(run_block(module, inp))
        for j, inp in enumerate(current):
            store[("final", j)] = inp.stream

    @staticmethod
    def _backward(state: SensitivityRequest, store: MutableMapping) -> BlockSensitivity:
        blocks = state.partition.blocks
        sums = [0.0] * len(blocks)
        counts = [0] * len(blocks)
        unit_taylor: dict[str, tuple[float, ...]] = {}
        output_fisher: dict[str, torch.Tensor] = {}
        n_batches = state.collective.sum_floats([len(state.inputs)], "count batches")[0]
        dtype = autocast_dtype(state.precision, state.inputs[0].stream.device)
        logger.info("block sensitivity: blocks in %s", dtype or "float32")
        for block in tqdm(blocks[::-1], desc="sensitivity: backward", leave=False):
            module = state.resident(block_module(state.model, block))
            if block.index == len(blocks) - 1:  # the head's gradient, in the format the block returns
                with torch.no_grad():
                    first = state.inputs[0].with_stream(store[(block.index, 0)])
                    as_tuple = isinstance(module(*first.args, **first.kwargs), (tuple, list))
                for j, batch in enumerate(state.batches):
                    store[("grad", j)] = head_gradient(state.model, state.partition.list_path, batch,
                                                       store[("final", j)], as_tuple)
                    del store[("final", j)]
            unit_taylor.update(BlockSensitivityPass._block(state, store, block, module, sums, counts, n_batches,
                                                            output_fisher, dtype))
        for j in range(len(state.inputs)):
            del store[("grad", j)]
        where = "block sensitivity"
        sums = state.collective.sum_floats(sums, where)
        counts = state.collective.sum_floats([float(c) for c in counts], where)
        return BlockSensitivity(tuple(s / c for s, c in zip(sums, counts)), unit_taylor, output_fisher,
                                str(dtype or torch.float32).removeprefix("torch."))

    @staticmethod
    def _block(state: SensitivityRequest, store: MutableMapping, block, module: nn.Module, sums: list,
               counts: list, n_batches: float, output_fisher: dict,
               dtype: Optional[torch.dtype] = None) -> dict[str, tuple[float, ...]]:
        """One block of the backward sweep: the gradient at its input from the one at its output (stored in
        place), its sums of squared output gradients, and (``groups``) its units' Taylor saliency (returned)
        and its consumers' output Fisher (into ``output_fisher``)."""
        weights = _saliency_weights(module, block, state.groups) if state.groups and state.taylor else {}
        weight_grads = {name: torch.zeros_like(_float32(p.detach())) for name, p in weights.items()}
        layers = _fisher_layers(module, block, state.groups) if state.groups and state.output_fisher else {}
        fisher: dict[str, torch.Tensor] = {}  # path -> (out,) sum over tokens of (dL/dy)^2
        tokens = 0.0
        hooks = [layer.register_forward_hook(_square_grad_hook(fisher, path)) for path, layer in layers.items()]
        try:
            with _half_as_float32(module), _requiring_grad(weights.values()):  # once per block, not per batch
                for j, inp in enumerate(state.inputs):
                    grad = store[("grad", j)]  # dL / d(block output): (batch, tokens, hidden)
                    sums[block.index] += float((grad.double() ** 2).sum())
                    counts[block.index] += grad.numel()
                    tokens += grad.numel() / grad.shape[-1]
                    if block.index > 0 or weights or layers:  # block 0: only for its weights' or layers' gradients
                        # (batch, tokens, hidden); block 0's input gradient is never read, and is not computed
                        # where its weights' gradients carry the backward pass
                        x = _float32(store[(block.index, j)]).clone().requires_grad_(block.index > 0 or not weights)
                        upcast = BlockInput((x, *(_float32(a) for a in inp.args[1:])),
                                            {k: _float32(v) for k, v in inp.kwargs.items()})
                        wrt = [x] if x.requires_grad else []
                        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype or torch.bfloat16,
                                                                 enabled=dtype is not None):
                            out = run_block(module, upcast)
                            grads = torch.autograd.grad(out, [*wrt, *weights.values()], grad.to(out.dtype),
                                                        allow_unused=True)
                        if block.index > 0:
                            store[("grad", j)] = grads[0]
                        for acc, g in zip(weight_grads.values(), grads[len(wrt):]):
                            if g is not None:
                                acc += g.to(acc.dtype)
                    del store[(block.index, j)]
                state.collective.sum_tensors_(weight_grads, f"taylor saliency, block {block.index}")
                saliency = {gid: _group_saliency(state.groups[gid], weights, weight_grads, n_batches)
                            for gid in (block.group_ids if weights else ())}
        finally:
            for h in hooks:
                h.remove()
        if layers:
            prefix = block.path + "." if block.path else ""
            state.collective.sum_tensors_(fisher, f"output fisher, block {block.index}")
            total = state.collective.sum_floats([tokens], f"output fisher, block {block.index}")[0]
            output_fisher.update({prefix + path: f / max(total, 1.0) for path, f in fisher.items()})
        return saliency


def _fisher_layers(module: nn.Module, block, groups: Mapping[str, Group]) -> dict[str, nn.Module]:
    """Path inside the block -> layer, for every linear consumer of the groups the block holds (fused
    experts' weights are not layers: they keep OBS's unweighted error)."""
    found = {}
    for gid in block.group_ids:
        for path, _ in consumers_of(block, module, groups[gid]):
            layer = module.get_submodule(path) if not is_fused_path(module, path) else None
            if layer is not None and is_linear(layer):
                found[path] = layer
    return found


def _square_grad_hook(acc: dict, path: str) -> Callable:
    """A forward hook whose output, when it requires grad, adds its gradient's square per output channel
    (summed over tokens) to ``acc[path]``."""
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            def on_grad(g: torch.Tensor) -> None:
                flat = g.detach().double().reshape(-1, g.shape[-1])  # (tokens, out)
                acc[path] = acc.get(path, 0.0) + (flat ** 2).sum(0)
            out.register_hook(on_grad)
    return hook


def _saliency_weights(module: nn.Module, block, groups: Mapping[str, Group]) -> dict[str, nn.Parameter]:
    """Full parameter name -> the block's parameter, for every member of the groups the block holds."""
    prefix = block.path + "." if block.path else ""
    params = dict(module.named_parameters())
    return {m.name: params[m.name[len(prefix):]] for gid in block.group_ids for m in groups[gid].members
            if m.is_param and m.name.startswith(prefix) and m.name[len(prefix):] in params}


@contextmanager
def _requiring_grad(params) -> Iterator[None]:
    """The parameters require grad for the duration (a frozen model's too); their flags are put back after."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _group_saliency(group: Group, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                    n_batches: float) -> tuple[float, ...]:
    """Per unit, sum of |w * dL/dw| over the group's members, dL/dw of the mean loss over the batches."""
    total = torch.zeros(group.size, dtype=torch.float64)  # (units,)
    for m in group.members:
        if m.is_param and m.name in weights:
            total += taylor_saliency(_float32(weights[m.name].detach()), grads[m.name] / n_batches, m.dim, m.indices)
    return tuple(total.tolist())
