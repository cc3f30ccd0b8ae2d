"""Fused mixture-of-experts tensors as OBS consumers (helpers of the block-wise passes, not a pass).

transformers stores a layer's experts as 3-D parameters, ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I); an ``expert_channel`` group is channel c of every expert at once (the tensors are sliced
uniformly). The consumer of that group is ``down_proj``, whose expert e reads the intermediate
activation of the tokens routed to it, scaled by their routing weight (the output is w * down_e(h), that
is down_e(w * h)). Each expert is its own consumer ``down_proj#e`` with H_e over its own tokens, so the
structured OBS of a channel sums its error over the experts, and the re-fit solves each expert apart.
The statistics are computed from the experts module's inputs (hidden states, routed experts, routing
weights) for the standard layout (concatenated gate and up, not transposed, no bias, a gate); other
layouts have no consumer, and their groups stay whole with the solver's reason.
"""

from __future__ import annotations

from typing import Mapping, MutableMapping, Optional

import torch
from torch import nn

from .obs import gram, token_capped

SEP = "#"  # "mlp.experts.down_proj#3": expert 3 of the fused tensor


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module in transformers' standard fused layout."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
            and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
            and callable(getattr(module, "act_fn", None)))


def is_fused_path(root: nn.Module, path: str) -> bool:
    """Whether ``path`` (under ``root``) names a fused ``down_proj`` parameter rather than a layer."""
    owner, _, attr = path.rpartition(".")
    return attr == "down_proj" and is_fused_experts(root.get_submodule(owner))


def fused_input(module: nn.Module, attr: str, dim: int) -> bool:
    """Whether member (``attr``, ``dim``) of ``module`` is the input dim of its fused ``down_proj``."""
    return attr == "down_proj" and dim == 2 and is_fused_experts(module)


def routed_inputs(experts: nn.Module, args: tuple, kwargs: Mapping) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Expert -> (its tokens (tokens_e,), their routing-weighted intermediate activation (tokens_e, I)), as
    the experts module computes them for ``hidden_states, top_k_index, top_k_weights``."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    hidden, index, weights = (v.detach() for v in values[:3])  # (tokens, H), (tokens, k), (tokens, k)
    out = {}
    for e in index.unique().tolist():
        if not 0 <= e < experts.gate_up_proj.shape[0]:
            continue  # expert-parallel sentinels
        token, slot = torch.where(index == e)
        gate, up = nn.functional.linear(hidden[token], experts.gate_up_proj[e]).chunk(2, dim=-1)  # (tokens_e, I)
        out[e] = (token, experts.act_fn(gate) * up * weights[token, slot, None].to(up.dtype))
    return out


def hook_experts(experts: nn.Module, path: str, hessians: MutableMapping[str, torch.Tensor],
                 dtype: torch.dtype = torch.float64, token_cap: Optional[float] = None):
    """A forward pre-hook adding each expert's H = X_e^T X_e to ``hessians[path#e]``; an expert no token
    reached adds zeros, so that every rank of a distributed run holds the same keys. ``token_cap``: the rows
    of X_e capped as ``obs.token_capped`` does, against the median of that expert's tokens."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            routed = routed_inputs(module, args, kwargs)
            width = module.down_proj.shape[-1]
            for e in range(module.down_proj.shape[0]):
                x = routed[e][1].float() if e in routed else None  # (tokens_e, I)
                h = (gram(token_capped(x, token_cap)).to(dtype) if x is not None
                     else torch.zeros(width, width, dtype=dtype))
                key = f"{path}{SEP}{e}"
                hessians[key] = hessians[key] + h if key in hessians else h
    return experts.register_forward_pre_hook(hook, with_kwargs=True)


def expert_weights(path: str, value: torch.Tensor, current: Optional[Mapping[str, torch.Tensor]],
                   dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Per expert, ``down_proj[e]`` as (out, in) in ``dtype``: the cluster's updated value where it has one."""
    return [current[f"{path}{SEP}{e}"] if current is not None and f"{path}{SEP}{e}" in current
            else value[e].detach().to(dtype) for e in range(value.shape[0])]


def assemble(current: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``path#e`` matrices back into their fused tensors (``like``: path -> the parameter)."""
    out = {}
    for path, param in like.items():
        out[path] = torch.stack([current[f"{path}{SEP}{e}"] for e in range(param.shape[0])]).to(param.dtype)
    return out
