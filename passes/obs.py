"""Closed-form structured masks: the structured Optimal Brain Surgeon and its least-squares update.

A unit of a group reaches its *consumer* layer (``y = W x``, ``W``: (out, in)) as a set C of input
columns. With H = X^T X over the calibration tokens (damped: H + lambda * mean(diag H) * I), removing
columns C and optimally re-fitting the others costs

    err(C) = tr( W_C  [H^-1]_CC^-1  W_C^T )                               (structured OBS)

and the surviving weights move by  dW = -W_C [H^-1]_CC^-1 [H^-1]_C,: . Units are removed greedily, a
few per step, with H^-1 down-dated after each step (as ZipLM/SlimGPT do); a group with several consumers
sums their errors. The final weights are the least-squares fit on the kept columns K,

    W_K' = argmin ||X_K W_K'^T - T||^2 = (H_KK)^-1 (X_K^T T),  T = X W^T (+ D, a target shift)

solved with a Cholesky factorisation (the damping makes H_KK positive definite: never a NaN). The work
runs in float64, or in float32 at half the memory (``SolverConfig.statistics``: the 7B MLP's H is 0.9 GB in
float64) with its error checked: the re-fit takes one step of iterative refinement, whose size estimates
the solve's relative error, and is redone in float64 above ``FLOAT32_TOLERANCE``; a Cholesky that fails in
float32, or a down-dated H^-1 that loses its positive diagonal, is redone in float64 from H.
A 2-D convolution (one group of filters, zero padding) is a linear layer on unfolded patches: W is
(out, in * kh * kw), H is taken over the unfolded input (``F.unfold``: one row per output position), and a
channel is its kh * kw columns. Other consumers (grouped, 1-D/3-D or padded-mode convolutions) get the
cheap Wanda-style saliency (||W_:,C||^2 * ||X_C||^2) and no update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from math import ceil
from typing import Optional, Sequence

import torch
from torch import nn

from structprune_graph.module_attrs import input_dim

DEFAULT_DAMPING = 0.01
# relative error of a float32 re-fit (estimated by one refinement step) above which it is redone in float64
FLOAT32_TOLERANCE = 1e-3
STATISTICS_DTYPES = {"float64": torch.float64, "float32": torch.float32}
REFIT_ERROR_LOG = "float32 re-fit: estimated relative error %.3g at width %d"  # a DEBUG record per checked re-fit

logger = logging.getLogger(__name__)


# columns per tile of ``gram``: X^T X is symmetric, so only the tiles on and above the diagonal are multiplied
# (4 tiles of 384 at SmolLM2's 1,536 MLP width: 10 products of 16, 26.5 ms against 38.9 for the one product on
# one core, the same numbers); narrower inputs take the one product
GRAM_TILE = 384


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X for ``x`` (tokens, d): the second moments every H of the solver sums. Wide inputs in tiles of
    ``GRAM_TILE`` columns: of n x n tiles only the n (n + 1) / 2 on and above the diagonal are multiplied, the
    rest copied from them (10 of 16 at n = 4; half as n grows). Always in ``x``'s dtype, even inside a
    ``torch.autocast`` region (a block's forward in bf16: a gram in bf16 would round every sum of H)."""
    with torch.autocast(x.device.type, enabled=False):
        return _gram(x)


