"""The training-step timeline of a deep stack of identical blocks, derived from walks of the same
model with a few blocks: the same events as walking all of them, in a fraction of the time.

Why: the walk (passes/memory/) spends ~15 µs of Python per event, and a step of a 126-block
model has ~50k of them; the checkpoint search walks several policies, fit and the plan search
several shapes.

How. analyze() builds the full graph by copying block 1 of a two-block trace (graphcost.blocks)
and keeps that trace (`BlockTemplate`), so the model with any number of blocks can be built and
costed the same way. The checkpoint plan of the full model is cut into pieces along the stack:
literal blocks (the first, the last, and any unlike their neighbours) and runs of c identical
units (a unit: the blocks a pattern of regions repeats over; one block for full, selective,
save-matmuls or modules:..., K for every-K, a segment for sqrt). Walk A has every run cut to one
unit; walk B_r has run r at two units. The bytes alive at an event are a sum over storages, and
one more unit of a run adds the same bytes to an event wherever it sits, as long as it stays on
the same side of the event's block (its parameters, the tensors it keeps, its gradients once its
backward ran). So, per event and category:

    an event outside run r gains     d_r = B_r - A               per extra unit of run r,
    an event in unit u of run r has  A + u * b_r + (c_r - 1 - u) * a_r   (+ the other runs' d),

where a_r = B_r(its first unit) - A is one unit after the event and b_r = B_r(its second
unit) - A one unit before it. The walks must line up (the same ops in the same order, run r's
events doubled in B_r) or the whole graph is walked instead; tests/passes/test_stack.py checks
the derived timelines against full walks, event for event, on every zoo family and policy.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

import numpy as np

from graphcost.analysis.template import BlockTemplate
from graphcost.graph.costed import CostedGraph
from graphcost.graph.facts import BlockStack
from graphcost.passes.checkpoint.policy import Plan, Region, plan
from graphcost.passes.memory.training import EventTable, MemoryTimeline, TrainingConfig
from graphcost.passes.memory.walk import Walk

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("block_template",)

MAX_RUNS = 4  # each run costs one more short walk (a sorted mix of the 4 options: 4)
MAX_PERIOD = 4  # units of up to this many atoms (every-K alternates full and none blocks)
MAX_WALKED_SHARE = 0.6  # derive only when the short walks add up to at most this share of L


@dataclass(frozen=True)
class _Piece:
    first: int  # first block of the full stack
    unit: int  # blocks per unit
    count: int  # units (a literal piece: 1)
    run: bool


def derived_timeline(g: CostedGraph, config: TrainingConfig) -> MemoryTimeline | None:
    """The timeline of `config` on `g` from walks of shortened stacks; None when `g` has no
    block template, the plan does not repeat along the stack, deriving would save little, or
    the short walks do not line up."""
    template = g.graph.get("block_template")
    if template is None:
        return None
    full = g.block_stack
    if full is None:
        return None
    full_plan = plan(g, config.checkpoint)
    pieces = _layout(full, full_plan)
    if pieces is None:
        return None
    runs = [i for i, p in enumerate(pieces) if p.run]
    walks = [_short_walk(template, full, full_plan, pieces, config, doubled)
             for doubled in [None] + runs]
    if any(w is None for w in walks):
        return None
    return _derive(g, full, full_plan, pieces, config, walks[0], dict(zip(runs, walks[1:])))


def _layout(full: BlockStack, checkpoint_plan: Plan) -> list[_Piece] | None:
    """The pieces of the stack under the plan, the cheapest to walk (None: not worth it)."""
    atoms = _atoms(full, checkpoint_plan)
    if atoms is None or len(atoms) < 3:
        return None
    best, best_cost = None, MAX_WALKED_SHARE * full.count
    for period in range(1, MAX_PERIOD + 1):
        pieces = _compress(atoms, period)
        runs = [p for p in pieces if p.run]
        if not runs or len(runs) > MAX_RUNS:
            continue
        short = sum(p.unit if p.run else p.unit * p.count for p in pieces)
        cost = (len(runs) + 1) * short + sum(p.unit for p in runs)
        if cost <= best_cost:
            best, best_cost = pieces, cost
    return best


def _atoms(full: BlockStack, checkpoint_plan: Plan) -> list[tuple[int, int, tuple]] | None:
    """(first block, blocks, signature) of each atom: a block, or the blocks one region spans.
    The signature is the atom's regions relative to its first op. None: a region reaches from
    the stack out of it."""
    index = full.index
    first_of: dict[int, int] = {}  # first block -> last block of a multi-block region
    regions_at: dict[int, list[Region]] = {}
    for r in checkpoint_plan.regions:
        if r.stop < full.lo[0] or r.start > full.hi[-1]:
            continue  # before or after the stack
        a = bisect.bisect_right(full.lo, r.start) - 1
        b = bisect.bisect_right(full.lo, r.stop) - 1
        if a < 0 or r.stop > full.hi[-1]:
            return None
        regions_at.setdefault(a, []).append(r)
        first_of[a] = max(first_of.get(a, a), b)
    atoms, i = [], 0
    while i < full.count:
        j = first_of.get(i, i)
        k = i
        while k < j:  # a region starting inside the atom may reach further
            k += 1
            j = max(j, first_of.get(k, k))
        base = full.lo[i]
        sig = tuple((r.start - base, r.stop - base,
                     tuple(sorted(index[n] - base for n in r.save)), tuple(sorted(r.save_ops)),
                     r.early_stop, r.reentrant)
                    for b in range(i, j + 1) for r in regions_at.get(b, ()))
        atoms.append((i, j - i + 1, sig))
        i = j + 1
    return atoms


def _compress(atoms: list[tuple[int, int, tuple]], period: int) -> list[_Piece]:
    """The first and last atoms as they are; the others in units of `period` atoms, runs of at
    least three equal units becoming runs."""
    pieces = [_Piece(atoms[0][0], atoms[0][1], 1, False)]
    middle = atoms[1:-1]
    units = [middle[i:i + period] for i in range(0, len(middle), period)]
    k = 0
    while k < len(units):
        key = tuple((n, s) for _, n, s in units[k])
        same = k + 1
        while same < len(units) and len(units[same]) == period and \
                tuple((n, s) for _, n, s in units[same]) == key:
            same += 1
        size = sum(n for _, n, _ in units[k])
        if same - k >= 3 and len(units[k]) == period:
            pieces.append(_Piece(units[k][0][0], size, same - k, True))
        else:
            pieces += [_Piece(f, n, 1, False) for u in units[k:same] for f, n, _ in u]
        k = same
    pieces.append(_Piece(atoms[-1][0], atoms[-1][1], 1, False))
    return pieces


@dataclass
class _ShortWalk:
    timeline: MemoryTimeline
    stack: BlockStack
    where: dict[str, tuple[int, int]]
    blocks: list[tuple[int, int, int]]  # per short block: (full block, piece, unit)
    label: np.ndarray  # per event: piece * 2 + unit, or -1 outside the stack


def _short_blocks(pieces: list[_Piece], doubled: int | None) -> list[tuple[int, int, int]]:
    out = []
    for p, piece in enumerate(pieces):
        for u in range(2 if p == doubled else 1):
            out += [(piece.first + u * piece.unit + b, p, u) for b in range(piece.unit)]
    return out


def _short_walk(template: BlockTemplate, full: BlockStack, full_plan: Plan, pieces: list[_Piece],
                config: TrainingConfig, doubled: int | None) -> _ShortWalk | None:
    blocks = _short_blocks(pieces, doubled)
    g = template.shortened(len(blocks))
    if g is None:
        return None
    stack = BlockStack(g, template.blocks.path, len(blocks))
    per_block = full.hi[0] - full.lo[0] + 1
    if not stack.ok or len(full.ops) - len(stack.ops) != per_block * (full.count - len(blocks)):
        return None
    timeline = Walk(g, config, _transplant(full_plan, full, stack, blocks)).run()
    where = stack.positions()
    piece_of = [p * 2 + u for _, p, u in blocks]
    label = np.array([piece_of[where[n][0]] if n in where else -1
                      for n in timeline.table.node])
    return _ShortWalk(timeline, stack, where, blocks, label)


def _transplant(full_plan: Plan, full: BlockStack, short: BlockStack,
                blocks: list[tuple[int, int, int]]) -> Plan:
    """The full plan's regions on the short graph: those of the blocks it has, same offsets."""
    shift = len(short.ops) - len(full.ops)
    short_of = {f: k for k, (f, _, _) in enumerate(blocks)}
    regions = []
    for r in full_plan.regions:
        if r.stop < full.lo[0]:
            regions.append(r)
        elif r.start > full.hi[-1]:
            regions.append(replace(r, start=r.start + shift, stop=r.stop + shift,
                                   save=frozenset(r.save)))
        else:
            f = bisect.bisect_right(full.lo, r.start) - 1
            if f not in short_of:
                continue
            move = short.lo[short_of[f]] - full.lo[f]
            regions.append(replace(r, start=r.start + move, stop=r.stop + move,
                                   save=frozenset(short.ops[full.index[n] + move]
                                                  for n in r.save)))
    return Plan(full_plan.policy, tuple(regions), ())


