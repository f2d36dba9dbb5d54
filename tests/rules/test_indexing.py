"""topk, advanced indexing, index_select, index_add, floor_divide: no FLOPs; the backward
keeps the indices (and index_add its source), checked against autograd and FlopCounterMode."""

import pytest
import torch

from tests.helpers import assert_matches_pytorch, on_activations

N, D, K = 6, 4, 2


def _idx(device):
    return torch.tensor([0, 2, 2, 5], device=device)


CASES = {
    "topk": (lambda x: torch.topk(x, K, dim=-1).values, (N, D)),
    "index_by_computed_ids": (
        lambda x: x[(torch.arange(8, device=x.device) * 3) // 4 % N], (N, D)),
    "index_select": (lambda x: x.index_select(0, _idx(x.device)), (N, D)),
    "index_add": (lambda x, s: x.index_add(0, _idx(x.device), s), (N, D), (4, D)),
    "index_add_weighted": (
        lambda x, s: torch.zeros_like(x).index_add(0, _idx(x.device), s * s), (N, D), (4, D)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_indexing(case, dtype):
    fn, *shapes = case
    assert_matches_pytorch(*on_activations(fn, *shapes), dtype)
