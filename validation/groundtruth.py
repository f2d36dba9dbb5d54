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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
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


class _IntoKernel(TorchDispatchMode):
    """Runs `op` through its composite kernel with this mode on, so that the modes below it see
    the ATen ops that kernel calls (they would otherwise see `op` alone)."""

    def __init__(self, op: torch._ops.OpOverload, key: torch._C.DispatchKey) -> None:
        super().__init__()
        self.op, self.key = op, key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            with self:
                return func._op_dk(self.key, *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def kernel_flops(op: torch._ops.OpOverload):
    """A FlopCounterMode formula for an op with a composite kernel of its own (its own autograd
    formula, computed by calling other ATen ops): what FlopCounterMode counts for the ops that
    kernel calls, run on meta tensors of the same shapes. `_trilinear` (nn.Bilinear) calls bmm
    per output feature and `_euclidean_dist` (torch.cdist's matmul path) a matmul, but
    FlopCounterMode sees only the op itself, has no formula for it and counts 0."""
    key = next(torch._C.DispatchKey.__members__[k] for k in (
        "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k))

    def formula(*args, out_val=None, **kwargs) -> int:
        def meta(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

        args, kwargs = tree_map_only(torch.Tensor, meta, (args, kwargs))
        counter = FlopCounterMode(display=False)
        with counter, _IntoKernel(op, key):
            op(*args, **kwargs)
        return counter.get_total_flops()

    formula._get_raw = True  # FlopCounterMode passes the tensors, not their shapes
    return formula


def cpu_flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU's fused attention kernel with torch's own flash
    attention formulas (FlopCounterMode has none for `_scaled_dot_product_flash_attention_for_cpu`
    and would count it as 0), a grouped convolution's backward per group
    (`per_group_conv_backward_flop`: its own formula overcounts the weight gradient), and the
    composite kernels of `_trilinear` and `_euclidean_dist` by the ops they call
    (`kernel_flops`)."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop.__wrapped__,
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            flop_counter.sdpa_backward_flop.__wrapped__,
        aten.convolution_backward: per_group_conv_backward_flop,
        aten._trilinear: kernel_flops(aten._trilinear.default),
        aten._euclidean_dist: kernel_flops(aten._euclidean_dist.default)})


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
