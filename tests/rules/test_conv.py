"""Convolutions (FlopCounterMode's conv formulas, forward and per required gradient) and pooling."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphcost import FLOPS_PER_FMA
from tests.helpers import (
    Fn,
    analyze_meta,
    assert_matches_pytorch,
    frozen,
    on_activations,
    randn_inputs,
)

N, C_IN, C_OUT, HW, K = 2, 3, 4, 6, 3


def test_conv2d_flops_from_dimensions():
    out_hw = HW - K + 1
    fma = N * C_OUT * out_hw * out_hw * C_IN * K * K
    a = analyze_meta(lambda: nn.Conv2d(C_IN, C_OUT, K), randn_inputs((N, C_IN, HW, HW)))
    assert a.forward_flops == FLOPS_PER_FMA * fma
    assert a.backward_flops == 2 * FLOPS_PER_FMA * fma  # input and weight gradients
    first = analyze_meta(lambda: nn.Conv2d(C_IN, C_OUT, K),
                         randn_inputs((N, C_IN, HW, HW), requires_grad=False))
    assert first.backward_flops == FLOPS_PER_FMA * fma  # a first layer: weight gradient only


def test_grouped_conv_flops_from_dimensions():
    groups, out_hw = 2, HW  # padding=1 keeps the size
    fma = N * C_OUT * out_hw * out_hw * (C_OUT // groups) * K * K
    a = analyze_meta(lambda: nn.Conv2d(C_OUT, C_OUT, K, padding=1, groups=groups),
                     randn_inputs((N, C_OUT, HW, HW)))
    assert a.forward_flops == FLOPS_PER_FMA * fma


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(C_IN, C_OUT, K),
                                  frozen(lambda: nn.Conv2d(C_IN, C_OUT, K), "")],
                         ids=["trainable", "frozen"])
def test_conv_keeps_its_input_even_when_frozen(make, dtype):
    # convolution_backward takes the input for either gradient; x * 2 keeps nothing itself.
    a = analyze_meta(lambda: nn.Sequential(Fn(lambda x: x * 2), make()),
                     randn_inputs((N, C_IN, HW, HW)), dtype)
    assert a.saved_activation_bytes == N * C_IN * HW * HW * dtype.itemsize


CONVS = {
    "plain": lambda: nn.Conv2d(C_IN, C_OUT, K),
    "stride_padding": lambda: nn.Conv2d(C_IN, C_OUT, K, stride=2, padding=1),
    "no_bias": lambda: nn.Conv2d(C_IN, C_OUT, K, bias=False),
    "groups": lambda: nn.Conv2d(C_IN * 2, C_OUT, K, groups=2),
    "depthwise": lambda: nn.Conv2d(C_IN, C_IN, K, groups=C_IN, padding=1),
    "dilation": lambda: nn.Conv2d(C_IN, C_OUT, K, dilation=2),
    "padding_same": lambda: nn.Conv2d(C_IN, C_OUT, K, padding="same"),
    "frozen_weight": frozen(lambda: nn.Conv2d(C_IN, C_OUT, K), "weight"),
    "frozen_bias": frozen(lambda: nn.Conv2d(C_IN, C_OUT, K), "bias"),
    "transposed": lambda: nn.ConvTranspose2d(C_IN, C_OUT, K, stride=2),
    "transposed_groups": lambda: nn.ConvTranspose2d(C_IN * 2, C_OUT, K, stride=2, padding=1,
                                                    output_padding=1, groups=2, bias=False),
}


def conv_input_channels(make):
    with torch.device("meta"):
        return make().in_channels


@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "first_layer"])
def test_conv2d(make, input_grad, dtype):
    shape = (N, conv_input_channels(make), HW, HW)
    assert_matches_pytorch(make, randn_inputs(shape, requires_grad=input_grad), dtype)


OTHER_RANKS = {  # fn(x, weight, bias), and the three shapes
    "conv1d": (F.conv1d, (N, C_IN, HW), (C_OUT, C_IN, K), (C_OUT,)),
    "conv3d": (F.conv3d, (1, C_IN, 4, 4, 4), (C_OUT, C_IN, 2, 2, 2), (C_OUT,)),
    "conv_transpose1d": (F.conv_transpose1d, (N, C_OUT, HW), (C_OUT, C_IN, K), (C_IN,)),
    "conv2d_stride": (lambda x, w, b: F.conv2d(x, w, b, stride=2), (N, C_IN, HW, HW),
                      (C_OUT, C_IN, K, K), (C_OUT,)),
}


@pytest.mark.parametrize("case", OTHER_RANKS.values(), ids=OTHER_RANKS.keys())
def test_conv_on_activations(case, dtype):
    fn, *shapes = case
    assert_matches_pytorch(*on_activations(fn, *shapes), dtype)


POOLS = {
    "max_pool": lambda x: F.max_pool2d(x, 2),
    "max_pool_stride_padding": lambda x: F.max_pool2d(x, 3, 2, 1),
    "max_pool_ceil": lambda x: F.max_pool2d(x, 2, ceil_mode=True),
    "max_pool1d": lambda x: F.max_pool1d(x.flatten(2), 2),
    "avg_pool": lambda x: F.avg_pool2d(x, 2),
    "adaptive_avg_1x1": lambda x: F.adaptive_avg_pool2d(x, 1),
    "adaptive_avg_2x2": lambda x: F.adaptive_avg_pool2d(x, 2),
    "adaptive_avg_3x3": lambda x: F.adaptive_avg_pool2d(x, 3),
    "adaptive_avg_same_size": lambda x: F.adaptive_avg_pool2d(x, 5),
    "adaptive_max": lambda x: F.adaptive_max_pool2d(x, 2),
    "adaptive_max1d": lambda x: F.adaptive_max_pool1d(x.flatten(2), 2),
    "adaptive_max3d": lambda x: F.adaptive_max_pool3d(x[:, None], 2),
    "max_pool_with_indices": lambda x: F.max_pool2d(x, 2, return_indices=True)[0],
    "max_pool1d_with_indices": lambda x: F.max_pool1d(x.flatten(2), 2, return_indices=True)[0],
    "max_pool3d_with_indices": lambda x: F.max_pool3d(x[:, None], 2, return_indices=True)[0],
    "avg_pool_no_pad_count": lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    "adaptive_avg_1x2": lambda x: F.adaptive_avg_pool2d(x, (1, 2)),
}


@pytest.mark.parametrize("fn", POOLS.values(), ids=POOLS.keys())
def test_pooling_on_activations(fn, dtype):
    assert_matches_pytorch(*on_activations(fn, (N, C_IN, 5, 5)), dtype)


@pytest.mark.parametrize("module", [lambda: nn.MaxPool2d(2), lambda: nn.AdaptiveAvgPool2d(1),
                                    lambda: nn.AdaptiveAvgPool2d(2)],
                         ids=["max_pool", "adaptive_avg_1x1", "adaptive_avg_2x2"])
def test_pooling_on_inputs(module, dtype):
    assert_matches_pytorch(module, randn_inputs((N, C_IN, 4, 4)), dtype)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3))


CNN_FROZEN = {
    "none": (), "stem": ("0.", "1."), "second_conv": ("4.",), "batch_norm": ("1.",),
    "all_but_head": ("0.", "1.", "4."), "head": ("8.",),
}


@pytest.mark.parametrize("prefixes", CNN_FROZEN.values(), ids=CNN_FROZEN.keys())
def test_small_cnn_with_frozen_layers(prefixes, dtype):
    assert_matches_pytorch(frozen(small_cnn, *prefixes),
                           randn_inputs((2, 3, 8, 8), requires_grad=False), dtype)


# -- grouped convolutions: the true count, not FlopCounterMode's -------------------------------

class PerGroup(nn.Module):
    """A grouped convolution written as `groups` ungrouped ones on channel slices: the same
    products, each counted right by FlopCounterMode (it overcounts only grouped ones)."""

    def __init__(self, grouped: nn.Conv2d) -> None:
        super().__init__()
        g = grouped.groups
        self.groups = g
        self.convs = nn.ModuleList(
            nn.Conv2d(grouped.in_channels // g, grouped.out_channels // g, grouped.kernel_size,
                      grouped.stride, grouped.padding, grouped.dilation, bias=False)
            for _ in range(g))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.convs, x.chunk(self.groups, 1))],
                         1)


GROUPED = {
    "groups2": lambda: nn.Conv2d(4, 6, K, padding=1, groups=2, bias=False),
    "depthwise": lambda: nn.Conv2d(8, 8, K, padding=1, groups=8, bias=False),
    "depthwise_multiplier": lambda: nn.Conv2d(4, 8, K, stride=2, groups=4, bias=False),
}


@pytest.mark.parametrize("make", GROUPED.values(), ids=GROUPED.keys())
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "first_layer"])
def test_grouped_conv_flops_equal_the_same_conv_done_per_group(make, input_grad):
    from validation.groundtruth import measure_flops

    with torch.device("meta"):
        conv = make()
        x = torch.randn(N, conv.in_channels, 8, 8, requires_grad=input_grad)
    a = analyze_meta(make, randn_inputs(tuple(x.shape), requires_grad=input_grad))
    with torch.device("meta"):
        per_group = PerGroup(conv)
    assert (a.forward_flops, a.backward_flops) == measure_flops(per_group, (x,))


def test_flop_counter_overcounts_a_depthwise_weight_gradient():
    """Why graphcost differs from FlopCounterMode here (docs/rules.md): its weight-gradient
    formula ignores `groups`. A depthwise 3x3 conv over C channels makes N*C*H*W*9 products,
    forward and for the weight gradient alike; FlopCounterMode counts the latter C times."""
    from torch.utils.flop_counter import FlopCounterMode

    c, hw = 8, 8
    with torch.device("meta"):
        conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        x = torch.randn(N, c, hw, hw)  # a first layer: the weight gradient only
    products = N * c * hw * hw * 9
    counter = FlopCounterMode(display=False)
    with counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == FLOPS_PER_FMA * products * (1 + c)
    a = analyze_meta(lambda: nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                     randn_inputs((N, c, hw, hw), requires_grad=False))
    assert (a.forward_flops, a.backward_flops) == (FLOPS_PER_FMA * products,) * 2
