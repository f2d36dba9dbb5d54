"""Losses: cross_entropy (class indices or probabilities, weights, label smoothing, reductions,
N-d logits), nll_loss, regression losses, binary cross-entropy."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import Fn, analyze_meta, assert_matches_pytorch, on_activations

N, C = 4, 5


class Scored(nn.Module):
    """loss(logits * scale, target, ...): the logits are an activation, as after a model's head."""

    def __init__(self, loss, logits_shape):
        super().__init__()
        self.loss = loss
        self.scale = nn.Parameter(torch.randn(logits_shape))

    def forward(self, logits, target, *rest):
        return self.loss(logits * self.scale, target, *rest)


def loss_inputs(extra=(), probs=False, weight=False):
    def make(device, dtype):
        logits = torch.randn(N, C, *extra, device=device, dtype=dtype)
        if probs:
            target = torch.randn(N, C, *extra, device=device, dtype=dtype).softmax(1)
        else:
            target = torch.randint(0, C, (N, *extra), device=device)
        return (logits, target) + ((torch.rand(C, device=device, dtype=dtype),) if weight else ())
    return make


def test_cross_entropy_keeps_log_probabilities_and_total_weight(dtype):
    a = analyze_meta(lambda: Scored(F.cross_entropy, (N, C)), loss_inputs(), dtype)
    assert (a.forward_flops, a.backward_flops) == (0, 0)
    log_probs, total_weight = N * C * dtype.itemsize, dtype.itemsize
    assert a.saved_activation_bytes == log_probs + total_weight  # the targets are an input


def test_label_smoothing_keeps_the_ignore_mask_and_the_count(dtype):
    a = analyze_meta(lambda: Scored(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),
                                    (N, C)), loss_inputs(), dtype)
    ignore_mask, count = N * 1, 8  # bool per target; an int64 count of targets not ignored
    assert a.saved_activation_bytes == N * C * dtype.itemsize + dtype.itemsize + ignore_mask + count


CROSS_ENTROPY = list(itertools.product(
    ["mean", "sum", "none"], [0.0, 0.1], [False, True], [False, True], [(), (3,), (2, 3)]))


@pytest.mark.parametrize("reduction, smoothing, weight, probs, extra", CROSS_ENTROPY,
                         ids=[f"{r}-ls{s}-{'w' if w else 'nw'}-{'probs' if p else 'ids'}-"
                              f"{2 + len(e)}d" for r, s, w, p, e in CROSS_ENTROPY])
def test_cross_entropy(reduction, smoothing, weight, probs, extra, dtype):
    def loss(x, y, *w):
        return F.cross_entropy(x, y, *w, reduction=reduction, label_smoothing=smoothing)

    assert_matches_pytorch(lambda: Scored(loss, (N, C, *extra)),
                           loss_inputs(extra, probs, weight), dtype)


@pytest.mark.parametrize("kwargs", [dict(ignore_index=1),
                                    dict(ignore_index=1, label_smoothing=0.1)],
                         ids=["ignore_index", "ignore_index_smoothing"])
def test_cross_entropy_ignore_index(kwargs, dtype):
    assert_matches_pytorch(lambda: Scored(lambda x, y: F.cross_entropy(x, y, **kwargs), (N, C)),
                           loss_inputs(), dtype)


def test_cross_entropy_on_logits_that_are_an_input(dtype):
    def inputs(device, dtype):
        return (torch.randn(N, C, device=device, dtype=dtype, requires_grad=True),
                torch.randint(0, C, (N,), device=device))

    assert_matches_pytorch(lambda: Fn(F.cross_entropy), inputs, dtype)


def test_cross_entropy_of_one_sample(dtype):
    def inputs(device, dtype):
        return torch.randn(C, device=device, dtype=dtype), torch.tensor(2, device=device)

    assert_matches_pytorch(lambda: Scored(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),
                                          (C,)), inputs, dtype)


NLL = {
    "2d": (lambda x, y: F.nll_loss(F.log_softmax(x, -1), y), (), False),
    "3d_weighted": (lambda x, y, w: F.nll_loss(F.log_softmax(x, 1), y, weight=w), (3,), True),
    "4d_sum": (lambda x, y: F.nll_loss(F.log_softmax(x, 1), y, reduction="sum"), (2, 3), False),
}


