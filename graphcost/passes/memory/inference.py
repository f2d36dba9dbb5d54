"""Inference memory: a forward pass without autograd, plus the KV cache.

The KV cache per token is derived from the traced graph, not from a formula: for every
scaled_dot_product_attention, the key and value operands are followed back through views and
copies (transpose, reshape, expand, repeat_kv, contiguous) to the smallest tensor on that chain —
the projection (after rotary embedding) before grouped-query heads were expanded, which is what a
cache stores. MHA, GQA and MQA need no special case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from graphcost.analysis.analyze import Analysis
from graphcost.rules.registry import Value, values_in

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "kind", "made_in_forward", "module_path", "op", "outputs", "storage_bytes",
         "storages")

SHAPE_ONLY = {"view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze", "transpose",
              "permute", "contiguous", "clone", "repeat_interleave", "flatten", "unflatten",
              "expand_as", "alias", "detach"}


@dataclass(frozen=True)
class InferenceMemory:
    """Peak of a prefill of the traced batch x sequence, with the cache holding that context."""

    weight_bytes: int  # parameters and buffers
    kv_cache_bytes: int
    kv_cache_bytes_per_token: int  # per token of one sequence, all layers, K and V
    activation_peak_bytes: int  # inputs and activations alive at the forward's peak
    peak_bytes: int
    peak_op: str
    peak_module: str
    event_bytes: tuple[int, ...] = ()  # weights + cache + live after each forward op


def cache_source(g: nx.DiGraph, v: Value) -> Value:
    """The smallest tensor on the chain of views/copies that produced `v`."""
    best = v
    while g.nodes[v.node]["kind"] == "op" and \
            g.nodes[v.node]["op"].split(".")[1] in SHAPE_ONLY:
        inputs = values_in(g.nodes[v.node]["args"])
        if not inputs:
            break
        v = inputs[0]
        if v.spec.numel < best.spec.numel:
            best = v
    return best


def kv_cache_bytes_per_token(analysis: Analysis) -> int:
    """Bytes a KV cache holds per token of one sequence (0 for a model without attention)."""
    g = analysis.graph
    total = 0
    for n in g.op_order:
        d = g.nodes[n]
        if not d["op"].startswith("aten.scaled_dot_product_attention"):
            continue
        key, value = d["args"][1], d["args"][2]
        tokens = math.prod(key.shape[:-3]) * key.shape[-2]  # batch x key length
        for v in (key, value):
            total += cache_source(g, v).spec.nbytes // tokens
    return total


def inference_memory(analysis: Analysis) -> InferenceMemory:
    """Walk the forward without autograd: outputs freed after their last reader, nothing saved."""
    g = analysis.graph
    nbytes = g.graph["storage_bytes"]
    find = g.storage_root

    ops = g.op_order
    last_read = {sid: ops[i] for sid, i in g.last_reads.items()}
    outputs = {find(v.storage) for v in g.graph.get("outputs", [])}
    weights = {d["storages"][0] for _, d in g.nodes(data=True) if d["kind"] in ("param", "buffer")}
    inputs = {d["storages"][0] for _, d in g.nodes(data=True)
              if d["kind"] in ("input", "constant") and not d.get("made_in_forward")}
    weight_bytes = sum(nbytes[s] for s in weights)
    live = {s: nbytes[s] for s in inputs}
    peak, peak_at = sum(live.values()), ""
    per_token = kv_cache_bytes_per_token(analysis)
    cache = per_token * _tokens(g)
    events = []
    frees: dict[str, list[int]] = {}
    for sid, n in last_read.items():
        frees.setdefault(n, []).append(sid)
    for n in ops:
        made = g.new_outputs[n]  # no autograd: nothing is saved
        for s in made:
            live[s] = nbytes[s]
        alive = sum(live.values())
        events.append(weight_bytes + cache + alive)
        if alive > peak:
            peak, peak_at = alive, n
        for s in frees.get(n, []) + [s for s in made if s not in last_read]:
            if s not in outputs and s not in weights and s not in inputs:
                live.pop(s, None)
    where = g.nodes[peak_at] if peak_at else {"op": "", "module_path": ""}
    return InferenceMemory(weight_bytes=weight_bytes, kv_cache_bytes=cache,
                           kv_cache_bytes_per_token=per_token, activation_peak_bytes=peak,
                           peak_bytes=weight_bytes + cache + peak, peak_op=where["op"],
                           peak_module=where["module_path"], event_bytes=tuple(events))


def _tokens(g: nx.DiGraph) -> int:
    """Batch x key length of the first attention (the context the cache holds); 0 without one."""
    for n in g.op_order:
        d = g.nodes[n]
        if d["op"].startswith("aten.scaled_dot_product_attention"):
            key = d["args"][1]
            return math.prod(key.shape[:-3]) * key.shape[-2]
    return 0
