"""Stage 1: capture a module as an ATen-level torch.fx graph with torch.export (non-strict).

Every node of the result keeps `meta["val"]` (a fake tensor: shape, dtype, strides, storage),
`meta["nn_module_stack"]` (module path and type) and `meta["stack_trace"]` (source line).
"""

from __future__ import annotations

import contextlib
import io
import linecache
import operator
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphcost.errors import TraceError
from graphcost.rules import REGISTRY
from graphcost.rules.registry import RuleRegistry, TensorSpec
from graphcost.trace.blocks import RepeatedBlocks, find_repeated_blocks, first_two_blocks
from graphcost.trace.checkpoints import has_regions, recording_checkpoints, tag_regions
from graphcost.trace.decompose import decompose_composites
from graphcost.trace.fake_kernels import shape_only_kernels
from graphcost.trace.grads import INPUT_GRAD_KEY
from graphcost.trace.lifetimes import mark_lifetimes, observing_lifetimes
from graphcost.trace.masks import eager_mask_branches
from graphcost.trace.opaque import CannotStandIn, StandIn, add_stand_in, first_line, standing_in
from graphcost.trace.outputs import OutputTypeError, returning_tensors

WHAT_TO_DO = ("\n  what to do: graphcost traces with torch.export (non-strict) on meta tensors, "
              "so the forward must not read tensor values (no .item(), no Python branches on "
              "tensor data, no data-dependent shapes). Make such control flow static, use "
              "torch.cond / torch.where, or check that the example inputs have the shapes and "
              "dtypes the model expects.")


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
          autocast: torch.dtype | None = None, opaque_submodules: bool = True,
          rules: RuleRegistry | None = None, kernels: str = "cpu") -> Trace:
    """Export `module` called on `example_inputs` (tensors, meta tensors or TensorSpecs).

    With `reuse_blocks`, a stack of identical blocks is exported with its first two blocks only
    (graphcost.blocks); `Trace.blocks` then says how many the model really has. With
    `autocast` (torch.bfloat16 or torch.float16) the ops carry the dtypes they produce under
    torch.autocast (graphcost.autocast). With `opaque_submodules`, a submodule torch.export
    cannot capture becomes one opaque op with the outputs it really has (graphcost.opaque), so
    the rest of the model is still traced; without, its failure is a TraceError. An op that
    `rules` (default: the shipped REGISTRY) has no rule for and that PyTorch runs through its
    CompositeImplicitAutograd decomposition is replaced by that decomposition as it runs on a
    `kernels` ("cpu" or "cuda": the target device's kind) device (`decompose_composites`)."""
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
        with first_two_blocks(module, blocks) if blocks else contextlib.nullcontext():
            program = _export(module, args, kwargs, name, opaque_submodules)
    except TraceError:
        if blocks is None:
            raise
        program = None  # the shortened model may be what failed: try the real one
    # A model that checkpoints in its own forward decides per block what to checkpoint (every
    # n-th, segments): the first two blocks do not say what the others do.
    if blocks is not None and (program is None or has_regions(program.graph)):
        return trace(module, example_inputs, kwargs=kwargs, model_name=model_name,
                     reuse_blocks=False, autocast=autocast,
                     opaque_submodules=opaque_submodules, rules=rules, kernels=kernels)
    inline_grad_mode_regions(program.graph_module)
    mark_input_grads(program, args, kwargs)
    program = decompose_composites(program, rules or REGISTRY, kernels)
    if autocast is not None:
        from graphcost.trace.autocast import rerun

        try:
            rerun(program, autocast)
        except Exception as exc:  # re-raised with what to do
            raise TraceError(f"cannot run model {name!r} under torch.autocast({autocast}): "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}; "
                             "analyze it without mixed precision") from exc
    return Trace(program, module, name, blocks, autocast)


