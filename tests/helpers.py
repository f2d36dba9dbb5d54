"""Shared test helper: graphcost's three numbers against PyTorch's own measurements.

    assert_matches_pytorch(lambda: nn.Linear(8, 4), randn_inputs((2, 8)), torch.bfloat16)

builds the module twice from the same seed, in `dtype` — on the meta device for `analyze` and
FlopCounterMode, on the CPU for autograd's saved tensors — and checks that forward FLOPs,
backward FLOPs and saved activation bytes are equal exactly, with no unsupported op.

`make_module()` is called under the target device as the default device; `make_inputs(device,
dtype)` returns the example inputs (a tensor or a tuple).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from graphcost import analyze
from graphcost.analysis.analyze import Analysis
from validation.groundtruth import measure_flops, measure_saved_bytes

MakeModule = Callable[[], nn.Module]
MakeInputs = Callable[[torch.device, torch.dtype], Any]
NAMES = ("forward_flops", "backward_flops", "saved_activation_bytes")


def _build(make_module: MakeModule, make_inputs: MakeInputs, dtype: torch.dtype, device: str,
           seed: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    with torch.device(device):
        module = make_module().to(dtype)
    inputs = make_inputs(torch.device(device), dtype)
    return module, inputs if isinstance(inputs, tuple) else (inputs,)


def measure(make_module: MakeModule, make_inputs: MakeInputs,
            dtype: torch.dtype = torch.float32, *, seed: int = 0) -> dict[str, Any]:
    """{"graphcost": {...}, "pytorch": {...}} of forward FLOPs, backward FLOPs and saved
    activation bytes, plus graphcost's "analysis"."""
    module, inputs = _build(make_module, make_inputs, dtype, "meta", seed)
    analysis = analyze(module, inputs, device="cpu")
    try:
        forward, backward = measure_flops(module, inputs)
    except RuntimeError as exc:  # its eager forward reads tensor values, which meta has not
        if "meta" not in str(exc):
            raise
        forward, backward = measure_flops_on_cpu(*_build(make_module, make_inputs, dtype, "cpu",
                                                        seed))
    module, inputs = _build(make_module, make_inputs, dtype, "cpu", seed)
    saved = measure_saved_bytes(module, inputs)
    return {
        "graphcost": dict(zip(NAMES, (analysis.forward_flops, analysis.backward_flops,
                                      analysis.saved_activation_bytes))),
        "pytorch": dict(zip(NAMES, (forward, backward, saved))),
        "analysis": analysis,
    }


def measure_flops_on_cpu(module: nn.Module, inputs: tuple) -> tuple[int, int]:
    """FlopCounterMode on a real CPU run with SDPA on its math backend, the ops it runs on the
    meta device: for a model whose eager forward reads tensor values (transformers' mask code
    asks whether anything is padded), which a meta tensor does not have."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return measure_flops(module, inputs)


def analyze_meta(make_module: MakeModule, make_inputs: MakeInputs,
                 dtype: torch.dtype = torch.float32) -> Analysis:
    """graphcost's analysis alone (device "cpu"), of the module built on meta: for checks
    against hand formulas."""
    module, inputs = _build(make_module, make_inputs, dtype, "meta", 0)
    return analyze(module, inputs, device="cpu")


def assert_matches_pytorch(make_module: MakeModule, make_inputs: MakeInputs,
                           dtype: torch.dtype = torch.float32, *, seed: int = 0) -> Analysis:
    """Assert graphcost equals FlopCounterMode (meta) and autograd's saved tensors (real CPU run)
    exactly, every op supported. Returns graphcost's Analysis for further checks."""
    m = measure(make_module, make_inputs, dtype, seed=seed)
    analysis = m["analysis"]
    assert not analysis.unsupported_ops, f"ops without a rule: {analysis.unsupported_ops}"
    assert m["graphcost"] == m["pytorch"], f"graphcost {m['graphcost']} != pytorch {m['pytorch']}"
    return analysis


def randn_inputs(*shapes: Sequence[int], requires_grad: bool = True) -> MakeInputs:
    """make_inputs for standard-normal float inputs of these shapes."""
    def make(device: torch.device, dtype: torch.dtype) -> tuple:
        return tuple(torch.randn(*s, device=device, dtype=dtype, requires_grad=requires_grad)
                     for s in shapes)
    return make


class Fn(nn.Module):
    """A function as a module (no parameters)."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class Scaled(nn.Module):
    """fn(x1 * p1, x2 * p2, ...): each input scaled by a parameter of its shape, so every operand
    of fn is an activation (a new storage that needs a gradient), as inside a real model."""

    def __init__(self, fn: Callable, *shapes: Sequence[int]) -> None:
        super().__init__()
        self.fn = fn
        self.scales = nn.ParameterList(nn.Parameter(torch.randn(*s)) for s in shapes)

    def forward(self, *xs):
        return self.fn(*(x * p for x, p in zip(xs, self.scales)))


def on_activations(fn: Callable, *shapes: Sequence[int]) -> tuple[MakeModule, MakeInputs]:
    """(make_module, make_inputs) that run `fn` on activations of these shapes (see Scaled)."""
    return (lambda: Scaled(fn, *shapes)), randn_inputs(*shapes, requires_grad=False)


def frozen(make_module: MakeModule, *prefixes: str) -> MakeModule:
    """make_module with `requires_grad_(False)` on every parameter whose name starts with one of
    `prefixes` ("0." freezes the first layer of a Sequential, "" all of them)."""
    def make() -> nn.Module:
        module = make_module()
        for name, p in module.named_parameters():
            if name.startswith(prefixes):
                p.requires_grad_(False)
        return module
    return make


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`graphcost ARGV` in-process: (exit status, stdout, stderr)."""
    from graphcost.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, argv, needle: str) -> None:
    """A user error: exit status 2, nothing on stdout, one message naming `needle`, no
    traceback."""
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert needle in err and "Traceback" not in err
    assert err.count("graphcost: error:") == 1
