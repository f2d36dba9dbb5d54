"""A model's output as torch.export can return it: the tensors in it.

torch.export returns only what PyTorch's pytree machinery (torch.utils._pytree) can flatten:
tensors in tuples, lists, dicts, NamedTuples and registered types such as Hugging Face's
ModelOutput. A forward that returns a plain `@dataclass`, or a ModelOutput that holds a key/value
cache (transformers' DynamicCache and EncoderDecoderCache are not pytree types; use_cache is on
by default), is refused ("Found <class DynamicCache> in output, which is not a known type").

While graphcost exports a model, `returning_tensors` wraps the root module's forward: an output
torch.export accepts is returned as it is; any other is returned as the flat tuple of its
tensors, found by `output_tensors`:
- through every pytree container and the fields of each `@dataclass`, as they are: the tensors
  the loss is taken from (graphcost's backward starts from those that need a gradient, as the
  ground truth's `validation.groundtruth.scalar_loss` does);
- the tensors another object holds (a cache's keys and values, reached through its attributes),
  detached: the returned object keeps them, so they are alive at the end of the forward and
  count as outputs, but a training loss is not taken from a cache.
An object that holds tensors graphcost cannot find (a generator, a function, an object without
attributes) is an `OutputTypeError` that names its type and where it is in the output.

    >>> import dataclasses, torch
    >>> @dataclasses.dataclass
    ... class Out:
    ...     loss: torch.Tensor
    ...     extra: dict
    >>> [tuple(t.shape) for t in output_tensors(Out(torch.ones(()), {"x": torch.ones(2)}))]
    [(), (2,)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten_with_path, tree_leaves

from graphcost.errors import TraceError

# Leaves that hold no tensor: torch.export returns them as constants, graphcost drops them.
CONSTANTS = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.dtype,
             torch.device, torch.layout, torch.memory_format, torch.SymInt, torch.SymFloat,
             torch.SymBool, slice, range, type(...))
EXPORTABLE = (torch.Tensor, type(None), bool, int, float, str, torch.SymInt, torch.SymFloat,
              torch.SymBool)  # leaves torch.export returns as they are


class OutputTypeError(TraceError):
    """A model output holds something graphcost cannot find the tensors of."""


def output_tensors(output: Any, *, kept_elsewhere: set[int] = frozenset()) -> list[torch.Tensor]:
    """The tensors in `output`, in order (see the module docstring): those of its pytree
    containers and dataclass fields as they are, those another object holds detached, each
    tensor once, none whose id is in `kept_elsewhere` (the module's parameters and buffers)."""
    out: list[torch.Tensor] = []
    seen: set[int] = set(kept_elsewhere)
    _collect(output, "output", out, seen, held=False)
    return out


def _collect(obj: Any, where: str, out: list, seen: set[int], *, held: bool) -> None:
    """Append the tensors of `obj` (at `where` in the output) to `out`; `held`: `obj` is kept
    by an object that is not a container (its tensors are detached)."""
    for path, leaf in tree_flatten_with_path(obj)[0]:
        at = where + "".join(str(k) for k in path)
        if id(leaf) in seen:
            continue
        if isinstance(leaf, torch.Tensor):
            seen.add(id(leaf))
            out.append(leaf.detach() if held else leaf)
        elif isinstance(leaf, CONSTANTS) or isinstance(leaf, (type, nn.Module)):
            continue  # a constant, a class or a module (its parameters are no output)
        elif dataclasses.is_dataclass(leaf):
            seen.add(id(leaf))
            for f in dataclasses.fields(leaf):
                _collect(getattr(leaf, f.name), f"{at}.{f.name}", out, seen, held=held)
        else:
            seen.add(id(leaf))
            _collect_attributes(leaf, at, out, seen, held)


def _collect_attributes(obj: Any, where: str, out: list, seen: set[int], held: bool) -> None:
    """The tensors an object keeps in its attributes (a Hugging Face cache's layers), detached.
    Inside an object, what has no attributes to look into is skipped; at the top of the output
    (not `held`) it is an OutputTypeError."""
    state = _attributes(obj)
    if state is None:
        if held:
            return
        raise OutputTypeError(
            f"the model's output holds a {_type_name(obj)} (at {where}), whose tensors graphcost "
            "cannot find: a forward's outputs must be tensors in tuples, lists, dicts, "
            "NamedTuples, @dataclasses, types registered with torch.utils._pytree, or objects "
            "that keep their tensors in attributes (as a Hugging Face cache does); return "
            "its tensors instead")
    for name, value in state.items():
        _collect(value, f"{where}.{name}", out, seen, held=True)


def _attributes(obj: Any) -> dict[str, Any] | None:
    """An object's attributes (`__dict__` and `__slots__`), or None for what has none to look
    into: a function, a generator or iterator, a C object."""
    if inspect.isroutine(obj) or isinstance(obj, (functools.partial, Iterator)) or \
            inspect.iscoroutine(obj):
        return None  # a function's closure, a generator's frame: not attributes
    state = dict(getattr(obj, "__dict__", {}) or {})
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if name not in state and hasattr(obj, name):
                state[name] = getattr(obj, name)
    if not state and not hasattr(obj, "__dict__") and not any(
            getattr(cls, "__slots__", None) for cls in type(obj).__mro__):
        return None
    return state


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def exportable(output: Any) -> bool:
    """torch.export returns `output` as it is: a pytree of tensors and constants only."""
    return all(isinstance(leaf, EXPORTABLE) for leaf in tree_leaves(output))


@contextlib.contextmanager
def returning_tensors(module: nn.Module) -> Iterator[None]:
    """While inside, `module(...)` returns its output as it is when torch.export can return it,
    else the tuple of `output_tensors(output)` (see the module docstring)."""
    missing = object()
    before = module.__dict__.get("forward", missing)
    forward = module.forward
    kept = {id(t) for t in [*module.parameters(), *module.buffers()]}

    @functools.wraps(forward)
    def flat_forward(*args: Any, **kwargs: Any) -> Any:
        output = forward(*args, **kwargs)
        return output if exportable(output) else tuple(output_tensors(output,
                                                                      kept_elsewhere=kept))

    module.forward = flat_forward
    try:
        yield
    finally:
        if before is missing:
            del module.forward
        else:
            module.forward = before