def token_capped(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``x`` (tokens, d) with each row scaled so that its energy (sum of x^2) is at most ``cap`` x the median
    row's; ``cap`` None: ``x`` itself. A transformer's attention-sink tokens carry massive activations: in
    SmolLM2 the first token of a window holds 99.8% of the energy of block 11's ``down_proj`` input and 77% of
    block 28's, so an H summed over raw rows fits a few tokens (``SolverConfig.token_cap``). Scaling a row
    scales its weight in every sum of H; those tokens still count, as ``cap`` ordinary ones. Where the median
    row is zero (most rows empty, e.g. sparse patches) there is no scale to cap against: ``x`` itself."""
    if cap is None or x.shape[0] == 0:
        return x
    e = (x.double() ** 2).sum(1)  # (tokens,)
    limit = cap * e.median()
    if not limit > 0:
        return x
    scale = torch.where(e > limit, (limit / e).sqrt(), torch.ones_like(e)).to(x.dtype)  # (tokens,)
    return x * scale[:, None]  # (tokens, d)


def _gram(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    n = d // GRAM_TILE
    if n < 2:
        return x.T @ x  # (d, d)
    bounds = [round(i * d / n) for i in range(n + 1)]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)  # (d, d)
    for i in range(n):
        rows = slice(bounds[i], bounds[i + 1])
        left = x[:, rows].T  # (tile, tokens)
        for j in range(i, n):
            cols = slice(bounds[j], bounds[j + 1])
            tile = left @ x[:, cols]  # (tile, tile')
            out[rows, cols] = tile
            if j > i:
                out[cols, rows] = tile.T
    return out


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (input_dim(module) == 0 and getattr(module, "weight", None) is not None
                                             and module.weight.dim() == 2)


def unfoldable(module: nn.Module) -> bool:
    """A convolution that is a linear layer on ``F.unfold`` patches: 2-D, one group, numeric zero padding."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def kernel_size(module: nn.Module) -> int:
    """Columns per input channel in ``as_out_in``: kh * kw for a convolution, 1 for a linear layer."""
    w = getattr(module, "weight", None)
    return int(w[0, 0].numel()) if isinstance(module, nn.modules.conv._ConvNd) else 1


def unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(batch, in, h, w) -> (positions, in * kh * kw): the patches the convolution multiplies."""
    cols = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def as_out_in(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The weight as a ``dtype`` matrix (out, in * kernel) whose column c * kernel + j is input channel c at
    kernel position j: (out, in) for a linear layer (HF Conv1D stores (in, out))."""
    w = weight.detach().to(dtype)
    if input_dim(module) == 0:
        return w.T.contiguous()
    return w.reshape(w.shape[0], -1).clone()


def from_out_in(module: nn.Module, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``as_out_in``, in ``like``'s dtype and layout."""
    if input_dim(module) == 0:
        w = w.T
    return w.reshape(like.shape).to(like.dtype).contiguous()


def damped(h: torch.Tensor, damping: float, inplace: bool = False) -> torch.Tensor:
    """H + damping * mean(diag H) * I, in H's dtype; dead inputs (never non-zero) get a unit diagonal.
    ``inplace``: H is damped where it is (its last user: the 7B MLP's H is 0.9 GB in float64)."""
    h = h if inplace else h.clone()
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damping * float(diag.mean())
    return h


def redamped(h: torch.Tensor, damping: float, ridge: float, scale: str = "mean") -> torch.Tensor:
    """An H that ``damped(h, damping, inplace=True)`` damped, shifted in place to the re-fit's own ridge:
    H + ridge * mean(diag H) * I (``scale="mean"``; the mean is recovered from the damped diagonal, whose mean
    is (1 + damping) * mean(diag H)), or H + ridge * diag(H) (``"diagonal"``: each input by its own second
    moment, i.e. the correlations shrunk toward none, whatever each input's scale); returned as it is when
    ``ridge == damping`` with the mean scale."""
    diag = h.diagonal()
    if scale == "diagonal":
        own = diag - damping * float(diag.mean()) / (1.0 + damping)  # diag H (dead inputs: 1), (in,)
        diag.copy_(own * (1.0 + ridge))
    elif ridge != damping:
        diag += (ridge - damping) * float(diag.mean()) / (1.0 + damping)
    return h


def ridge_shift(h: torch.Tensor, ridge: float, scale: str = "mean") -> torch.Tensor:
    """The ridge a ``redamped`` H carries, recovered from its diagonal: r m (a scalar tensor) for the mean
    scale, whose diagonal mean is (1 + r) m; r diag(H) (in,) for the diagonal scale, whose diagonal is
    (1 + r) diag(H)."""
    diag = h.diagonal()
    return diag * (ridge / (1.0 + ridge)) if scale == "diagonal" else diag.mean() * (ridge / (1.0 + ridge))


def ridged(h: torch.Tensor, ridge: float, scale: str = "mean") -> torch.Tensor:
    """A copy of an undamped H with the re-fit's ridge: ``damped(h, ridge)`` (mean scale) or H + ridge *
    diag(H) with dead inputs given a unit diagonal first (diagonal scale)."""
    return redamped(damped(h, 0.0), 0.0, ridge, scale) if scale == "diagonal" else damped(h, ridge)


def _factor_in_place(h: torch.Tensor) -> bool:
    """Overwrite a symmetric H (row-major) with its lower Cholesky factor without a copy: LAPACK factors the
    column-major view H^T (= H) and writes there (``torch.linalg.cholesky`` copies its input first: 2 matrices
    at its peak where this holds 1). False where the factorisation fails (H is then overwritten)."""
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(h.T, upper=True, out=(h.T, info))
    return int(info) == 0


def _factor(h: torch.Tensor, what: str, in_place: bool = False) -> torch.Tensor:
    """The lower Cholesky factor of a damped H, written over a copy (over H itself with ``in_place``: its last
    use). A float32 failure (rounding made a nearly singular H indefinite) is redone in float64, and the factor
    stays float64; a float64 failure raises."""
    chol = h if in_place else h.clone()
    if _factor_in_place(chol):
        return chol
    if h.dtype != torch.float64 and not in_place:
        logger.info("%s: Cholesky failed in %s at width %d; redone in float64", what, h.dtype, h.shape[0])
        chol = h.double()
        if _factor_in_place(chol):
            return chol
    raise torch.linalg.LinAlgError(f"{what}: the damped H (width {h.shape[0]}) is not positive definite in "
                                   f"{chol.dtype}; raise the damping")


def _cho_solve(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """H v = rhs from H's lower factor by two triangular solves (``torch.cholesky_solve`` copies the factor)."""
    y = torch.linalg.solve_triangular(chol, rhs, upper=False)  # L y = rhs
    return torch.linalg.solve_triangular(chol.T, y, upper=True)  # L^T v = y


def _inverse(h: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """H^-1 of a damped H (float64 where float32's Cholesky fails), factored and inverted in place in one
    copy of H (in H itself with ``in_place``): one matrix beside H at the peak instead of two (the 7B MLP's
    H is 0.45 GB in float32)."""
    work = _factor(h, "OBS inverse", in_place)
    torch.cholesky_inverse(work.T, upper=True, out=work.T)  # in place: the full symmetric inverse
    return work


@dataclass
class Consumer:
    """One consumer layer of a group: its weight (out, in), damped H, and the columns of each unit."""

    path: str
    weight: torch.Tensor  # (out, in) float64
    hessian: Optional[torch.Tensor]  # (in, in) float64, damped; None: no second-order statistics
    columns: Sequence[torch.Tensor]  # per unit, LongTensor of input columns
    energy: Optional[torch.Tensor] = None  # (in,) sum of x^2, for the fallback saliency
    hinv: Optional[torch.Tensor] = field(default=None, repr=False)


def _unit_errors(c: Consumer, units: Sequence[int]) -> torch.Tensor:
    if c.hessian is None:  # Wanda-style: ||W_:,C||^2 ||X_C||^2 (squared, on the scale of the OBS error)
        col = (c.weight ** 2).sum(0) * (c.energy if c.energy is not None else 1.0)  # (in,)
        return torch.stack([col[c.columns[u]].sum() for u in units])
    sizes = {len(c.columns[u]) for u in units}
    if sizes == {1}:
        cols = torch.cat([c.columns[u] for u in units])
        return (c.weight[:, cols] ** 2).sum(0) / c.hinv.diagonal()[cols]
    out = []
    for u in units:  # a head: tr(W_C M^-1 W_C^T), M = [H^-1]_CC
        cols = c.columns[u]
        w_c = c.weight[:, cols]  # (out, |C|)
        m = c.hinv[cols][:, cols]  # (|C|, |C|)
        out.append((w_c.T * torch.linalg.solve(m, w_c.T)).sum())
    return torch.stack(out)


def _remove(c: Consumer, cols: torch.Tensor, alive: torch.Tensor) -> float:
    """OBS step on the consumer's remaining columns: drop ``cols`` (positions in them; ``alive``: the
    others), move the others and keep only their rows and columns of H^-1 (the down-date computed on those
    alone: 2 r^2 |S| flops for r remaining columns instead of 2 in^2 |S|); returns the error it costs."""
    if c.hessian is None:
        err = float(((c.weight[:, cols] ** 2).sum(0) * (c.energy[cols] if c.energy is not None else 1.0)).sum())
        c.weight = c.weight[:, alive]
        c.energy = c.energy[alive] if c.energy is not None else None
        return err
    # (|S|, |S|), small: not in place, so that a float32 failure can be redone in float64 from the gathered block
    m_inv = _inverse(c.hinv[cols][:, cols]).to(c.hinv.dtype)
    w_s = c.weight[:, cols]  # (out, |S|)
    err = float((w_s @ m_inv * w_s).sum())
    keep = alive.nonzero().squeeze(1)
    h_sr = c.hinv[cols][:, keep]  # (|S|, r)
    # one gather to the (r, r) block, then the down-date in place: H^-1 is never held three times over
    rest = c.hinv[keep[:, None], keep[None, :]]  # (r, r)
    c.hinv = None
    c.hinv = rest.addmm_(h_sr.T, m_inv @ h_sr, alpha=-1.0)
    c.weight = c.weight[:, keep].addmm_(w_s @ m_inv, h_sr, alpha=-1.0)  # (out, r)
    return err


def _checked(c: Consumer, origin: torch.Tensor) -> None:
    """A float32 down-date that lost H^-1's positive diagonal (a Schur complement of a positive definite H
    keeps it in exact arithmetic) is recomputed in float64 from H on the remaining columns (``origin``:
    their columns in H), and the consumer works in float64 from then on."""
    if c.hinv is None or c.hinv.dtype == torch.float64:
        return
    diag = c.hinv.diagonal()
    if bool(torch.isfinite(diag).all()) and bool((diag > 0).all()):
        return
    logger.info("OBS down-date of %s lost precision in float32 at %d columns; redone in float64",
                c.path, len(origin))
    c.hinv = _inverse(c.hessian[origin[:, None], origin[None, :]].double(), in_place=True)  # a gathered copy
    c.weight = c.weight.double()


# what a curve's error counts (``greedy_obs``): "obs", the error left after the optimal re-fit of the kept
# columns on the calibration tokens; "removal", the error of dropping the units with no re-fit; "blend", the
# geometric mean of the two at every step (the re-fit's gain only half trusted off the calibration text)
CURVE_ERRORS = ("obs", "removal", "blend")


class RemovalError:
    """tr(W_S H_SS W_S^T) summed over the consumers as the removed set S grows: the error of zeroing S's
    columns of the dense weights with no re-fit (the Wanda-style saliency where H is missing). Each step adds
    T: E(S + T) = E(S) + 2 <W_T, Q_T> + <W_T, W_T H_TT>, with Q = W_S H_S,: (out, in) kept up to date, so a
    step costs out x |T| x in and holds one matrix the size of W (not the (|S|, |S|) block of H)."""

    def __init__(self, consumers: Sequence[Consumer]) -> None:
        self.consumers = consumers
        # (out, in) before any OBS update: greedy_obs's work replaces a consumer's weight and changes the
        # original only in place at its end, after the last step, so no copy is needed
        self.dense = [c.weight for c in consumers]
        self.q = [torch.zeros_like(w) if c.hessian is not None else None for c, w in zip(consumers, self.dense)]

    def add(self, units: Sequence[int]) -> float:
        """The error the units add to the removed set (then part of it)."""
        total = 0.0
        for c, w, q in zip(self.consumers, self.dense, self.q):
            cols = torch.cat([c.columns[u] for u in units])
            w_t = w[:, cols]  # (out, |T|)
            if q is None:
                total += float(((w_t ** 2).sum(0) * (c.energy[cols] if c.energy is not None else 1.0)).sum())
                continue
            h_t = c.hessian.index_select(0, cols).to(w.dtype)  # (|T|, in)
            total += float(2.0 * (w_t * q[:, cols]).sum() + (w_t @ h_t[:, cols] * w_t).sum())
            q.addmm_(w_t, h_t)  # Q += W_T H_T,:
        return total


def _step_errors(obs: Sequence[float], removal: Sequence[float], error: str) -> list[float]:
    """Per greedy step, the error increment the curve records (cumulative errors differenced for ``blend``)."""
    if error == "obs":
        return list(obs)
    cum_obs = torch.tensor(obs, dtype=torch.float64).cumsum(0)
    # zeroing more columns can cancel (||X_S W_S^T|| is not monotone in S): the curve is kept non-decreasing
    cum_rm = torch.tensor(removal, dtype=torch.float64).cumsum(0).clamp_min(0).cummax(0).values
    cum = cum_rm if error == "removal" else (cum_obs.clamp_min(0) * cum_rm).sqrt().cummax(0).values
    return torch.diff(cum, prepend=cum.new_zeros(1)).tolist()


def greedy_obs(consumers: Sequence[Consumer], n_units: int, n_remove: int, steps: int = 16, error: str = "obs",
               first: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Remove ``n_remove`` of ``n_units`` units greedily (after ``first``, removed in one step before the
    greedy ones: units another order chose); returns the removal order and, per removed unit,
    its share of the error of the step it was removed in (a step's error split by the units' own errors).
    ``error`` (``CURVE_ERRORS``) says which error the increments count; the order is the OBS order in every
    case. The work runs on copies that shrink to the remaining columns as units leave (at 80% removed, about
    40% of the down-date flops of a full-size H^-1); at the end each consumer's weight is the OBS update
    (removed columns zero)."""
    if error not in CURVE_ERRORS:
        raise ValueError(f"greedy_obs: unknown error {error!r}; choose one of {CURVE_ERRORS}")
    removal = RemovalError(consumers) if error != "obs" else None
    step_obs: list[float] = []
    step_removal: list[float] = []
    shares: list[torch.Tensor] = []
    work = [replace(c, columns=list(c.columns), hinv=_inverse(c.hessian) if c.hessian is not None else None)
            for c in consumers]
    for c in work:  # a Cholesky redone in float64 makes the consumer's work float64
        c.weight = c.weight.to(c.hinv.dtype) if c.hinv is not None else c.weight
    origin = [torch.arange(c.weight.shape[1]) for c in consumers]  # per work column: its column in the layer
    remaining = list(range(n_units))
    order: list[int] = []
    n_steps = steps + (1 if first else 0)
    for step in range(n_steps):
        left = n_remove - len(order)
        if left <= 0:
            break
        if step == 0 and first:
            picked = list(first)[:left]
            own = sum(_unit_errors(c, picked) for c in work).clamp_min(0.0)  # (picked,)
        else:
            k = ceil(left / (n_steps - step))
            errs = sum(_unit_errors(c, remaining) for c in work)  # (remaining,)
            picked_pos = torch.argsort(errs, stable=True)[:k].tolist()
            picked = [remaining[p] for p in picked_pos]
            own = errs[picked_pos].clamp_min(0.0)
        gone = set(picked)
        remaining = [u for u in remaining if u not in gone]
        total = 0.0
        for i, c in enumerate(work):
            cols = torch.cat([c.columns[u] for u in picked])
            alive = torch.ones(c.weight.shape[1], dtype=torch.bool)
            alive[cols] = False
            total += _remove(c, cols, alive)
            position = torch.full((len(alive),), -1, dtype=torch.long)
            position[alive] = torch.arange(int(alive.sum()))
            origin[i] = origin[i][alive]
            _checked(c, origin[i])
            for u in remaining:  # the units' columns, renumbered among the remaining ones
                c.columns[u] = position[c.columns[u]]
        shares.append(own / own.sum() if float(own.sum()) > 0 else torch.full_like(own, 1.0 / len(own)))
        step_obs.append(total)
        if removal is not None:
            step_removal.append(removal.add(picked))
        order += picked
    increments = [x for share, e in zip(shares, _step_errors(step_obs, step_removal, error))
                  for x in (share * e).tolist()]
    for c, w, cols in zip(consumers, work, origin):
        c.weight.zero_()
        c.weight[:, cols] = w.weight.to(c.weight.dtype)
    return order, increments


RHS_ROWS = 1024  # rows of H (x its width) the re-fit's right-hand side is computed from at a time


def _problem(weight: torch.Tensor, hessian: torch.Tensor, keep_cols: torch.Tensor, cross: Optional[torch.Tensor],
             dtype: torch.dtype, rhs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """H_KK and H_K,: W^T (+ cross) in ``dtype`` (or ``rhs`` itself); the right-hand side RHS_ROWS rows of H
    at a time, never the whole (k, in) gather (0.34 GB at the 7B MLP's width in float32)."""
    h_kk = hessian[keep_cols[:, None], keep_cols[None, :]].to(dtype)  # (k, k), one gather
    if rhs is not None:
        return h_kk, rhs.to(dtype).clone()  # (k, out)
    w_t = weight.T.to(dtype)  # (in, out)
    rhs = torch.empty(len(keep_cols), w_t.shape[1], dtype=dtype)  # (k, out)
    for start in range(0, len(keep_cols), RHS_ROWS):
        rows = keep_cols[start:start + RHS_ROWS]
        torch.mm(hessian.index_select(0, rows).to(dtype), w_t, out=rhs[start:start + len(rows)])
    if cross is not None:
        rhs += cross.to(dtype)
    return h_kk, rhs


def least_squares(weight: torch.Tensor, hessian: torch.Tensor, keep_cols: torch.Tensor,
                  cross: Optional[torch.Tensor] = None, rhs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept columns re-fitted: argmin ||X_K V^T - (X W^T + D)||^2 with H = X^T X (damped), cross = X_K^T D
    (in_kept, out); ``rhs``: the whole right-hand side (in_kept, out) instead of (H W^T)_K + cross, for a
    target that is not a function of X; removed columns are zero. weight: (out, in); returns (out, in) in
    weight's dtype. Below
    float64, one step of iterative refinement corrects the solution, and its size (the estimated relative
    error) must stay under ``FLOAT32_TOLERANCE`` or the fit is redone in float64 (the float32 problem released
    first, the float64 one factored in place)."""
    target = rhs
    h_kk, rhs = _problem(weight, hessian, keep_cols, cross, hessian.dtype, target)
    v = _solve_checked(h_kk, rhs)  # (k, out)
    if v is None:  # the float32 fit failed its check: the whole problem in float64
        del h_kk, rhs
        h_kk, rhs = _problem(weight, hessian, keep_cols, cross, torch.float64, target)
        v = _cho_solve(_factor(h_kk, "least-squares re-fit", in_place=True), rhs)
        del h_kk, rhs
    out = torch.zeros_like(weight)
    out[:, keep_cols] = v.T.to(out.dtype)
    return out


def refinement_error(h: torch.Tensor, rhs: torch.Tensor, v: torch.Tensor, chol: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One step of iterative refinement of H v = rhs: the corrected v and the step's relative size, an
    estimate of v's relative error."""
    step = _cho_solve(chol, rhs - h @ v)  # (k, out)
    corrected = v + step
    return corrected, float(step.norm() / corrected.norm().clamp_min(1e-30))


def _solve_checked(h: torch.Tensor, rhs: torch.Tensor) -> Optional[torch.Tensor]:
    """H v = rhs by Cholesky; in float64 H is factored in place (its last use). Below float64, None where the
    factorisation fails or the refinement step says the error is too large (the caller redoes the whole
    problem in float64)."""
    if h.dtype == torch.float64:
        return _cho_solve(_factor(h, "least-squares re-fit", in_place=True), rhs)  # (k, out)
    chol = h.clone()  # H itself stays for the refinement's residual
    error = float("inf")
    if _factor_in_place(chol):
        v, error = refinement_error(h, rhs, _cho_solve(chol, rhs), chol)
        if error <= FLOAT32_TOLERANCE and bool(torch.isfinite(v).all()):
            logger.debug(REFIT_ERROR_LOG, error, h.shape[0])
            return v
    logger.info("least-squares re-fit: estimated relative error %.2g in %s at width %d; redone in float64",
                error, h.dtype, h.shape[0])
    return None
