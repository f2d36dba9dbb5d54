"""Activation-checkpointing policies: which regions of the forward are checkpointed, and inside
them which op outputs are kept, resolved on the costed graph.

A policy becomes a `Plan`: a tuple of `Region`s, each a contiguous run of forward ops that
torch.utils.checkpoint(use_reentrant=False) would wrap. Inside a region autograd keeps nothing
but the region's inputs (and, with a selective checkpoint context, the outputs of the ops in
`Region.save`); the backward recomputes the region's forward when it first needs one of its
saved tensors. How that plays out in memory is the scheduler's job (passes/memory/).

Built-in policies (`parse_policy` names):

    none           nothing is checkpointed
    full           every block of the model's main stack (the children of its longest
                   ModuleList/Sequential of identical modules) is a region
    every-K        blocks 0, K, 2K, ... are regions (torchtitan's per-layer "every K-th layer")
    sqrt           segments of ceil(sqrt(L)) consecutive blocks are regions (Chen et al. 2016)
    selective      the attention core of every block is a region (Megatron-LM's selective
                   recompute): a fused scaled_dot_product_attention op, or the chain
                   scores matmul -> scale/mask -> softmax -> dropout -> matmul with V
    save-matmuls   every block is a region that keeps the outputs of its compute-heavy ops
                   (linear, matmul, bmm, attention, convolution) and recomputes the rest
                   (torch.utils.checkpoint's selective checkpoint contexts)
    per-block:OPT,OPT,...
                   one of none, full, selective, save-matmuls per block of the main stack
                   ("per-block:full*4,none*28": OPT*N repeats); what `optimize` returns
    modules:PAT[,PAT...][+save:OP[,OP...]]
                   every call of a module whose path matches one of the fnmatch patterns is a
                   region ("modules:layers.*.attention,layers.*.feed_forward"); with +save the
                   outputs of those ops are kept ("+save:linear,scaled_dot_product_attention")

    model          the checkpoint regions of the model's own forward (torch.utils.checkpoint
                   called in it: trace/checkpoints.py); what "none" means for such a model

A model that checkpoints inside its own forward is costed with its own regions, whatever the
policy: those are what will run. A policy on top of them is a ConfigError (graphcost does not
compose two checkpointing schemes); remove the model's checkpoint calls to compare policies.

`apply_policy` (graphcost.checkpoint_apply) applies the same policies to a real module.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import networkx as nx

from graphcost.errors import ConfigError
from graphcost.graph.costed import CostedGraph, main_blocks_of

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("args", "checkpoint", "kind", "module_calls", "module_path", "op", "order")

BUILTIN_POLICIES = ("none", "full", "every-2", "sqrt", "selective", "save-matmuls")
BLOCK_OPTIONS = ("none", "selective", "save-matmuls", "full")  # what per-block mixes
# Ops whose outputs save-matmuls keeps: the ones whose recomputation costs FLOPs.
MATMUL_OPS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d",
    "conv3d", "convolution", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"})
_SOFTMAX = ("softmax", "_softmax", "log_softmax", "_log_softmax")
_SHAPE_OPS = ("view", "reshape", "_unsafe_view", "expand", "transpose", "permute", "t",
              "contiguous", "clone", "unsqueeze", "squeeze", "flatten", "alias", "detach")
_POINTWISE_BETWEEN = ("mul", "div", "add", "sub", "masked_fill", "where", "_to_copy", "to",
                      "dropout", "native_dropout", "type_as", "exp", "neg", "tanh")


def short_op(op: str) -> str:
    """'aten.linear.default' -> 'linear'."""
    parts = op.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


@dataclass(frozen=True)
class Policy:
    """A parsed policy spec (see the module docstring)."""

    kind: str  # none | full | every | sqrt | selective | save-matmuls | modules | per-block
    every: int = 1
    per_block: tuple[str, ...] = ()  # per-block: the option of each block
    patterns: tuple[str, ...] = ()
    save_ops: frozenset[str] = frozenset()
    spec: str = "none"

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Region:
    """A checkpointed run of forward ops: ops[start : stop + 1] of the graph's op order."""

    name: str  # the module path(s) it covers
    start: int
    stop: int
    save: frozenset[str] = frozenset()  # op nodes whose outputs are kept (not recomputed)
    save_ops: frozenset[str] = frozenset()  # the ops of those nodes ("aten.linear.default")
    modules: tuple[str, ...] = ()  # the module calls it wraps (none: an attention core)
    within: str = ""  # an attention core: the module whose forward runs it
    # the recomputation stops once every saved tensor is back (non-reentrant's default); a
    # reentrant checkpoint, or early_stop=False, re-runs the whole region
    early_stop: bool = True
    reentrant: bool = False  # use_reentrant=True: its backward holds the recomputed outputs


