"""The rewrite pass: apply keep-sets to a copy of the model, physically (``ApplyPass``) or as the
reference semantics with unchanged shapes (``MaskPass``). The input model is never modified."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import fx, nn

from structprune_graph.errors import KeepSetError, RewriteError
from structprune_graph.graph import DependencyGraph
from structprune_graph.verify import verify_forward, verify_rewrite
from structprune_graph.module_attrs import HEAD_ATTRS, HEAD_ATTRS_SCALED_BY_KIND, fix_layer, output_dim
from structprune_graph.moe import fix_expert_counts

from ._infra import Pass, PassResult
from .experts import is_fused_experts

logger = logging.getLogger(__name__)

Keep = Mapping[str, tuple[int, ...]]
GROUPED_MM_ALIGNMENT = 8  # channels: grouped_mm's 16-byte strides in fp32 and in 16-bit weights
REFERENCE_MAX_BYTES = 2 * 2**30  # above: the masked reference (a copy of the model) is not built


@dataclass(frozen=True)
class RewriteRequest:
    model: nn.Module
    graph: DependencyGraph
    keep: Keep  # group id -> unit indices kept
    bias_updates: Mapping[str, torch.Tensor] = field(default_factory=dict)  # layer path -> added to its bias
    weight_updates: Mapping[str, torch.Tensor] = field(default_factory=dict)  # parameter -> new full-shape value
    # run the result once on the graph's example inputs (against the masked reference where exact)
    run_check: bool = True


def validate_keep(graph: DependencyGraph, keep: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Check a keep-set against the graph; return it normalised (sorted tuples of ints)."""
    known = {g.id: g for g in graph.groups}
    result = {}
    for gid, kept in keep.items():
        if gid not in known:
            close = [k for k in known if k.split(":")[-1] == str(gid).split(":")[-1]][:3]
            raise KeepSetError(f"keep-set names unknown group {gid!r}" + (f"; did you mean {close}?" if close else
                               f"; list them with graph.groups (first: {next(iter(known), None)!r})"))
        group = known[gid]
        try:
            indices = tuple(sorted(int(i) for i in kept))
        except (TypeError, ValueError) as err:
            raise KeepSetError(f"group {gid!r}: kept indices must be integers ({err})") from None
        if len(set(indices)) != len(indices):
            raise KeepSetError(f"group {gid!r}: kept indices contain duplicates")
        if indices and (indices[0] < 0 or indices[-1] >= group.size):
            raise KeepSetError(f"group {gid!r} has units 0..{group.size - 1}; got index "
                               f"{indices[0] if indices[0] < 0 else indices[-1]}")
        if len(indices) < group.size:
            if not group.prunable:
                raise KeepSetError(f"group {gid!r} is not prunable: {group.reason}. Keep all its units or omit it.")
            if len(indices) < group.min_keep:
                raise KeepSetError(f"group {gid!r} must keep at least {group.min_keep} unit(s) "
                                   f"({group.constraint}); got {len(indices)}")
        result[gid] = indices
    return result


def _removed(graph: DependencyGraph, keep: Keep) -> dict[str, tuple[int, ...]]:
    """Group id -> the unit indices a keep-set drops."""
    return {gid: tuple(sorted(set(range(graph.group(gid).size)) - set(kept))) for gid, kept in keep.items()}


class MaskPass(Pass[RewriteRequest, nn.Module]):
    """Same shapes; every parameter slice of a removed unit is zero (the reference semantics)."""

    def requires(self, state: RewriteRequest) -> None:
        validate_keep(state.graph, state.keep)

    def call(self, state: RewriteRequest) -> PassResult[nn.Module]:
        keep = validate_keep(state.graph, state.keep)
        model = copy.deepcopy(state.model)
        params = dict(model.named_parameters(remove_duplicate=False))
        modified = bool(state.weight_updates) or bool(state.bias_updates)
        with torch.no_grad():
            for name, value in state.weight_updates.items():  # re-fitted values, removed slices zeroed below
                params[name].copy_(value)
            _add_to_biases(model, state.bias_updates)
            for gid, dropped in _removed(state.graph, keep).items():
                for member in state.graph.group(gid).members:
                    if not member.is_param or not dropped:
                        continue
                    idx = torch.tensor([i for u in dropped for i in member.indices[u]], dtype=torch.long)
                    params[member.name].index_fill_(member.dim, idx, 0.0)
                    modified = True
        return PassResult(model, modified)


