"""Prune a checkpoint on disk without ever holding the model: the streaming form of ``prune``.

    skeleton (meta) -> trace -> partition -> block-wise calibrate -> allocate -> block solve
                    -> write the pruned blocks one shard at a time

The skeleton is the checkpoint's architecture with no weights; a ``WeightStreamer`` materialises the
part outside the blocks once and each block when a pass needs it; the solver's re-fitted weights go to
a disk-backed store as each block is solved; the output folder gets one safetensors shard per block,
each read, re-fitted and sliced on its own. Peak memory: the resident part, two blocks, the calibration
activations and one block's statistics, whatever the depth. ``structprune_graph.load`` reads the result.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from structprune_graph.passes import ApplyPass, RewriteRequest
from structprune_graph.passes.partition import find_block_list
from structprune_graph.passes.round_widths import WidthRule

from .blockwise import ActivationStore
from .distributed import LOCAL, Collective
from .errors import StructPruneError
from .evaluate import STAGE_LOG, count_params, track_peak_memory
from .graph import DependencyGraph, trace
from .plan import Plan
from .pruning import PruneReport, _tracing_inputs, make_report, select_groups, solver_details
from .solver import SolverConfig, prepare, solve
from .report import write_report
from .storage import SHARD_INDEX, atomic_folder, check_output_dir, write_meta
from .streaming import CheckpointWeights, WeightStreamer, empty_model, meta_inputs
from .verify import verify_forward

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPruneResult:
    directory: Path
    plan: Plan
    report: PruneReport
    graph: DependencyGraph = field(repr=False)
    weight_loads: int = 0  # blocks materialised from disk over the run


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch.to(device)


def prune_checkpoint(folder: Union[str, Path], calibration: Iterable[Mapping[str, torch.Tensor]], sparsity: float,
                     output: Union[str, Path], *, solver: Optional[SolverConfig] = None,
                     kinds: Optional[Sequence[str]] = None, device: Union[str, torch.device] = "cpu",
                     overwrite: bool = False, tokenizer: Any = None, round_to: int = 1,
                     uniform: bool = False, distributed: bool = False,
                     dtype: Optional[torch.dtype] = None) -> CheckpointPruneResult:
    """``prune(method="structprune")`` for a transformers checkpoint folder that is never loaded whole:
    writes the pruned model to ``output`` (shards, config, plan, report), loadable with ``load``;
    ``round_to``/``uniform`` as for ``prune`` (the folder keeps the dense config and the plan).
    ``distributed``: one rank of an initialised process group; every rank streams the same checkpoint and
    runs its share of the batches; rank 0 alone writes ``output``, the others wait for it.
    ``dtype``: the working precision of the weights (a bf16 checkpoint computed in fp32, or an fp32 one in
    bf16 at half the memory); None: as stored. Statistics are in ``solver.statistics`` whatever it is; every tensor is
    written in the precision the checkpoint stores it in."""
    folder, output, device = Path(folder), Path(output), torch.device(device)
    batches = tuple(_to(b, device) for b in calibration)
    if not batches or not isinstance(batches[0], Mapping):
        raise StructPruneError("prune_checkpoint needs calibration batches as dicts of keyword tensors "
                               "(input_ids, attention_mask)")
    collective = Collective.from_process_group() if distributed else LOCAL
    all_batches, example = len(batches), batches[0]
    batches = tuple(batches[i] for i in collective.shard(len(batches)))
    check_output_dir(output, overwrite, inputs=(folder,))  # refuse before any work is done
    solver = solver or SolverConfig()
    if solver.rounds and solver.coordination == "kl":
        raise StructPruneError("prune_checkpoint: coordination='kl' runs the whole model's head and backward sweep on "
                               "a model in memory; use rounds=0 or coordination='admm' when streaming")
    widths = WidthRule(round_to, uniform)
    source = CheckpointWeights(folder)
    start = time.perf_counter()
    with track_peak_memory() as peak:
        skeleton = empty_model(folder, meta_buffers=True)  # traced and rewritten: shapes only
        graph = trace(skeleton, meta_inputs(example))
        model = empty_model(folder)  # run: parameters streamed in
        groups = select_groups(graph, kinds)
        list_path = find_block_list(model, groups)
        if list_path is None:
            raise StructPruneError(f"{type(model).__name__} has no block list holding its groups: streaming "
                                   f"needs one; load the model and use prune() instead")
        refitted = ActivationStore(budget_bytes=0)  # re-fitted weights go to disk as each block is solved
        try:
            # two blocks resident only for the coordination rounds' coupling step
            with WeightStreamer(model, list_path, source, device, capacity=2 if solver.rounds else 1,
                                dtype=dtype) as streamer:
                state = prepare(model, graph, groups, batches, solver, streamer, collective)
                solved = solve(model, state, batches, sparsity, solver, groups, streamer, refitted, widths, collective)
                loads = streamer.loads
            details = solver_details(solver, solved, state)
            if collective.active:
                details["distributed"] = {"ranks": collective.world, "rank": collective.rank,
                                          "bytes_sent": dict(collective.traffic)}
            biases = dict(solved.new_biases)  # SolverConfig.refit_bias: room for them in the skeleton
            pruned = ApplyPass()(RewriteRequest(skeleton, graph, solved.keep, {  # shapes and attributes
                path: torch.empty(delta.shape, device="meta") for path, delta in biases.items()})).state
            plan = Plan.from_keep(graph, skeleton, solved.keep, meta={"method": "structprune", "sparsity": sparsity,
                                                                     "bias_compensated": sorted(biases),
                                                                     "streamed": True})
            if collective.rank:  # rank 0 writes; the others return once it has
                collective.barrier("wait for rank 0 to write the output")
                report = make_report("structprune", sparsity, solved.removed_params, groups, graph, solved.keep,
                                     count_params(skeleton), count_params(pruned), peak, all_batches,
                                     details)
                return CheckpointPruneResult(output, plan, report, graph, loads)
            with atomic_folder(output, overwrite) as tmp:
                written = time.perf_counter()
                write_shards(tmp, pruned, graph, solved.keep, solved.new_weights, source, list_path, biases)
                details["stages"]["write"] = round(time.perf_counter() - written, 3)
                logger.info(STAGE_LOG, "write", details["stages"]["write"])
                peak.seconds = time.perf_counter() - start  # the report covers the writing too
                report = make_report("structprune", sparsity, solved.removed_params, groups, graph, solved.keep,
                                     count_params(skeleton), count_params(pruned), peak, all_batches,
                                     details)
                write_report(tmp, report)
                pruned.config.save_pretrained(tmp)
                plan.save(tmp / "plan.json")
                write_meta(tmp, type(skeleton).__name__, {k: v.cpu() for k, v in batches[0].items()
                                                          if isinstance(v, torch.Tensor)},
                           "a streamed pruning keeps the dense config")
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / "tokenizer")
                with streamed(tmp, device, dtype) as written:  # run what we write, from the files themselves
                    verify_forward(written, _tracing_inputs(example), where="prune_checkpoint")
            collective.barrier("rank 0 wrote the output")
        finally:
            refitted.close()
    return CheckpointPruneResult(output, plan, report, graph, loads)


def write_shards(folder: Path, pruned: nn.Module, graph: DependencyGraph, keep: Mapping[str, Sequence[int]],
                 refitted: Mapping[str, torch.Tensor], source: CheckpointWeights, list_path: str,
                 bias_updates: Mapping[str, torch.Tensor] = MappingProxyType({})) -> None:
    """One safetensors shard per block (and one for the rest): each tensor read from ``source`` (or its
    re-fitted value), sliced to the kept indices and written before the next shard is read. ``bias_updates``
    (layer path -> added to its bias) go onto the stored bias, or make one in the layer weight's dtype."""
    from safetensors.torch import save_file

    kept: dict[str, list[tuple[int, list[int]]]] = {}
    for (tensor, dim), indices in graph.kept_indices(keep).items():
        kept.setdefault(tensor, []).append((dim, indices))
    names = [n for n, _ in pruned.named_parameters()]  # tied weights once, as save_pretrained stores them
    names += [n for n, _ in pruned.named_buffers() if n in source]
    shards: dict[str, list[str]] = {}
    for name in names:
        rest = name[len(list_path) + 1:] if name.startswith(list_path + ".") else None
        shards.setdefault(f"block-{int(rest.split('.')[0]):05d}" if rest else "rest", []).append(name)
    aliases = {a: canon for canon, names_ in graph.aliases.items() for a in names_}
    weight_map = {}
    added = {f"{path}.bias": delta for path, delta in bias_updates.items()}  # parameter name -> (out,)
    for shard, shard_names in tqdm(sorted(shards.items()), desc="write shards", leave=False):
        stored = {n: _stored_name(n, aliases, source) for n in shard_names
                  if n not in refitted and not (n in added and n not in source)}
        values = source.read(set(stored.values()))
        tensors = {}
        for name in shard_names:
            # re-fitted weights come in the working precision (--dtype): written in the checkpoint's own
            if name in added:  # a new bias in its layer weight's stored dtype
                base = values[stored[name]] if name in stored else 0.0
                dtype = source.dtype_of(_stored_name(name.rpartition(".")[0] + ".weight", aliases, source))
                value = (added[name].double() + base).to(dtype)
            elif name in refitted:
                value = refitted[name].to(source.dtype_of(_stored_name(name, aliases, source)))
            else:
                value = values[stored[name]]
            for dim, indices in kept.get(aliases.get(name, name), ()):
                value = value.index_select(dim, torch.tensor(indices, dtype=torch.long))
            tensors[name] = value.contiguous()
        file = f"model-{shard}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard_names})
        del tensors, values
    total = sum(p.numel() * p.element_size() for p in pruned.parameters())
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=1))