@dataclass(frozen=True)
class Plan:
    policy: Policy
    regions: tuple[Region, ...]
    blocks: tuple[str, ...] = ()  # the main stack's block paths, when the policy uses them


def parse_policy(spec: str | Policy | None) -> Policy:
    """'every-4' -> Policy(kind='every', every=4, ...); raises ConfigError on anything unknown."""
    if isinstance(spec, Policy):
        return spec
    text = (spec or "none").strip()
    if text in ("none", "full", "sqrt", "selective", "save-matmuls", "model"):
        return Policy(kind=text, spec=text)
    m = re.fullmatch(r"every-(\d+)", text)
    if m:
        k = int(m.group(1))
        if k < 1:
            raise ConfigError(f"checkpoint policy {text!r}: K must be at least 1")
        return Policy(kind="every", every=k, spec=text)
    if text.startswith("per-block:"):
        options: list[str] = []
        for item in text[len("per-block:"):].split(","):
            name, _, count = item.strip().partition("*")
            if name not in BLOCK_OPTIONS or (count and not count.isdigit()):
                raise ConfigError(f"checkpoint policy {text!r}: {item.strip()!r} is not "
                                  f"OPTION or OPTION*N with OPTION one of "
                                  f"{', '.join(BLOCK_OPTIONS)}")
            options += [name] * (int(count) if count else 1)
        return Policy(kind="per-block", per_block=tuple(options), spec=per_block_spec(options))
    if text.startswith("modules:"):
        body, _, save = text[len("modules:"):].partition("+save:")
        patterns = tuple(p.strip() for p in body.split(",") if p.strip())
        save_ops = frozenset(s.strip() for s in save.split(",") if s.strip())
        if not patterns:
            raise ConfigError(f"checkpoint policy {text!r} names no module pattern; write "
                              "e.g. modules:layers.*.attention")
        return Policy(kind="modules", patterns=patterns, save_ops=save_ops, spec=text)
    raise ConfigError(
        f"unknown checkpoint policy {text!r}; choose one of none, full, every-K (e.g. every-2), "
        "sqrt, selective, save-matmuls, model, or modules:PATTERN[,PATTERN][+save:OP[,OP]] "
        "(e.g. modules:layers.*.feed_forward)")


def per_block_spec(options) -> str:
    """('full', 'full', 'none') -> 'per-block:full*2,none'."""
    parts: list[str] = []
    for option in options:
        if parts and parts[-1][0] == option:
            parts[-1][1] += 1
        else:
            parts.append([option, 1])
    return "per-block:" + ",".join(o if n == 1 else f"{o}*{n}" for o, n in parts)


