"""Whole experts of a mixture-of-experts layer as one group each: the router's row for the expert and the
expert's slices of the fused expert tensors.

The channel analysis pins the expert dim, and rightly for an op-level rule: the router's logits go through
``softmax`` and ``topk``, and the fused tensors are indexed by expert id. For transformers' standard MoE
block (a router module with ``weight`` (experts, hidden), ``top_k`` and ``num_experts``, beside a fused
experts module, ``passes/experts.py``) the structure is known: removing expert e removes router row e and
slice e of every fused tensor, and the pruned layer routes among the remaining experts exactly as the dense
layer does with e's router logit at -inf (softmax over the others, then top-k, then the optional
renormalisation). That is not a zeroing mask (``mask_exact`` False), so whole experts are opt-in
(``kinds=["expert"]``), and a group is made only where each of those dims is pinned alone (no other
coupling), at least ``top_k`` experts are kept, and the modules' ``num_experts`` is rewritten after slicing
(``fix_expert_counts``, called by the rewrite pass).
"""

from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

from .graph import Group, Member
from .passes.experts import is_fused_experts
from .units import UnitIndices

KIND = "expert"


def is_router(module: nn.Module) -> bool:
    """A top-k router in transformers' layout: ``weight`` (experts, hidden), ``top_k`` and ``num_experts``."""
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.dim() == 2 and isinstance(getattr(module, "top_k", None), int)
            and isinstance(getattr(module, "num_experts", None), int) and not isinstance(module, nn.Linear))


def moe_blocks(model: nn.Module) -> dict[str, tuple[str, str]]:
    """MoE block path -> (router path, experts path) for every block whose ``gate`` routes its ``experts``."""
    found = {}
    for path, module in model.named_modules():
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if gate is None or experts is None or not is_router(gate) or not is_fused_experts(experts):
            continue
        if experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == gate.weight.shape[0] == gate.num_experts:
            prefix = f"{path}." if path else ""
            found[path] = (f"{prefix}gate", f"{prefix}experts")
    return found


def expert_groups(groups: tuple[Group, ...], model: nn.Module, canonical: Mapping[str, str]) -> tuple[Group, ...]:
    """``groups`` with, per MoE block, the pinned single-member groups of the expert dim (router rows, fused
    tensors' dim 0) replaced by one ``expert`` group."""
    by_member = {}
    for g in groups:
        for m in g.members:
            by_member.setdefault((m.name, m.dim), []).append(g)
    replaced: set[str] = set()
    added = []
    for block, (router_path, experts_path) in moe_blocks(model).items():
        router, experts = model.get_submodule(router_path), model.get_submodule(experts_path)
        n = router.weight.shape[0]
        names = [f"{router_path}.weight"] + [f"{experts_path}.{a}" for a, p in experts.named_parameters(recurse=False)
                                             if p.shape[0] == n]
        names = [canonical.get(x, x) for x in names]
        pinned = [_pinned_alone(by_member.get((x, 0), []), x) for x in names]
        if any(g is None for g in pinned):
            continue  # coupled to something else, or already a group: left as the analysis found it
        params = {x: model.get_parameter(x) for x in names}
        members = tuple(Member(x, 0, True, UnitIndices.of([[e] for e in range(n)])) for x in names)
        per_unit = sum(p[0].numel() for p in params.values())
        replaced.update(g.id for g in pinned)
        added.append(Group(id=f"{KIND}:{block}", kind=KIND, size=n, prunable=True, reason=None, mask_exact=False,
                           members=members, unit_params=(per_unit,) * n, module=block,
                           min_keep=int(router.top_k)))
    return tuple(g for g in groups if g.id not in replaced) + tuple(added)


def _pinned_alone(candidates: list, name: str) -> Optional[Group]:
    """The one unprunable group whose only member is ``name``'s dim 0, else None."""
    if len(candidates) != 1:
        return None
    (g,) = candidates
    return g if not g.prunable and len(g.members) == 1 and g.members[0].name == name else None


def fix_expert_counts(module: nn.Module) -> None:
    """After slicing: ``num_experts`` of a router or a fused experts module is its tensors' leading dim."""
    if is_router(module):
        module.num_experts = int(module.weight.shape[0])
    elif is_fused_experts(module) and hasattr(module, "num_experts"):
        module.num_experts = int(module.gate_up_proj.shape[0])
