"""Channel-flow functions: how each kind of op moves, couples, pins or reduces channel atoms.

Every flow has the signature ``flow(ctx, a, out)``: ``a`` maps the op's ATen argument names to values
(``Labelled`` for tensors, plain Python values otherwise), ``out`` is the op's output with no labels
(``Labelled.plain`` of the traced shape, a tuple of them, or a Python value). The flow returns the
output with labels. The registry (``registry.py``) maps ops in all their forms to these flows.

The one engine underneath is ``couple``: operands are described einsum-style (one letter per dimension);
labelled dimensions that share a letter are the same channels (union), a labelled dimension that meets
a same-letter dimension of fixed size (a data dimension, or one whose labels were lost) is pinned, and
contracted letters disappear from the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .labels import AtomTable, GqaSite, Label, Labelled, repeat_lanes

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class FlowContext:
    atoms: AtomTable
    node: str  # fx node name
    op: str  # the op as the graph names it, e.g. "aten.linear.default"
    module: str  # innermost module path of the node ("" at top level)

    @property
    def where(self) -> str:
        return f"op {self.op} at node '{self.node}'" + (f" (module '{self.module}')" if self.module else "")

    def pin(self, label: Label, why: str) -> None:
        if label is not None:
            self.atoms.pin(label, f"{why} ({self.where})")

    def pin_all(self, value: Any, why: str) -> None:
        for t in iter_labelled(value):
            for d in t.dims:
                self.pin(d, why)

    def flag(self, label: Label, flag: str) -> None:
        if label is not None:
            self.atoms.flag(label, flag)


def iter_labelled(value: Any):
    """Every ``Labelled`` inside a (possibly nested) argument value."""
    if isinstance(value, Labelled):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from iter_labelled(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from iter_labelled(v)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# --------------------------------------------------------------------------------------------- engine
def couple(ctx: FlowContext, operands: Sequence[tuple[Labelled, str]], out: str,
           soft: Optional[tuple[int, str]] = None) -> tuple[Label, ...]:
    """Couple operands described by letters; return the labels of the ``out`` letters.

    ``soft=(operand, letter)``: that operand's channels on that letter couple softly (grouped-query
    attention: query heads reading a shared KV head), and its labels are the ones the output keeps."""
    entries: dict[str, list[tuple[Label, int, int]]] = {}
    for k, (value, letters) in enumerate(operands):
        assert len(letters) == value.ndim, (ctx.where, letters, value.shape)
        for letter, size, label in zip(letters, value.shape, value.dims):
            entries.setdefault(letter, []).append((label, size, k))
    result: dict[str, Label] = {}
    for letter, items in entries.items():
        full = max(size for _, size, _ in items)
        labelled = [(lab, k) for lab, size, k in items if lab is not None and size == full]
        for lab, size, _ in items:
            if lab is not None and size != full:
                ctx.pin(lab, "a channel dimension of size 1 is broadcast")
        fixed = full > 1 and any(lab is None and size == full for lab, size, _ in items)
        if labelled and fixed:
            for lab, _ in labelled:
                ctx.pin(lab, "channels meet a dimension of fixed size that no parameter controls")
            result[letter] = None
            continue
        if not labelled:
            result[letter] = None
            continue
        is_soft = [soft is not None and (k, letter) == soft for _, k in labelled]
        hard = [lab for (lab, _), s in zip(labelled, is_soft) if not s]
        softs = [lab for (lab, _), s in zip(labelled, is_soft) if s]
        anchor = hard[0] if hard else softs[0]
        for lab in hard[1:]:
            ctx.atoms.union(anchor, lab)
        for lab in softs:
            if lab is not anchor:
                ctx.atoms.union(anchor, lab, soft=True)
        result[letter] = softs[0] if softs else anchor
    return tuple(result.get(letter) for letter in out)


def right_aligned(values: Sequence[Labelled], ndim: int) -> list[tuple[Labelled, str]]:
    letters = LETTERS[:ndim]
    return [(v, letters[ndim - v.ndim:]) for v in values]


def tensors_of(a: Mapping[str, Any]) -> list[Labelled]:
    return list(iter_labelled(a))


# ------------------------------------------------------------------------------------ generic flows
def pointwise(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """Elementwise ops with broadcasting (activations, add, mul, where, casts, dropout, ...)."""
    if not isinstance(out, Labelled):
        return out
    operands = right_aligned([t for t in tensors_of(a) if t.ndim <= out.ndim], out.ndim)
    return out.with_dims(couple(ctx, operands, LETTERS[:out.ndim]))


def residual_add(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """``add``/``sub``: pointwise, and when both operands carry the same channels it is a residual
    connection, which names the group kind (hidden dim / residual conv channels)."""
    operands = [t for t in tensors_of(a) if t.is_labelled]
    result = pointwise(ctx, a, out)
    if len(operands) == 2 and isinstance(result, Labelled):
        x, y = operands
        for i, lab in enumerate(result.dims):
            lx, ly = x.dims[i - out.ndim + x.ndim] if i - out.ndim + x.ndim >= 0 else None, \
                y.dims[i - out.ndim + y.ndim] if i - out.ndim + y.ndim >= 0 else None
            # x + f(x) (e.g. inside gelu) carries the same channels twice: not a residual join
            if lab is not None and lx is not None and ly is not None and not torch.equal(lx, ly):
                ctx.flag(lab, "residual")
    return result


def passthrough_value(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """Ops whose output holds no channels: creation ops, shape queries, asserts."""
    return out


def unknown(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """No rule: every channel the op touches becomes unprunable, its output carries none."""
    ctx.pin_all(a, "no coupling rule for this op; add one to the registry to prune through it")
    return out


def reduce_dims(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """mean/sum/var/amax over ``dim``: reduced channels are not mask-exact (zeroing != removing).
    ``max``/``min`` of two tensors (``aten.min.other``, T5's relative position buckets) is element-wise."""
    if isinstance(a.get("other"), Labelled):
        return pointwise(ctx, a, out)
    x: Labelled = a["self"] if "self" in a else a["input"]
    dims = a.get("dim")
    if dims is None or dims == []:
        dims = list(range(x.ndim))
    elif isinstance(dims, int):
        dims = [dims]
    reduced = {norm_dim(d, x.ndim) for d in dims}
    for d in reduced:
        ctx.flag(x.dims[d], "reduced")
    keepdim = bool(a.get("keepdim", False))
    kept = [None if i in reduced else lab for i, lab in enumerate(x.dims) if keepdim or i not in reduced]
    if isinstance(out, tuple):  # max.dim -> (values, indices)
        return tuple(o.with_dims(kept) for o in out)
    return out.with_dims(kept)


def softmax(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    x: Labelled = a["self"] if "self" in a else a["input"]
    ctx.flag(x.dims[norm_dim(a["dim"], x.ndim)], "reduced")
    return out.with_dims(x.dims)


def index(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """gather/index_select/advanced indexing: an indexed channel dim is pinned (positions are data);
    the other dims keep their channels where the output keeps their size."""
    x: Labelled = a["self"]
    if "indices" in a:  # aten.index.Tensor: one optional index tensor per leading dim
        indexed = [i for i, t in enumerate(a["indices"]) if t is not None]
        if indexed != list(range(len(indexed))):
            return unknown(ctx, a, out)
        rest = x.dims[len(indexed):]
    else:
        indexed = [norm_dim(a["dim"], x.ndim)]
        rest = None
    for d in indexed:
        ctx.pin(x.dims[d], "channels are indexed by position")
    ctx.pin_all(a.get("index", a.get("indices")), "indices are data")
    if rest is not None:
        return out.with_dims((None,) * (out.ndim - len(rest)) + tuple(rest))
    dims = [None if i in indexed or (lab is not None and out.shape[i] != x.shape[i]) else lab
            for i, lab in enumerate(x.dims)]
    for i, lab in enumerate(x.dims):
        if i not in indexed and lab is not None and dims[i] is None:
            ctx.pin(lab, "channels are cut by an index")
    return out.with_dims(dims)


def order_dependent(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """cumsum/argmax/sort along ``dim``: channel positions carry meaning there, so pin them."""
    x: Labelled = a["self"] if "self" in a else a["input"]
    dim = a.get("dim")
    if dim is None:
        ctx.pin_all(x, "channels are ordered or indexed by this op")
        return out
    d = norm_dim(dim, x.ndim)
    ctx.pin(x.dims[d], "channels are ordered or indexed by this op")
    outs = out if isinstance(out, tuple) else (out,)
    result = []
    for o in outs:
        if not isinstance(o, Labelled):
            result.append(o)
        elif o.ndim == x.ndim:
            result.append(o.with_dims([None if i == d else lab for i, lab in enumerate(x.dims)]))
        else:
            result.append(o.with_dims([lab for i, lab in enumerate(x.dims) if i != d]))
    return tuple(result) if isinstance(out, tuple) else result[0]


# -------------------------------------------------------------------------------- contractions
def linear(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """``input @ weight.T + bias``: input features ~ weight columns; output features = weight rows."""
    x, w, b = a["input"], a["weight"], a.get("bias")
    batch = LETTERS[: x.ndim - 1]
    operands = [(x, batch + "z"), (w, "yz")] + ([(b, "y")] if isinstance(b, Labelled) else [])
    return out.with_dims(couple(ctx, operands, batch + "y"))


def matmul(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """mm/bmm/matmul/addmm/baddbmm: contraction over k; batch dims couple (attention heads)."""
    if "mat1" in a or "batch1" in a:  # addmm / baddbmm: self is the added term
        x, y, bias = a.get("mat1", a.get("batch1")), a.get("mat2", a.get("batch2")), a["self"]
    else:
        x, y, bias = a["self"], a.get("mat2", a.get("other")), None
    if x.ndim < 2 or y.ndim < 2:
        return unknown(ctx, a, out)
    nb = out.ndim - 2
    batch = LETTERS[:nb]
    operands = [(x, batch[nb - (x.ndim - 2):] + "xz"), (y, batch[nb - (y.ndim - 2):] + "zy")]
    if isinstance(bias, Labelled) and bias.ndim:
        operands.append((bias, (batch + "xy")[out.ndim - bias.ndim:]))
    soft = None
    for i in range(nb):  # a batch dim where one side repeats its channels: grouped-query attention
        lx, ly = operands[0][0].dims[i - nb + x.ndim - 2] if i - nb + x.ndim - 2 >= 0 else None, \
            operands[1][0].dims[i - nb + y.ndim - 2] if i - nb + y.ndim - 2 >= 0 else None
        if lx is not None and ly is not None:
            lanes_x, lanes_y = repeat_lanes(lx), repeat_lanes(ly)
            if (lanes_x is None) != (lanes_y is None):
                soft = (0, batch[i]) if lanes_x is None else (1, batch[i])
                ctx.atoms.gqa_sites.append(GqaSite(lx if lanes_x is None else ly,
                                                   lanes_y if lanes_x is None else lanes_x, ctx.module))
    dims = couple(ctx, operands, batch + "xy", soft=soft)
    for lab in dims[:nb]:
        if lab is not None:  # channels as a batch dim of a matmul: attention heads (eager attention)
            ctx.atoms.tag("attention_head", lab, ctx.module)
    return out.with_dims(dims)


def conv(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """conv1d/2d/3d, also grouped and depthwise. weight is (out, in/groups, *kernel)."""
    if a.get("transposed", False):
        return unknown(ctx, a, out)
    x, w, b = a["input"], a["weight"], a.get("bias")
    groups = int(a.get("groups", 1) or 1)
    spatial = x.ndim - 2
    sp_in, sp_k = "pqr"[:spatial], "stu"[:spatial]
    c_in, c_out = x.shape[1], w.shape[0]
    x_ch, w_rows, w_cols = x.dims[1], w.dims[0], w.dims[1]
    for lab in x.dims[2:]:
        ctx.pin(lab, "channels meet the spatial dims of a convolution")
    if groups == 1:
        dims = couple(ctx, [(x.with_dims((x.dims[0], x_ch) + (None,) * spatial), "bc" + sp_in), (w, "oc" + sp_k)]
                      + ([(b, "o")] if isinstance(b, Labelled) else []), "bo")
        return out.with_dims(dims + (None,) * spatial)
    if isinstance(b, Labelled) and b.dims[0] is not None and w_rows is not None:
        ctx.atoms.union(w_rows, b.dims[0])
    if c_in == groups:  # depthwise: input channel c feeds output channels c*m .. c*m+m-1
        if x_ch is None:
            ctx.pin(w_rows, "depthwise conv on channels that no parameter controls")
            return out.with_dims((x.dims[0], None) + (None,) * spatial)
        if w_rows is not None:
            ctx.atoms.union(w_rows.view(c_in, -1), x_ch.view(c_in, 1))
            return out.with_dims((x.dims[0], w_rows) + (None,) * spatial)
        return out.with_dims((x.dims[0], x_ch) + (None,) * spatial)
    # grouped conv: every group must keep the same width, so a unit is one lane across all groups
    if w_rows is not None:
        lanes = w_rows.view(groups, c_out // groups)
        ctx.atoms.union(lanes, lanes[:1])
    if x_ch is None:
        ctx.pin(w_cols, "grouped conv input channels that no parameter controls")
    elif w_cols is not None:
        ctx.atoms.union(x_ch.view(groups, c_in // groups), w_cols.view(1, -1))
    else:
        ctx.pin(x_ch, "grouped conv with one input channel per group but groups != channels")
    return out.with_dims((x.dims[0], w_rows) + (None,) * spatial)


def embedding(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    w, idx = a["weight"], a["indices"]
    ctx.pin(w.dims[0], "embedding rows are addressed by token ids")
    ctx.pin_all(idx, "indices are data")
    for lab in w.dims[1:]:
        ctx.flag(lab, "embedding")
    return out.with_dims((None,) * idx.ndim + w.dims[1:])


def sdpa(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """softmax(q k^T / sqrt(d) + mask) v with q (b, h, t, d), k (b, g, s, d), v (b, g, s, e); g divides h
    (grouped-query attention). A unit is a KV head together with all query heads that read it."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    lead = LETTERS[: q.ndim - 3]
    if isinstance(mask, Labelled):
        couple(ctx, right_aligned([q.with_dims(q.dims[:-1] + (None,), q.shape[:-1] + (mask.shape[-1],)), mask], q.ndim), "")
    heads, kv_heads = q.shape[-3], k.shape[-3]
    q_heads, lanes = q.dims[-3], None
    if heads != kv_heads and q_heads is not None:  # enable_gqa: query head h reads KV head h // (heads/kv)
        per_kv = q_heads.view(kv_heads, -1)
        ctx.atoms.union(per_kv, per_kv[:, :1], soft=True)
        lanes = torch.arange(heads) % (heads // kv_heads)
        q_heads = per_kv[:, 0]
    elif q_heads is not None and k.dims[-3] is not None:  # KV heads repeated (repeat_kv) before the call
        lanes = repeat_lanes(k.dims[-3])
    q_grouped = q.with_dims(q.dims[:-3] + (q_heads,) + q.dims[-2:], q.shape[:-3] + (kv_heads,) + q.shape[-2:])
    soft = (0, "g") if lanes is not None else None
    dims = couple(ctx, [(q_grouped, lead + "gtd"), (k, lead + "gsd"), (v, lead + "gse")], lead + "gte", soft=soft)
    if q.dims[-3] is not None:
        ctx.atoms.tag("attention_head", q.dims[-3], ctx.module)
        if lanes is not None:
            ctx.atoms.gqa_sites.append(GqaSite(q.dims[-3], lanes, ctx.module))
    return out.with_dims(dims[:-3] + (q.dims[-3],) + dims[-2:])


# ------------------------------------------------------------------------------------------ norms
def layer_norm(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """layer_norm / rms_norm over the trailing ``normalized_shape`` dims: parameters couple with them,
    and the statistics reduce over them (so zeroing a channel is not the same as removing it)."""
    x = a["input"]
    k = len(a["normalized_shape"])
    letters = LETTERS[: x.ndim]
    params = [(p, letters[x.ndim - k:]) for p in (a.get("weight"), a.get("bias")) if isinstance(p, Labelled)]
    dims = couple(ctx, [(x, letters)] + params, letters)
    for lab in dims[x.ndim - k:]:
        ctx.flag(lab, "reduced")
    main = out[0] if isinstance(out, tuple) else out
    result = main.with_dims(dims)
    return (result,) + tuple(out[1:]) if isinstance(out, tuple) else result


def batch_norm(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """batch/instance norm: per-channel parameters and running statistics on dim 1."""
    x = a["input"]
    letters = LETTERS[: x.ndim]
    params = [(p, "b") for name in ("weight", "bias", "running_mean", "running_var")
              if isinstance(p := a.get(name), Labelled)]
    dims = couple(ctx, [(x, letters)] + params, letters)
    main = out[0] if isinstance(out, tuple) else out
    result = main.with_dims(dims)
    return (result,) + tuple(out[1:]) if isinstance(out, tuple) else result


def group_norm(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    x, groups = a["input"], int(a["num_groups"])
    channels = x.shape[1]
    letters = LETTERS[: x.ndim]
    params = [(p, "b") for p in (a.get("weight"), a.get("bias")) if isinstance(p, Labelled)]
    dims = couple(ctx, [(x, letters)] + params, letters)
    lab = dims[1]
    if lab is not None and channels != groups:
        ctx.flag(lab, "reduced")
        if groups > 1:  # every group must keep the same width: a unit is one lane across groups
            lanes = lab.view(groups, channels // groups)
            ctx.atoms.union(lanes, lanes[:1])
    main = out[0] if isinstance(out, tuple) else out
    result = main.with_dims(dims)
    return (result,) + tuple(out[1:]) if isinstance(out, tuple) else result


# --------------------------------------------------------------------------------- shape / index
def reshape_groups(src: Sequence[int], dst: Sequence[int], src_joins: frozenset = frozenset(),
                   dst_joins: frozenset = frozenset()) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input dims with runs of output dims of equal product. Size-1 dims stand alone, except
    those in ``src_joins`` / ``dst_joins``, which join the run that follows them."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (i not in src_joins or i == len(src) - 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and dst[j] == 1 and (j not in dst_joins or j == len(dst) - 1):
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                gj.append(j)
                pj *= dst[j]
                j += 1
        groups.append((gi, gj))
    return groups


def reshape(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """view/reshape/flatten/unflatten. Splitting a channel dim (hidden -> heads x head_dim) keeps the outer
    dim as the unit: the inner block is removed whole (never prune inside a head). Merging a channel dim
    with data dims repeats its atoms; merging two channel dims is not supported and pins them.

    A single head is a channel dim of width 1: split off by a size the code leaves to be inferred (``-1``
    in ``view(b, n, -1, head_dim)``), or carrying a label when merged back. Such a size-1 dim is paired
    with the dims after it, so that its head stays one unit rather than its head_dim channels becoming
    prunable behind a hard-coded ``head_dim``."""
    x: Labelled = a["self"] if "self" in a else a["input"]
    dims: list[Label] = [None] * out.ndim
    size = a.get("size", a.get("shape"))
    written = list(size) if isinstance(size, (list, tuple)) and len(size) == out.ndim else []  # the code's sizes
    infers = [k for k, v in enumerate(written) if v == -1]
    single_heads = frozenset(i for i in range(x.ndim) if x.shape[i] == 1 and x.dims[i] is not None)
    runs = reshape_groups(x.shape, out.shape, single_heads, frozenset(k for k in infers if out.shape[k] == 1))
    for gi, gj in runs:
        labelled = [i for i in gi if x.dims[i] is not None]
        if not labelled or not gj:
            continue
        if len(gi) == 1 and len(gj) == 1 and infers and infers[0] > gj[0]:
            # the channel count is a constant and a later dim is inferred: once pruned, that dim would absorb
            # the change and the data be reinterpreted (a count read from another tensor: SegFormer's
            # ``reshape(b, num_channels, -1)`` after its reduction conv). ``view(-1, channels)``, which
            # flattens the leading dims, is not affected
            ctx.pin(x.dims[gi[0]], f"a reshape writes this channel count as a constant ({out.shape[gj[0]]}) and "
                                   f"infers another dimension (-1): pruned, the data would be reinterpreted")
        elif len(gi) == 1 and len(gj) == 1:
            dims[gj[0]] = x.dims[gi[0]]
        elif len(gi) == 1:  # split: outer output dim is the unit, inner ones are whole blocks
            blocks = x.dims[gi[0]].view(out.shape[gj[0]], -1)
            ctx.atoms.union(blocks, blocks[:, :1])
            dims[gj[0]] = blocks[:, 0].clone()
        elif len(gj) == 1 and len(labelled) == 1:  # merge a channel dim with data dims
            sizes = [x.shape[i] for i in gi]
            grid = x.dims[labelled[0]].view([s if i == labelled[0] else 1 for i, s in zip(gi, sizes)])
            dims[gj[0]] = grid.expand(sizes).reshape(-1).clone()
        else:
            for i in labelled:
                ctx.pin(x.dims[i], "reshape mixes two channel dimensions")
    return out.with_dims(dims)


def permute(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    x: Labelled = a["self"]
    if "dims" in a:
        order = [norm_dim(d, x.ndim) for d in a["dims"]]
    else:  # transpose(dim0, dim1) / t()
        order = list(range(x.ndim))
        d0, d1 = (norm_dim(a["dim0"], x.ndim), norm_dim(a["dim1"], x.ndim)) if "dim0" in a else (0, 1)
        order[d0], order[d1] = order[d1], order[d0]
    return out.with_dims([x.dims[i] for i in order])


def reverse_dims(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """``x.T``: every dimension reversed."""
    x: Labelled = a["self"]
    return out.with_dims(tuple(reversed(x.dims)))


def unsqueeze(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    x: Labelled = a["self"]
    d = norm_dim(a["dim"], out.ndim)
    return out.with_dims(x.dims[:d] + (None,) + x.dims[d:])


def repeat_interleave(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """``x.repeat_interleave(k, dim)``: each slice along ``dim`` repeated k times (a mixture of experts'
    tokens, one copy per routed expert); channels on the other dims pass, channels repeated are pinned."""
    x: Labelled = a["self"]
    dim = a.get("dim")
    if dim is None:  # flattened first
        ctx.pin_all(x, "repeat_interleave without a dim flattens the channels")
        return out.with_dims([None] * out.ndim)
    d = norm_dim(dim, x.ndim)
    if x.dims[d] is not None:
        ctx.pin(x.dims[d], "repeat_interleave repeats these channels")
    return out.with_dims(tuple(None if i == d else lab for i, lab in enumerate(x.dims)))


def squeeze(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    x: Labelled = a["self"]
    dims = a.get("dim")
    if dims is None:
        drop = {i for i, s in enumerate(x.shape) if s == 1}
    else:
        drop = {norm_dim(d, x.ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims]) if x.shape[norm_dim(d, x.ndim)] == 1}
    return out.with_dims([lab for i, lab in enumerate(x.dims) if i not in drop])


def expand(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """expand/repeat/broadcast_to: new leading dims are data; a labelled dim repeated keeps its atoms
    (the copies are the same channels, e.g. repeat_kv of grouped-query attention)."""
    x: Labelled = a["self"]
    offset = out.ndim - x.ndim
    dims: list[Label] = [None] * offset
    for i, lab in enumerate(x.dims):
        size = out.shape[offset + i]
        if lab is None or lab.numel() == size:
            dims.append(lab)
        elif "repeats" in a:
            dims.append(lab.repeat(size // lab.numel()))
        else:
            dims.append(lab.expand(size).clone())
    return out.with_dims(dims)


def slice_(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    x: Labelled = a["self"]
    d = norm_dim(a.get("dim", 0), x.ndim)
    lab = x.dims[d]
    if lab is not None:
        start = a.get("start") or 0
        end = a.get("end")
        step = a.get("step") or 1
        lab = lab[slice(start, None if end is None or end >= 2**62 else end, step)].clone()
    return out.with_dims(x.dims[:d] + (lab,) + x.dims[d + 1:])


def select(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    x: Labelled = a["self"]
    d = norm_dim(a["dim"], x.ndim)
    ctx.pin(x.dims[d], "one channel is selected by position")
    return out.with_dims(x.dims[:d] + x.dims[d + 1:])


def split(ctx: FlowContext, a: Mapping[str, Any], out: tuple) -> tuple:
    """split/split_with_sizes/chunk/unbind: index maps onto the pieces."""
    x: Labelled = a["self"]
    d = norm_dim(a.get("dim", 0), x.ndim)
    lab = x.dims[d]
    pieces, offset = [], 0
    for piece in out:
        if piece.ndim < x.ndim:  # unbind
            ctx.pin(lab, "channels are unbound one by one")
            pieces.append(piece.with_dims(x.dims[:d] + x.dims[d + 1:]))
            continue
        n = piece.shape[d]
        piece_lab = None if lab is None else lab[offset: offset + n].clone()
        pieces.append(piece.with_dims(x.dims[:d] + (piece_lab,) + x.dims[d + 1:]))
        offset += n
    return tuple(pieces)


def cat(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    """cat: the concat dim's atoms are the inputs' atoms end to end (data parts become pinned atoms);
    every other dim couples like an elementwise op."""
    parts = [t for t in a["tensors"] if isinstance(t, Labelled) and not (t.ndim == 1 and t.shape[0] == 0)]
    d = norm_dim(a.get("dim", 0), out.ndim)
    letters = LETTERS[: out.ndim]
    others = [(t.with_dims(t.dims[:d] + (None,) + t.dims[d + 1:], t.shape[:d] + (1,) + t.shape[d + 1:]), letters) for t in parts]
    dims = list(couple(ctx, others, letters))
    if any(t.dims[d] is not None for t in parts):
        chunks = [t.dims[d] if t.dims[d] is not None else ctx.atoms.data_atoms(t.shape[d], f"data concatenated with channels ({ctx.where})") for t in parts]
        dims[d] = torch.cat(chunks)
    else:
        dims[d] = None
    return out.with_dims(dims)


def stack(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    parts = [t for t in a["tensors"] if isinstance(t, Labelled)]
    d = norm_dim(a.get("dim", 0), out.ndim)
    letters = LETTERS[: out.ndim - 1]
    dims = list(couple(ctx, [(t, letters) for t in parts], letters))
    return out.with_dims(dims[:d] + [None] + dims[d:])


def pad(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    x: Labelled = a["self"] if "self" in a else a["input"]
    widths = list(a["pad"])
    dims = list(x.dims)
    for k in range(len(widths) // 2):
        d = x.ndim - 1 - k
        if widths[2 * k] or widths[2 * k + 1]:
            ctx.pin(dims[d], "channels are padded")
            dims[d] = None
    return out.with_dims(dims)


def pool(spatial: int):
    """max/avg/adaptive pooling over the trailing ``spatial`` dims."""

    def flow(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
        x: Labelled = a["self"] if "self" in a else a["input"]
        for lab in x.dims[x.ndim - spatial:]:
            ctx.pin(lab, "channels are pooled over")
        dims = x.dims[: x.ndim - spatial] + (None,) * spatial
        if isinstance(out, tuple):  # pooling with indices
            return tuple(o.with_dims(dims) for o in out)
        return out.with_dims(dims)

    flow.__name__ = f"pool{spatial}d"
    return flow


def getitem(ctx: FlowContext, a: Mapping[str, Any], out: Any) -> Any:
    """operator.getitem: an element of a multi-output op, or basic tensor indexing (fx graphs)."""
    container, index = a["self"], a["index"]
    if not isinstance(container, Labelled):
        return container[index]
    x = container
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (x.ndim - len(index) + 1 + sum(i is None for i in index)) + index[k + 1:]
    dims: list[Label] = []
    d = 0
    for i in index:
        if i is None:
            dims.append(None)
        elif isinstance(i, int):
            ctx.pin(x.dims[d], "one channel is selected by position")
            d += 1
        elif isinstance(i, slice):
            lab = x.dims[d]
            dims.append(None if lab is None else lab[i].clone())
            d += 1
        else:
            return unknown(ctx, a, out)
    dims.extend(x.dims[d:])
    return out.with_dims(dims)


def einsum(ctx: FlowContext, a: Mapping[str, Any], out: Labelled) -> Labelled:
    equation = a["equation"].replace(" ", "")
    if "..." in equation or "->" not in equation:
        return unknown(ctx, a, out)
    inputs, result = equation.split("->")
    operands = list(zip(a["tensors"], inputs.split(",")))
    return out.with_dims(couple(ctx, operands, result))