def plan(g: CostedGraph, policy: str | Policy | None) -> Plan:
    """Resolve `policy` on a costed graph into the regions it checkpoints."""
    policy = parse_policy(policy)
    ops = g.op_order
    own = model_regions(g, ops)
    if own:
        if policy.kind not in ("none", "model"):
            raise ConfigError(
                f"checkpoint policy {policy.spec!r}: the model already checkpoints "
                f"{len(own)} region(s) in its own forward (torch.utils.checkpoint, e.g. "
                f"{own[0].name}); graphcost costs those and does not put a second policy on "
                "top. Use --checkpoint none (or model) for the model as written, or remove its "
                "checkpoint calls to compare policies")
        return Plan(Policy(kind="model", spec="model"), own)
    if policy.kind == "model":
        raise ConfigError("checkpoint policy 'model': the model calls no torch.utils.checkpoint "
                          "in its forward; choose another policy")
    if policy.kind == "none":
        return Plan(policy, ())
    if policy.kind == "modules":
        calls = g.module_calls
        chosen = [c for c in calls if any(fnmatch.fnmatchcase(c, p) for p in policy.patterns)]
        if not chosen:
            raise ConfigError(f"checkpoint policy {policy.spec!r}: no module call matches; "
                              f"module paths look like {', '.join(list(calls)[:4])}")
        # the outermost matching calls: a region inside another region is part of it
        outer = [c for c in chosen if not any(c != o and c.startswith(o + ".") for o in chosen)]
        regions = [_call_region(c, calls[c], ops, g, policy.save_ops) for c in outer]
        return Plan(policy, tuple(sorted(regions, key=lambda r: r.start)))
    blocks = list(g.main_blocks)
    if policy.kind == "selective":
        regions = attention_cores(g, ops)
        if not regions:
            raise ConfigError("checkpoint policy 'selective': the model has no attention "
                              "(no scaled_dot_product_attention, no softmax between matmuls)")
        return Plan(policy, tuple(regions), tuple(blocks))
    if not blocks:
        raise ConfigError(f"checkpoint policy {policy.spec!r} checkpoints blocks, but the "
                          "model has no stack of identical blocks (a ModuleList/Sequential); "
                          "use modules:PATTERN to name the modules to checkpoint")
    calls = g.module_calls
    if policy.kind == "full":
        regions = [_call_region(b, calls[b], ops, g) for b in blocks]
    elif policy.kind == "every":
        regions = [_call_region(b, calls[b], ops, g) for i, b in enumerate(blocks)
                   if i % policy.every == 0]
    elif policy.kind == "sqrt":
        size = math.ceil(math.sqrt(len(blocks)))
        regions = []
        for i in range(0, len(blocks), size):
            segment = blocks[i:i + size]
            first, last = calls[segment[0]], calls[segment[-1]]
            regions.append(Region(name=f"{segment[0]}..{segment[-1]}" if len(segment) > 1
                                  else segment[0], start=first[0], stop=last[1],
                                  modules=tuple(segment)))
    elif policy.kind == "save-matmuls":
        regions = [_call_region(b, calls[b], ops, g, MATMUL_OPS) for b in blocks]
    elif policy.kind == "per-block":
        if len(policy.per_block) != len(blocks):
            raise ConfigError(f"checkpoint policy {policy.spec!r} gives {len(policy.per_block)} "
                              f"options; the model has {len(blocks)} blocks")
        cores = attention_cores(g, ops) if "selective" in policy.per_block else []
        regions = []
        for b, option in zip(blocks, policy.per_block):
            if option == "full":
                regions.append(_call_region(b, calls[b], ops, g))
            elif option == "save-matmuls":
                regions.append(_call_region(b, calls[b], ops, g, MATMUL_OPS))
            elif option == "selective":
                first, last = calls[b]
                regions += [r for r in cores if first <= r.start and r.stop <= last]
    else:  # pragma: no cover - parse_policy admits nothing else
        raise ConfigError(f"unknown checkpoint policy {policy.spec!r}")
    return Plan(policy, tuple(regions), tuple(blocks))


def model_regions(g: CostedGraph, ops: tuple[str, ...] | list[str]) -> list[Region]:
    """The checkpoint regions of the model's own forward (graph attribute `checkpoint`, written
    from trace/checkpoints.py), in order: each a contiguous run of ops with the same tag."""
    regions: list[Region] = []
    current = None
    for i, n in enumerate(ops):
        tag = g.nodes[n].get("checkpoint")
        if tag is None:
            current = None
            continue
        if current is not None and current[0].region == tag.region:
            current[2] = i
            continue
        current = [tag, i, i]
        regions.append(current)
    out = []
    for tag, start, stop in regions:
        calls = [c for c in g.nodes[ops[start]].get("module_calls", ())
                 if all(c in g.nodes[ops[k]].get("module_calls", ()) for k in (start, stop))]
        where = calls[-1] if calls else g.nodes[ops[start]]["module_path"] or "<root>"
        out.append(Region(name=f"{where} (the model's checkpoint)", start=start, stop=stop,
                          modules=(calls[-1],) if calls else (),
                          early_stop=tag.early_stop and not tag.reentrant,
                          reentrant=tag.reentrant))
    return out


def segment_size(n_blocks: int) -> int:
    """Blocks per segment of the sqrt policy."""
    return math.ceil(math.sqrt(n_blocks))


