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
def test_rms_norm_backward_workspace(dtype, x_grad, weight):
    if not x_grad and weight != "trained":
        pytest.skip("nothing to differentiate")
    x = torch.randn(B, T, D, dtype=dtype, requires_grad=x_grad)
    measured = _measured_workspace(_rms_norm(dtype, weight), x)
    predicted = _predicted_workspace(_rms_norm(dtype, weight), x, "aten.rms_norm.default")
    # The formula frees the incoming gradient after the first node of the composite, as in a
    # model; here the test holds it, through the peak unless that is the first node's (fp32
    # with x frozen: the weight's gradient beside the incoming one).
    held = x.nbytes if x_grad or dtype != torch.float32 else 0
    assert predicted + held == measured


def _measured_forward_workspace(module: nn.Module, x: torch.Tensor) -> int:
    """The peak inside the forward above what outlives it (the output, what autograd keeps)."""
    tracker = LiveTensorTracker(module, x)
    with tracker:
        with tracker.phase("forward"):
            y = module(x)
        after = tracker.live_bytes
    del y
    return max(e.live_bytes for e in tracker.timeline if e.phase == "forward") - after


def _predicted_forward_workspace(module: nn.Module, x: torch.Tensor, op: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = analyze(module.to("meta"), (x.to("meta"),)).graph
    [node] = [n for n in op_nodes(g) if g.nodes[n]["op"] == op]
    return g.nodes[node]["cost"].forward_workspace_bytes


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_forward_workspace(dtype, x_grad, weight):
    """pow(x, 2), the mean and rstd; y * weight beside a y not kept; the product beside the
    cast back to x's dtype."""
    x = torch.randn(B, T, D, dtype=dtype, requires_grad=x_grad)
    measured = _measured_forward_workspace(_rms_norm(dtype, weight), x)
    assert _predicted_forward_workspace(_rms_norm(dtype, weight), x,
                                        "aten.rms_norm.default") == measured


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
