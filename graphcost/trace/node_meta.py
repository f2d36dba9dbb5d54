"""What torch.export recorded on each fx node about where it came from: the module path and
class (`nn_module_stack`) and the line of the model's own code (`stack_trace`). Read by the graph
stage (graph/build.py) and by trace/export.py's error messages."""

from __future__ import annotations

import os

import torch

from graphcost.trace import opaque


def module_of(node: torch.fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, mtype = list(stack.values())[-1]
    path = path.split("@")[0]  # "blocks.0.ln@1": the second call of the same module
    mtype = mtype if isinstance(mtype, str) else getattr(mtype, "__name__", str(mtype))
    return path, mtype.rsplit(".", 1)[-1]


def module_calls_of(node: torch.fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    return tuple(path for path, _ in stack.values() if path)


def module_call_types_of(node: torch.fx.Node) -> tuple[str, ...]:
    """The class names of `module_calls_of(node)`'s modules, in the same order."""
    stack = node.meta.get("nn_module_stack") or {}
    return tuple((t if isinstance(t, str) else getattr(t, "__name__", str(t))).rsplit(".", 1)[-1]
                 for path, t in stack.values() if path)


def source_of(node: torch.fx.Node) -> str:
    """The innermost frame of the model's own code ('file:line: code'), skipping torch's files
    (nn.Linear's `F.linear(...)` says less than the model line that called the Linear) and
    graphcost's stand-ins for modules export cannot capture (graphcost.opaque)."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "")
              for i in range(len(lines)) if lines[i].lstrip().startswith("File ")]
    own = [f for f in frames if f"{os.sep}torch{os.sep}" not in f[0]
           and f'"{opaque.__file__}"' not in f[0]] or frames
    if not own:
        return ""
    where, code = own[-1]
    parts = where.split('"')
    filename = parts[1] if len(parts) > 2 else where
    lineno = where.split("line ")[-1].split(",")[0] if "line " in where else "?"
    return f"{filename}:{lineno}: {code}"
