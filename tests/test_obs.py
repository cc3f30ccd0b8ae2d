"""Structured OBS and the least-squares update: exact against a direct solve, finite on degenerate data."""

from __future__ import annotations

import pytest
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
