"""Elementwise minimum/maximum (and min/max of two tensors): both operands are kept."""

import pytest
import torch

from tests.helpers import assert_matches_pytorch, on_activations

CASES = {
    "minimum": torch.minimum, "maximum": torch.maximum,
    "min_other": lambda a, b: torch.min(a, b), "max_other": lambda a, b: torch.max(a, b),
}


@pytest.mark.parametrize("fn", CASES.values(), ids=CASES.keys())
def test_min_max(fn, dtype):
    assert_matches_pytorch(*on_activations(fn, (4, 5), (4, 5)), dtype)
