"""Token rows capped in the solver's second moments (``SolverConfig.token_cap``, ``obs.token_capped``): a row
above the cap is scaled to exactly cap x the median row energy and every other row is untouched; H summed by
the statistics hooks (a layer's, a fused expert's) is the gram of the capped rows; an unreachable cap prunes
bit for bit as no cap; combinations the cap does not cover are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import structprune_graph as sp
from conftest import traced
from structprune_graph.passes.blockwise_calibrate import StatsCollector
from structprune_graph.passes.experts import routed_inputs
from structprune_graph.passes.obs import token_capped
from structprune_graph.solver import SolverConfig
from test_fused_experts import _mixtral
from test_pruning import lm_batches


def _with_sink(tokens: int = 64, d: int = 16, scale: float = 300.0) -> torch.Tensor:
    x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # (tokens, d)
    x[0] *= scale  # the first token's massive activation
    return x


def test_only_rows_above_the_cap_are_scaled_and_to_the_cap_exactly():
    x = _with_sink()
    assert token_capped(x, None) is x
    capped = token_capped(x, 10.0)
    energy = (x ** 2).sum(1)  # (tokens,)
    torch.testing.assert_close(capped[1:], x[1:], rtol=0, atol=0)
    torch.testing.assert_close((capped[0] ** 2).sum(), 10.0 * energy.median())
    torch.testing.assert_close(capped[0] / capped[0].norm(), x[0] / x[0].norm())  # the direction is kept
    share = float((capped[0] ** 2).sum() / (capped ** 2).sum())
    assert float(energy[0] / energy.sum()) > 0.99 and share < 10.0 / (len(x) - 1)
    mostly_empty = torch.zeros_like(x)
    mostly_empty[:3] = x[:3]  # the median row is zero: nothing to cap against, the rows are kept as they are
    assert token_capped(mostly_empty, 10.0) is mostly_empty


def test_the_hook_sums_the_gram_of_the_capped_rows():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 16))
    x = _with_sink().float()[None]  # (batch, tokens, d)
    stats = StatsCollector(module, ["0"], torch.float64, token_cap=10.0)
    try:
        with torch.no_grad():
            module(x)
    finally:
        stats.close()
    rows = token_capped(x[0], 10.0)  # (tokens, d), float32 as the hook reads the layer's input
    torch.testing.assert_close(stats.hessians["0"], (rows.T @ rows).double(), rtol=0, atol=0)
    with pytest.raises(sp.StructPruneError, match="token_cap with centred statistics is not supported"):
        StatsCollector(module, ["0"], centred=True, token_cap=10.0)


def test_a_fused_expert_sums_the_gram_of_its_capped_routed_rows():
    layer = _mixtral().model.layers[0].mlp
    seen = []
    handle = layer.experts.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)),
                                                     with_kwargs=True)
    stats = StatsCollector(layer, ["experts.down_proj"], torch.float64, token_cap=2.0)
    hidden = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(1))  # (batch, tokens, hidden)
    try:
        with torch.no_grad():
            layer(hidden)
    finally:
        stats.close()
        handle.remove()
    routed = routed_inputs(layer.experts, *seen[0])
    assert routed
    changed = False
    for e, (_, x) in routed.items():  # x (tokens_e, intermediate)
        rows = token_capped(x.float(), 2.0)  # (tokens_e, intermediate)
        torch.testing.assert_close(stats.hessians[f"experts.down_proj#{e}"], (rows.T @ rows).double())
        changed |= not torch.equal(rows, x.float())
    assert changed  # a cap of twice the median binds on some expert's tokens


def test_an_unreachable_cap_prunes_bit_for_bit_as_no_cap():
    model = traced("llama")[1]
    batches = lm_batches(4)
    base = dict(block_energy="stream", taylor_first=0.0, obs_weighting="none", solve_precision="float32")
    plain = sp.prune(model, batches, 0.3, solver=SolverConfig(**base))
    huge = sp.prune(model, batches, 0.3, solver=SolverConfig(token_cap=1e30, **base))
    assert huge.plan.keep == plain.plan.keep and huge.report.solver["token_cap"] == 1e30
    want, got = plain.model.state_dict(), huge.model.state_dict()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_a_binding_cap_changes_the_statistics_the_solve_uses():
    model = traced("llama")[1]
    batches = lm_batches(4)
    base = dict(block_energy="stream", taylor_first=0.0, obs_weighting="none", solve_precision="float32")
    plain = sp.prune(model, batches, 0.3, solver=SolverConfig(**base))
    capped = sp.prune(model, batches, 0.3, solver=SolverConfig(token_cap=1.0, **base))  # every row at the median
    with torch.no_grad():
        assert torch.isfinite(capped.model(**batches[0]).logits).all()
    differ = [n for n, v in plain.model.state_dict().items()
              if v.shape != capped.model.state_dict()[n].shape or not torch.equal(v, capped.model.state_dict()[n])]
    assert differ  # another keep-set or other re-fitted weights


@pytest.mark.parametrize("settings, match", [
    (dict(token_cap=0.5), "token_cap is a multiple of the median token's energy, >= 1"),
    (dict(token_cap=10.0, refit_bias="refit"), "token_cap caps the rows of H only"),
    (dict(token_cap=10.0, refit_target="model"), "token_cap caps the rows of H only"),
])
def test_settings_the_cap_does_not_cover_are_refused(settings, match):
    with pytest.raises(sp.StructPruneError, match=match):
        SolverConfig(**settings)
