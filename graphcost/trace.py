"""Stage 1: capture a module as an ATen-level torch.fx graph with torch.export (non-strict).

Every node of the result keeps `meta["val"]` (a fake tensor: shape, dtype, strides, storage),
`meta["nn_module_stack"]` (module path and type) and `meta["stack_trace"]` (source line).
"""

from __future__ import annotations

import operator
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphcost.blocks import RepeatedBlocks, find_repeated_blocks, first_two_blocks
from graphcost.errors import TraceError
from graphcost.rules.registry import TensorSpec


def spec(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A shape/dtype example input: an empty tensor on the meta device (allocates nothing)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


@dataclass(frozen=True)
class Trace:
    """What torch.export captured, and the module it came from."""

    program: torch.export.ExportedProgram
    module: nn.Module
    model_name: str
    blocks: RepeatedBlocks | None = None  # set when only the first two blocks were exported
    autocast: torch.dtype | None = None  # the ops' dtypes are those under torch.autocast


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("meta")


def _as_tensor(x: Any, device: torch.device) -> Any:
    if isinstance(x, TensorSpec):
        return torch.empty(x.shape, dtype=x.dtype, device=device)
    return x


def trace(module: nn.Module, example_inputs: Any, *, kwargs: dict | None = None,
          model_name: str | None = None, reuse_blocks: bool = True,
          autocast: torch.dtype | None = None) -> Trace:
    """Export `module` called on `example_inputs` (tensors, meta tensors or TensorSpecs).

    With `reuse_blocks`, a stack of identical blocks is exported with its first two blocks only
    (graphcost.blocks); `Trace.blocks` then says how many the model really has. With
    `autocast` (torch.bfloat16 or torch.float16) the ops carry the dtypes they produce under
    torch.autocast (graphcost.autocast)."""
    if not isinstance(module, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(module).__name__}")
    name = model_name or type(module).__name__
    if isinstance(example_inputs, (torch.Tensor, TensorSpec)):
        example_inputs = (example_inputs,)
    device = _module_device(module)
    args = tuple(_as_tensor(x, device) for x in example_inputs)
    kwargs = {k: _as_tensor(v, device) for k, v in (kwargs or {}).items()}
    blocks = find_repeated_blocks(module) if reuse_blocks else None
    try:
        if blocks is None:
            program = torch.export.export(module, args, kwargs, strict=False)
        else:
            with first_two_blocks(module, blocks):
                program = torch.export.export(module, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with where and what to do
        if blocks is not None:  # the shortened model may be what failed: try the real one
            return trace(module, example_inputs, kwargs=kwargs, model_name=model_name,
                         reuse_blocks=False, autocast=autocast)
        raise TraceError(_explain_trace_failure(name, module, exc)) from exc
    inline_grad_mode_regions(program.graph_module)
    if autocast is not None:
        from graphcost.autocast import rerun

        try:
            rerun(program, autocast)
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do
            raise TraceError(f"cannot run model {name!r} under torch.autocast({autocast}): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}; "
                             "analyze it without mixed precision") from exc
    return Trace(program, module, name, blocks, autocast)


def inline_grad_mode_regions(gm: torch.fx.GraphModule) -> None:
    """Inline torch.export's `wrap_with_set_grad_enabled` regions (a `with torch.no_grad()`
    block or a `@torch.no_grad()` forward, such as transformers' rotary embedding), so that
    their ops are costed one by one like any other: each region becomes its ops between two
    `_set_grad_enabled` calls, which the graph builder already follows."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    if hop is None:
        return
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not hop:
            continue
        enabled, body, *args = node.args
        sub = getattr(gm, body.target)
        env: dict = {}
        outputs = None
        with graph.inserting_before(node):
            graph.call_function(torch._C._set_grad_enabled, (enabled,))
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            env.update(zip(placeholders, args))
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = inner.args[0]
                    continue
                env[inner] = graph.node_copy(inner, lambda x: env[x])
            graph.call_function(torch._C._set_grad_enabled, (torch.is_grad_enabled(),))
        outs = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(env[outs[user.args[1]]])
                graph.erase_node(user)
        if node.users:  # a single output used directly
            node.replace_all_uses_with(env[outs[0]])
        graph.erase_node(node)
    graph.lint()


def _explain_trace_failure(name: str, module: nn.Module, exc: BaseException) -> str:
    """Name the innermost module whose forward was running, its source line, and a fix."""
    paths = {id(m): (path or "<root>", type(m).__name__) for path, m in module.named_modules()}
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if id(owner) in paths:
            where = (paths[id(owner)], frame.f_code.co_filename, lineno)
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    msg = f"cannot trace model {name!r}: {type(exc).__name__}: {first_line}"
    if where:
        (path, mtype), filename, lineno = where
        import linecache

        src = linecache.getline(filename, lineno).strip()
        msg += f"\n  in module {path} ({mtype}), {filename}:{lineno}: {src}"
    msg += ("\n  what to do: graphcost traces with torch.export (non-strict) on meta tensors, so "
            "the forward must not read tensor values (no .item(), no Python branches on tensor "
            "data, no data-dependent shapes). Make such control flow static, use torch.cond / "
            "torch.where, or check that the example inputs have the shapes and dtypes the model "
            "expects.")
    return msg