class ApplyPass(Pass[RewriteRequest, nn.Module]):
    """A physically smaller copy: every member parameter and buffer sliced, layer and attention
    attributes updated, literal reshape sizes of a traced GraphModule rewritten."""

    def requires(self, state: RewriteRequest) -> None:
        validate_keep(state.graph, state.keep)

    def call(self, state: RewriteRequest) -> PassResult[nn.Module]:
        graph, keep = state.graph, validate_keep(state.graph, state.keep)
        kept = graph.kept_indices(keep)
        tensors = dict(state.model.named_parameters(remove_duplicate=False))
        tensors.update(dict(state.model.named_buffers(remove_duplicate=False)))
        for name, value in state.weight_updates.items():
            if name not in tensors or tensors[name].shape != value.shape:
                raise RewriteError(f"rewrite pass: weight update for {name!r} does not match a parameter "
                                   f"of that shape ({tuple(value.shape)})")
        by_name: dict[str, list[tuple[int, list[int]]]] = {}
        for (name, dim), indices in kept.items():
            by_name.setdefault(name, []).append((dim, indices))
        # the copy is made with the sliced (and re-fitted) tensors already in place: the full-size
        # duplicates of the pruned tensors never exist (peak memory: the input plus the pruned copy)
        memo: dict[int, torch.Tensor] = {}
        touched_modules = set()
        with torch.no_grad():
            for name in set(by_name) | set(state.weight_updates):
                value = state.weight_updates.get(name, tensors[name]).detach()
                for dim, indices in by_name.get(name, ()):
                    value = value.index_select(dim, torch.tensor(indices, dtype=torch.long))
                original = tensors[name]
                value = value.clone()
                if name in graph.param_shapes or isinstance(original, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=original.requires_grad)
                memo[id(original)] = value
                if name in by_name:
                    touched_modules.update(alias.rpartition(".")[0] for alias in graph.aliases.get(name, (name,)))
        model = copy.deepcopy(state.model, memo)
        self._check_bias_updates(model, kept, state.bias_updates)
        _add_to_biases(model, state.bias_updates)
        for path in touched_modules:
            fix_layer(model.get_submodule(path))
            fix_expert_counts(model.get_submodule(path))  # whole experts removed: the router and experts count
        self._fix_attention_modules(model, graph, keep)
        self._fix_fused_experts(model, touched_modules)
        if isinstance(model, fx.GraphModule) and graph.captured.frontend == "fx":
            self._fix_shape_literals(model, graph, keep)
        return PassResult(model, bool(by_name) or bool(state.bias_updates) or bool(state.weight_updates))

    @staticmethod
    def _check_bias_updates(model: nn.Module, kept: Mapping, updates: Mapping[str, torch.Tensor]) -> None:
        for path in updates:
            layer = model.get_submodule(path)
            if (f"{path}.weight", output_dim(layer)) in kept or (f"{path}.bias", 0) in kept:
                raise RewriteError(f"rewrite pass: bias update of {path} with its output channels pruned too "
                                   f"is not supported; exclude the group that prunes {path}'s outputs")

    @staticmethod
    def _fix_attention_modules(model: nn.Module, graph: DependencyGraph, keep: Keep) -> None:
        """Scale the head counts an attention module reads: its own attributes and, where its code reads
        them from the config every layer shares (Phi-3's fused qkv split), a copy of that config of its own."""
        own_config: set[int] = set()
        for gid, indices in keep.items():
            group = graph.group(gid)
            scaled = HEAD_ATTRS_SCALED_BY_KIND.get(group.kind, ())
            if not scaled or not group.module or len(indices) == group.size:
                continue
            module = model.get_submodule(group.module)
            targets = [(module, group.module)]
            config = getattr(module, "config", None)
            if config is not None and any(isinstance(vars(config).get(a), int) for a in HEAD_ATTRS):
                if id(module) not in own_config:  # widths differ per layer: never touch the shared config
                    module.config = copy.deepcopy(config)
                    own_config.add(id(module))
                targets.append((module.config, f"{group.module}.config"))
            for owner, where in targets:
                _scale_head_attrs(owner, where, gid, scaled, len(indices), group.size, own=owner is module)

    @staticmethod
    def _fix_fused_experts(model: nn.Module, touched: set) -> None:
        """Fused experts sliced to a width grouped_mm cannot run (it needs 16-byte strides: a multiple of 8
        channels covers fp32 and 16-bit weights) run that layer with the ``eager`` loop, on a config of its
        own; the other layers keep theirs."""
        for path in sorted(touched):
            module = model.get_submodule(path)
            if not is_fused_experts(module):
                continue
            width = module.down_proj.shape[-1]  # (experts, hidden, intermediate)
            if hasattr(module, "intermediate_dim"):
                module.intermediate_dim = width
            config = getattr(module, "config", None)
            if width % GROUPED_MM_ALIGNMENT and getattr(config, "_experts_implementation", None) == "grouped_mm":
                module.config = copy.deepcopy(config)
                module.config._experts_implementation = "eager"
                logger.warning("%s keeps %d expert channels (not a multiple of %d, as grouped_mm needs): this "
                               "layer runs its experts with the eager loop; round_to=%d keeps grouped_mm", path,
                               width, GROUPED_MM_ALIGNMENT, GROUPED_MM_ALIGNMENT)

    @staticmethod
    def _fix_shape_literals(model: fx.GraphModule, graph: DependencyGraph, keep: Keep) -> None:
        """Literal sizes of view/reshape/expand count the channels that stay along each labelled dim."""
        removed: list[torch.Tensor] = []
        for (name, dim), indices in graph.kept_indices(keep).items():
            space = graph.space(name, dim)
            gone = sorted(set(range(space.size)) - set(indices))
            removed.append(torch.tensor(gone, dtype=torch.long) + space.start)
        if not removed:
            return
        removed_atoms = torch.cat(removed)
        nodes = {n.name: n for n in model.graph.nodes}
        for name, dims in graph.shape_sites.items():
            node = nodes[name]
            packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
            sizes = list(node.args[1]) if packed else list(node.args[1:])
            for d, lab in enumerate(dims):
                if lab is not None and d < len(sizes) and isinstance(sizes[d], int) and sizes[d] != -1:
                    sizes[d] = int((~torch.isin(lab, removed_atoms)).sum())
            node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
        model.recompile()

    def ensures(self, state: RewriteRequest, result: PassResult[nn.Module]) -> None:
        keep = validate_keep(state.graph, state.keep)
        verify_rewrite(state.graph, keep, result.state, tuple(state.bias_updates))
        inputs = state.graph.example_inputs
        if not state.run_check or inputs is None or any(p.device.type == "meta" for p in result.state.parameters()):
            return  # a skeleton on the meta device is checked where its weights are streamed in
        pruned = [gid for gid, kept in keep.items() if len(kept) < state.graph.group(gid).size]
        reference = None
        weight_bytes = sum(p.numel() * p.element_size() for p in state.model.parameters())
        if weight_bytes > REFERENCE_MAX_BYTES:  # the masked reference is a whole copy of the model
            logger.info("rewrite pass: %.1f GiB of weights: the pruned model is run and checked for finite outputs, "
                        "not compared with a masked copy", weight_bytes / 2**30)
        elif all(state.graph.group(gid).mask_exact for gid in pruned):
            reference = MaskPass()(RewriteRequest(state.model, state.graph, keep, state.bias_updates,
                                                  state.weight_updates, run_check=False)).state
        verify_forward(result.state, inputs, reference, where="rewrite pass")


def _scale_head_attrs(owner: object, where: str, gid: str, scaled: frozenset, kept: int, size: int, own: bool) -> None:
    """Every head-count attribute of ``owner`` in a scaled category, times kept / size."""
    for attr, category in HEAD_ATTRS.items():
        old = getattr(owner, attr, None) if own else vars(owner).get(attr)
        if category not in scaled or not isinstance(old, int) or isinstance(old, bool):
            continue
        new, rem = divmod(old * kept, size)
        if rem:
            raise RewriteError(f"group {gid!r}: {where}.{attr}={old} does not scale to {kept}/{size} units; "
                               f"keep a multiple that divides it")
        setattr(owner, attr, new)


def _add_to_biases(model: nn.Module, updates: Mapping[str, torch.Tensor]) -> None:
    """Compensation of removed inputs (FLAP): bias += delta, creating the bias when the layer has none."""
    for path, delta in updates.items():
        layer = model.get_submodule(path)
        with torch.no_grad():
            if getattr(layer, "bias", None) is None:
                layer.bias = nn.Parameter(delta.to(layer.weight.dtype).clone())
            else:
                layer.bias.add_(delta.to(layer.bias.dtype))