def module_calls(g: CostedGraph, ops: list[str] | None = None) -> dict[str, list[int]]:
    """{module call path: [first op index, last op index]} in order of first op: the costed
    graph's `module_calls` (of other `ops` than its op order: computed for them)."""
    if ops is None or tuple(ops) == g.op_order:
        return {c: list(span) for c, span in g.module_calls.items()}
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(ops):
        for c in g.nodes[n].get("module_calls", ()):
            span = spans.setdefault(c, [i, i])
            span[1] = i
    return spans


def _call_region(name: str, span: list[int], ops: list[str], g: nx.DiGraph,
                 save_ops: frozenset[str] = frozenset()) -> Region:
    save = frozenset(n for n in ops[span[0]:span[1] + 1]
                     if short_op(g.nodes[n]["op"]) in save_ops or g.nodes[n]["op"] in save_ops)
    return Region(name=name, start=span[0], stop=span[1], save=save,
                  save_ops=frozenset(g.nodes[n]["op"] for n in save), modules=(name,))


def main_blocks(g: CostedGraph, ops: list[str] | None = None) -> list[str]:
    """Paths of the blocks of the model's main stack: the costed graph's `main_blocks` (of other
    `ops` than its op order: computed for them)."""
    if ops is None or tuple(ops) == g.op_order:
        return list(g.main_blocks)
    return main_blocks_of(g, ops)


def attention_cores(g: nx.DiGraph, ops: list[str]) -> list[Region]:
    """The attention core of every attention: a fused SDPA op, or scores matmul -> softmax ->
    matmul with V with the pointwise and shape ops between and the shape ops feeding the two
    matmuls."""
    index = {n: i for i, n in enumerate(ops)}
    regions = []
    for i, n in enumerate(ops):
        name = short_op(g.nodes[n]["op"])
        if "scaled_dot_product" in name:
            regions.append(Region(name=f"{g.nodes[n]['module_path']} (attention core)",
                                  start=i, stop=i, within=g.nodes[n]["module_path"]))
        elif name in _SOFTMAX:
            first = _walk(g, n, up=True)
            last = _walk(g, n, up=False)
            if first is None or last is None:
                continue
            members = {first, last} | _shape_feeders(g, first) | _shape_feeders(g, last)
            start = min(index[m] for m in members if m in index)
            regions.append(Region(name=f"{g.nodes[n]['module_path']} (attention core)",
                                  start=start, stop=index[last],
                                  within=g.nodes[n]["module_path"]))
    return _disjoint(regions)


def _is_matmul(g: nx.DiGraph, n: str) -> bool:
    return short_op(g.nodes[n]["op"]) in ("matmul", "bmm", "mm", "baddbmm", "einsum")


def _walk(g: nx.DiGraph, n: str, up: bool) -> str | None:
    """From a softmax, follow its first input up (its output down) through pointwise and shape
    ops to the nearest matmul."""
    seen = 0
    while seen < 32:
        seen += 1
        nxt = [m for m in (g.predecessors(n) if up else g.successors(n))
               if g.nodes[m]["kind"] == "op"]
        if up:  # the op's first tensor input
            args = g.nodes[n]["args"]
            first = next((a.node for a in (args if isinstance(args, (list, tuple)) else [])
                          if hasattr(a, "node")), None)
            nxt = [first] if first in g and g.nodes[first]["kind"] == "op" else []
        if not nxt:
            return None
        n = min(nxt, key=lambda m: g.nodes[m]["order"])
        if _is_matmul(g, n):
            return n
        if short_op(g.nodes[n]["op"]) not in _POINTWISE_BETWEEN + _SHAPE_OPS:
            return None
    return None


def _shape_feeders(g: nx.DiGraph, n: str) -> set[str]:
    """Shape ops (views, expands, copies for a matmul) that feed op `n`, transitively."""
    out, todo = set(), [n]
    while todo:
        m = todo.pop()
        for p in g.predecessors(m):
            if g.nodes[p]["kind"] == "op" and short_op(g.nodes[p]["op"]) in _SHAPE_OPS \
                    and p not in out:
                out.add(p)
                todo.append(p)
    return out


def _disjoint(regions: list[Region]) -> list[Region]:
    regions = sorted(regions, key=lambda r: r.start)
    for a, b in zip(regions, regions[1:]):
        if b.start <= a.stop:
            raise ConfigError(f"checkpoint regions {a.name} and {b.name} overlap")
    return regions

