"""Backward workspace of single ops (OpCost.backward_workspace_bytes): the memory the op's
backward holds beyond the gradients it returns, measured in isolation with LiveTensorTracker
(peak over the backward above what was live before it, less the gradients returned)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from graphcost import analyze
from graphcost.graph.build import op_nodes
from validation.memtrack import LiveTensorTracker

torch.set_num_threads(1)
B, T, D = 2, 8, 16


def _measured_workspace(module: nn.Module, x: torch.Tensor) -> int:
    params = [p for p in module.parameters() if p.requires_grad]
    wrt = [t for t in [x, *params] if t.requires_grad]
    tracker = LiveTensorTracker(module, x)
    with tracker:  # the forward too, so that what it saves is counted from its creation
        y = module(x)
        grad_out = torch.ones_like(y)
        base = tracker.live_bytes
        with tracker.phase("backward"):
            grads = torch.autograd.grad(y, wrt, grad_out)
    peak = max(e.live_bytes for e in tracker.timeline if e.phase == "backward")
    return peak - base - sum(g.nbytes for g in grads)


def _predicted_workspace(module: nn.Module, x: torch.Tensor, op: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = analyze(module.to("meta"), (x.to("meta"),)).graph
    [node] = [n for n in op_nodes(g) if g.nodes[n]["op"] == op]
    return g.nodes[node]["cost"].backward_workspace_bytes


class Square(nn.Module):
    def forward(self, x):
        return x.pow(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_pow_backward_holds_two_input_sized_temporaries(dtype):
    x = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    measured = _measured_workspace(Square(), x)
    assert measured == 2 * B * T * D * dtype.itemsize
    assert _predicted_workspace(Square(), x, "aten.pow.Tensor_Scalar") == measured


def _rms_norm(dtype: torch.dtype, weight: str) -> nn.Module:
    norm = nn.RMSNorm(D, elementwise_affine=weight != "none", dtype=dtype)
    return norm.requires_grad_(weight == "trained")


WEIGHTS = ["trained", "frozen", "none"]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_training_peaks(dtype, x_grad, weight):
    """For a CPU target trace replaces rms_norm by the ops its composite runs (pow, mean,
    add_, rsqrt, mul, mul): every phase's peak of two training steps is the live tracker's,
    with a residual gradient waiting for x's and without."""
    from graphcost.passes.memory.timeline import training_timeline
    from validation.memtrack import measure_training_peak

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(D, D, dtype=dtype).requires_grad_(x_grad)
            self.norm = _rms_norm(dtype, weight)
            self.head = nn.Linear(D, 4, dtype=dtype)

        def forward(self, x):
            h = self.inner(x)
            return self.head(self.norm(h) + h)

    torch.manual_seed(0)
    with torch.device("meta"):
        predicted = training_timeline(analyze(Block(), (torch.empty(B, T, D, dtype=dtype),),
                                              device="cpu")).phase_peaks()
    torch.manual_seed(0)
    measured = measure_training_peak(Block(), (torch.randn(B, T, D, dtype=dtype),),
                                     record_timeline=False).step_phase_peaks
    assert {key: measured[key] for key in predicted} == predicted


class MinMax(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):  # x: (2, B, T, D), the two operands
        return self.fn(x[0], x[1])


@pytest.mark.parametrize("fn", [torch.maximum, torch.minimum], ids=["maximum", "minimum"])
@pytest.mark.parametrize("grads", [(True, True), (True, False)], ids=["both", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_maximum_backward_holds_half_the_gradient_and_two_masks(fn, grads, dtype):
    a, b = (torch.randn(B, T, D, dtype=dtype) * torch.ones(1, dtype=dtype, requires_grad=g)
            for g in grads)
    tracker = LiveTensorTracker(a, b)
    with tracker:
        y = fn(a, b)
        grad_out = torch.ones_like(y)
        base = tracker.live_bytes
        with tracker.phase("backward"):
            returned = torch.autograd.grad(y, [t for t in (a, b) if t.requires_grad], grad_out)
    peak = max(e.live_bytes for e in tracker.timeline if e.phase == "backward")
    measured = peak - base - sum(g.nbytes for g in returned)
    assert measured == B * T * D * (dtype.itemsize + 2)  # grad / 2 and two bool masks
    x = torch.randn(2, B, T, D, dtype=dtype, requires_grad=True)
    assert _predicted_workspace(MinMax(fn), x, f"aten.{fn.__name__}.default") == measured
