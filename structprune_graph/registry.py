"""The coupling-rule registry: one immutable table from an op, in all its forms, to its channel flow.

An entry names an op's ATen overload packets (torch.export graphs), Python functions
(``torch.cat``, ``F.linear``, ``operator.add``: symbolic_trace graphs), tensor method names
(``x.view``) and ``nn.Module`` classes, together with which module attribute holds which argument.
Arguments are always bound to ATen schema names, so one flow serves every form. A new op is one
``CouplingRule``; ``Registry.with_rules`` returns a new registry and never mutates a shared one.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import rules

Flow = Callable[..., Any]


@dataclass(frozen=True)
class ModuleForm:
    """How an ``nn.Module`` call maps onto the op's ATen arguments."""

    module_type: type
    inputs: tuple[str, ...]  # names of the call's positional arguments
    attrs: tuple[tuple[str, str], ...] = ()  # (ATen argument, module attribute): parameters, buffers, ints


@dataclass(frozen=True)
class CouplingRule:
    name: str
    flow: Flow
    aten: tuple[str, ...] = ()  # OpOverloadPacket names, e.g. "aten.linear"
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    modules: tuple[ModuleForm, ...] = ()
    signature: Optional[Callable] = None  # Python-form signature (ATen argument names) when it differs


@dataclass(frozen=True)
class Registry:
    rules: tuple[CouplingRule, ...]
    _by_aten: Mapping[str, CouplingRule] = field(init=False, repr=False, compare=False)
    _by_function: Mapping[Any, CouplingRule] = field(init=False, repr=False, compare=False)
    _by_method: Mapping[str, CouplingRule] = field(init=False, repr=False, compare=False)
    _by_module: Mapping[type, tuple[CouplingRule, ModuleForm]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_aten, by_function, by_method, by_module = {}, {}, {}, {}
        for rule in self.rules:
            for name in rule.aten:
                by_aten[name] = rule
            for fn in rule.functions:
                by_function[fn] = rule
            for name in rule.methods:
                by_method[name] = rule
            for form in rule.modules:
                by_module[form.module_type] = (rule, form)
        object.__setattr__(self, "_by_aten", MappingProxyType(by_aten))
        object.__setattr__(self, "_by_function", MappingProxyType(by_function))
        object.__setattr__(self, "_by_method", MappingProxyType(by_method))
        object.__setattr__(self, "_by_module", MappingProxyType(by_module))

    def with_rules(self, *extra: CouplingRule) -> "Registry":
        return Registry(self.rules + tuple(extra))

    def for_target(self, target: Any) -> Optional[CouplingRule]:
        if isinstance(target, torch._ops.OpOverload):
            return self._by_aten.get(str(target.overloadpacket))
        try:
            return self._by_function.get(target)
        except TypeError:  # unhashable target
            return None

    def for_method(self, name: str) -> Optional[CouplingRule]:
        return self._by_method.get(name)

    def for_module(self, module: nn.Module) -> Optional[tuple[CouplingRule, ModuleForm]]:
        for cls in type(module).__mro__:
            if cls in self._by_module:
                return self._by_module[cls]
        return None


# ------------------------------------------------------------------------------------- binding
def _schema_params(packet_name: str) -> Optional[list[inspect.Parameter]]:
    namespace, name = packet_name.split(".", 1)
    packet = getattr(getattr(torch.ops, namespace), name, None)
    if packet is None:
        return None
    overload = getattr(packet, "default", None) or getattr(packet, packet.overloads()[0])
    params = []
    for arg in overload._schema.arguments:
        default = arg.default_value if arg.has_default_value() else inspect.Parameter.empty
        params.append(inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    return params


def bind_aten(op: torch._ops.OpOverload, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    bound: dict[str, Any] = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def bind_python(rule: CouplingRule, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Bind a function or method call to ATen argument names; trailing positional ints of a method
    such as ``x.view(2, 3)`` or ``x.permute(0, 2, 1)`` are packed into the list argument."""
    if rule.signature is not None:
        sig = inspect.signature(rule.signature)
    else:
        params = _schema_params(rule.aten[0]) if rule.aten else None
        if params is None:
            raise KeyError(f"rule {rule.name} has no signature for its Python forms")
        sig = inspect.Signature(params)
    names = list(sig.parameters)
    if len(names) >= 2 and names[1] in _LIST_ARGS and len(args) >= 2 and isinstance(args[1], int):
        args = (args[0], tuple(args[1:]))
    bound = sig.bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


_LIST_ARGS = frozenset({"size", "dims", "shape", "repeats"})


def bind_module(form: ModuleForm, module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    bound = dict(zip(form.inputs, args))
    bound.update(kwargs)
    for arg, attr in form.attrs:
        bound[arg] = getattr(module, attr)
    return bound


# ----------------------------------------------------------------------------------- the table
def _sig_linear(input, weight, bias=None): ...
def _sig_embedding_f(indices, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False): ...
def _sig_batch_norm_f(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5): ...
def _sig_layer_norm_f(input, normalized_shape, weight=None, bias=None, eps=1e-5): ...
def _sig_group_norm_f(input, num_groups, weight=None, bias=None, eps=1e-5): ...
def _sig_unary(self, *args, **kwargs): ...
def _sig_binary(self, other, *args, **kwargs): ...
def _sig_getitem(self, index): ...
def _sig_cat(tensors, dim=0): ...
def _sig_reduce(self, dim=None, keepdim=False, *, dtype=None): ...
def _sig_softmax(self, dim, dtype=None, _stacklevel=3): ...
def _sig_flatten(self, start_dim=0, end_dim=-1): ...
def _sig_view(self, size): ...
def _sig_transpose(self, dim0, dim1): ...
def _sig_permute(self, dims): ...
def _sig_split(self, split_size, dim=0): ...
def _sig_chunk(self, chunks, dim=0): ...
def _sig_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False): ...
def _sig_conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _sig_pool(self, *args, **kwargs): ...
def _sig_size(self, dim=None): ...


_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                       nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout,
                       nn.Dropout1d, nn.Dropout2d)
_POINTWISE_ATEN = tuple(f"aten.{n}" for n in (
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "tanh", "sigmoid", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "neg", "exp", "log", "sqrt", "rsqrt", "pow", "abs",
    "cos", "sin", "clamp", "clamp_min", "clamp_max", "erf", "reciprocal", "sign", "square",
    "mul", "mul_", "div", "div_", "maximum", "minimum", "where", "masked_fill", "masked_fill_",
    "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "logical_and", "logical_or", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_not", "type_as", "to", "_to_copy", "alias", "clone", "contiguous",
    "detach", "dropout", "dropout_", "feature_dropout", "native_dropout", "lift_fresh_copy", "copy", "fill"))
_VALUE_ATEN = tuple(f"aten.{n}" for n in (
    "_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride", "arange", "zeros", "ones", "full", "empty",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "new_ones", "new_zeros",
    "new_full", "new_empty", "scalar_tensor", "_assert_async", "_assert_scalar", "lift_fresh"))


def default_registry() -> Registry:
    """The rules this library ships: every op the foundation zoo traces through."""
    r = rules
    return Registry((
        CouplingRule("pointwise", r.pointwise, aten=_POINTWISE_ATEN,
                     functions=(operator.mul, operator.truediv, operator.neg, torch.mul, torch.div, torch.relu,
                                torch.sigmoid, torch.tanh, torch.exp, torch.where, F.relu, F.relu6, F.gelu, F.silu,
                                F.hardtanh, F.hardswish, F.leaky_relu, F.elu, F.dropout, torch.sqrt, torch.rsqrt,
                                torch.neg),
                     methods=("relu", "sigmoid", "tanh", "exp", "mul", "div", "contiguous", "to", "float", "type_as",
                              "clone", "detach", "neg", "sqrt", "rsqrt", "pow", "masked_fill", "clamp"),
                     modules=tuple(ModuleForm(m, ("self",)) for m in _ACTIVATION_MODULES),
                     signature=_sig_unary),
        CouplingRule("residual_add", r.residual_add, aten=("aten.add", "aten.add_", "aten.sub", "aten.sub_"),
                     functions=(operator.add, operator.sub, operator.iadd, torch.add, torch.sub),
                     methods=("add", "add_", "sub"), signature=_sig_binary),
        CouplingRule("value", r.passthrough_value, aten=_VALUE_ATEN,
                     functions=(getattr,), methods=("size", "dim", "numel"), signature=_sig_size),
        CouplingRule("linear", r.linear, aten=("aten.linear",), functions=(F.linear,),
                     modules=(ModuleForm(nn.Linear, ("input",), (("weight", "weight"), ("bias", "bias"))),),
                     signature=_sig_linear),
        CouplingRule("matmul", r.matmul, aten=("aten.mm", "aten.bmm", "aten.matmul", "aten.addmm", "aten.baddbmm"),
                     functions=(torch.matmul, torch.bmm, torch.mm, operator.matmul), methods=("matmul", "bmm")),
        CouplingRule("einsum", r.einsum, aten=("aten.einsum",), functions=(torch.einsum,)),
        CouplingRule("conv", r.conv, aten=("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"),
                     functions=(F.conv1d, F.conv2d, F.conv3d),
                     modules=tuple(ModuleForm(m, ("input",), (("weight", "weight"), ("bias", "bias"), ("groups", "groups")))
                                   for m in (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
                     signature=_sig_conv),
        CouplingRule("embedding", r.embedding, aten=("aten.embedding",), functions=(F.embedding,),
                     modules=(ModuleForm(nn.Embedding, ("indices",), (("weight", "weight"),)),),
                     signature=_sig_embedding_f),
        CouplingRule("scaled_dot_product_attention", r.sdpa, aten=("aten.scaled_dot_product_attention",),
                     functions=(F.scaled_dot_product_attention,), signature=_sig_sdpa),
        CouplingRule("layer_norm", r.layer_norm, aten=("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm"),
                     functions=(F.layer_norm, F.rms_norm),
                     modules=tuple(ModuleForm(m, ("input",), (("normalized_shape", "normalized_shape"), ("weight", "weight"),
                                                              ("bias", "bias")))
                                   for m in (nn.LayerNorm,)) + (
                         ModuleForm(nn.RMSNorm, ("input",), (("normalized_shape", "normalized_shape"), ("weight", "weight"))),),
                     signature=_sig_layer_norm_f),
        CouplingRule("batch_norm", r.batch_norm,
                     aten=("aten.batch_norm", "aten._native_batch_norm_legit_no_training",
                           "aten._native_batch_norm_legit", "aten.native_batch_norm", "aten.instance_norm"),
                     functions=(F.batch_norm,),
                     modules=tuple(ModuleForm(m, ("input",), (("weight", "weight"), ("bias", "bias"),
                                                              ("running_mean", "running_mean"), ("running_var", "running_var")))
                                   for m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
                     signature=_sig_batch_norm_f),
        CouplingRule("group_norm", r.group_norm, aten=("aten.group_norm", "aten.native_group_norm"),
                     functions=(F.group_norm,),
                     modules=(ModuleForm(nn.GroupNorm, ("input",), (("num_groups", "num_groups"), ("weight", "weight"),
                                                                   ("bias", "bias"))),),
                     signature=_sig_group_norm_f),
        CouplingRule("reshape", r.reshape, aten=("aten.view", "aten.reshape", "aten._unsafe_view", "aten.flatten",
                                                  "aten.unflatten", "aten.view_copy"),
                     functions=(torch.flatten, torch.reshape), methods=("view", "reshape", "flatten", "unflatten"),
                     modules=(ModuleForm(nn.Flatten, ("self",)),), signature=_sig_view),
        CouplingRule("permute", r.permute, aten=("aten.permute",), functions=(torch.permute,), methods=("permute",)),
        CouplingRule("transpose", r.permute, aten=("aten.transpose", "aten.t", "aten.swapaxes"),
                     functions=(torch.transpose, torch.t), methods=("transpose", "t"), signature=_sig_transpose),
        CouplingRule("numpy_T", r.reverse_dims, aten=("aten.numpy_T",)),  # x.T (Falcon's linear layers)
        CouplingRule("unsqueeze", r.unsqueeze, aten=("aten.unsqueeze",), functions=(torch.unsqueeze,),
                     methods=("unsqueeze",)),
        CouplingRule("squeeze", r.squeeze, aten=("aten.squeeze",), functions=(torch.squeeze,), methods=("squeeze",)),
        CouplingRule("expand", r.expand, aten=("aten.expand", "aten.repeat", "aten.broadcast_to", "aten.expand_as"),
                     methods=("expand", "repeat", "expand_as")),
        CouplingRule("repeat_interleave", r.repeat_interleave, aten=("aten.repeat_interleave",),
                     methods=("repeat_interleave",)),
        CouplingRule("slice", r.slice_, aten=("aten.slice", "aten.narrow")),
        CouplingRule("select", r.select, aten=("aten.select",), methods=("select",)),
        CouplingRule("split", r.split, aten=("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind",
                                              "aten.tensor_split"),
                     functions=(torch.split, torch.chunk, torch.unbind), methods=("split", "chunk", "unbind")),
        CouplingRule("cat", r.cat, aten=("aten.cat", "aten.concat", "aten.concatenate"),
                     functions=(torch.cat, torch.concat), signature=_sig_cat),
        CouplingRule("stack", r.stack, aten=("aten.stack",), functions=(torch.stack,), signature=_sig_cat),
        CouplingRule("pad", r.pad, aten=("aten.pad", "aten.constant_pad_nd"), functions=(F.pad,)),
        CouplingRule("pool1d", r.pool(1), aten=("aten.max_pool1d", "aten.avg_pool1d", "aten.adaptive_avg_pool1d",
                                                 "aten.adaptive_max_pool1d"),
                     functions=(F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d),
                     modules=tuple(ModuleForm(m, ("self",)) for m in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)),
                     signature=_sig_pool),
        CouplingRule("pool2d", r.pool(2), aten=("aten.max_pool2d", "aten.avg_pool2d", "aten.adaptive_avg_pool2d",
                                                 "aten.adaptive_max_pool2d", "aten.max_pool2d_with_indices",
                                                 "aten._adaptive_avg_pool2d"),
                     functions=(F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d),
                     modules=tuple(ModuleForm(m, ("self",)) for m in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)),
                     signature=_sig_pool),
        CouplingRule("reduce", r.reduce_dims, aten=tuple(f"aten.{n}" for n in (
            "mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "max", "min", "prod", "any", "all",
            "var_mean", "linalg_vector_norm")),
                     functions=(torch.mean, torch.sum, torch.amax), methods=("mean", "sum", "amax", "max", "var", "std", "norm"),
                     signature=_sig_reduce),
        CouplingRule("softmax", r.softmax, aten=("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"),
                     functions=(F.softmax, F.log_softmax, torch.softmax), methods=("softmax", "log_softmax"),
                     signature=_sig_softmax),
        CouplingRule("order_dependent", r.order_dependent, aten=tuple(f"aten.{n}" for n in (
            "cumsum", "cumprod", "argmax", "argmin", "sort", "argsort", "topk", "flip", "roll")),
                     functions=(torch.cumsum, torch.argmax), methods=("cumsum", "argmax")),
        CouplingRule("index", r.index, aten=("aten.gather", "aten.index_select", "aten.index"),
                     functions=(torch.gather, torch.index_select), methods=("gather", "index_select")),
        CouplingRule("getitem", r.getitem, functions=(operator.getitem,), signature=_sig_getitem),
    ))