def _stored_name(name: str, aliases: Mapping[str, str], source: CheckpointWeights) -> str:
    """The checkpoint's name for a parameter (a tied weight may be stored under another alias)."""
    canon = aliases.get(name, name)
    for candidate in (name, canon, *(a for a, c in aliases.items() if c == canon)):
        if candidate in source:
            return candidate
    raise StructPruneError(f"no tensor for {name!r} in the checkpoint {source.folder}")


def block_list_path(model: nn.Module) -> str:
    """The ``nn.ModuleList`` (two or more children) holding the most parameters: the blocks to stream."""
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise StructPruneError(f"{type(model).__name__} has no nn.ModuleList of blocks to stream; load it whole")
    return max(lists)[1]


@contextmanager
def streamed(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
             dtype: Optional[torch.dtype] = None) -> Iterator[nn.Module]:
    """A model backed by a checkpoint folder (or a folder written by the pruner) whose blocks are read from
    disk as they run: evaluate a model larger than memory (perplexity, outputs) one block at a time."""
    from .storage import example_inputs_of, pruned_structure

    folder = Path(folder)
    model = empty_model(folder)
    if (folder / "structprune.json").is_file():  # a pruned folder: its shapes come from the plan
        graph = trace(empty_model(folder, meta_buffers=True), meta_inputs(example_inputs_of(folder)))
        model = pruned_structure(folder, model, graph)
    with WeightStreamer(model, block_list_path(model), CheckpointWeights(folder), device, dtype=dtype):
        yield model