@pytest.mark.parametrize("case", NLL.values(), ids=NLL.keys())
def test_nll_loss(case, dtype):
    loss, extra, weight = case
    assert_matches_pytorch(lambda: Scored(loss, (N, C, *extra)),
                           loss_inputs(extra, weight=weight), dtype)


REGRESSION = {
    "mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "huber": F.huber_loss,
    "l1_transposed": lambda x, y: F.l1_loss(x.t().t(), y, reduction="sum"),
    "mse_broadcast_target": lambda x, y: F.mse_loss(x, y[:1].expand(N, C)),
    "binary_cross_entropy": lambda x, y: F.binary_cross_entropy(x.sigmoid(), y.sigmoid()),
    "bce_with_logits": lambda x, y: F.binary_cross_entropy_with_logits(x, y.sigmoid()),
}


@pytest.mark.parametrize("loss", REGRESSION.values(), ids=REGRESSION.keys())
def test_regression_and_binary_losses(loss, dtype):
    assert_matches_pytorch(*on_activations(loss, (N, C), (N, C)), dtype)


def test_bce_with_logits_weights(dtype):
    def loss(x, y, w, pos_weight):
        return F.binary_cross_entropy_with_logits(x, y.sigmoid(), weight=w.detach(),
                                                  pos_weight=pos_weight.detach())

    assert_matches_pytorch(*on_activations(loss, (N, C), (N, C), (N, C), (C,)), dtype)


# ---- CTC ---------------------------------------------------------------------------------------

CTC_T, CTC_S = 6, 3


class Ctc(nn.Module):
    def __init__(self, lengths_as="tensor", **kwargs):
        super().__init__()
        self.proj, self.lengths_as, self.kwargs = nn.Linear(C, C), lengths_as, kwargs

    def forward(self, x, targets, input_lengths, target_lengths):
        if self.lengths_as == "list":
            input_lengths, target_lengths = [CTC_T] * N, [CTC_S] * (N - 1) + [CTC_S - 1]
        return F.ctc_loss(self.proj(x).log_softmax(-1), targets, input_lengths, target_lengths,
                          **self.kwargs)


def ctc_inputs(concatenated=False, target_dtype=torch.int64):
    def make(device, dtype):
        lengths = [CTC_S] * (N - 1) + [CTC_S - 1]
        shape = (sum(lengths),) if concatenated else (N, CTC_S)
        return (torch.randn(CTC_T, N, C, device=device, dtype=dtype),
                torch.randint(1, C, shape, device=device, dtype=target_dtype),
                torch.full((N,), CTC_T, device=device), torch.tensor(lengths, device=device))
    return make


CTC_CASES = {
    "mean": (dict(), ctc_inputs()),
    "sum": (dict(reduction="sum"), ctc_inputs()),
    "none": (dict(reduction="none"), ctc_inputs()),
    "zero_infinity": (dict(zero_infinity=True), ctc_inputs()),
    "int32_targets": (dict(), ctc_inputs(target_dtype=torch.int32)),
    "int_lists": (dict(lengths_as="list", reduction="sum"), ctc_inputs()),
    "int_lists_mean": (dict(lengths_as="list"), ctc_inputs()),
    "concatenated_int_lists": (dict(lengths_as="list", reduction="none"),
                               ctc_inputs(concatenated=True)),
}


@pytest.mark.parametrize("case", CTC_CASES.values(), ids=CTC_CASES.keys())
def test_ctc_loss(case):
    """F.ctc_loss traces as one op (graphcost/trace/fake_kernels.py) and its rule is checked
    against FlopCounterMode and autograd on a CPU run (there is no meta kernel for its
    backward); float32 (the CPU kernel has no bf16)."""
    from graphcost import analyze
    from validation.groundtruth import measure_flops, measure_saved_bytes

    kwargs, make_inputs = case
    torch.manual_seed(0)
    with torch.device("meta"):
        module = Ctc(**kwargs)
    a = analyze(module, make_inputs(torch.device("meta"), torch.float32), device="cpu")
    torch.manual_seed(0)
    module, inputs = Ctc(**kwargs), make_inputs(torch.device("cpu"), torch.float32)
    assert not a.unsupported_ops
    assert (a.forward_flops, a.backward_flops) == measure_flops(module, inputs)
    assert a.saved_activation_bytes == measure_saved_bytes(module, inputs)
