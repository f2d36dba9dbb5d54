"""The graph's attributes are declared once (graphcost/graph/schema.py) and every pass states what
it reads (a module-level READS); the costed graph's cached facts are what a fresh computation of
them gives, and a costed graph cannot be changed."""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import networkx as nx
import pytest

from graphcost.graph.costed import CostedGraph, FrozenGraphError, main_blocks_of, op_order_of
from graphcost.graph.liveness import last_reads
from graphcost.graph.schema import GRAPH_ATTRIBUTES, NODE_ATTRIBUTES, WRITTEN_BY
from graphcost.rules.registry import values_in

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "graphcost"
# The readers: every pass, what reports and sizes, and the graph's own derived facts. The stages
# that write the attributes (graph/build.py, graph/expand.py) and the CLI are not scanned.
SCANNED = ["passes", "report", "sizing", "analysis", "graph/costed.py", "graph/facts.py",
           "graph/liveness.py"]
MUST_DECLARE = ("passes", "sizing")  # every module there has a READS, even an empty one
DECLARED = NODE_ATTRIBUTES | GRAPH_ATTRIBUTES
# What node data is called where it is read: g.nodes[n], self.nd[n], or a name bound to it.
NODE_DATA = re.compile(r"((^|\.)nodes|^(self\.)?(f\.)?nd)\[[^\]]+\]$|^(d|data|e|t|where|node_data)$")
GRAPH_DATA = re.compile(r"(^|\.)graph$")


def _modules() -> dict[str, Path]:
    found = {}
    for entry in SCANNED:
        paths = [PACKAGE / entry] if entry.endswith(".py") else sorted((PACKAGE / entry).rglob("*.py"))
        for path in paths:
            if path.name != "__init__.py":
                parts = path.relative_to(ROOT).with_suffix("").parts
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def attribute_reads(source: str) -> set[str]:
    """The attribute names a module reads by string literal: `d["x"]`, `g.nodes[n]["x"]`,
    `g.graph["x"]` and `.get("x")` on those; and any literal subscript with a declared
    attribute's name, whatever the dict is called."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and \
                isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            receiver, key = node.value, node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr == "get" and node.args and \
                isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            receiver, key = node.func.value, node.args[0].value
        else:
            continue
        text = ast.unparse(receiver)
        if NODE_DATA.search(text) or GRAPH_DATA.search(text) or key in DECLARED:
            found.add(key)
    return found


def test_the_scan_finds_node_and_graph_reads():
    source = '''
for n, d in g.nodes(data=True):
    d["kind"], d.get("module_calls"), g.nodes[n]["op"], self.nd[n]["saved"], g.graph["device"]
    g.graph.get("outputs"), rows[0]["forward_flops"], d["not_declared"]
    ok = config["seq"], n.meta["val"]
'''
    assert attribute_reads(source) == {"kind", "module_calls", "op", "saved", "device", "outputs",
                                      "forward_flops", "not_declared"}


def test_every_attribute_says_which_stage_writes_it():
    assert set(WRITTEN_BY) == DECLARED
    assert {WRITTEN_BY[k] for k in ("kind", "args", "module_calls", "storage_owner")} == \
        {"build_graph"}
    assert {WRITTEN_BY[k] for k in ("cost", "saved", "runs_backward", "storage_alias")} == \
        {"annotate"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_reads_are_declared_and_complete(module):
    """READS names declared attributes only, and exactly those the module's source reads."""
    path = MODULES[module]
    reads = attribute_reads(path.read_text())
    declared = getattr(importlib.import_module(module), "READS", None)
    if declared is None:
        assert not reads and path.relative_to(PACKAGE).parts[0] not in MUST_DECLARE, \
            f"{module} reads {sorted(reads)} and has no READS"
        return
    assert set(declared) <= DECLARED, f"not in graphcost/graph/schema.py: " \
        f"{sorted(set(declared) - DECLARED)}"
    assert set(declared) == reads, (f"{module}: READS lacks {sorted(reads - set(declared))}, "
                                    f"lists unread {sorted(set(declared) - reads)}")


# -- the costed graph ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[("gpt2", "n_layer"), ("llama3-8b", "n_layers")])
def costed(request):
    """A small zoo model with four blocks: analyze expands them from a two-block trace."""
    from graphcost.models import SMALL_OVERRIDES, load

    import graphcost

    name, layers = request.param
    shape = {**SMALL_OVERRIDES[name], layers: 4}
    return graphcost.analyze(*load(name, batch=2, seq=32, with_targets=True, **shape)).graph


def _fresh_new_storages(g, n, with_saved):
    owner, alias, d = g.graph["storage_owner"], g.graph.get("storage_alias", {}), g.nodes[n]
    made = [s for s in d["storages"] if s is not None and owner.get(s) == n and s not in alias]
    if with_saved:
        made += [s for s in d["saved"] if owner.get(s) == n and s not in d["storages"]]
    return tuple(dict.fromkeys(made))


