"""embedding: no FLOPs; the backward keeps the indices (only if the table needs a gradient)."""

import pytest
import torch
from torch import nn

from tests.helpers import analyze_meta, assert_matches_pytorch, frozen

VOCAB, DIM, B, T = 10, 4, 2, 3


def token_ids(device, dtype):
    return torch.randint(0, VOCAB, (B, T), device=device)


class EmbedThenLinear(nn.Module):
    def __init__(self, shift_ids=False, **kwargs):
        super().__init__()
        self.emb, self.proj = nn.Embedding(VOCAB, DIM, **kwargs), nn.Linear(DIM, DIM)
        self.shift_ids = shift_ids

    def forward(self, ids):
        if self.shift_ids:
            ids = (ids + 1) % VOCAB  # computed ids: an activation the lookup keeps
        return self.proj(self.emb(ids))


def test_embedding_keeps_the_computed_indices_only_when_the_table_learns(dtype):
    ids_bytes = B * T * 8  # int64
    embedded = B * T * DIM * dtype.itemsize  # kept by the linear for its weight's gradient
    a = analyze_meta(lambda: EmbedThenLinear(shift_ids=True), token_ids, dtype)
    assert (a.forward_flops, a.saved_activation_bytes) == (2 * B * T * DIM * DIM,
                                                          ids_bytes + embedded)
    a = analyze_meta(frozen(lambda: EmbedThenLinear(shift_ids=True), "emb"), token_ids, dtype)
    assert a.saved_activation_bytes == embedded


MODELS = {
    "embedding": lambda: nn.Embedding(VOCAB, DIM),
    "frozen": frozen(lambda: nn.Embedding(VOCAB, DIM), ""),
    "padding_idx": lambda: nn.Embedding(VOCAB, DIM, padding_idx=0),
    "then_linear": EmbedThenLinear,
    "then_linear_frozen_table": frozen(EmbedThenLinear, "emb"),
    "computed_ids": lambda: EmbedThenLinear(shift_ids=True),
    "computed_ids_frozen_table": frozen(lambda: EmbedThenLinear(shift_ids=True), "emb"),
}


@pytest.mark.parametrize("make", MODELS.values(), ids=MODELS.keys())
def test_embedding(make, dtype):
    assert_matches_pytorch(make, token_ids, dtype)
