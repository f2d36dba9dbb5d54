"""Mixture-of-experts layers found in the graph: experts per layer, top-k, and the parameters a
token activates.

A layer is a module whose parameters include `experts.<i>.` children (Mixtral's
`feed_forward.experts.0.w1.weight`, ...), or an `experts` child whose parameters stack one slice
per expert (transformers' Mixtral: `mlp.experts.gate_up_proj`, E x 2I x D, with E the last dim of
the router scores its `topk` picks from); its top-k is the k of that `topk`, run inside the same
module. Active parameters per token are every parameter outside the experts
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


def _routers(g) -> dict[str, tuple[int, int]]:
    """{module call: (experts, k)} of every `topk` over the last dim of router scores: the
    experts are the scores' last dim, in each module call the topk runs inside."""
    out: dict[str, tuple[int, int]] = {}
    for n in g.op_order:
        d = g.nodes[n]
        if d["op"].startswith("aten.topk"):
            args = d["args"]
            dim = args[2] if len(args) > 2 else -1
            scores = args[0]
            if dim in (-1, len(scores.shape) - 1):
                for call in d.get("module_calls", ()):
                    out.setdefault(call, (scores.shape[-1], int(args[1])))
    return out


def moe_summary(analysis: Analysis) -> MoESummary | None:
    """None for a model without experts."""
    g = analysis.graph
    routers = _routers(g)
    per_expert: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    fused: set[str] = set()  # layers whose experts are stacked in tensors (transformers' Mixtral)
    for _, d in g.nodes(data=True):
        if d["kind"] != "param":
            continue
        name = d["names"][0]
        m = EXPERT_INDEX.match(name)
        if m:
            per_expert[m.group(1)][int(m.group(2))] += d["outputs"][0].numel
            continue
        path, _, leaf = name.rpartition(".experts.")
        shape = d["outputs"][0].shape
        if path and "." not in leaf and path in routers and shape and \
                shape[0] == routers[path][0]:
            for i in range(shape[0]):  # one slice of the stacked weight per expert
                per_expert[path][i] += d["outputs"][0].numel // shape[0]
            fused.add(path)
    if not per_expert:
        return None
    top_k = {path: routers[path][1] for path in per_expert if path in routers}
    flops: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for n in g.op_order:
        d = g.nodes[n]
        for path in per_expert:
            if path in fused:  # all experts run in one module: balanced, a 1/E share each
                if d["module_path"].startswith(path + ".experts"):
                    flops[path][0] += d["forward_flops"] / len(per_expert[path])
                    flops[path][1] += d["backward_flops"] / len(per_expert[path])
            elif d["module_path"].startswith(path + ".experts.0"):
                flops[path][0] += d["forward_flops"]
                flops[path][1] += d["backward_flops"]
    layers = []
    for path, experts in per_expert.items():
        sizes = set(experts.values())
        layers.append(ExpertLayer(path, len(experts), top_k.get(path, len(experts)), max(sizes),
                                  round(flops[path][0]), round(flops[path][1])))
    inactive = sum(x.params_per_expert * (x.n_experts - x.top_k) for x in layers)
    return MoESummary(tuple(layers), analysis.params, analysis.params - inactive)
