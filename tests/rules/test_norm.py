"""layer_norm, batch_norm, group_norm, rms_norm (nn.RMSNorm and the hand-written Meta style): no
FLOPs; the input and the statistics the kernel keeps (CPU: in the input's dtype)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import (
    Fn,
    analyze_meta,
    assert_matches_pytorch,
    frozen,
    on_activations,
    randn_inputs,
)

B, T, C = 2, 3, 8


class MetaRMSNorm(nn.Module):
    """Llama's reference RMSNorm: normalise in fp32, cast back, scale."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


# ---- hand values -----------------------------------------------------------------------------

def test_layer_norm_keeps_input_mean_and_rstd_in_the_input_dtype(dtype):
    a = analyze_meta(*on_activations(lambda x: F.layer_norm(x, (C,)), (B, T, C)), dtype=dtype)
    assert (a.forward_flops, a.backward_flops) == (0, 0)
    assert a.saved_activation_bytes == (B * T * C + 2 * B * T) * dtype.itemsize


def test_batch_norm_keeps_input_and_per_channel_statistics(dtype):
    channels, hw = 3, 4 * 4

    def conv_bn():
        return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    a = analyze_meta(conv_bn, randn_inputs((B, channels, 4, 4), requires_grad=False), dtype)
    assert a.saved_activation_bytes == (B * channels * hw + 2 * channels) * dtype.itemsize


# ---- against PyTorch -------------------------------------------------------------------------

LAYER_NORMS = {
    "affine": lambda: nn.LayerNorm(C),
    "no_affine": lambda: nn.LayerNorm(C, elementwise_affine=False),
    "no_bias": lambda: nn.LayerNorm(C, bias=False),
    "frozen_weight": frozen(lambda: nn.LayerNorm(C), "weight"),
    "frozen": frozen(lambda: nn.LayerNorm(C), ""),
    "two_normalized_dims": lambda: nn.LayerNorm((T, C)),
}


@pytest.mark.parametrize("make", LAYER_NORMS.values(), ids=LAYER_NORMS.keys())
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "input_no_grad"])
def test_layer_norm(make, input_grad, dtype):
    assert_matches_pytorch(make, randn_inputs((B, T, C), requires_grad=input_grad), dtype)


def test_layer_norm_on_activation(dtype):
    assert_matches_pytorch(*on_activations(lambda x: F.layer_norm(x, (C,)), (B, T, C)), dtype)


BATCH_NORMS = {
    "train": (lambda: nn.BatchNorm2d(3), (B, 3, 4, 4)),
    "eval": (lambda: nn.BatchNorm2d(3).eval(), (B, 3, 4, 4)),
    "no_affine": (lambda: nn.BatchNorm2d(3, affine=False), (B, 3, 4, 4)),
    "no_running_stats": (lambda: nn.BatchNorm2d(3, track_running_stats=False), (B, 3, 4, 4)),
    "frozen": (frozen(lambda: nn.BatchNorm2d(3), ""), (B, 3, 4, 4)),
    "1d": (lambda: nn.BatchNorm1d(3), (4, 3)),
    "1d_sequence": (lambda: nn.BatchNorm1d(3), (4, 3, 5)),
}


@pytest.mark.parametrize("case", BATCH_NORMS.values(), ids=BATCH_NORMS.keys())
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "input_no_grad"])
def test_batch_norm(case, input_grad, dtype):
    make, shape = case
    assert_matches_pytorch(make, randn_inputs(shape, requires_grad=input_grad), dtype)


@pytest.mark.parametrize("make", [lambda: nn.GroupNorm(2, 4),
                                  lambda: nn.GroupNorm(4, 4, affine=False)],
                         ids=["affine", "no_affine"])
def test_group_norm(make, dtype):
    assert_matches_pytorch(make, randn_inputs((B, 4, 3, 3)), dtype)


# group_norm runs on input.contiguous(input.suggest_memory_format()): a transposed input is
# copied (the copy is kept, beside h, which sin keeps), a channels-last one is kept itself.
GROUP_NORM_LAYOUTS = {
    "transposed_3d": (lambda h: h.transpose(1, 2), (B, 5, 4)),
    "channels_last": (lambda h: h.permute(0, 3, 1, 2), (B, 3, 5, 4)),
    "transposed_4d": (lambda h: h.transpose(2, 3), (B, 4, 3, 5)),
}


@pytest.mark.parametrize("case", GROUP_NORM_LAYOUTS.values(), ids=GROUP_NORM_LAYOUTS.keys())
def test_group_norm_on_a_strided_activation(case, dtype):
    layout, shape = case
    fn = lambda h: (F.group_norm(layout(h), 2), h.sin())  # noqa: E731
    assert_matches_pytorch(*on_activations(fn, shape), dtype)


INSTANCE_NORMS = {
    "plain": (lambda: nn.InstanceNorm2d(3), (B, 3, 4, 4)),
    "affine": (lambda: nn.InstanceNorm2d(3, affine=True), (B, 3, 4, 4)),
    "running_stats": (lambda: nn.InstanceNorm2d(3, track_running_stats=True), (B, 3, 4, 4)),
    "running_stats_eval": (lambda: nn.InstanceNorm2d(3, affine=True,
                                                     track_running_stats=True).eval(),
                           (B, 3, 4, 4)),
    "frozen_affine_1d": (frozen(lambda: nn.InstanceNorm1d(3, affine=True), ""), (B, 3, 5)),
    "non_contiguous": (lambda: Fn(lambda x: F.instance_norm(x.transpose(2, 3))), (B, 3, 4, 5)),
}


@pytest.mark.parametrize("case", INSTANCE_NORMS.values(), ids=INSTANCE_NORMS.keys())
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "input_no_grad"])
def test_instance_norm(case, input_grad, dtype):
    make, shape = case
    assert_matches_pytorch(make, randn_inputs(shape, requires_grad=input_grad), dtype)


RMS_NORMS = {
    "nn": lambda: nn.RMSNorm(C),
    "nn_eps": lambda: nn.RMSNorm(C, eps=1e-5),
    "nn_no_weight": lambda: nn.RMSNorm(C, elementwise_affine=False),
    "nn_frozen": frozen(lambda: nn.RMSNorm(C), ""),
    "meta_style": lambda: MetaRMSNorm(C),
    "meta_style_frozen": frozen(lambda: MetaRMSNorm(C), ""),
    "functional_no_weight": lambda: Fn(lambda x: F.rms_norm(x, (C,))),
}


@pytest.mark.parametrize("make", RMS_NORMS.values(), ids=RMS_NORMS.keys())
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "input_no_grad"])
def test_rms_norm(make, input_grad, dtype):
    assert_matches_pytorch(make, randn_inputs((B, T, C), requires_grad=input_grad), dtype)


@pytest.mark.parametrize("make", [lambda: nn.RMSNorm(C), lambda: MetaRMSNorm(C)],
                         ids=["nn", "meta_style"])
def test_rms_norm_between_linears(make, dtype):
    assert_matches_pytorch(lambda: nn.Sequential(nn.Linear(C, C), make(), nn.Linear(C, C)),
                           randn_inputs((B, T, C), requires_grad=False), dtype)
