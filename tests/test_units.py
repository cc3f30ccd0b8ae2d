"""Compact unit indices behave as the tuple of tuples they replace."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from structprune_graph.units import UnitIndices, UnitTable, per_unit_sum, unit_tensors


def test_unit_indices_read_like_tuples():
    units = ((0, 1, 2), (5,), (), (7, 9))
    idx = UnitIndices.of(units)
    assert len(idx) == 4 and idx[0] == (0, 1, 2) and idx[-1] == (7, 9) and idx[2] == ()
    assert list(idx) == list(units) and idx == units and idx[1:3] == ((5,), ())
    assert idx.sizes().tolist() == [3, 1, 0, 2]
    assert hash(idx) == hash(UnitIndices.of(units)) and idx != UnitIndices.of(units[:3])
    assert pickle.loads(pickle.dumps(idx)) == idx and copy.deepcopy(idx) == idx
    with pytest.raises(IndexError):
        idx[4]


@pytest.mark.parametrize("compact", [True, False])
def test_unit_tensors_and_per_unit_sums(compact):
    units = ((0, 1, 2), (5,), (), (7, 9))
    idx = UnitIndices.of(units) if compact else units
    tensors = unit_tensors(idx)
    assert [t.dtype for t in tensors] == [torch.long] * 4 and [t.tolist() for t in tensors] == [list(u) for u in units]
    values = torch.arange(10, dtype=torch.float32) ** 2  # (channels,)
    sums = per_unit_sum(values, idx)
    assert sums.dtype == torch.float64
    torch.testing.assert_close(sums, torch.tensor([0.0 + 1 + 4, 25, 0, 49 + 81], dtype=torch.float64), rtol=0, atol=0)


def test_unit_table_reads_units_off_components():
    class Space:
        def __init__(self, start, size, is_param):
            self.start, self.size, self.is_param = start, size, is_param

    spaces = [Space(0, 3, True), Space(3, 3, True), Space(6, 2, False)]  # atoms 0..7
    component = np.array([0, 1, 2, 0, 1, 2, 6, 7])  # channel i of space 0 with channel i of space 1
    degree = np.ones(8, dtype=np.int64)
    table = UnitTable.build(spaces, component, degree)
    assert table.comp.tolist() == [0, 1, 2]  # the buffer-only atoms 6 and 7 are not units
    assert [table.signature(i) for i in range(3)] == [(0, 1)] * 3
    assert table.member(np.array([2, 0]), 1) == ((2,), (0,))  # units 2 and 0, their index in space 1
    assert table.members(1) == {0: [1], 1: [1]}
