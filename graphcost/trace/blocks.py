"""Trace a stack of identical blocks once: the speed path for deep models.

A transformer is mostly one block repeated L times. Exporting all L copies costs L times as
much as exporting one, so `trace` exports the model with its main stack cut to its first two
blocks, and `expand_blocks` rebuilds the full graph by copying block 1 L - 2 times, wiring each
copy's inputs to the previous copy's outputs and the ops after the stack to the last copy.
Blocks are "identical" when every submodule has the same type, configuration (`extra_repr`),
training flag, and parameters/buffers of the same shapes, dtypes and requires_grad; anything
else (or a block whose trace differs from the first one's, or ops the parent runs between
blocks) falls back to exporting the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

MIN_BLOCKS = 4  # below this, copying saves too little to be worth it


@dataclass(frozen=True)
class RepeatedBlocks:
    path: str  # module path of the ModuleList / Sequential: "layers", "h", "encoder.layers"
    count: int  # how many blocks the real model has


def _signature(block: nn.Module) -> tuple:
    modules = tuple((type(m), m.extra_repr(), m.training) for m in block.modules())
    tensors = tuple((n, tuple(p.shape), p.dtype, p.requires_grad)
                    for n, p in block.named_parameters(remove_duplicate=False))
    buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers())
    return modules, tensors, buffers


def find_repeated_blocks(module: nn.Module) -> RepeatedBlocks | None:
    """The longest ModuleList/Sequential of identical blocks with no parameter shared outside."""
    best = None
    for path, child in module.named_modules():
        # exactly these containers: a subclass may run its blocks its own way
        if type(child) not in (nn.ModuleList, nn.Sequential) or len(child) < MIN_BLOCKS:
            continue
        blocks = list(child)
        first = _signature(blocks[0])
        if any(_signature(b) != first for b in blocks[1:]):
            continue
        if best is None or len(blocks) > best.count:
            best = RepeatedBlocks(path, len(blocks))
    if best is None:
        return None
    # A parameter used both inside a block and elsewhere (or in two blocks) cannot be copied.
    inside = {id(p) for p in module.get_submodule(best.path).parameters()}
    outside = [p for n, p in module.named_parameters(remove_duplicate=False)
               if not n.startswith(best.path + ".")]
    per_block = [id(p) for b in module.get_submodule(best.path) for p in b.parameters()]
    if any(id(p) in inside for p in outside) or len(per_block) != len(set(per_block)):
        return None
    return best


@contextlib.contextmanager
def first_two_blocks(module: nn.Module, blocks: RepeatedBlocks) -> Iterator[None]:
    """Temporarily replace the stack with one holding only its first two blocks."""
    with first_blocks(module, blocks, 2):
        yield


@contextlib.contextmanager
def first_blocks(module: nn.Module, blocks: RepeatedBlocks, count: int) -> Iterator[None]:
    """Temporarily replace the stack with one holding only its first `count` blocks."""
    parent_path, _, attr = blocks.path.rpartition(".")
    parent = module.get_submodule(parent_path)
    stack = getattr(parent, attr)
    short = nn.Sequential(*list(stack)[:count]) if isinstance(stack, nn.Sequential) \
        else nn.ModuleList(list(stack)[:count])
    parent._modules[attr] = short
    try:
        yield
    finally:
        parent._modules[attr] = stack
