"""The dependency graph: coupled groups of channels and heads, found by interpreting a traced graph.

``trace(model, example_inputs)`` captures the model (``tracing.py``), runs every node's coupling rule
(``registry.py``/``rules.py``) over per-dimension channel labels, resolves the recorded unions into
units (connected components: the channels that must be removed together) and gathers units that touch
the same parameter dimensions into ``Group``s.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from math import prod
from typing import Any, Mapping, Optional, Sequence

import networkx as nx
import numpy as np
import torch
from torch import fx, nn

from .labels import AtomTable, Labelled, Resolution, Space
from .registry import CouplingRule, Registry, bind_aten, bind_module, bind_python, default_registry
from .rules import FlowContext, iter_labelled, unknown
from .tracing import Captured, ExampleInputs, capture
from .units import UnitIndices, UnitTable

logger = logging.getLogger(__name__)


# kinds a method prunes only when asked (``kinds=``): the residual hidden dim, and whole experts (removing one
# re-routes tokens: not a zeroing mask; structprune_graph/moe.py)
OPT_IN_KINDS = ("hidden", "expert")


@dataclass(frozen=True)
class Member:
    """One dimension of one parameter (or buffer) of a group, with the indices each unit owns there."""

    name: str  # canonical name (the first of tied aliases)
    dim: int
    is_param: bool
    indices: Sequence[tuple[int, ...]]  # per unit, sorted (a compact UnitIndices; any sequence of tuples works)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.dim}]"


@dataclass(frozen=True)
class Group:
    """Units that are removed as a whole; a keep-set for a group lists the unit indices kept."""

    id: str
    kind: str
    size: int  # number of units
    prunable: bool
    reason: Optional[str]  # why not prunable
    mask_exact: bool  # False when a norm/softmax/mean reduces over these channels: zeroing != removing
    members: tuple[Member, ...]
    unit_params: tuple[int, ...]  # parameters removed with each unit (other dims at full size)
    heads_per_unit: int = 1  # query heads per unit (kv_group: query heads sharing one KV head)
    module: str = ""  # the attention module of a head group
    min_keep: int = 1

    @property
    def params_per_unit(self) -> int:
        """Parameters removed per unit (the first unit's count; see ``uniform``)."""
        return self.unit_params[0] if self.unit_params else 0

    @property
    def uniform(self) -> bool:
        return len(set(self.unit_params)) <= 1

    @property
    def constraint(self) -> str:
        if self.kind == "query_head":
            return (f"a unit is one query-head slot in every KV group ({self.heads_per_unit} query heads): "
                    f"query heads are pruned uniformly across KV groups; keep at least {self.min_keep} unit")
        if self.kind == "kv_group":
            return (f"a unit is one KV head with its {self.heads_per_unit} query heads; keep at least "
                    f"{self.min_keep} unit")
        return f"keep at least {self.min_keep} unit"


@dataclass(frozen=True)
class DependencyGraph:
    """What ``trace`` returns: the fx graph, the groups, and a networkx graph of channel spaces."""

    groups: tuple[Group, ...]
    captured: Captured = field(repr=False)
    spaces: tuple[Space, ...] = field(repr=False)
    nx_graph: nx.Graph = field(repr=False)
    param_shapes: Mapping[str, tuple[int, ...]] = field(repr=False)  # canonical parameter name -> shape
    buffer_shapes: Mapping[str, tuple[int, ...]] = field(repr=False)
    aliases: Mapping[str, tuple[str, ...]] = field(repr=False)  # canonical name -> every name of the tensor
    unsupported: tuple[str, ...] = ()  # ops that had no rule and touched channels
    fingerprint: str = ""
    # for rewriting literal sizes of view/reshape/expand in a traced GraphModule: node -> labels per out dim
    shape_sites: Mapping[str, tuple[Optional[torch.Tensor], ...]] = field(default_factory=dict, repr=False)
    # the inputs the model was traced on: every rewrite runs the pruned model on them once before returning it
    example_inputs: Any = field(default=None, repr=False, compare=False)

    @property
    def fx_graph(self) -> fx.Graph:
        return self.captured.graph

    def group(self, group_id: str) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(f"no group {group_id!r}; known ids look like {self.groups[0].id!r}" if self.groups else
                       f"no group {group_id!r}: this graph has no groups")

    def space(self, name: str, dim: int) -> Space:
        for sp in self.spaces:
            if sp.name == name and sp.dim == dim:
                return sp
        raise KeyError(f"{name}[{dim}] is not a channel space of this graph")

    @property
    def prunable_groups(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def kept_indices(self, keep: Mapping[str, Any]) -> dict[tuple[str, int], list[int]]:
        """For every (tensor, dim) a keep-set shrinks: the indices that stay, ascending."""
        removed: dict[tuple[str, int], set[int]] = {}
        for gid, kept in keep.items():
            group = self.group(gid)
            dropped = set(range(group.size)) - set(int(i) for i in kept)
            for member in group.members:
                for unit in dropped:
                    removed.setdefault((member.name, member.dim), set()).update(member.indices[unit])
        result = {}
        for (name, dim), gone in removed.items():
            size = (self.param_shapes.get(name) or self.buffer_shapes[name])[dim]
            result[(name, dim)] = [i for i in range(size) if i not in gone]
        return result

    def prunable_param_count(self, exclude_kinds: tuple[str, ...] = OPT_IN_KINDS) -> int:
        """Parameters that lie on at least one index of a prunable group (each counted once), i.e. what
        pruning every such group to nothing would remove. The opt-in kinds (the hidden dim, whole experts)
        are excluded by default."""
        covered: dict[tuple[str, int], set[int]] = {}  # groups may overlap (kv_group and query_head)
        for g in self.prunable_groups:
            if g.kind in exclude_kinds:
                continue
            for m in g.members:
                covered.setdefault((m.name, m.dim), set()).update(i for u in m.indices for i in u)
        return sum(prod(shape) - prod(s - len(covered.get((name, d), ())) for d, s in enumerate(shape))
                   for name, shape in self.param_shapes.items())

    def param_count(self, keep: Optional[Mapping[str, Any]] = None) -> int:
        """Parameters of the model after applying ``keep`` (every distinct tensor counted once)."""
        kept = self.kept_indices(keep or {})
        total = 0
        for name, shape in self.param_shapes.items():
            total += prod(len(kept[(name, d)]) if (name, d) in kept else s for d, s in enumerate(shape))
        return total


# ------------------------------------------------------------------------------------ analysis
class _Interpreter:
    """Runs each node's coupling rule over labels, in graph order."""

    def __init__(self, captured: Captured, model: nn.Module, registry: Registry) -> None:
        self.captured, self.registry = captured, registry
        self.atoms = AtomTable()
        self.tensors: dict[str, torch.Tensor] = {}
        self.is_param: dict[str, bool] = {}
        self.canonical: dict[str, str] = {}
        self._register_state(model if captured.frontend == "export" else captured.root)
        self.state: dict[str, Labelled] = {}
        self.unsupported: list[str] = []
        self.shape_sites: dict[str, tuple] = {}

    def _register_state(self, root: nn.Module) -> None:
        first: dict[int, str] = {}
        for name, t in root.named_parameters(remove_duplicate=False):
            self.canonical[name] = first.setdefault(id(t), name)
            self.tensors.setdefault(first[id(t)], t)
            self.is_param[first[id(t)]] = True
        for name, t in root.named_buffers(remove_duplicate=False):
            self.canonical[name] = first.setdefault(id(t), name)
            self.tensors.setdefault(first[id(t)], t)
            self.is_param.setdefault(first[id(t)], False)

    def state_labels(self, name: str) -> Labelled:
        name = self.canonical.get(name, name)
        if name not in self.state:
            t = self.tensors[name]
            dims = tuple(self.atoms.allocate(name, d, s, self.is_param[name]) if s > 1 else None
                         for d, s in enumerate(t.shape))
            self.state[name] = Labelled(tuple(t.shape), dims)
        return self.state[name]

    def run(self) -> None:
        env: dict[str, Any] = {}
        cap = self.captured
        for node in cap.graph.nodes:
            plain_out = cap.values.get(node.name)
            if node.op in ("placeholder", "get_attr"):
                env[node.name] = self.state_labels(cap.state_of[node.name]) if node.name in cap.state_of else plain_out
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            module = cap.module_path.get(node.name, "")
            if node.op == "output":
                ctx = FlowContext(self.atoms, node.name, "output", module)
                ctx.pin_all(args, "channels reach a model output")
                continue
            env[node.name] = self.run_node(node, args, kwargs, plain_out, module)

    def resolve_rule(self, node: fx.Node, args: tuple, kwargs: dict) -> tuple[Optional[CouplingRule], dict, str]:
        if node.op == "call_module":
            submodule = self.captured.root.get_submodule(node.target)
            found = self.registry.for_module(submodule)
            op = type(submodule).__name__
            if found is None:
                return None, {"args": args, "kwargs": kwargs}, op
            rule, form = found
            bound = bind_module(form, submodule, args, kwargs)
            for arg, attr in form.attrs:  # parameters/buffers of the module: their labels
                if isinstance(getattr(submodule, attr), torch.Tensor):
                    bound[arg] = self.state_labels(f"{node.target}.{attr}")
            return rule, bound, op
        if node.op == "call_method":
            rule = self.registry.for_method(node.target)
            op = f"Tensor.{node.target}"
            return (rule, bind_python(rule, args, kwargs), op) if rule else (None, {"args": args, "kwargs": kwargs}, op)
        op = str(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(
            node.target, "__qualname__", str(node.target))
        rule = self.registry.for_target(node.target)
        if rule is None:
            return None, {"args": args, "kwargs": kwargs}, op
        if isinstance(node.target, torch._ops.OpOverload):
            return rule, bind_aten(node.target, args, kwargs), op
        return rule, bind_python(rule, args, kwargs), op

    def run_node(self, node: fx.Node, args: tuple, kwargs: dict, plain_out: Any, module: str) -> Any:
        rule, bound, op = self.resolve_rule(node, args, kwargs)
        ctx = FlowContext(self.atoms, node.name, op, module)
        if rule is None:
            if any(t.is_labelled for t in iter_labelled(bound)):
                self.unsupported.append(f"{op} at node '{node.name}'")
            return unknown(ctx, bound, plain_out)
        result = rule.flow(ctx, bound, plain_out)
        if self.captured.frontend == "fx" and rule.name in ("reshape", "expand") and isinstance(result, Labelled):
            self.shape_sites[node.name] = result.dims
        return result


def _heads_per_unit(res: Resolution) -> tuple[dict[int, int], dict[int, str]]:
    heads, module_of = {}, {}
    for _, atoms, module in res.table.tags:
        comps = res.of(atoms)
        per_comp = np.unique(comps, return_counts=True)
        for comp, count in zip(*per_comp):
            heads[int(comp)] = max(heads.get(int(comp), 1), int(count))
            module_of.setdefault(int(comp), module)
    return heads, module_of


def _kind(comps: list[int], members: list[Space], shapes: Mapping[str, tuple], res: Resolution,
          heads: Mapping[int, int]) -> str:
    if any(c in heads for c in comps):
        return "kv_group" if max(heads.get(c, 1) for c in comps) > 1 else "attention_head"
    convs = sum(1 for m in members if m.is_param and len(shapes[m.name]) >= 3)
    linears = sum(1 for m in members if m.is_param and len(shapes[m.name]) == 2)
    embedded = any(c in res.flagged.get("embedding", ()) for c in comps)
    residual_norm = any(c in res.flagged.get("residual", ()) and c in res.flagged.get("reduced", ()) for c in comps)
    # kinds from structure, not from norms: channels that exactly one layer reads on its input dim live
    # inside one branch (an MLP's, even through GRN's add and norm); the stream the residual adds carry
    # is read by every block, and is ``hidden`` (a LayerNorm-ed conv net's streams too)
    readers = sum(1 for m in members if m.is_param and len(shapes[m.name]) >= 2 and m.dim == 1)
    if residual_norm and not embedded and readers == 1:
        return "conv_channel" if convs > linears else "mlp_channel"
    if embedded or residual_norm:
        return "hidden"
    # a fused expert tensor (experts, out, in) read on its last dim: the MLP channels of every expert at once
    if any(m.is_param and len(shapes[m.name]) == 3 and m.dim == 2 for m in members):
        return "expert_channel"
    if convs:
        return "conv_channel"
    return "mlp_channel" if linears >= 2 else "channel"


def _make_group(gid: str, kind: str, spaces: list[Space], signature: tuple[int, ...],
                member_indices: Sequence[UnitIndices], shapes: Mapping[str, tuple], **fields: Any) -> Group:
    members = tuple(Member(spaces[s].name, spaces[s].dim, spaces[s].is_param, idx)
                    for s, idx in zip(signature, member_indices))
    per_unit = sum((m.indices.sizes() * prod(n for d, n in enumerate(shapes[m.name]) if d != m.dim)
                    for m in members if m.is_param), np.zeros(len(member_indices[0]), dtype=np.int64))
    return Group(id=gid, kind=kind, size=len(member_indices[0]), members=members,
                 unit_params=tuple(per_unit.tolist()), **fields)


def build_groups(interp: _Interpreter, res: Resolution) -> tuple[Group, ...]:
    """Units (components holding parameter atoms) gathered into groups by the dims they touch."""
    spaces = interp.atoms.spaces
    if not spaces:
        return ()
    degree = interp.atoms.degree()
    heads, module_of = _heads_per_unit(res)
    table = UnitTable.build(spaces, res.component, degree)
    by_signature: dict[tuple, list[int]] = {}  # (spaces, pinned) -> unit positions in the table
    for i, c in enumerate(table.comp.tolist()):
        by_signature.setdefault((table.signature(i), c in res.pin_reason), []).append(i)
    shapes = {n: tuple(t.shape) for n, t in interp.tensors.items()}
    hard = interp.atoms.resolve(hard_only=True) if interp.atoms.gqa_sites else None
    hard_units = UnitTable.build(spaces, hard.component, degree) if hard is not None else None
    groups: list[Group] = []
    seen_ids: dict[str, int] = {}
    for (signature, pinned), positions in sorted(by_signature.items(), key=lambda kv: int(table.first_atom[kv[1]].min())):
        entries = np.array(positions)[np.argsort(table.first_atom[positions], kind="stable")]
        comp_ids = table.comp[entries].tolist()
        kind = _kind(comp_ids, [spaces[s] for s in signature], shapes, res, heads)
        module = module_of.get(comp_ids[0], "") if kind in ("attention_head", "kv_group") else ""
        gid = f"{kind}:{module or f'{spaces[signature[0]].name}[{spaces[signature[0]].dim}]'}"
        seen_ids[gid] = seen_ids.get(gid, 0) + 1
        gid = gid if seen_ids[gid] == 1 else f"{gid}#{seen_ids[gid]}"
        reason = res.pin_reason.get(comp_ids[0]) if pinned else None
        if not pinned and len(entries) < 2:
            reason = "a single unit: removing it would remove the whole dimension"
        groups.append(_make_group(
            gid, kind, spaces, signature, [table.member(entries, k) for k in range(len(signature))], shapes,
            prunable=reason is None, reason=reason,
            mask_exact=not any(c in res.flagged.get("reduced", ()) for c in comp_ids),
            heads_per_unit=max(heads.get(c, 1) for c in comp_ids), module=module))
        if kind == "kv_group" and reason is None and hard is not None:
            lanes = _query_head_group(interp, res, hard, hard_units, set(comp_ids), module, shapes)
            if lanes is not None:
                groups.append(lanes)
    return tuple(groups)


def _query_head_group(interp: _Interpreter, full: Resolution, hard: Resolution,
                      units: UnitTable, kv_units: set[int], module: str,
                      shapes: Mapping[str, tuple]) -> Optional[Group]:
    """Grouped-query attention: the query heads of one slot in every KV group form a unit, found from the
    resolution without the soft (query ~ shared KV head) edges. None when they cannot be separated."""
    sites = [s for s in interp.atoms.gqa_sites if set(full.of(s.query_heads).tolist()) <= kv_units]
    if not sites:
        return None
    site = sites[0]
    head_comps = hard.of(site.query_heads)
    slots = int(site.lanes.max()) + 1
    lanes = [sorted(set(head_comps[(site.lanes == r).numpy()].tolist())) for r in range(slots)]
    flat = [c for lane in lanes for c in lane]
    position = {c: i for i, c in enumerate(units.comp.tolist()) if c in set(flat)}
    if slots < 2 or len(flat) != len(set(flat)) or any(c not in position or c in hard.pin_reason for c in flat):
        return None
    unit_members = []
    for lane in lanes:
        merged: dict[int, list[int]] = {}
        for c in lane:
            for s, idx in units.members(position[c]).items():
                merged.setdefault(s, []).extend(idx)
        unit_members.append(merged)
    signature = tuple(sorted({s for u in unit_members for s in u}))
    member_indices = [UnitIndices.of([sorted(u.get(s, ())) for u in unit_members]) for s in signature]
    # a flat graph (ExportedProgram.module()) has no attention module: name the group by its first tensor
    first = interp.atoms.spaces[signature[0]]
    name = module or f"{first.name}[{first.dim}]"
    return _make_group(f"query_head:{name}", "query_head", interp.atoms.spaces, signature, member_indices, shapes,
                       prunable=True, reason=None,
                       mask_exact=not any(c in hard.flagged.get("reduced", ()) for c in flat),
                       heads_per_unit=len(site.query_heads) // slots, module=module)


def _nx_graph(groups: tuple[Group, ...], spaces: list[Space]) -> nx.Graph:
    g = nx.Graph()
    for sp in spaces:
        g.add_node(f"{sp.name}[{sp.dim}]", kind="space", size=sp.size, is_param=sp.is_param)
    for group in groups:
        g.add_node(group.id, kind="group", group_kind=group.kind, units=group.size, prunable=group.prunable)
        for m in group.members:
            g.add_edge(group.id, m.label, units=group.size, channels=sum(len(u) for u in m.indices))
    return g


def model_fingerprint(model: nn.Module) -> str:
    """Identifies a model's structure: class, and every parameter and buffer name, shape and dtype."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def trace(model: nn.Module, example_inputs: ExampleInputs, *, registry: Optional[Registry] = None,
          frontend: str = "auto") -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (a tuple of positional tensors or a dict of keyword
    tensors) into a ``DependencyGraph``. Small inputs suffice (e.g. batch 2, 8 tokens): labels are
    per-dimension, so cost grows with the number of nodes and channels, not with the input size."""
    captured = capture(model, example_inputs, frontend)
    interp = _Interpreter(captured, model, registry or default_registry())
    interp.run()
    res = interp.atoms.resolve()
    from .moe import expert_groups  # the structural rule for MoE routers (it builds on Group)

    groups = expert_groups(build_groups(interp, res), model, interp.canonical)
    aliases: dict[str, list[str]] = {}
    for name, canon in interp.canonical.items():
        aliases.setdefault(canon, []).append(name)
    shapes = {name: tuple(t.shape) for name, t in interp.tensors.items()}
    graph = DependencyGraph(
        groups=groups, captured=captured, spaces=tuple(interp.atoms.spaces),
        nx_graph=_nx_graph(groups, interp.atoms.spaces),
        param_shapes={n: s for n, s in shapes.items() if interp.is_param[n]},
        buffer_shapes={n: s for n, s in shapes.items() if not interp.is_param[n]},
        aliases={k: tuple(v) for k, v in aliases.items()}, unsupported=tuple(interp.unsupported),
        fingerprint=model_fingerprint(model), shape_sites=dict(interp.shape_sites), example_inputs=example_inputs)
    from .verify import verify_graph

    verify_graph(graph)
    logger.info("traced %s: %d groups (%d prunable)", type(model).__name__, len(groups), len(graph.prunable_groups))
    return graph