def test_cached_facts_are_a_fresh_computation(costed):
    g = costed
    assert isinstance(g, CostedGraph) and g.is_frozen
    ops = sorted((n for n, d in g.nodes(data=True) if d["kind"] == "op"),
                 key=lambda n: g.nodes[n]["order"])
    assert g.op_order == tuple(ops) == op_order_of(g)
    assert g.op_index == {n: i for i, n in enumerate(ops)}
    assert g.op_inputs == {n: tuple(values_in((g.nodes[n]["args"],
                                                list(g.nodes[n]["kwargs"].values()))))
                           for n in ops}
    alias = g.graph["storage_alias"]

    def root(sid):
        while sid in alias:
            sid = alias[sid]
        return sid

    assert all(g.storage_root(s) == root(s) for s in g.graph["storage_bytes"])
    assert g.new_storages == {n: _fresh_new_storages(g, n, True) for n in ops}
    assert g.new_outputs == {n: _fresh_new_storages(g, n, False) for n in ops}
    assert g.last_reads == last_reads(g, ops, root)
    spans = defaultdict(list)
    for i, n in enumerate(ops):
        for c in g.nodes[n]["module_calls"]:
            spans[c].append(i)
    assert g.module_calls == {c: (s[0], s[-1]) for c, s in spans.items()}
    assert list(g.main_blocks) == main_blocks_of(g, ops) != []
    # cached: the same object every time
    assert g.walk_facts is g.walk_facts and g.op_inputs is g.op_inputs
    assert g.walk_facts.ops == ops
    stack = g.block_stack  # the expanded stack, block by block
    assert [(stack.lo[b], stack.hi[b]) for b in range(stack.count)] == \
        [g.module_calls[b] for b in g.main_blocks]


def test_a_costed_graph_cannot_be_changed(costed):
    g = costed
    n = g.op_order[0]
    with pytest.raises(nx.NetworkXError):
        g.add_node("x")
    with pytest.raises(nx.NetworkXError):
        g.remove_edge(*next(iter(g.edges)))
    for change in (lambda: g.nodes[n].__setitem__("forward_flops", 0),
                   lambda: g.nodes[n].update(forward_flops=0),
                   lambda: g.nodes[n].pop("forward_flops"),
                   lambda: g.graph.__setitem__("storage_bytes", {}),
                   lambda: g.graph["storage_bytes"].__setitem__(0, 1),
                   lambda: g.graph["storage_alias"].clear()):
        with pytest.raises(FrozenGraphError):
            change()


def test_a_copy_is_a_new_mutable_graph(costed):
    copy = CostedGraph.of(costed)
    n = costed.op_order[0]
    copy.nodes[n]["forward_flops"] = -1
    assert costed.nodes[n]["forward_flops"] != -1
    with pytest.raises(FrozenGraphError):
        copy.op_order  # facts are read once the graph is frozen
    copy.freeze()
    assert copy.op_order == costed.op_order
    other = costed.with_attributes({n: {**d, "forward_flops": -1} if d["kind"] == "op" else d
                                    for n, d in costed.nodes(data=True)}, dict(costed.graph))
    assert other.is_frozen and other.op_order == costed.op_order
    assert list(other.edges) == list(costed.edges)
    assert costed.nodes[n]["forward_flops"] != -1 == other.nodes[n]["forward_flops"]


def test_a_pass_fact_is_derived_once_per_graph_and_arguments(costed):
    """CostedGraph.derived: what a pass derives from the graph (the parallel pass's stages) is
    computed once per graph and arguments, on the graph (no global memo holds the graph)."""
    import gc
    import weakref

    calls = []

    def ops_in_stage(g, pp):
        calls.append(pp)
        return len(g.op_order) // pp

    assert costed.derived(ops_in_stage, 2) == costed.derived(ops_in_stage, 2) \
        == len(costed.op_order) // 2
    assert costed.derived(ops_in_stage, 4) == len(costed.op_order) // 4
    assert calls == [2, 4]
    copy = CostedGraph.of(costed)
    with pytest.raises(FrozenGraphError):
        copy.derived(ops_in_stage, 2)  # facts are read once the graph is frozen
    copy.freeze()
    copy.derived(ops_in_stage, 2)
    assert calls == [2, 4, 2]  # a new graph, a new computation
    ref = weakref.ref(copy)
    del copy
    gc.collect()
    assert ref() is None  # nothing outside the graph keeps it


def test_the_parallel_pass_keeps_its_facts_on_the_graph(costed):
    from graphcost.passes.parallel.plan import op_stages, stage_of_params, tensor_split

    assert tensor_split(costed) is tensor_split(costed)
    assert op_stages(costed, 2) is op_stages(costed, 2)
    assert stage_of_params(costed, 2) is stage_of_params(costed, 2)
    assert set(op_stages(costed, 2).values()) == {0, 1}
