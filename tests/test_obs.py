"""Structured OBS and the least-squares update: exact against a direct solve, finite on degenerate data."""

from __future__ import annotations

import pytest
import torch

from structprune_graph.passes.obs import GRAM_TILE, Consumer, damped, gram, greedy_obs, least_squares, redamped


def _problem(seed=0, tokens=256, d_in=12, d_out=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)  # (tokens, d_in)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)  # (d_out, d_in)
    return x, w


def test_keeping_every_column_changes_nothing():
    x, w = _problem()
    h = damped(x.T @ x, 0.01)
    torch.testing.assert_close(least_squares(w, h, torch.arange(12)), w)


def test_least_squares_is_the_optimal_refit_of_the_kept_columns():
    x, w = _problem()
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    h = damped(x.T @ x, 1e-9)
    fitted = least_squares(w, h, keep)
    direct = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # (d_out, kept)
    torch.testing.assert_close(fitted[:, keep], direct, rtol=1e-6, atol=1e-8)
    assert fitted[:, [1, 4, 6, 9, 10]].abs().max() == 0


def test_obs_error_is_the_error_of_the_optimal_refit():
    """Removing one unit (a single column or a 3-column head) costs exactly the reconstruction error."""
    x, w = _problem()
    h = damped(x.T @ x, 1e-9)
    for columns in ([torch.tensor([i]) for i in range(12)], [torch.arange(3 * i, 3 * i + 3) for i in range(4)]):
        consumer = Consumer("fc", w.clone(), h, columns)
        order, increments = greedy_obs([consumer], len(columns), 1)
        gone = columns[order[0]]
        keep = torch.tensor([i for i in range(12) if i not in set(gone.tolist())])
        refit = least_squares(w, h, keep)
        err = float(((x @ w.T - x @ refit.T) ** 2).sum())
        assert abs(increments[0] - err) <= 1e-6 * err
        torch.testing.assert_close(consumer.weight, refit, rtol=1e-6, atol=1e-8)  # the OBS update is the refit


@pytest.mark.parametrize("ridge", [0.01, 1.0, 1e-4])
def test_an_h_damped_in_place_is_shifted_to_the_refits_ridge(ridge):
    """The block solve damps the last reader's H in place for the OBS and re-uses it for the re-fit: shifted
    to the re-fit's ridge it is the H that ``damped`` gives for that ridge (dead inputs included)."""
    x, _ = _problem()
    x[:, 3] = 0.0  # a dead input: unit diagonal in both
    h = x.T @ x
    shifted = redamped(damped(h.clone(), 0.01, inplace=True), 0.01, ridge)
    torch.testing.assert_close(shifted, damped(h, ridge), rtol=1e-14, atol=1e-12)
    same = damped(h.clone(), 0.01, inplace=True)
    assert redamped(same, 0.01, 0.01) is same and torch.equal(same, damped(h, 0.01))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_in_place_factor_inverse_and_solves_equal_torchs(dtype):
    """H factored over itself (LAPACK on the column-major view), inverted over the factor, and solved by two
    triangular solves: torch's cholesky, inv and solve, with H left as it was where a copy is asked for."""
    from structprune_graph.passes.obs import _cho_solve, _factor, _inverse

    x, w = _problem(tokens=256, d_in=40, d_out=7)
    h = damped(x.T @ x, 0.01).to(dtype)
    before = h.clone()
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    chol = _factor(h, "test")
    torch.testing.assert_close(chol.tril(), torch.linalg.cholesky(h), **tol)
    torch.testing.assert_close(_cho_solve(chol, w.T.to(dtype)), torch.linalg.solve(h, w.T.to(dtype)), **tol)
    inverse = _inverse(h)
    assert torch.equal(inverse, inverse.T) and torch.equal(h, before)
    torch.testing.assert_close(inverse, torch.linalg.inv(h), **tol)
    own = h.clone()
    assert _factor(own, "test", in_place=True).data_ptr() == own.data_ptr()
    singular = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError, match="test: the damped H \\(width 4\\) is not positive definite"):
        _factor(singular, "test")


def test_greedy_removes_the_cheapest_unit_first():
    x, w = _problem()
    w[:, 4] *= 1e-3  # column 4 hardly matters
    h = damped(x.T @ x, 0.01)
    order, increments = greedy_obs([Consumer("fc", w, h, [torch.tensor([i]) for i in range(12)])], 12, 6)
    assert order[0] == 4 and len(order) == 6 and len(set(order)) == 6
    assert all(i >= 0 for i in increments)


