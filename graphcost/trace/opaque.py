"""Stand-ins for the submodules graphcost cannot trace: the rest of the model is analysed and
each such submodule becomes one opaque op, listed as unsupported.

When export fails inside a submodule (data-dependent control flow, Python it cannot follow), or
an op's output shape depends on tensor values (torch.nonzero, a boolean mask), `graphcost.trace`
asks `add_stand_in` for a stand-in for the innermost submodule it happened in:
1. the call's arguments are captured on an eager run of the model, stopped as the submodule is
   entered (`_capture_call`);
2. its outputs are found by running the submodule alone on them, on meta tensors, or, when that
   fails too, on CPU tensors: zeros, then random values, with its parameters materialised, and
   only when its parameters and inputs fit in `MAX_CPU_RUN_BYTES`. Output shapes that differ
   between the two runs depend on the data: then the innermost module around it whose outputs
   do not is stood in for instead (a mixture-of-experts layer around its routing);
3. during export its forward is replaced (`standing_in`) by one call of
   `graphcost::opaque_module`, which reads the call's tensors and the submodule's parameters and
   buffers, and whose fake implementation returns empty tensors of the recorded outputs. A call
   with other shapes or arguments than the recorded one is an error: no stand-in then.

The op has no cost rule: annotate lists it under `unsupported_ops` as
`opaque module PATH (TYPE)` and warns that its FLOPs and memory are not counted; its parameters
are still the module's and count in the parameter total.

    >>> from torch import nn
    >>> class Gate(nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x  # reads tensor data: export cannot follow it
    >>> model = nn.Sequential(nn.Linear(8, 8), Gate()).to("meta")
    >>> import graphcost, warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     graphcost.analyze(model, (graphcost.spec((2, 8)),)).unsupported_ops
    {'opaque module 1 (Gate)': 1}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

from graphcost.rules.registry import TensorSpec

MAX_STAND_INS = 8  # distinct submodules stood in for before giving up on the model
MAX_CPU_RUN_BYTES = 256 * 2**20  # parameters + inputs of a submodule run once on the CPU
REASON_CHARS = 200  # of the export error's first line, kept in the op and the warning
OPAQUE_PREFIX = "opaque module "  # how unsupported_ops names a stand-in


@torch.library.custom_op("graphcost::opaque_module", mutates_args=())
def opaque_module(inputs: list[torch.Tensor], module: str, shapes: list[int], dtypes: str,
                  reason: str) -> list[torch.Tensor]:
    """A submodule torch.export could not capture: `inputs` are the tensors it reads, `shapes`
    and `dtypes` its outputs' (see _encode), `reason` the first line of the export error."""
    raise RuntimeError(f"module {module} was traced as an opaque stand-in (graphcost.opaque): "
                       "only the shapes of its outputs are known, it cannot run")


@opaque_module.register_fake
def _opaque_module_fake(inputs, module, shapes, dtypes, reason):
    device = inputs[0].device if inputs else torch.device("meta")
    return [torch.empty(s.shape, dtype=s.dtype, device=device) for s in _decode(shapes, dtypes)]


OPAQUE = torch.ops.graphcost.opaque_module.default


class CannotStandIn(Exception):
    """Why a submodule that export cannot capture cannot be stood in for either."""


class _Captured(BaseException):  # a BaseException: a model's `except Exception` lets it through
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.call = (args, kwargs)


@dataclass(frozen=True)
class StandIn:
    """What replaces `module`'s forward while the model is exported."""

    module: nn.Module
    path: str
    reason: str  # why it could not be traced: one line
    call: tuple  # the call it stands in for (see _signature)
    outputs: tuple[TensorSpec, ...]  # the tensors it returns, flattened
    tree: TreeSpec  # how `outputs` nest in what it returns

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = _signature(args, kwargs)
        if not _same_call(call, self.call):
            raise RuntimeError(f"the stand-in for module {self.path} was made for a call on "
                               f"{_shapes(self.call[1])}, not on {_shapes(call[1])}: a module "
                               "called with other shapes or arguments each time cannot be "
                               "stood in for")
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        state = {id(t): t for t in [*self.module.parameters(), *self.module.buffers()]}
        shapes, dtypes = _encode(self.outputs)
        flat = opaque_module(tensors + list(state.values()), self.path, shapes, dtypes,
                             self.reason)
        return tree_unflatten(list(flat), self.tree)


def _signature(args: tuple, kwargs: dict) -> tuple[TreeSpec, tuple]:
    """A call as (its arguments' structure, their leaves with tensors as TensorSpecs)."""
    leaves, tree = tree_flatten((args, kwargs))
    return tree, tuple(TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in leaves)


_CONSTANTS = (TensorSpec, bool, int, float, str, torch.dtype, torch.device)