def mark_input_grads(program: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> None:
    """Note on each user-input placeholder whether the example input it stands for requires a
    gradient. The placeholder's fake value can say otherwise: tracing some ops (mse_loss's
    target) sets requires_grad on it."""
    leaves = [x for x in torch.utils._pytree.tree_leaves((args, kwargs))]
    names = list(program.graph_signature.user_inputs)
    if len(leaves) != len(names):
        return  # cannot pair them: the fake values are all there is
    grads = {name: bool(getattr(x, "requires_grad", False)) for name, x in zip(names, leaves)}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in grads:
            node.meta[INPUT_GRAD_KEY] = grads[node.name]


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


@dataclass(frozen=True)
class _Failure:
    """Why an export cannot be used, and where."""

    path: str | None  # the innermost submodule it happened in; None: the root module's own code
    reason: str  # one line
    message: str  # what TraceError says: what, where, what to do


def _export(module: nn.Module, args: tuple, kwargs: dict, name: str,
            opaque_submodules: bool) -> torch.export.ExportedProgram:
    """torch.export.export, non-strict; with `opaque_submodules`, each submodule that cannot be
    captured (its forward fails, or an output shape depends on tensor values) is stood in for
    (graphcost.opaque) and the export tried again."""
    stand_ins: list[StandIn] = []
    first_failures: dict[str, _Failure] = {}  # by module: what made graphcost stand in for it
    while True:
        cause = None
        try:
            with standing_in(stand_ins):
                program = _export_quietly(module, args, kwargs)
        except Exception as exc:  # stood in for, or re-raised with what to do
            if isinstance(exc, OutputTypeError):  # about the output, not tensor values
                raise TraceError(f"cannot trace model {name!r}: {exc}") from exc
            cause = exc
            failure = _Failure(_failing_submodule(module, exc), first_line(exc),
                               _explain_trace_failure(name, module, exc))
        else:
            failure = _data_dependent_shape(name, module, program)
            if failure is None:
                return program
        if failure.path is None:
            raise TraceError(failure.message) from cause
        if not opaque_submodules:
            raise TraceError(f"{failure.message}\n  without --strict (analyze(strict=False)), "
                             "graphcost tries to analyse the rest of the model and to list "
                             f"module {failure.path} as unsupported") from cause
        first = first_failures.setdefault(failure.path, failure)
        try:
            stand_ins = add_stand_in(module, failure.path, args, kwargs, stand_ins,
                                     failure.reason)
        except CannotStandIn as why:
            raise TraceError(f"{first.message}\n  graphcost cannot analyse the rest of the "
                             f"model without module {failure.path} either: {why}") from cause


def _data_dependent_shape(name: str, module: nn.Module,
                          program: torch.export.ExportedProgram) -> _Failure | None:
    """The first op whose output shape depends on tensor values (torch.nonzero, a boolean
    mask, a size read with .item()): export follows it with a symbol, graphcost cannot."""
    from graphcost.trace.node_meta import module_of, source_of

    for node in program.graph.nodes:
        val = node.meta.get("val")
        for t in val if isinstance(val, (list, tuple)) else [val]:
            if isinstance(t, torch.Tensor) and not all(isinstance(s, int) for s in t.shape):
                path, mtype = module_of(node)
                reason = (f"the output shape of {node.target}, {tuple(t.shape)}, depends on "
                          "tensor values")
                return _Failure(path or None, reason,
                                f"cannot trace model {name!r}: {reason}\n  in module "
                                f"{path or '<root>'} ({mtype or type(module).__name__}), "
                                f"{source_of(node)}{WHAT_TO_DO}")
    return None


def _export_quietly(module: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export.export, whose stderr is passed on only when it succeeds (on failure it
    prints its partial graph: graphcost's own message or stand-in replaces that), with the
    checkpoint regions of the model's own forward tagged on their ops (trace/checkpoints.py)
    and how long eager Python keeps each value (trace/lifetimes.py); its output is returned as
    its tensors (trace/outputs.py) and transformers' mask code takes eager's branches
    (trace/masks.py)."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held), recording_checkpoints() as checkpoints, \
            observing_lifetimes(module) as deaths, returning_tensors(module), \
            eager_mask_branches(), shape_only_kernels(), warnings.catch_warnings():
        # nn.RNN/GRU/LSTM reassign their weight list inside forward: nothing a user can act on
        warnings.filterwarnings("ignore", message=r"The tensor attributes? .*_flat_weights")
        program = torch.export.export(module, args, kwargs, strict=False)
    sys.stderr.write(held.getvalue())
    tag_regions(program.graph, checkpoints)
    mark_lifetimes(program.graph, deaths)
    return program


def _module_frames(module: nn.Module, exc: BaseException) -> list[tuple[str, str, str, int]]:
    """(module path, type name, file, line) of each frame of `exc`'s traceback that runs a
    method of one of `module`'s modules, outermost first; the root's path is ""."""
    paths = {id(m): (path, type(m).__name__) for path, m in module.named_modules()}
    return [(*paths[id(frame.f_locals.get("self"))], frame.f_code.co_filename, lineno)
            for frame, lineno in traceback.walk_tb(exc.__traceback__)
            if id(frame.f_locals.get("self")) in paths]


def _failing_submodule(module: nn.Module, exc: BaseException) -> str | None:
    """The path of the innermost submodule (not the root) whose forward raised `exc`."""
    frames = _module_frames(module, exc)
    return frames[-1][0] if frames and frames[-1][0] else None


def _explain_trace_failure(name: str, module: nn.Module, exc: BaseException) -> str:
    """Name the innermost module whose forward was running, its source line, and a fix."""
    msg = f"cannot trace model {name!r}: {first_line(exc)}"
    frames = _module_frames(module, exc)
    if frames:
        path, mtype, filename, lineno = frames[-1]
        own = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)
               if f"{os.sep}torch{os.sep}" not in f.filename]
        if own:  # the model's own line, not torch's module machinery
            filename, lineno = own[-1]
        src = linecache.getline(filename, lineno).strip()
        msg += f"\n  in module {path or '<root>'} ({mtype}), {filename}:{lineno}: {src}"
    if type(exc).__name__ == "DynamicOutputShapeException":
        return msg + ("\n  what to do: the output shape of that op depends on tensor values "
                      "(torch.nonzero, a boolean mask's selection). Call it inside a submodule: "
                      "graphcost then lists that module as one opaque op and analyses the rest "
                      "of the model.")
    return msg + WHAT_TO_DO
