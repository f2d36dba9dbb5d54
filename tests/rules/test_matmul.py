"""linear, matmul, mm, addmm, bmm, baddbmm: against hand formulas from named dimensions and against
FlopCounterMode + autograd's saved tensors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphcost import FLOPS_PER_FMA
from graphcost.rules.layout import dense_dim_order, view_strides
from tests.helpers import (
    Fn,
    analyze_meta,
    assert_matches_pytorch,
    frozen,
    on_activations,
    randn_inputs,
)

B, T, D_IN, D_HID, D_OUT = 2, 3, 8, 16, 4
M = B * T




# ---- hand formulas ---------------------------------------------------------------------------

def test_linear_flops_from_dimensions():
    a = analyze_meta(lambda: nn.Linear(D_IN, D_OUT), randn_inputs((B, T, D_IN)))
    forward = FLOPS_PER_FMA * M * D_IN * D_OUT
    assert a.forward_flops == forward
    assert a.backward_flops == 2 * forward  # input gradient and weight gradient
    assert a.saved_activation_bytes == 0  # x is a model input, w a parameter


def test_linear_whose_input_needs_no_grad_has_no_input_gradient_matmul():
    a = analyze_meta(lambda: nn.Linear(D_IN, D_OUT), randn_inputs((B, T, D_IN),
                                                                   requires_grad=False))
    assert a.backward_flops == FLOPS_PER_FMA * M * D_IN * D_OUT  # weight gradient only


def test_frozen_linear_has_only_the_input_gradient_and_keeps_no_input():
    make = frozen(lambda: nn.Sequential(nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_OUT)), "1.")
    a = analyze_meta(make, randn_inputs((M, D_IN), requires_grad=False))
    first, second = FLOPS_PER_FMA * M * D_IN * D_HID, FLOPS_PER_FMA * M * D_HID * D_OUT
    assert a.forward_flops == first + second
    assert a.backward_flops == first + second  # w1 gradient; h gradient through frozen w2
    assert a.saved_activation_bytes == 0  # the frozen layer keeps only its weight


def test_two_layer_mlp_saved_bytes_from_dimensions(dtype):
    a = analyze_meta(lambda: nn.Sequential(nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_OUT)),
                     randn_inputs((M, D_IN), requires_grad=False), dtype)
    first, second = FLOPS_PER_FMA * M * D_IN * D_HID, FLOPS_PER_FMA * M * D_HID * D_OUT
    assert (a.forward_flops, a.backward_flops) == (first + second, first + 2 * second)
    assert a.saved_activation_bytes == M * D_HID * dtype.itemsize  # h, for w2's gradient


def test_bmm_flops_from_dimensions():
    batch, m, k, n = 3, 4, 5, 6
    a = analyze_meta(lambda: Fn(torch.bmm), randn_inputs((batch, m, k), (batch, k, n)))
    assert a.forward_flops == FLOPS_PER_FMA * batch * m * k * n
    assert a.backward_flops == 2 * a.forward_flops


def test_broadcast_matmul_keeps_the_expanded_copy(dtype):
    # (B, 1, m, k) @ (H, k, n): a is expanded to (B, H, m, k) and reshaped -> a copy bmm keeps.
    heads, m, k, n = 3, 4, 5, 6
    make = on_activations(torch.matmul, (B, 1, m, k), (heads, k, n))
    a = analyze_meta(*make, dtype=dtype)
    assert a.forward_flops == FLOPS_PER_FMA * B * heads * m * k * n
    copy_of_a = B * heads * m * k * dtype.itemsize
    copy_of_b = B * heads * k * n * dtype.itemsize  # b's batch is broadcast over B too
    assert a.saved_activation_bytes == copy_of_a + copy_of_b
    assert_matches_pytorch(*make, dtype)


def test_non_contiguous_input_to_linear_is_copied_and_kept(dtype):
    # x.transpose(0, 1) cannot be folded into a matrix by a view: the copy is what mm keeps.
    make = on_activations(lambda x, w: F.linear(x.transpose(0, 1), w), (T, B, D_IN),
                          (D_OUT, D_IN))
    a = analyze_meta(*make, dtype=dtype)
    x_copy = M * D_IN * dtype.itemsize  # for w's gradient
    w_scaled = D_OUT * D_IN * dtype.itemsize  # an activation here, for x's gradient
    assert a.saved_activation_bytes == x_copy + w_scaled
    assert_matches_pytorch(*make, dtype)


# ---- against PyTorch -------------------------------------------------------------------------

MATMULS = {
    "2d@2d": ((3, 4), (4, 5)),
    "3d@2d": ((2, 3, 4), (4, 5)),
    "2d@3d": ((3, 4), (2, 4, 5)),
    "4d@4d": ((2, 2, 3, 4), (2, 2, 4, 5)),
    "broadcast_batch": ((2, 1, 3, 4), (3, 4, 5)),
    "batch_of_one_lhs": ((1, 3, 4), (2, 4, 5)),
    "batch_of_one_rhs": ((2, 3, 4), (1, 4, 5)),
    "1d@1d": ((4,), (4,)),
    "1d@2d": ((4,), (4, 5)),
    "2d@1d": ((3, 4), (4,)),
    "1d@3d": ((4,), (2, 4, 5)),
    "3d@1d": ((2, 3, 4), (4,)),
}


@pytest.mark.parametrize("shapes", MATMULS.values(), ids=MATMULS.keys())
def test_matmul_on_activations(shapes, dtype):
    assert_matches_pytorch(*on_activations(torch.matmul, *shapes), dtype)


@pytest.mark.parametrize("shapes", [MATMULS["3d@2d"], MATMULS["4d@4d"], MATMULS["1d@3d"]],
                         ids=["3d@2d", "4d@4d", "1d@3d"])
def test_matmul_on_inputs_that_need_grad(shapes, dtype):
    assert_matches_pytorch(lambda: Fn(torch.matmul), randn_inputs(*shapes), dtype)


TRANSPOSED = {
    "mT@2d": (lambda a, b: a.t() @ b, (4, 3), (4, 5)),
    "transposed_3d@2d": (lambda a, b: a.transpose(0, 1) @ b, (3, 2, 4), (4, 5)),
    "transposed_4d@4d": (lambda a, b: a.transpose(1, 2) @ b, (2, 3, 2, 4), (2, 2, 4, 5)),
    "2d@transposed_3d": (lambda a, b: a @ b.transpose(-1, -2), (3, 4), (2, 5, 4)),
}


@pytest.mark.parametrize("case", TRANSPOSED.values(), ids=TRANSPOSED.keys())
def test_matmul_on_non_contiguous_activations(case, dtype):
    fn, *shapes = case
    assert_matches_pytorch(*on_activations(fn, *shapes), dtype)


OTHERS = {
    "mm": (torch.mm, (3, 4), (4, 5)),
    "addmm": (torch.addmm, (5,), (3, 4), (4, 5)),
    "bmm": (torch.bmm, (2, 3, 4), (2, 4, 5)),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b, alpha=0.5, beta=2.0),
                (2, 3, 5), (2, 3, 4), (2, 4, 5)),
}


@pytest.mark.parametrize("case", OTHERS.values(), ids=OTHERS.keys())
def test_mm_family_on_activations(case, dtype):
    fn, *shapes = case
    assert_matches_pytorch(*on_activations(fn, *shapes), dtype)


LINEARS = {
    "2d": (lambda x, w, b: F.linear(x, w, b), (3, 4)),
    "1d": (lambda x, w, b: F.linear(x, w, b), (4,)),
    "2d_transposed": (lambda x, w, b: F.linear(x.t(), w, b), (4, 3)),
    "2d_transposed_no_bias": (lambda x, w, b: F.linear(x.t(), w), (4, 3)),
    "3d": (lambda x, w, b: F.linear(x, w, b), (2, 3, 4)),
    "4d": (lambda x, w, b: F.linear(x, w, b), (2, 2, 3, 4)),
    "3d_no_bias": (lambda x, w, b: F.linear(x, w), (2, 3, 4)),
    "transposed": (lambda x, w, b: F.linear(x.transpose(0, 1), w, b), (3, 2, 4)),
    "transposed_no_bias": (lambda x, w, b: F.linear(x.transpose(0, 1), w), (3, 2, 4)),
    "transposed_4d": (lambda x, w, b: F.linear(x.transpose(1, 2), w, b), (2, 3, 2, 4)),
    "last_dim_slice": (lambda x, w, b: F.linear(x[..., :4], w, b), (2, 3, 6)),
    "last_dim_slice_no_bias": (lambda x, w, b: F.linear(x[..., :4], w), (2, 3, 6)),
}


@pytest.mark.parametrize("case", LINEARS.values(), ids=LINEARS.keys())
def test_linear_on_activations(case, dtype):
    fn, x_shape = case
    assert_matches_pytorch(*on_activations(fn, x_shape, (5, 4), (5,)), dtype)


def mlp():
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.GELU(), nn.Linear(D_HID, D_IN),
                         nn.LayerNorm(D_IN), nn.Linear(D_IN, D_OUT))


FROZEN = {
    "none": (),
    "first_layer": ("0.",),
    "first_and_middle": ("0.", "2."),
    "norm": ("3.",),
    "last_layer": ("4.",),
    "all_biases": ("0.bias", "2.bias", "4.bias"),
    "weights": ("0.weight", "2.weight"),
    "all_but_last": ("0.", "2.", "3."),
}


@pytest.mark.parametrize("prefixes", FROZEN.values(), ids=FROZEN.keys())
def test_mlp_with_frozen_layers(prefixes, dtype):
    """Backward FLOPs drop exactly as FlopCounterMode counts, saved bytes as autograd keeps."""
    assert_matches_pytorch(frozen(mlp, *prefixes) if prefixes else mlp,
                           randn_inputs((B, T, D_IN), requires_grad=False), dtype)


def test_linear_with_input_that_needs_no_grad(dtype):
    assert_matches_pytorch(lambda: nn.Linear(D_IN, D_OUT),
                           randn_inputs((B, T, D_IN), requires_grad=False), dtype)


# ---- the layout arithmetic the rules rely on, against PyTorch's own --------------------------

BASE = torch.empty(2, 3, 4, device="meta")
STRIDED = {  # meta tensors with permuted, sliced and broadcast layouts
    "contiguous": BASE,
    "transposed": BASE.transpose(0, 1),
    "permuted": BASE.permute(2, 0, 1),
    "sliced": BASE[:, 1:],
    "stepped": BASE[..., ::2],
    "size_one_slice": BASE[:, :1],
    "transposed_sliced": BASE.transpose(1, 2)[:, :2],
    "expanded_front": BASE[None].expand(3, 2, 3, 4),
    "expanded_middle": BASE[:, None].expand(2, 5, 3, 4),
    "size_one_dims_swapped": torch.empty(1, 3, 1, 4, device="meta").transpose(0, 2),
}


@pytest.mark.parametrize("x", STRIDED.values(), ids=STRIDED.keys())
def test_view_strides_agree_with_tensor_view(x):
    n = x.numel()
    shapes = {(n,), (1, n, 1), tuple(x.shape), (x.shape[0] * x.shape[1], *x.shape[2:]),
              (*x.shape[:-2], x.shape[-2] * x.shape[-1])}
    for shape in shapes:
        try:
            want = tuple(x.view(shape).stride())
        except RuntimeError:
            want = None
        got = view_strides(x.shape, x.stride(), shape)
        assert (got is None) == (want is None), (shape, got, want)
        if want is not None:  # strides of size-1 dims are arbitrary
            assert [s for s, d in zip(got, shape) if d > 1] == [
                s for s, d in zip(want, shape) if d > 1]


@pytest.mark.parametrize("x", STRIDED.values(), ids=STRIDED.keys())
def test_dense_dim_order_agrees_with_empty_like(x):
    like = torch.empty_like(x)
    order = dense_dim_order(x.shape, x.stride())
    # empty_like's strides decrease along `order` (dims of size 1 may sit anywhere).
    strides = [like.stride(d) for d in order if x.shape[d] > 1]
    assert strides == sorted(strides, reverse=True)