def _same_call(a: tuple[TreeSpec, tuple], b: tuple[TreeSpec, tuple]) -> bool:
    """Same structure, tensor specs and constants (other objects: the same object)."""
    return a[0] == b[0] and all(
        x is y or (type(x) is type(y) and isinstance(x, _CONSTANTS) and x == y)
        for x, y in zip(a[1], b[1]))


@contextlib.contextmanager
def standing_in(stand_ins: list[StandIn]) -> Iterator[None]:
    """Temporarily replace each stand-in's module's forward by the stand-in's."""
    missing = object()
    patched = []
    try:
        for s in stand_ins:
            patched.append((s.module, s.module.__dict__.get("forward", missing)))
            s.module.forward = s.forward
        yield
    finally:
        for module, before in reversed(patched):
            if before is missing:
                del module.forward
            else:
                module.forward = before


def add_stand_in(root: nn.Module, path: str, args: tuple, kwargs: dict,
                 done: list[StandIn], reason: str) -> list[StandIn]:
    """`done` (the stand-ins in place when `root` is called on `args`, `kwargs`) with one more:
    for submodule `path`, which could not be traced because of `reason`, or, when it has none
    (its output shapes depend on the data, say), for the innermost module around it that has
    one, the root excepted, which replaces the stand-ins inside it. CannotStandIn says why
    there is none."""
    parts = path.split(".")
    around = [".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]
    cause = next((s.reason for s in done if s.path == path), reason)  # its first failure's
    first = None
    for candidate in [path, *around]:
        others = [s for s in done if not _inside(s.path, candidate)]
        why_here = reason if candidate == path else f"{cause} (in {path})"
        try:
            return [*others, _stand_in(root, candidate, args, kwargs, done, others, why_here)]
        except CannotStandIn as why:
            first = first or why
    raise CannotStandIn(f"{first}" + (f"; nor can the modules around it ({', '.join(around)})"
                                      if around else "")) from first


def _inside(path: str, outer: str) -> bool:
    return path == outer or path.startswith(outer + ".")


def _stand_in(root: nn.Module, path: str, args: tuple, kwargs: dict, done: list[StandIn],
              others: list[StandIn], reason: str) -> StandIn:
    """A stand-in for `path`, found with the stand-ins `others` (`done` but those inside it)."""
    module = root.get_submodule(path)
    if any(s.module is module for s in done):
        raise CannotStandIn(f"its stand-in does not fit every call of it ({reason})")
    if len(others) >= MAX_STAND_INS:
        raise CannotStandIn(f"{len(others)} submodules already stand in ("
                            f"{', '.join(s.path for s in others)}), the most graphcost allows")
    call_args, call_kwargs = _capture_call(root, module, args, kwargs, others)
    leaves, tree = tree_flatten(_run(module, call_args, call_kwargs))
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        kinds = sorted({type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)})
        raise CannotStandIn(f"it returns {', '.join(kinds)} values, not only tensors (a tensor "
                            "or a nested tuple, list or dict of tensors can be stood in for)")
    return StandIn(module, path, reason[:REASON_CHARS], _signature(call_args, call_kwargs),
                   tuple(TensorSpec.of(t) for t in leaves), tree)


def _capture_call(root: nn.Module, module: nn.Module, args: tuple, kwargs: dict,
                  done: list[StandIn]) -> tuple[tuple, dict]:
    """The arguments of `module`'s first call in an eager run of `root`."""
    def stop(_: nn.Module, call_args: tuple, call_kwargs: dict) -> None:
        raise _Captured(call_args, call_kwargs)

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with standing_in(done), torch.no_grad():
            root(*args, **kwargs)
    except _Captured as captured:
        return captured.call
    except Exception as exc:  # reported as the reason
        raise CannotStandIn("an eager run of the model on its example inputs fails before "
                            f"calling it ({first_line(exc)})") from exc
    finally:
        handle.remove()
    raise CannotStandIn("an eager run of the model on its example inputs does not call it")


