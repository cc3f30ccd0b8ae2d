"""Invariants checked after every pass (``verify``): a broken invariant is a bug, reported with the
group and tensor it concerns, never a silently wrong model."""

from __future__ import annotations

import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .errors import StructPruneError
from .graph import DependencyGraph


class InvariantError(StructPruneError, AssertionError):
    """An internal invariant does not hold (please report it with the model that triggers it)."""


def verify_graph(graph: DependencyGraph) -> None:
    """Every group: all members list one index set per unit; units are disjoint and in range within each
    member; in a group of one kind no (tensor, dim) index belongs to two units."""
    shapes = {**graph.param_shapes, **graph.buffer_shapes}
    for g in graph.groups:
        if g.size != len(g.unit_params):
            raise InvariantError(f"group {g.id}: {g.size} units but {len(g.unit_params)} parameter counts")
        for m in g.members:
            if len(m.indices) != g.size:
                raise InvariantError(f"group {g.id}: member {m.label} lists {len(m.indices)} units, not {g.size}")
            flat = [i for unit in m.indices for i in unit]
            if len(flat) != len(set(flat)):
                raise InvariantError(f"group {g.id}: member {m.label} gives one index to two units")
            size = shapes[m.name][m.dim]
            if flat and (min(flat) < 0 or max(flat) >= size):
                raise InvariantError(f"group {g.id}: member {m.label} has indices outside 0..{size - 1}")


def verify_rewrite(graph: DependencyGraph, keep: Mapping[str, Sequence[int]], model: nn.Module,
                   added: Optional[Sequence[str]] = ()) -> None:
    """A rewritten model: every tensor has exactly the kept sizes; nothing but ``added`` (e.g. biases
    created by compensation) is new; every kept index map is ascending and within its dim."""
    kept = graph.kept_indices(keep)
    for (name, dim), indices in kept.items():
        size = (graph.param_shapes.get(name) or graph.buffer_shapes[name])[dim]
        if indices != sorted(set(indices)) or (indices and (indices[0] < 0 or indices[-1] >= size)):
            raise InvariantError(f"rewrite of {name}[{dim}]: the kept indices are not an ascending map into 0..{size - 1}")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, shape in {**graph.param_shapes, **graph.buffer_shapes}.items():
        want = tuple(len(kept[(name, d)]) if (name, d) in kept else s for d, s in enumerate(shape))
        if name in tensors and tuple(tensors[name].shape) != want:
            raise InvariantError(f"rewrite: {name} has shape {tuple(tensors[name].shape)}, expected {want}")
    known = set(graph.param_shapes) | set(graph.buffer_shapes) | {a for names in graph.aliases.values() for a in names}
    extra = [n for n in dict(model.named_parameters()) if n not in known and n.rpartition(".")[0] not in set(added or ())]
    if extra:
        raise InvariantError(f"rewrite created parameters no pass asked for: {extra[:3]}")


# ---------------------------------------------------------------------------- run before return
FORWARD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _outputs(output: Any) -> list[torch.Tensor]:
    """The tensors a model returns: its main output (logits, last hidden state) or, failing that, all of its
    floating tensors."""
    from .evaluate import main_output

    try:
        return [main_output(output)]
    except TypeError:
        return _floating_tensors(output)


def _innermost_module(model: nn.Module, err: BaseException) -> str:
    """The qualified name of the innermost submodule of ``model`` whose code the error went through."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)] or type(model).__name__
    return found or type(model).__name__


def _first_nonfinite(model: nn.Module, run: Callable[[], Any]) -> Optional[str]:
    """Re-runs the model with hooks; the first module (in execution order) whose output is not finite."""
    seen: list[str] = []

    def hook(name):
        def check(module, args, out):
            if not seen and any(not torch.isfinite(t).all() for t in _floating_tensors(out)):
                seen.append(f"{name or type(model).__name__} ({type(module).__name__})")
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return seen[0] if seen else None


def _floating_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for o in values for t in _floating_tensors(o)]


def run_model_once(model: nn.Module, inputs: Any) -> Any:
    """One forward pass in eval mode (the mode is restored), without gradients."""
    from .blockwise import run_model

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return run_model(model, tuple(inputs) if isinstance(inputs, list) else inputs)
    finally:
        model.train(training)


def verify_forward(model: nn.Module, inputs: Any, reference: Optional[nn.Module] = None, *,
                   where: str = "rewrite", tolerance: Optional[float] = None) -> None:
    """Run what we return: ``model`` must run on ``inputs`` with finite outputs and, when a ``reference``
    (the dense model with the same units masked) is given, match it within ``tolerance`` (relative to the
    reference's largest value; by dtype when None). Raises ``RewriteError`` naming the module and the op."""
    from .errors import RewriteError

    try:
        got = _outputs(run_model_once(model, inputs))
    except Exception as err:  # any failure of the pruned model's first forward is the rewrite's to report
        module = _innermost_module(model, err)
        raise RewriteError(f"{where}: the pruned model fails at its first forward in module {module!r}: "
                           f"{type(err).__name__}: {err}. Its code reads a size that the rewrite did not update; "
                           f"pin the group that prunes {module!r} (leave it out of the keep-set) and report the "
                           f"architecture") from err
    if not all(torch.isfinite(t).all() for t in got):
        first = _first_nonfinite(model, lambda: run_model_once(model, inputs))
        raise RewriteError(f"{where}: the pruned model gives non-finite outputs, first at module {first}; check "
                           f"the input model's weights for NaN/inf (structprune_graph.verify.nonfinite_weights)")
    if reference is None:
        return
    want = _outputs(run_model_once(reference, inputs))
    for i, (g, w) in enumerate(zip(got, want)):
        tol = tolerance if tolerance is not None else FORWARD_TOLERANCE.get(w.dtype, 1e-4)
        if g.shape != w.shape:
            raise RewriteError(f"{where}: output {i} of the pruned model has shape {tuple(g.shape)}, the masked "
                               f"reference {tuple(w.shape)}")
        # in the outputs' own dtype: a float64 copy of an LM's logits would cost more than the check itself
        diff = float((g - w).abs().max()) if g.numel() else 0.0
        bound = tol * (1.0 + float(w.abs().max())) if w.numel() else 0.0
        if diff > bound:
            raise RewriteError(f"{where}: output {i} of the pruned model differs from the dense model with the same "
                               f"units masked by {diff:.3g} (allowed {bound:.3g}): the rewrite changed what the model "
                               f"computes; please report the model")


def nonfinite_weights(model: nn.Module, limit: int = 3) -> list[str]:
    """Names of parameters and floating buffers holding NaN or inf (at most ``limit``); meta tensors skipped."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad
