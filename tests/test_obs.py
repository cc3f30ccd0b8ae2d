"""Structured OBS and the least-squares update: exact against a direct solve, finite on degenerate data."""

from __future__ import annotations

import torch

from structprune_graph.passes.obs import Consumer, damped, greedy_obs, least_squares


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
