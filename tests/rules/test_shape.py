"""Views, copies and factories: no FLOPs and nothing saved of their own — but whether a result is
a view of its input or a new storage decides what a later op keeps. Each chain below ends in sin(),
which keeps its input: the bytes counted are those of the storage that input really lives in."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import Fn, analyze_meta, assert_matches_pytorch, on_activations, randn_inputs


def then_sin(fn):
    return lambda *xs: torch.sin(fn(*xs))


@pytest.mark.parametrize("fn, storages", [
    (lambda x: x.view(4, 3), 1), (lambda x: x.reshape(12), 1), (lambda x: x[1:], 1),
    (lambda x: x.t().contiguous(), 2), (lambda x: x.t().reshape(12), 2), (lambda x: x * 1, 2),
], ids=["view", "reshape_view", "slice", "transpose_contiguous", "reshape_copy", "mul"])
def test_a_view_shares_its_base_a_copy_is_new(fn, storages, dtype):
    # sin(x) keeps x; sin(fn(x)) keeps fn(x): the same storage for a view, a new one for a copy.
    a = analyze_meta(*on_activations(lambda x: (torch.sin(x), torch.sin(fn(x))), (3, 4)),
                     dtype=dtype)
    assert a.saved_activation_bytes == storages * 3 * 4 * dtype.itemsize


CHAINS = {
    "view": (lambda x: x.view(6, 4), (2, 3, 4)),
    "reshape_view": (lambda x: x.reshape(3, 8), (2, 3, 4)),
    "reshape_copy": (lambda x: x.transpose(0, 1).reshape(3, 8), (2, 3, 4)),
    "flatten": (lambda x: x.flatten(1), (2, 2, 3, 3)),
    "flatten_copy": (lambda x: x.transpose(1, 2).flatten(1), (2, 2, 3, 3)),
    "unflatten": (lambda x: x.unflatten(-1, (2, 2)), (2, 3, 4)),
    "permute": (lambda x: x.permute(2, 0, 1), (2, 3, 4)),
    "permute_contiguous": (lambda x: x.permute(2, 0, 1).contiguous(), (2, 3, 4)),
    "contiguous_noop": (lambda x: x.contiguous(), (2, 3, 4)),
    "expand": (lambda x: x[:, None].expand(2, 5, 3), (2, 3)),
    "expand_contiguous": (lambda x: x[:, None].expand(2, 5, 3).contiguous(), (2, 3)),
    "expand_reshape": (lambda x: x[:, :, None].expand(2, 3, 2, 4).reshape(2, 6, 4), (2, 3, 4)),
    "slice": (lambda x: x[1:, ::2], (3, 4)),
    "select": (lambda x: x[1], (3, 4)),
    "split": (lambda x: x.split(1, 0)[1], (2, 3)),
    "chunk_cat": (lambda x: torch.cat(x.chunk(3, 1)[::-1], 1), (2, 3)),
    "unbind": (lambda x: x.unbind(0)[1], (2, 3)),
    "unsafe_split": (lambda x: torch.unsafe_split(x, 2, 1)[1], (2, 4)),
    "unsafe_chunk": (lambda x: torch.unsafe_chunk(x, 2, 1)[0], (2, 4)),
    "unsafe_split_with_sizes": (lambda x: torch.unsafe_split_with_sizes(x, [1, 3], 1)[1], (2, 4)),
    "squeeze_unsqueeze": (lambda x: x.unsqueeze(0).squeeze(0).unsqueeze(-1), (2, 3)),
    "movedim": (lambda x: x.movedim(0, -1), (2, 3, 4)),
    "long_chain": (lambda x: x.view(2, 3, 4).transpose(1, 2).contiguous().reshape(2, 12)
                   .permute(1, 0)[2:7].split(2, 0)[1].expand(3, 2, 2).contiguous(), (24,)),
    "repeat": (lambda x: x.repeat(2, 1), (2, 3)),
    "pad": (lambda x: F.pad(x, (1, 1)), (2, 3)),
    "roll": (lambda x: x.roll(1, 0), (2, 3)),
    "flip": (lambda x: x.flip(0), (2, 3)),
    "clone": (lambda x: x.clone(), (2, 3)),
    "cast_and_back": (lambda x: x.float().to(x.dtype), (2, 3)),
}


@pytest.mark.parametrize("case", CHAINS.values(), ids=CHAINS.keys())
def test_shape_chain(case, dtype):
    fn, shape = case
    assert_matches_pytorch(*on_activations(then_sin(fn), shape), dtype)


JOINS = {
    "cat": lambda x, y: torch.cat([x, y], 0),
    "cat_last_dim": lambda x, y: torch.cat([x, y], -1),
    "stack": lambda x, y: torch.stack([x, y]),
    "broadcast_tensors": lambda x, y: torch.broadcast_tensors(x, y[:1])[1],
}


@pytest.mark.parametrize("fn", JOINS.values(), ids=JOINS.keys())
def test_joins(fn, dtype):
    assert_matches_pytorch(*on_activations(then_sin(fn), (2, 3), (2, 3)), dtype)


def test_cat_of_inputs_that_need_grad(dtype):
    assert_matches_pytorch(lambda: Fn(lambda x, y: torch.cat([x, y], 1)),
                           randn_inputs((2, 3), (2, 4)), dtype)


def test_factories_in_the_forward(dtype):
    def fn(x):
        mask = torch.ones(3, 3, dtype=torch.bool, device=x.device).tril()
        pos = torch.arange(3, device=x.device) + torch.tensor([0, 1, 2], device=x.device)
        return torch.sin(x.masked_fill(~mask, 0.0) + pos.to(x.dtype) + torch.zeros_like(x))

    assert_matches_pytorch(*on_activations(fn, (2, 3, 3)), dtype)