def test_dead_and_duplicated_inputs_stay_finite():
    x, w = _problem()
    x[:, 3] = 0.0  # an input that is never non-zero
    x[:, 5] = x[:, 6]  # two identical inputs: H is singular without damping
    h = damped(x.T @ x, 0.01)
    consumer = Consumer("fc", w.clone(), h, [torch.tensor([i]) for i in range(12)])
    greedy_obs([consumer], 12, 9)
    assert torch.isfinite(consumer.weight).all()
    assert torch.isfinite(least_squares(w, h, torch.tensor([0, 5, 6, 9]))).all()


def test_a_convolution_is_refit_on_its_unfolded_patches():
    """Channel c of a 3x3 conv is 9 columns of the unfolded problem; removing it and re-fitting gives the
    conv whose output error, computed by running the conv, is the OBS error."""
    from structprune_graph.passes.blockwise_calibrate import StatsCollector, build_consumers
    from structprune_graph.passes.obs import as_out_in, from_out_in
    from structprune_graph.passes.partition import Block

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, 3, padding=1).double()
    x = torch.randn(8, 6, 7, 7, generator=g, dtype=torch.float64)  # (batch, in, h, w)
    module = torch.nn.Sequential(conv)
    stats = StatsCollector(module, ["0"])
    with torch.no_grad():
        module(x)
    stats.close()

    class _Member:  # the group of conv 0's input channels, as the graph lists it
        name, dim, is_param = "0.weight", 1, True
        indices = [(c,) for c in range(6)]

    class _Group:
        members = [_Member()]

    [consumer] = build_consumers(Block(0, "", 0, 0, ()), module, _Group(), stats, 1e-9)
    assert consumer.weight.shape == (4, 54) and consumer.columns[2].tolist() == list(range(18, 27))
    order, increments = greedy_obs([consumer], 6, 1)
    refit = from_out_in(conv, consumer.weight, conv.weight)  # (4, 6, 3, 3), channel order[0] zero
    assert refit[:, order[0]].abs().max() == 0
    with torch.no_grad():
        dense = conv(x)
        pruned = torch.nn.functional.conv2d(x, refit, conv.bias, padding=1)
    err = float(((dense - pruned) ** 2).sum())
    assert abs(increments[0] - err) <= 1e-5 * err
    torch.testing.assert_close(as_out_in(conv, refit), consumer.weight)


