"""What module code reads besides its weights: attributes to update after slicing, as one table.

Two kinds of fixup:
- ``LAYER_FIXUPS``: a layer's size attributes follow from its own sliced weights (``nn.Linear.in_features``,
  ``nn.Conv2d.groups`` of a depthwise conv, ``LayerNorm.normalized_shape``, transformers' ``Conv1D.nf``).
- ``HEAD_ATTRS``: an attention module's head counts and widths scale with the fraction of its heads kept
  (``num_heads`` of OPT, ``split_size`` of GPT-2, ``all_head_size`` of BERT, ...). Attributes the module
  does not have are skipped; shared ``config`` objects are never touched (widths differ per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from torch import nn


@dataclass(frozen=True)
class LayerFixup:
    module_type: type
    update: Callable[[nn.Module], None]


def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv(m: nn.modules.conv._ConvNd) -> None:
    out_ch, in_per_group = m.weight.shape[:2]
    if m.groups > 1 and m.groups == m.in_channels:  # depthwise: one group per input channel
        m.groups = out_ch // (m.out_channels // m.groups)
    m.out_channels, m.in_channels = out_ch, in_per_group * m.groups


def _norm_features(m: nn.Module) -> None:
    source = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    m.num_features = source.shape[0]


def _layer_norm(m: nn.Module) -> None:
    if getattr(m, "weight", None) is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _group_norm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _hf_conv1d(m: nn.Module) -> None:  # transformers.pytorch_utils.Conv1D: weight is (nx, nf)
    m.nx, m.nf = m.weight.shape


def _layer_fixups() -> tuple[LayerFixup, ...]:
    fixups = [LayerFixup(nn.Linear, _linear), LayerFixup(nn.modules.conv._ConvNd, _conv),
              LayerFixup(nn.modules.batchnorm._NormBase, _norm_features), LayerFixup(nn.LayerNorm, _layer_norm),
              LayerFixup(nn.GroupNorm, _group_norm), LayerFixup(nn.Embedding, _embedding)]
    try:
        from transformers.pytorch_utils import Conv1D
        fixups.append(LayerFixup(Conv1D, _hf_conv1d))
    except ImportError:  # transformers is optional for plain models
        pass
    return tuple(fixups)


LAYER_FIXUPS: tuple[LayerFixup, ...] = _layer_fixups()

# attention-module attributes that count query heads, KV heads, or the width heads x head_dim
HEAD_ATTRS: Mapping[str, str] = MappingProxyType({
    "num_heads": "query_heads", "num_attention_heads": "query_heads", "n_head": "query_heads",
    "n_heads": "query_heads", "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads",
    "n_kv_heads": "kv_heads", "all_head_size": "width", "split_size": "width", "inner_dim": "width",
    "num_key_value_groups": "queries_per_kv",
})

# which of those scale with the fraction of units a group keeps: a head (MHA) or a KV group takes its
# KV heads along; a query-head slot of grouped-query attention leaves the KV heads and thins every group
HEAD_ATTRS_SCALED_BY_KIND: Mapping[str, frozenset[str]] = MappingProxyType({
    "attention_head": frozenset({"query_heads", "kv_heads", "width"}),
    "kv_group": frozenset({"query_heads", "kv_heads", "width"}),
    "query_head": frozenset({"query_heads", "width", "queries_per_kv"}),
})


def fix_layer(module: nn.Module) -> None:
    """Update ``module``'s size attributes from its (sliced) weights; also any custom layer-norm-like
    module that keeps a ``normalized_shape``."""
    for fixup in LAYER_FIXUPS:
        if isinstance(module, fixup.module_type):
            fixup.update(module)
    if not isinstance(module, nn.LayerNorm) and hasattr(module, "normalized_shape"):
        _layer_norm(module)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers: weight is (in, out)


def input_dim(module: nn.Module):
    """Which dim of ``module.weight`` meets the layer's input channels (None: not a plain layer)."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return 1
    return 0 if _is_hf_conv1d(module) else None


def output_dim(module: nn.Module) -> int:
    """Which dim of ``module.weight`` holds the layer's output channels (the bias's dim)."""
    return 1 if _is_hf_conv1d(module) else 0
