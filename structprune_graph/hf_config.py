"""A stock transformers config for a pruned model, when one config can describe it.

Stock ``from_pretrained`` builds every layer from the same sizes, so a pruned model loads without this
library when every layer kept the same width of each kind (``prune(..., uniform=True)``), or when its
architecture reads transformers' heterogeneous ``per_layer_config`` (in transformers 5.24 a few newer
modeling files do; Llama, Mistral and Qwen2 do not, which a test checks). The sizes
are read from the pruned layers themselves (the table below: which config field, which layer of each
decoder block, which attribute, whether it counts heads) and written into a copy of the config. The
config is only offered when every table entry is found in every layer with one value; ``save`` then
loads the written folder with stock ``from_pretrained`` and compares its logits before claiming it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StockSize:
    field: str  # config attribute
    layer: str  # module path inside each decoder block
    attribute: str  # the layer's size that gives it
    per_head: bool  # divide by head_dim (a head count)


# the LLaMA family's naming (Llama, Mistral, Qwen2/3, Gemma, SmolLM, ...); other models keep the dense
# config and the plan, and load with ``structprune_graph.load``
STOCK_SIZES = (
    StockSize("intermediate_size", "mlp.up_proj", "out_features", False),
    StockSize("num_attention_heads", "self_attn.q_proj", "out_features", True),
    StockSize("num_key_value_heads", "self_attn.k_proj", "out_features", True),
)


def _head_dim(config: Any) -> Optional[int]:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads = getattr(config, "num_attention_heads", None)
    return config.hidden_size // heads if heads else None


def stock_config(model: nn.Module, dense_config: Any) -> tuple[Optional[Any], str]:
    """(the config with the pruned sizes, "") when a stock config describes the pruned model, else (None, why).
    Sizes that differ across layers go to transformers' ``per_layer_config`` (a sparse map from layer index
    to overrides), offered only where the architecture builds the same shapes from it (checked on the meta
    device: most modeling files, Llama's included, do not read it)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None, f"{type(model).__name__} has no model.layers list"
    head_dim = _head_dim(dense_config)
    sizes: dict[str, list[int]] = {}  # config field -> its value in each layer
    for entry in STOCK_SIZES:
        values = []
        for block in layers:
            try:
                layer = block.get_submodule(entry.layer)
            except AttributeError:
                return None, f"no {entry.layer} in its layers"
            value = int(getattr(layer, entry.attribute))
            if entry.per_head:
                if not head_dim or value % head_dim:
                    return None, f"{entry.layer}.{entry.attribute} = {value} is not whole heads of {head_dim}"
                value //= head_dim
            values.append(value)
        sizes[entry.field] = values
    embed = model.get_input_embeddings()
    config = copy.deepcopy(dense_config)
    varying = {name: values for name, values in sizes.items() if len(set(values)) > 1}
    for name, values in sizes.items():
        if name not in varying:
            setattr(config, name, values[0])
    if head_dim:
        config.head_dim = head_dim  # no longer hidden_size / num_attention_heads
    config.hidden_size = int(embed.embedding_dim)
    try:
        if varying:  # transformers' heterogeneous config: a sparse map from layer index to overrides
            config.per_layer_config = {i: {name: values[i] for name, values in varying.items()}
                                       for i in range(len(layers))}
        extra = _parameters_beyond(model, config)  # builds the architecture from the config (meta device)
    except Exception as err:  # noqa: BLE001 - with per-layer sizes: this architecture cannot take them
        if not varying:
            raise
        name, values = next(iter(varying.items()))
        return None, (f"{name} differs across layers ({sorted(set(values))}) and {type(model).__name__} does not "
                      f"build from transformers' per_layer_config ({type(err).__name__}); prune with uniform=True "
                      f"for a stock config")
    if extra:  # e.g. FLAP's compensation biases on o_proj / down_proj: no config switch adds only those
        return None, f"the pruned model has parameters its architecture's config cannot describe ({', '.join(extra)})"
    return config, ""


def _parameters_beyond(model: nn.Module, config: Any) -> list[str]:
    """Parameter names (first few) of ``model`` that ``type(model)(config)`` lacks or shapes otherwise;
    built on the meta device, so nothing is allocated."""
    import torch

    with torch.device("meta"):
        stock = type(model)(config)
    shapes = {name: tuple(p.shape) for name, p in stock.named_parameters()}
    return [name for name, p in model.named_parameters() if shapes.get(name) != tuple(p.shape)][:3]
