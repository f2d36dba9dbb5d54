"""Which values of an exported program need a gradient, as eager autograd would record them.

The fake values torch.export leaves on the nodes do not say (only parameters' do), yet
PyTorch's composites branch on it: at::matmul folds a batched input into one mm, a copy that
autograd then saves, exactly when an operand requires a gradient. So decompositions are traced
on fake inputs that require a gradient where eager's would (graphcost/trace/decompose.py), and
the graph builder marks its values by the same rule.
"""

from __future__ import annotations

import operator

import torch

aten = torch.ops.aten

# Ops whose output never carries a gradient even when an input does.
NON_DIFFERENTIABLE = {
    aten.detach.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.full_like.default, aten.rand_like.default,
    aten.randn_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_empty.default, aten.new_full.default,
}

INPUT_GRAD_KEY = "graphcost_requires_grad"  # on a user input: does the example input need one


def floating(val: object) -> bool:
    tensors = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
               for t in tensors)


def requires_grad_of(graph: torch.fx.Graph) -> dict[torch.fx.Node, bool]:
    """{node: does (any of) its output need a gradient}: parameters as their fake values say,
    user inputs as the example inputs did (INPUT_GRAD_KEY), an op's when grad mode is on, it
    makes a floating-point tensor, it is differentiable and one of its inputs needs one."""
    flags: dict[torch.fx.Node, bool] = {}
    grad_enabled = True
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            flags[node] = bool(node.meta.get(INPUT_GRAD_KEY, getattr(val, "requires_grad",
                                                                      False)))
        elif node.op == "call_function":
            if node.target is torch._C._set_grad_enabled:
                grad_enabled = bool(node.args[0])
                continue
            inputs = node.all_input_nodes
            if node.target is operator.getitem:
                flags[node] = bool(inputs) and flags.get(inputs[0], False) and floating(val)
                continue
            flags[node] = (grad_enabled and floating(val)
                           and node.target not in NON_DIFFERENTIABLE
                           and any(flags.get(a, False) for a in inputs))
    return flags