def _full_size_greedy(w, h, columns, n_remove, steps=16):
    """The greedy structured OBS on a full-size H^-1 and W (the textbook form the pass computes on shrinking
    copies): per step the k cheapest units by tr(W_C M^-1 W_C^T), M = [H^-1]_CC, then the update of W and H^-1."""
    hinv, w = torch.linalg.inv(h), w.clone()
    remaining, order, total = list(range(len(columns))), [], []
    for step in range(steps):
        left = n_remove - len(order)
        if left <= 0:
            break
        k = -(-left // (steps - step))
        errs = torch.stack([(w[:, columns[u]].T * torch.linalg.solve(hinv[columns[u]][:, columns[u]],
                                                                        w[:, columns[u]].T)).sum() for u in remaining])
        picked = [remaining[p] for p in torch.argsort(errs, stable=True)[:k].tolist()]
        cols = torch.cat([columns[u] for u in picked])
        m_inv = torch.linalg.inv(hinv[cols][:, cols])
        total.append(float((w[:, cols] @ m_inv * w[:, cols]).sum()))
        w -= w[:, cols] @ m_inv @ hinv[cols, :]
        hinv -= hinv[:, cols] @ m_inv @ hinv[cols, :]
        w[:, cols] = 0.0
        order += picked
        remaining = [u for u in remaining if u not in picked]
    return order, total, w


@pytest.mark.parametrize("unit", [1, 3])
def test_greedy_obs_on_shrinking_copies_equals_the_full_size_computation(unit):
    x, _ = _problem()
    g = torch.Generator().manual_seed(3)
    x = torch.cat([x, torch.randn(x.shape[0], 12, generator=g, dtype=x.dtype)], 1)  # 24 inputs
    w = torch.randn(7, 24, generator=g, dtype=x.dtype)
    h = damped(x.T @ x, 0.01)
    columns = [torch.arange(unit * i, unit * i + unit) for i in range(24 // unit)]
    consumer = Consumer("fc", w.clone(), h, [c.clone() for c in columns])
    n_remove = len(columns) * 3 // 4
    order, increments = greedy_obs([consumer], len(columns), n_remove, steps=5)
    want_order, step_errors, want_w = _full_size_greedy(w, h, columns, n_remove, steps=5)
    assert order == want_order
    assert all(torch.equal(a, b) for a, b in zip(consumer.columns, columns))  # the units' columns are untouched
    torch.testing.assert_close(torch.tensor(sum(increments)), torch.tensor(sum(step_errors)), rtol=1e-9, atol=0)
    torch.testing.assert_close(consumer.weight, want_w, rtol=1e-7, atol=1e-9)


def test_a_float32_refit_matches_float64_where_the_problem_is_well_conditioned(caplog):
    x, w = _problem(tokens=512, d_in=48, d_out=9)
    keep = torch.arange(0, 48, 2)
    h = damped(x.T @ x, 0.01)
    with caplog.at_level("INFO", logger="structprune_graph.passes.obs"):
        fitted = least_squares(w.float(), h.float(), keep)
    assert fitted.dtype == torch.float32
    torch.testing.assert_close(fitted.double(), least_squares(w, h, keep), rtol=1e-5, atol=1e-6)
    assert "redone in float64" not in caplog.text


def test_an_ill_conditioned_float32_refit_is_redone_in_float64(caplog):
    """A nearly duplicated input pair with a tiny ridge: float32's one refinement step shows an error far
    above the tolerance, so the fit is redone in float64 and equals the float64 fit."""
    x, w = _problem(tokens=512, d_in=48, d_out=9)
    x[:, 7] = x[:, 8] + 1e-5 * x[:, 9]  # columns 7 and 8 nearly equal: cond(H_KK) ~ 1e10
    keep = torch.arange(0, 40)
    h = damped(x.T @ x, 1e-12)
    with caplog.at_level("INFO", logger="structprune_graph.passes.obs"):
        fitted = least_squares(w.float(), h.float(), keep)
    assert "least-squares re-fit: estimated relative error" in caplog.text and "redone in float64" in caplog.text
    want = least_squares(w.float().double(), h.float().double(), keep)
    # the pair's split is ill-determined, what the layer computes is not: the fitted outputs agree
    torch.testing.assert_close(x[:, keep] @ fitted[:, keep].double().T, x[:, keep] @ want[:, keep].T,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("unit", [1, 3])
def test_greedy_obs_in_float32_picks_the_float64_order(unit):
    x, w = _problem(tokens=512, d_in=48, d_out=9)
    h = damped(x.T @ x, 0.01)
    columns = [torch.arange(unit * i, unit * i + unit) for i in range(48 // unit)]
    want = Consumer("fc", w.clone(), h, [c.clone() for c in columns])
    got = Consumer("fc", w.float(), h.float(), [c.clone() for c in columns])
    n_remove = len(columns) // 2
    want_order, want_inc = greedy_obs([want], len(columns), n_remove)
    order, inc = greedy_obs([got], len(columns), n_remove)
    assert order == want_order
    torch.testing.assert_close(torch.tensor(inc), torch.tensor(want_inc), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got.weight.double(), want.weight, rtol=1e-4, atol=1e-5)


def test_a_float32_cholesky_that_fails_is_taken_in_float64(caplog):
    """A duplicated input and no damping: H is singular in float32 (its Cholesky fails) and barely positive
    definite in float64; the OBS inverse is taken in float64 and the consumer's work stays float64."""
    x, w = _problem(tokens=512, d_in=24, d_out=5)
    x[:, 1] = x[:, 0]
    h = damped(x.T @ x, 0.0)
    assert int(torch.linalg.cholesky_ex(h.float())[1]) != 0
    got = Consumer("fc", w.float(), h.float(), [torch.tensor([i]) for i in range(24)])
    with caplog.at_level("INFO", logger="structprune_graph.passes.obs"):
        order, inc = greedy_obs([got], 24, 12, steps=12)
    assert "OBS inverse: Cholesky failed in torch.float32 at width 24; redone in float64" in caplog.text
    assert all(torch.isfinite(torch.tensor(inc))) and len(set(order)) == 12
    assert torch.isfinite(got.weight).all()


def test_a_downdated_inverse_without_a_positive_diagonal_is_recomputed_from_h_in_float64(caplog):
    from structprune_graph.passes.obs import _checked

    x, w = _problem(tokens=512, d_in=12, d_out=5)
    h = damped(x.T @ x, 0.01)
    origin = torch.tensor([0, 3, 4, 7, 9])  # the remaining columns
    broken = torch.linalg.inv(h[origin][:, origin]).float()
    broken[2, 2] = -1.0  # what catastrophic cancellation in a float32 down-date leaves
    c = Consumer("fc", w[:, origin].float(), h.float(), [], hinv=broken)
    with caplog.at_level("INFO", logger="structprune_graph.passes.obs"):
        _checked(c, origin)
    assert "lost precision in float32 at 5 columns" in caplog.text
    assert c.hinv.dtype == torch.float64 and c.weight.dtype == torch.float64
    torch.testing.assert_close(c.hinv, torch.linalg.inv(h.float().double()[origin][:, origin]))
    healthy = Consumer("fc", w[:, origin].float(), h.float(), [], hinv=torch.linalg.inv(h[origin][:, origin]).float())
    _checked(healthy, origin)
    assert healthy.hinv.dtype == torch.float32  # a positive diagonal stays in float32


@pytest.mark.parametrize("unit", [1, 3])
def test_removal_and_blend_curves_keep_the_obs_order_and_count_their_own_error(unit):
    """``removal``: after k units the curve sums to ||X_S W_S^T||^2 (the dense weights' columns zeroed, no
    re-fit), kept non-decreasing; ``blend``: to the geometric mean of that and the OBS curve's sum."""
    x, w = _problem(seed=5)
    x[:, 3] = 0.9 * x[:, 2] + 0.1 * x[:, 3]  # correlated inputs: the re-fit recovers much of the removal
    h = damped(x.T @ x, 1e-9)
    columns = [torch.arange(unit * i, unit * i + unit) for i in range(12 // unit)]
    runs = {}
    for error in ("obs", "removal", "blend"):
        consumer = Consumer("fc", w.clone(), h, [c.clone() for c in columns])
        runs[error] = greedy_obs([consumer], len(columns), len(columns) - 1, steps=len(columns) - 1, error=error)
    order = runs["obs"][0]
    assert runs["removal"][0] == order and runs["blend"][0] == order
    removal = []
    for k in range(1, len(order) + 1):
        cols = torch.cat([columns[u] for u in order[:k]])
        removal.append(float(((x[:, cols] @ w[:, cols].T) ** 2).sum()))  # (tokens, out) zeroed columns' output
    removal = torch.tensor(removal, dtype=torch.float64).cummax(0).values
    got = torch.tensor(runs["removal"][1], dtype=torch.float64).cumsum(0)
    torch.testing.assert_close(got, removal, rtol=1e-6, atol=1e-9)
    obs = torch.tensor(runs["obs"][1], dtype=torch.float64).cumsum(0)
    assert bool((obs <= removal * (1 + 1e-9)).all())  # the optimal re-fit never does worse than none
    blend = torch.tensor(runs["blend"][1], dtype=torch.float64).cumsum(0)
    torch.testing.assert_close(blend, (obs * removal).sqrt().cummax(0).values, rtol=1e-6, atol=1e-9)


def test_an_unknown_curve_error_is_refused():
    from structprune_graph.errors import StructPruneError
    from structprune_graph.solver import SolverConfig

    with pytest.raises(StructPruneError, match="unknown curve_error 'refit'.*choose one of"):
        SolverConfig(curve_error="refit")
    x, w = _problem()
    with pytest.raises(ValueError, match="unknown error 'x'"):
        greedy_obs([Consumer("fc", w, damped(x.T @ x, 0.01), [torch.tensor([i]) for i in range(12)])], 12, 3, error="x")


@pytest.mark.parametrize("width", [5, GRAM_TILE + 7, 2 * GRAM_TILE, 4 * GRAM_TILE + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_is_x_transpose_x_from_the_upper_tiles(width, dtype):
    x = torch.randn(300, width, generator=torch.Generator().manual_seed(width), dtype=dtype)  # (tokens, width)
    h = gram(x)
    torch.testing.assert_close(h, x.T @ x)  # the same dot products, tiled
    if width >= 2 * GRAM_TILE:  # tiled: the lower triangle is the upper's copy, exactly symmetric
        assert torch.equal(h, h.T)
    assert torch.equal(gram(x[:0]), torch.zeros(width, width, dtype=dtype))  # no tokens: no moments
