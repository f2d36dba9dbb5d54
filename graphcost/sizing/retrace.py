"""One export, several shapes: the bytes alive after every event of a step at several
(batch, seq), from a single export and a single walk.

`graphcost fit` needs those event vectors at four shapes (two batch sizes, three lengths).
An export costs about 0.15 s and a walk of a 7B model's training step 0.1 s, so:

1. The model is exported once, at a *marker* shape (B0, T0): two primes that divide none of
   its parameters' or buffers' dimensions (1009, and the largest such prime up to the longest
   context), so that every integer the trace baked in from the input shape (a view's sizes, a
   slice's end) reads as c * B0**i * T0**j.
2. At each wanted shape the exported (two-block, graphcost.blocks) program is run again on
   meta tensors with those integers rewritten to c * B**i * T**j: PyTorch's own meta kernels
   give every tensor's shape, strides and storage, as an export at that shape records them.
   graphcost's graph is built from that and costed: about 20 ms a shape.
3. The full graph is expanded and costed once, at the first shape, and a new costed graph is
   made from it with every byte count (storage sizes, tensor sizes, the rules' workspaces)
   replaced by one that holds its value at every shape (graphcost.sizing.sampled), read from
   the same node of the two-block graphs. The walk (training_timeline, inference_memory) runs
   once on it; the bytes alive after each event come out at every shape.

Nothing is approximated: each shape's numbers are those of the program run at that shape. The
premise is that the export at the marker shape, its integers rewritten, is the export at the
others. Where that visibly fails `Unsupported` is raised and fit exports every shape instead:
the export or a rerun fails; the model's parameters, or its inputs at the first shape, are not
what the rewrite predicts; the costed graphs differ between shapes in more than sizes (which
storages exist, alias or are saved); or the walk finds two sizes equal at one shape and not at
another (a decision the shapes would take differently).
NB: `<` and `>` between sizes compare their values at the first shape; the walks order byte
counts only to report the peak, not to decide what is alive.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import nn
from torch.export.graph_signature import InputKind

from graphcost.analysis.analyze import summarize
from graphcost.analysis.annotate import annotate
from graphcost.graph.build import build_graph
from graphcost.graph.costed import CostedGraph
from graphcost.graph.expand import expand_blocks
from graphcost.hardware.devices import Device
from graphcost.passes.memory.inference import inference_memory
from graphcost.passes.memory.timeline import training_timeline
from graphcost.passes.memory.training import TrainingConfig
from graphcost.rules.registry import TensorSpec, Value
from graphcost.sizing.sampled import Sampled, Unsupported, carried_spec, decode, encode
from graphcost.trace.autocast import placeholder_like
from graphcost.trace.export import Trace, trace

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "cost", "kind", "kwargs", "outputs", "storage_alias", "storage_bytes",
         "storage_owner", "storages", "unsupported_ops")

aten = torch.ops.aten
Shape = tuple[int, int | None]  # (batch, seq); seq None: the model has no sequence length
BATCH_MARKERS = (1009, 1013, 1019, 1021, 1031, 1033)
LONGEST_MARKER = 1 << 16  # T0 at most: B0 * T0**2 * heads * 8 bytes stays far from int64's end
SENTINEL = 1 << 62  # integers from here up are "no limit" markers (sys.maxsize), not sizes
TEMPLATE = "retrace_template"  # node attribute: the two-block graph's node a node copies


# -- the marker shape and the rewrite ---------------------------------------------------------

def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _dimensions(module: nn.Module) -> set[int]:
    tensors = list(module.parameters()) + list(module.buffers())
    return {int(s) for t in tensors for s in t.shape if int(s) > 1}


def marker(module: nn.Module, seq_limit: int | None) -> tuple[int, int | None]:
    """(B0, T0): primes dividing none of the module's dimensions; T0 as long as the model
    allows (None: the length is not searched, the trace keeps the first shape's)."""
    dims = _dimensions(module)
    free = [p for p in BATCH_MARKERS if all(d % p for d in dims)]
    if not free:
        raise Unsupported("no marker batch size")
    if seq_limit is None:
        return free[0], None
    for t0 in range(min(seq_limit, LONGEST_MARKER), 2, -1):
        if t0 not in free[:1] and _is_prime(t0) and all(d % t0 for d in dims):
            return free[0], t0
    raise Unsupported("no marker sequence length")


class Rewrite:
    """Integers of a trace at the marker shape, as they are at shape `to`."""

    def __init__(self, mark: tuple[int, int | None], to: Shape) -> None:
        self.mark, self.to = mark, to

    def size(self, a: int) -> int:
        if a <= 1 or a >= SENTINEL:  # flags, dims, -1; a slice's "to the end"
            return a
        (b0, t0), (b, t) = self.mark, self.to
        rest, scale = a, 1
        while rest % b0 == 0:
            rest, scale = rest // b0, scale * b
        while t0 is not None and rest % t0 == 0:
            rest, scale = rest // t0, scale * t
        return rest * scale

    def __call__(self, x: Any) -> Any:
        """`x` (an argument tree) with its ints rewritten; `x` itself when none changes."""
        if type(x) is int:
            return self.size(x)
        if isinstance(x, (list, tuple)):
            new = [self(v) for v in x]
            if all(a is b for a, b in zip(new, x)):
                return x
            return type(x)(*new) if hasattr(x, "_fields") else type(x)(new)
        if isinstance(x, dict):
            new = {k: self(v) for k, v in x.items()}
            return x if all(new[k] is x[k] for k in x) else new
        return x


# -- the exported graph at another shape ------------------------------------------------------

class _Rerun(torch.fx.Interpreter):
    """Runs the exported graph with its integers rewritten; records every node's value."""

    def __init__(self, gm: torch.fx.GraphModule, rewrite: Rewrite, cpu: bool) -> None:
        super().__init__(gm)
        self.rewrite, self.cpu, self.record = rewrite, cpu, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.target in (aten._assert_tensor_metadata.default, torch._C._set_grad_enabled):
            return None
        if n.op == "placeholder":
            value = super().run_node(n)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = self.rewrite(args), self.rewrite(kwargs)
            if self.cpu:  # under autocast the fakes are CPU tensors (graphcost.autocast)
                kwargs = {k: torch.device("cpu") if isinstance(v, torch.device) else v
                          for k, v in kwargs.items()}
            value = getattr(self, n.op)(n.target, args, kwargs)
        self.record[n] = value
        return value


def _rerun(tr: Trace, rewrite: Rewrite) -> dict[torch.fx.Node, Any]:
    program = tr.program
    user_inputs = {s.arg.name for s in program.graph_signature.input_specs
                   if s.kind == InputKind.USER_INPUT}
    cpu = tr.autocast is not None
    device = "cpu" if cpu else "meta"

    def run() -> dict:
        bases: dict = {}  # placeholders sharing a storage (tied parameters) share a tensor
        args = []
        for n in program.graph.nodes:
            if n.op != "placeholder":
                continue
            v = n.meta.get("val")
            if not isinstance(v, torch.Tensor):
                args.append(rewrite(v) if n.name in user_inputs else v)
                continue
            if n.name in user_inputs:
                if not v.is_contiguous():
                    raise Unsupported(f"input {n.name} is not contiguous")
                args.append(torch.empty(rewrite(tuple(v.shape)), dtype=v.dtype, device=device)
                            .requires_grad_(v.requires_grad))
                continue
            args.append(placeholder_like(v, bases, device))
        interpreter = _Rerun(program.graph_module, rewrite, cpu)
        interpreter.run(*args)
        return interpreter.record

    try:
        with torch.no_grad():
            if not cpu:
                return run()
            from torch._subclasses.fake_tensor import FakeTensorMode

            with FakeTensorMode(allow_non_fake_inputs=True), \
                    torch.autocast("cpu", dtype=tr.autocast):
                return run()
    except Unsupported:
        raise
    except Exception as exc:  # the rewritten trace does not run at this shape
        raise Unsupported(f"rerun at {rewrite.to}: {type(exc).__name__}: {exc}") from exc


def graph_at(tr: Trace, rewrite: Rewrite) -> nx.DiGraph:
    """graphcost's graph of the traced program as it would be traced at `rewrite.to`."""
    record = _rerun(tr, rewrite)
    kept = []  # the export's own values and arguments, put back once the graph is built
    try:
        for n in tr.program.graph.nodes:
            kept.append((n, dict(n.meta), n.args, n.kwargs))
            if n in record:
                n.meta["val"] = record[n]
            if n.op == "call_function":
                args, kwargs = rewrite(n.args), rewrite(n.kwargs)
                if args is not n.args:
                    n.args = args
                if kwargs is not n.kwargs:
                    n.kwargs = kwargs
        g = build_graph(tr)
    finally:
        for n, meta, args, kwargs in kept:
            n.meta = meta
            if n.args is not args:
                n.args = args
            if n.kwargs is not kwargs:
                n.kwargs = kwargs
    for n in g:
        g.nodes[n][TEMPLATE] = n
    return g


# -- checks -----------------------------------------------------------------------------------

def _layout(module: nn.Module) -> list:
    return ([(n, tuple(p.shape), p.dtype, p.requires_grad)
             for n, p in module.named_parameters(remove_duplicate=False)]
            + [(n, tuple(b.shape), b.dtype) for n, b in module.named_buffers()])


def check_same_model(first: tuple, marked: tuple, rewrite: Rewrite) -> None:
    """The module loaded at the marker shape is the one loaded at the first shape, and the
    marker inputs rewritten to the first shape are that shape's inputs."""
    (module, inputs), (module_m, inputs_m) = first, marked
    if _layout(module) != _layout(module_m):
        raise Unsupported("the model's parameters or buffers depend on the shape")
    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    inputs_m = inputs_m if isinstance(inputs_m, (tuple, list)) else (inputs_m,)
    if len(inputs) != len(inputs_m):
        raise Unsupported("the inputs differ between shapes")
    for x, y in zip(inputs, inputs_m):
        if hasattr(x, "shape") and hasattr(y, "shape"):
            same = tuple(x.shape) == rewrite(tuple(int(s) for s in y.shape)) and \
                x.dtype == y.dtype
        else:
            same = x == rewrite(y)
        if not same:
            raise Unsupported("an input is not the rewritten marker input")


def check_same_structure(graphs: Sequence[nx.DiGraph]) -> None:
    """The costed graphs differ in nothing but sizes."""
    first = graphs[0]
    keys = ("storages", "saved", "runs_backward", "requires_grad")
    for g in graphs[1:]:
        if (g.graph["storage_owner"] != first.graph["storage_owner"]
                or g.graph["storage_alias"] != first.graph["storage_alias"]
                or g.graph["unsupported_ops"] != first.graph["unsupported_ops"]):
            raise Unsupported("the costed graph's storages change with the shape")
        for n, d in first.nodes(data=True):
            e = g.nodes[n]
            if d["kind"] == "op" and (any(d[k] != e[k] for k in keys)
                                      or (d["cost"] is None) != (e["cost"] is None)):
                raise Unsupported(f"op {n} is traced or costed differently between shapes")


# -- the full graph's numbers, carried to every shape -----------------------------------------

_TREES = (Value, TensorSpec, list, tuple, dict)


def _with_spec(v: Value, spec: TensorSpec) -> Value:
    """dataclasses.replace(v, spec=spec), without its per-call introspection (a hot loop)."""
    new = object.__new__(Value)
    new.__dict__.update(v.__dict__, spec=spec)
    return new


class _Carry:
    """A copy of `full` (the costed full graph at the first shape) with every byte count and
    tensor size carried to every shape from the costed two-block graphs `costed` (same nodes
    as `full`'s templates)."""

    def __init__(self, full: CostedGraph, full_storages: set[int], costed: list[CostedGraph],
                 storages: set[int]) -> None:
        self.full, self.costed, self.specs = full, costed, {}
        self.template = {n: d[TEMPLATE] for n, d in full.nodes(data=True)}
        self.storage = self._storage_map(full_storages, storages)

    def _storage_map(self, full_storages: set[int], storages: set[int]) -> dict[int, int]:
        """full graph storage -> two-block graph storage: by the nodes' outputs, and the ones
        annotate creates (autocast copies, tensors kernels save) by owner and order."""
        full, two = self.full, self.costed[0]
        owner, their_owner = full.graph["storage_owner"], two.graph["storage_owner"]
        mapping: dict[int, int] = {}
        for n, d in full.nodes(data=True):
            template = self.template[n]
            theirs = two.nodes[template]["storages"]
            if len(theirs) != len(d["storages"]):
                raise Unsupported(f"node {n} does not match its template")
            for a, b in zip(d["storages"], theirs):
                if a is not None and owner[a] == n:  # the storages the node makes
                    if their_owner.get(b) != template or mapping.setdefault(a, b) != b:
                        raise Unsupported(f"storage {a} does not match its template's")
        made: dict[str, list[int]] = defaultdict(list)
        for sid in sorted(set(two.graph["storage_bytes"]) - storages):
            made[two.graph["storage_owner"][sid]].append(sid)
        mine: dict[str, list[int]] = defaultdict(list)
        for sid in sorted(set(full.graph["storage_bytes"]) - full_storages):
            mine[full.graph["storage_owner"][sid]].append(sid)
        for maker, sids in mine.items():
            theirs = made.get(self.template[maker], [])
            if len(theirs) != len(sids):
                raise Unsupported(f"op {maker} creates storages unlike its template")
            mapping.update(zip(sids, theirs))
        if set(full.graph["storage_bytes"]) - set(mapping):
            raise Unsupported("a storage without a template")
        return mapping

    @staticmethod
    def check(mine: Any, theirs: Any) -> None:
        if theirs != mine:
            raise Unsupported(f"the first shape's graphs disagree ({mine} vs {theirs})")

    def number(self, mine: int, theirs: tuple[int, ...]) -> int:
        """A byte count, encoded."""
        self.check(mine, theirs[0])
        return encode(theirs)

    def spec(self, mine: TensorSpec | None, theirs: Callable[[], list]) -> Any:
        """`mine` carried; `theirs()`: the same tensor at every shape."""
        if mine is None:
            return None
        carried = self.specs.get(id(mine))
        if carried is None:
            specs = theirs()
            if any(s is None or len(s.shape) != len(mine.shape) or s.dtype != mine.dtype
                   for s in specs):
                raise Unsupported("a tensor does not match its template")
            self.check(mine.shape, specs[0].shape)
            carried = self.specs[id(mine)] = carried_spec([mine, *specs[1:]])
        return carried

    def tree(self, mine: Any, theirs: list[Any]) -> Any:
        """An argument tree with its Values' specs carried."""
        if isinstance(mine, Value):
            spec = self.spec(mine.spec, lambda: [v.spec for v in theirs])
            return mine if spec is mine.spec else _with_spec(mine, spec)
        if isinstance(mine, TensorSpec):
            return self.spec(mine, lambda: theirs)
        if isinstance(mine, (list, tuple)):
            new = [self.tree(x, list(others)) if isinstance(x, _TREES) else x
                   for x, *others in zip(mine, *theirs)]
            return mine if all(a is b for a, b in zip(new, mine)) else type(mine)(new)
        if isinstance(mine, dict):
            return {k: self.tree(x, [t[k] for t in theirs]) for k, x in mine.items()}
        return mine

    def run(self) -> CostedGraph:
        """A new costed graph: `full` with its numbers carried to every shape."""
        full, costed = self.full, self.costed
        graph = dict(full.graph)
        for key in ("storage_bytes", "saved_storages"):
            graph[key] = {
                sid: self.number(n, tuple(g.graph[key].get(self.storage[sid], 0)
                                          for g in costed))
                for sid, n in full.graph[key].items()}
        graph["outputs"] = self.tree(full.graph.get("outputs", []),
                                     [g.graph.get("outputs", []) for g in costed])
        views = [g.nodes for g in costed]
        nodes = {}
        for n, mine in full.nodes(data=True):
            d = nodes[n] = dict(mine)
            template = self.template[n]
            theirs = [view[template] for view in views]
            d["outputs"] = self.tree(d["outputs"], [t["outputs"] for t in theirs])
            if d["kind"] != "op":
                continue
            d["args"] = self.tree(d["args"], [t["args"] for t in theirs])
            d["kwargs"] = self.tree(d["kwargs"], [t["kwargs"] for t in theirs])
            if d["cost"] is not None:
                costs = [t["cost"] for t in theirs]
                forward = self.number(d["cost"].forward_workspace_bytes,
                                      tuple(c.forward_workspace_bytes for c in costs))
                backward = self.number(d["cost"].backward_workspace_bytes,
                                       tuple(c.backward_workspace_bytes for c in costs))
                if (forward, backward) != (d["cost"].forward_workspace_bytes,
                                           d["cost"].backward_workspace_bytes):
                    d["cost"] = replace(d["cost"], forward_workspace_bytes=forward,
                                        backward_workspace_bytes=backward)
        return full.with_attributes(nodes, graph)


# -- all together -----------------------------------------------------------------------------

Loader = Callable[[int, int, bool], tuple]


def _load(load: Loader, shape: Shape, training: bool) -> tuple:
    try:
        return load(*shape, training)
    except Exception as exc:  # a loader may refuse the marker shape
        raise Unsupported(f"loading at {shape}: {exc}") from exc


def _trace(module: nn.Module, inputs: Any, **options: Any) -> Trace:
    """The export at the marker shape. Its nodes' source lines are never reported, so torch
    is spared recording a stack trace per node (a fifth of the export's time)."""
    config = torch.fx.config
    emit = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        return trace(module, inputs, **options)
    except Exception as exc:  # the marker shape may be one the model refuses
        raise Unsupported(f"export at the marker shape: {exc}") from exc
    finally:
        config.do_not_emit_stack_traces = emit


def step_events(load: Loader, shapes: Sequence[Shape], *, training: bool,
                config: TrainingConfig, device: Device, autocast: torch.dtype | None,
                seq_limit: int | None) -> dict[Shape, np.ndarray]:
    """{shape: bytes alive after each event} of a training step (`config`) or of inference,
    at every shape in `shapes`, (batch, seq) each. The walk's decisions are taken at the first
    shape and checked to agree at the others. `seq_limit`: the longest context, below which
    the marker length is picked; None when the length is not varied."""
    first = _load(load, shapes[0], training)
    mark = marker(first[0], seq_limit)
    marked = _load(load, (mark[0], mark[1] if mark[1] is not None else shapes[0][1]), training)
    rewrites = [Rewrite(mark, s) for s in shapes]
    check_same_model(first, marked, rewrites[0])
    tr = _trace(*marked, autocast=autocast, kernels=device.kind)
    graphs = [graph_at(tr, r) for r in rewrites]
    full = expand_blocks(graphs[0], tr.blocks) if tr.blocks is not None else graphs[0]
    if full is None:  # as analyze does: the two blocks did not repeat cleanly
        tr = _trace(*marked, autocast=autocast, reuse_blocks=False, kernels=device.kind)
        graphs = [graph_at(tr, r) for r in rewrites]
        full = graphs[0]
    full_storages = set(full.graph["storage_bytes"])
    analysis = summarize(annotate(full, device=device))
    with warnings.catch_warnings():  # the full graph's annotate has named unsupported ops
        warnings.simplefilter("ignore")
        costed = [annotate(g, device=device) for g in graphs]
    check_same_structure(costed)
    carried = _Carry(analysis.graph, full_storages, costed,
                     set(graphs[0].graph["storage_bytes"])).run()
    analysis = replace(analysis, graph=carried)
    if training:
        totals = [e.total_bytes for e in training_timeline(analysis, config).events]
    else:
        totals = list(inference_memory(analysis).event_bytes)
    values = np.array([t.values if isinstance(t, Sampled) else decode(t, len(shapes))
                       for t in totals], dtype=np.float64).reshape(len(totals), len(shapes))
    return {s: values[:, k].copy() for k, s in enumerate(shapes)}
