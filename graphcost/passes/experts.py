"""Mixture-of-experts layers found in the graph: experts per layer, top-k, and the parameters a
token activates.

A layer is a module whose parameters include `experts.<i>.` children (Mixtral's
`feed_forward.experts.0.w1.weight`, ...); its top-k is the k of the `topk` its router runs
inside the same module. Active parameters per token are every parameter outside the experts
plus k of each layer's E experts. FLOPs need no correction: the traced layer already does the
work of k experts per token (graphcost.models.moe: balanced routing).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from graphcost.analysis.analyze import Analysis

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "backward_flops", "forward_flops", "kind", "module_calls", "module_path", "names",
         "op", "outputs")

EXPERT_INDEX = re.compile(r"^(.*)\.experts\.(\d+)\.")


@dataclass(frozen=True)
class ExpertLayer:
    path: str  # "layers.3.feed_forward"
    n_experts: int
    top_k: int
    params_per_expert: int
    forward_flops_per_expert: int  # one expert's share of a step's forward (balanced routing)
    backward_flops_per_expert: int


@dataclass(frozen=True)
class MoESummary:
    layers: tuple[ExpertLayer, ...]
    total_params: int
    active_params: int  # per token

    @property
    def expert_params(self) -> int:
        return sum(x.n_experts * x.params_per_expert for x in self.layers)

    def as_dict(self) -> dict:
        first = self.layers[0]
        return {"moe_layers": len(self.layers), "experts_per_layer": first.n_experts,
                "top_k": first.top_k, "total_params": self.total_params,
                "active_params": self.active_params, "expert_params": self.expert_params,
                "params_per_expert": first.params_per_expert,
                "forward_flops_per_expert": first.forward_flops_per_expert,
                "backward_flops_per_expert": first.backward_flops_per_expert}


def moe_summary(analysis: Analysis) -> MoESummary | None:
    """None for a model without experts."""
    g = analysis.graph
    per_expert: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for _, d in g.nodes(data=True):
        if d["kind"] == "param":
            m = EXPERT_INDEX.match(d["names"][0])
            if m:
                per_expert[m.group(1)][int(m.group(2))] += d["outputs"][0].numel
    if not per_expert:
        return None
    top_k: dict[str, int] = {}
    flops: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for n in g.op_order:
        d = g.nodes[n]
        for path in per_expert:
            calls = d.get("module_calls", ())
            if path in calls and d["op"].startswith("aten.topk"):
                top_k[path] = int(d["args"][1])
            if d["module_path"].startswith(path + ".experts.0"):
                flops[path][0] += d["forward_flops"]
                flops[path][1] += d["backward_flops"]
    layers = []
    for path, experts in per_expert.items():
        sizes = set(experts.values())
        layers.append(ExpertLayer(path, len(experts), top_k.get(path, len(experts)), max(sizes),
                                  flops[path][0], flops[path][1]))
    inactive = sum(x.params_per_expert * (x.n_experts - x.top_k) for x in layers)
    return MoESummary(tuple(layers), analysis.params, analysis.params - inactive)