def _segments(label: np.ndarray) -> list[tuple[int, int, int]]:
    """(label, start, end) of each maximal run of equal labels."""
    cuts = np.flatnonzero(np.diff(label)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [len(label)]])
    return [(int(label[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _align(a: _ShortWalk, b: _ShortWalk, run_piece: int) -> list | None:
    """For each segment of A, where it is in B_r: one segment, or run r's unit twice (then
    (first unit's start, second unit's start, ascending?)). None: they do not line up."""
    ta, tb = a.timeline.table, b.timeline.table
    sb = _segments(b.label)
    out, j = [], 0
    for lab, s, e in _segments(a.label):
        n = e - s
        if lab >= 0 and lab // 2 == run_piece:
            if j + 1 >= len(sb):
                return None
            (l1, s1, e1), (l2, s2, e2) = sb[j], sb[j + 1]
            if {l1, l2} != {lab, lab + 1} or e1 - s1 != n or e2 - s2 != n:
                return None
            firsts = (s1, s2) if l1 == lab else (s2, s1)
            if any(tb.op[x:x + n] != ta.op[s:e] for x in firsts):
                return None
            out.append((firsts[0], firsts[1], l1 == lab))
            j += 2
        else:
            if j >= len(sb) or sb[j][0] != lab or sb[j][2] - sb[j][1] != n or \
                    tb.op[sb[j][1]:sb[j][2]] != ta.op[s:e]:
                return None
            out.append(sb[j][1])
            j += 1
    return out if j == len(sb) else None


def _derive(g: CostedGraph, full: BlockStack, full_plan: Plan, pieces: list[_Piece],
            config: TrainingConfig, a: _ShortWalk, b: dict[int, _ShortWalk]) -> MemoryTimeline | None:
    aligned = {}
    for p, walk in b.items():
        aligned[p] = _align(a, walk, p)
        if aligned[p] is None:
            return None
    ta = a.timeline.table
    columns: list[list] = [[] for _ in range(6)]  # bytes, step, phase, node, op, module path

    def emit(values, s, e, names, paths):
        columns[0].append(values)
        columns[1].append(ta.step[s:e])
        columns[2].append(ta.phase[s:e])
        columns[3] += names
        columns[4] += ta.op[s:e]
        columns[5] += paths

    prefix = a.stack.path + "."

    def template(s, e):
        """A's events s..e: per event its full block in A's terms, offset and module path
        after the block's own ("layers.3" + ".attention.wq"), or None outside the stack."""
        out = []
        for i in range(s, e):
            pos = a.where.get(ta.node[i])
            if pos is None:
                out.append(None)
                continue
            k, off = pos
            head = f"{prefix}{k}"
            path = ta.module_path[i]
            rest = path[len(head):] if path == head or path.startswith(head + ".") else None
            out.append((a.blocks[k][0], off, rest))
        return out

    def mapped(s, events, shift):
        """Node names and module paths of A's events s.. in the full graph, `shift` blocks on."""
        names, paths = [], []
        for i, t in enumerate(events, s):
            if t is None:
                names.append(ta.node[i])
                paths.append(ta.module_path[i])
                continue
            f, off, rest = t
            f += shift
            names.append(full.ops[full.lo[f] + off] if off >= 0 else full.params[f][-1 - off])
            paths.append(ta.module_path[i] if rest is None else f"{prefix}{f}{rest}")
        return names, paths

    bytes_a = ta.category_bytes
    for idx, (lab, s, e) in enumerate(_segments(a.label)):
        base = bytes_a[s:e]
        extra = np.zeros_like(base)
        piece = lab // 2 if lab >= 0 else None
        for p, walk in b.items():
            if p != piece:
                at = aligned[p][idx]
                extra += (pieces[p].count - 1) * (walk.timeline.table.category_bytes[at:at + e - s]
                                                  - base)
        if piece is not None and pieces[piece].run:
            first, second, ascending = aligned[piece][idx]
            tb = b[piece].timeline.table.category_bytes
            after, before = tb[first:first + e - s] - base, tb[second:second + e - s] - base
            c = pieces[piece].count
            events = template(s, e)
            for u in (range(c) if ascending else range(c - 1, -1, -1)):
                names, paths = mapped(s, events, u * pieces[piece].unit)
                emit(base + u * before + (c - 1 - u) * after + extra, s, e, names, paths)
        else:
            names, paths = mapped(s, template(s, e), 0)
            emit(base + extra, s, e, names, paths)
    table = EventTable(np.concatenate(columns[0]), np.concatenate(columns[1]),
                       np.concatenate(columns[2]), columns[3], columns[4], columns[5])

    def linear(attr: str) -> int:
        value = getattr(a.timeline, attr)
        return value + sum((pieces[p].count - 1) * (getattr(w.timeline, attr) - value)
                           for p, w in b.items())

    return MemoryTimeline(
        config, table, a.timeline.optimizer_impl, plan=full_plan,
        recompute_flops=linear("recompute_flops"), recompute_bytes=linear("recompute_bytes"),
        recomputed_ops=_recomputed(a, full, pieces),
        saved_activation_bytes=linear("saved_activation_bytes"),
        kept=lambda: Walk(g, config, full_plan).kept(),
        block_kept_bytes=_block_kept(a, full, pieces))


def _units(a: _ShortWalk, pieces: list[_Piece], k: int) -> list[int]:
    """The full blocks that short block `k` of A stands for."""
    f, p, _ = a.blocks[k]
    piece = pieces[p]
    return [f + u * piece.unit for u in range(piece.count)] if piece.run else [f]


def _recomputed(a: _ShortWalk, full: BlockStack, pieces: list[_Piece]) -> tuple[str, ...]:
    out = []
    for n in a.timeline.recomputed_ops:
        pos = a.where.get(n)
        if pos is None:
            out.append(n)
        else:
            out += [full.node(f, pos[1]) for f in _units(a, pieces, pos[0])]
    return tuple(out)


def _block_kept(a: _ShortWalk, full: BlockStack, pieces: list[_Piece]) -> tuple[int, ...]:
    """kept_bytes_by_block of the full stack, from A's: a unit's for every unit of its run."""
    n = len(a.blocks)
    block_of = {m: -1 if i < a.stack.lo[0] else n for i, m in enumerate(a.stack.ops)}
    block_of.update((m, k) for m, (k, off) in a.where.items() if off >= 0)
    short = a.timeline.kept_bytes_by_block(block_of, n)
    out = [0] * (full.count + 1)
    for k in range(n):
        for f in _units(a, pieces, k):
            out[f] += short[k]
    out[full.count] = short[n]
    return tuple(out)


__all__ = ["derived_timeline"]