def _run(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """What `module` returns: run on the example's (meta) tensors, else once on the CPU."""
    try:
        with torch.no_grad():
            return module(*args, **kwargs)
    except Exception as exc:  # the CPU run says whether it matters
        return _run_on_cpu(module, args, kwargs, exc)


def _run_on_cpu(module: nn.Module, args: tuple, kwargs: dict, meta_error: Exception) -> Any:
    """Run `module` on CPU tensors of the inputs' shapes, once filled with zeros and once with
    random values (0 or 1 for integers: valid indices); its output, when the output shapes are
    the same both times."""
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    tensors = {id(t): t for t in [*state.values(), *tree_leaves((args, kwargs))]
               if isinstance(t, torch.Tensor)}
    run_bytes = sum(t.nbytes for t in tensors.values())
    why_meta = f"it does not run on meta tensors ({first_line(meta_error)})"
    if run_bytes > MAX_CPU_RUN_BYTES:
        raise CannotStandIn(f"{why_meta}, and running it on CPU tensors would allocate "
                            f"{run_bytes / 2**20:,.1f} MiB of parameters and inputs, over the "
                            f"{MAX_CPU_RUN_BYTES / 2**20:,.0f} MiB graphcost allows for that")
    try:
        zeros = _cpu_call(module, state, args, kwargs, random=False)
        randoms = _cpu_call(module, state, args, kwargs, random=True)
    except Exception as exc:  # reported as the reason
        raise CannotStandIn(f"{why_meta} nor on CPU tensors ({first_line(exc)})") from exc
    if _specs(zeros) != _specs(randoms):
        raise CannotStandIn(f"{why_meta}, and on CPU tensors its output shapes depend on the "
                            f"values it reads ({_shapes(_specs(zeros))} with zeros, "
                            f"{_shapes(_specs(randoms))} with random values)")
    return zeros


def _cpu_call(module: nn.Module, state: dict, args: tuple, kwargs: dict, *,
              random: bool) -> Any:
    generator = torch.Generator().manual_seed(0)

    def fill(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if not random:
            return torch.zeros(x.shape, dtype=x.dtype)
        if x.is_floating_point() or x.is_complex():
            return torch.randn(x.shape, dtype=x.dtype, generator=generator)
        return torch.randint(0, 2, x.shape, generator=generator).to(x.dtype)  # valid indices

    with torch.random.fork_rng(devices=[]), torch.device("cpu"), torch.no_grad():
        return functional_call(module, tree_map(fill, state), tree_map(fill, args),
                               tree_map(fill, kwargs))


def _specs(output: Any) -> list:
    return [TensorSpec.of(x) if isinstance(x, torch.Tensor) else x for x in tree_leaves(output)]


def _encode(specs: tuple[TensorSpec, ...]) -> tuple[list[int], str]:
    """Output specs as op arguments: [ndim, *shape] per output, and the dtypes' names."""
    shapes = [n for s in specs for n in (len(s.shape), *s.shape)]
    return shapes, ",".join(str(s.dtype).removeprefix("torch.") for s in specs)


def _decode(shapes: list[int], dtypes: str) -> list[TensorSpec]:
    specs, i = [], 0
    for name in filter(None, dtypes.split(",")):
        ndim = shapes[i]
        specs.append(TensorSpec(tuple(shapes[i + 1: i + 1 + ndim]), getattr(torch, name)))
        i += 1 + ndim
    return specs


def _shapes(specs: Sequence[Any]) -> str:
    """'(2, 8) float32, (2,) int64' (anything not a TensorSpec as its repr)."""
    return ", ".join(f"{tuple(s.shape)} {str(s.dtype).removeprefix('torch.')}"
                     if isinstance(s, TensorSpec) else repr(s) for s in specs) or "nothing"


def first_line(exc: BaseException) -> str:
    """'TypeName: the first line of its message'."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


# -- reporting (graphcost.annotate) -----------------------------------------------------------

def unsupported_name(data: dict) -> str:
    """The name an op without a rule is listed under in unsupported_ops: its ATen name, or for a
    stand-in 'opaque module PATH (TYPE)'."""
    if data["target"] is not OPAQUE:
        return data["op"]
    return f"{OPAQUE_PREFIX}{data['module_path'] or '<root>'} ({data['module_type']})"


def warning(g: nx.DiGraph, nodes: list[str]) -> str:
    """One message for the stand-in op nodes `nodes`: which modules, why, what is not counted."""
    by_cause: dict[tuple[str, str], list[str]] = {}
    for n in nodes:
        d = g.nodes[n]
        reason = d["args"][4] if len(d["args"]) > 4 else d["kwargs"].get("reason", "")
        by_cause.setdefault((d["module_type"], reason), []).append(d["module_path"] or "<root>")
    causes = "; ".join(f"module {_listing(paths)} ({mtype}): {reason}"
                       for (mtype, reason), paths in by_cause.items())
    each = "It stands" if len(nodes) == 1 else "Each stands"
    return (f"graphcost: could not trace {causes}. {each} in as one opaque op (listed under "
            "unsupported_ops): its FLOPs, saved activations and memory are NOT counted in any "
            "figure, its parameters are. Make its forward traceable (no Python branch on tensor "
            "values, no .item(), no data-dependent shapes) to count it (docs/graph.md)")


def _listing(paths: list[str]) -> str:
    return ", ".join(paths) if len(paths) <= 3 else \
        f"{', '.join(paths[:2])} and {len(paths) - 2} more like them"
