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


# ---- EmbeddingBag --------------------------------------------------------------------------------

class Bag(nn.Module):
    """nn.EmbeddingBag, optionally on computed indices/offsets (activations) or with per-sample
    weights computed from a parameter."""

    def __init__(self, computed=False, weighted=False, **kwargs):
        super().__init__()
        self.bag, self.computed, self.weighted = nn.EmbeddingBag(VOCAB, DIM, **kwargs), computed, weighted
        self.scale = nn.Parameter(torch.ones(BAG_INDICES))

    def forward(self, ids, offsets=None, weights=None):
        if self.computed:
            ids = (ids + 1) % VOCAB
            offsets = None if offsets is None else offsets * 1
        if self.weighted:
            return self.bag(ids, offsets, per_sample_weights=weights * self.scale)
        return self.bag(ids, offsets)


BAG_INDICES = 7


def bags_2d(device, dtype):
    return (torch.randint(0, VOCAB, (3, 4), device=device),)


def bags(offsets=(0, 2, 5), index_dtype=torch.int64, weighted=False, strided=False):
    def make(device, dtype):
        ids = torch.randint(0, VOCAB, (2 * BAG_INDICES if strided else BAG_INDICES,),
                            device=device, dtype=index_dtype)
        ids = ids[::2] if strided else ids
        inputs = (ids, torch.tensor(offsets, device=device, dtype=index_dtype))
        return inputs + ((torch.randn(BAG_INDICES, device=device, dtype=dtype),) if weighted
                         else ())
    return make


def test_embedding_bag_keeps_the_kernel_s_index_tensors(dtype):
    """mean over 3 bags of 7 indices: offsets are an input; the kernel's offset2bag (one more
    than the indices), bag_size and max_indices (one per bag) are kept, all int64."""
    a = analyze_meta(lambda: Bag(mode="mean"), bags(), dtype)
    assert (a.forward_flops, a.backward_flops) == (0, 0)
    assert a.saved_activation_bytes == 8 * ((BAG_INDICES + 1) + 3 + 3)
    a = analyze_meta(lambda: Bag(mode="sum"), bags(), dtype)  # the fast sum path: no offset2bag
    assert a.saved_activation_bytes == 8 * (3 + 3)


BAG_CASES = {
    "2d": (lambda mode: Bag(mode=mode), bags_2d),
    "offsets": (lambda mode: Bag(mode=mode), bags()),
    "int32": (lambda mode: Bag(mode=mode), bags(index_dtype=torch.int32)),
    "include_last_offset": (lambda mode: Bag(mode=mode, include_last_offset=True),
                            bags(offsets=(0, 2, 5, 7))),
    "padding_idx": (lambda mode: Bag(mode=mode, padding_idx=0), bags()),
    "computed_indices": (lambda mode: Bag(mode=mode, computed=True), bags()),
    "strided_indices": (lambda mode: Bag(mode=mode), bags(strided=True)),
    "frozen": (lambda mode: frozen(lambda: Bag(mode=mode), "bag")(), bags()),
}
BAGS = [(case, mode) for case in BAG_CASES for mode in ("sum", "mean", "max")]


@pytest.mark.parametrize("case, mode", BAGS, ids=[f"{c}-{m}" for c, m in BAGS])
def test_embedding_bag(case, mode, dtype):
    make, inputs = BAG_CASES[case]
    assert_matches_pytorch(lambda: make(mode), inputs, dtype)


def test_embedding_bag_in_float64_takes_the_slow_sum_path():
    assert_matches_pytorch(lambda: Bag(mode="sum"), bags(), torch.float64)


WEIGHTED = {
    "weighted": lambda: Bag(weighted=True, mode="sum"),
    "weighted_frozen_table": frozen(lambda: Bag(weighted=True, mode="sum"), "bag"),
    "weighted_fixed_weights": frozen(lambda: Bag(weighted=True, mode="sum"), "scale"),
    "weighted_padding_idx": lambda: Bag(weighted=True, mode="sum", padding_idx=1),
}


@pytest.mark.parametrize("make", WEIGHTED.values(), ids=WEIGHTED.keys())
def test_embedding_bag_with_per_sample_weights(make, dtype):
    """The per-sample weights are kept, and the table when the weights need a gradient; a frozen
    table still runs the differentiable kernel (export's own decomposition would not)."""
    assert_matches_pytorch(make, bags(weighted=True), dtype)
