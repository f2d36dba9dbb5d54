"""PyTorch's own measurements, the independent references graphcost is checked against.

- `measure_flops`: torch.utils.flop_counter.FlopCounterMode over a forward and the backward of a
  scalar loss, on the meta device (where SDPA runs its math decomposition, so every matmul counts).
- `measure_saved_bytes`: what autograd actually saves for backward on a real run
  (torch.autograd.graph.saved_tensors_hooks), unique storages, parameters/buffers/inputs excluded.
These run the model for real (or on meta): use small configs for the saved-bytes measurement.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


def tensor_leaves(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output, in order: through any pytree container (tuples, lists,
    dicts, NamedTuples, Hugging Face ModelOutputs) and the fields of a plain @dataclass. Other
    objects (a Hugging Face cache) are not looked into."""
    out = []
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            out.extend(tensor_leaves([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return out


def scalar_loss(output: Any) -> torch.Tensor:
    """The output itself when it is a scalar, otherwise the sum of every floating output that
    needs a gradient (`tensor_leaves`: nested containers and dataclasses included), each summed
    to a scalar first."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    floats = [t for t in tensor_leaves(output) if t.is_floating_point() and t.requires_grad]
    return sum(t.sum() for t in floats)


def per_group_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding,
                                 dilation, transposed, output_padding, groups, output_mask,
                                 out_shape=None, **kwargs) -> int:
    """The backward of a grouped convolution counted as `groups` separate convolutions, one per
    group, each by torch's own formula for an ungrouped one. torch's `conv_backward_flop` counts
    the weight gradient as if groups were 1 (`groups` times too many: a depthwise conv's weight
    gradient by its channel count); an ungrouped convolution it counts right, so this is the
    same convolution done per group, an independent count of the true FLOPs."""
    def per_group(shape, dim: int) -> list[int]:
        shape = list(shape)
        shape[dim] //= groups
        return shape

    x_group = per_group(x_shape, 1)  # (N, C_in / g, ...)
    grad_group = per_group(grad_out_shape, 1)  # (N, C_out / g, ...)
    # weight: (C_out, C_in / g, ...) for a conv, (C_in, C_out / g, ...) transposed
    w_group = per_group(w_shape, 0)
    out = None if out_shape is None else (x_group, w_group, None)
    return groups * flop_counter.conv_backward_flop.__wrapped__(
        grad_group, x_group, w_group, bias, stride, padding, dilation, transposed,
        output_padding, 1, output_mask, out_shape=out)


def cpu_flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU's fused attention kernel with torch's own flash
    attention formulas (FlopCounterMode has none for `_scaled_dot_product_flash_attention_for_cpu`
    and would count it as 0), and a grouped convolution's backward per group
    (`per_group_conv_backward_flop`: its own formula overcounts the weight gradient)."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flop_counter.sdpa_backward_flop.__wrapped__,
        aten.convolution_backward: per_group_conv_backward_flop})


def measure_flops(module: nn.Module, inputs: tuple) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs) counted by FlopCounterMode (on the meta device SDPA runs
    its math decomposition; on the CPU its fused kernel is counted, see cpu_flop_counter)."""
    counter = cpu_flop_counter()
    with counter:
        loss = scalar_loss(module(*inputs))
        forward = counter.get_total_flops()
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
    return forward, counter.get_total_flops() - forward


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure_saved_bytes(module: nn.Module, inputs: tuple) -> int:
    """Bytes of the unique storages autograd saves during a forward (not params/buffers/inputs)."""
    excluded = {_storage_key(t) for t in list(module.parameters()) + list(module.buffers())}
    excluded |= {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    kept: list[torch.Tensor] = []  # holding them keeps their storages from being reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = module(*inputs)
    storages = {}
    for t in kept:
        key = _storage_key(t)
        if key not in excluded and t.untyped_storage().nbytes() > 0:
            storages[key] = t.untyped_storage().nbytes()
    del output
    return sum(storages.values())
