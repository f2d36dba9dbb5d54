"""The memory timeline of training steps, walked over the costed graph in execution order.

Eager PyTorch semantics, event by event (an event is one op of the forward, the backward of one
op, or the update of one parameter):

- forward: an op's new outputs (and the tensors its kernel creates to save) are allocated; an
  output is freed after its last reader unless autograd saved it for backward;
- backward, autograd's engine node by node in reverse forward order: a node holds its incoming
  gradient, its saved tensors, its rule's `backward_workspace_bytes` and the gradients it
  returns (a new tensor of each differentiable input's size, or a view of the incoming
  gradient for views, same-shape add and sum); then the incoming gradient and the saved
  tensors no other node needs are released, and each returned gradient goes to its value's
  input buffer. A second gradient for a value is summed out of place (`old + new`: under a
  dispatch mode, where the measurement runs, isTensorSubclassLike is true and InputBuffer never
  adds in place). A parameter's AccumulateGrad runs when its last contribution arrives: the
  first gradient becomes `.grad`, a later one is added to it in place. A tensor output's loss
  is its sum, a scalar whose gradient is expanded (no memory);
- optimizer: PyTorch's default implementation, single-tensor on the CPU (foreach on CUDA, where
  `_foreach_sqrt` holds a temporary for every parameter at once; fused: none): Adam/AdamW create
  exp_avg, exp_avg_sq (param dtype) and a 0-dim fp32 `step` per trainable parameter in the first
  step, then per parameter `(exp_avg_sq.sqrt() / c).add_(eps)` holds two parameter-sized
  temporaries while the previous parameter's `denom` is still referenced; SGD with momentum
  clones the gradient into its buffer; plain SGD allocates nothing.

The reported peak is the maximum over the first `steps` steps (the optimizer state appears in
the first one), as a real run's would be. Memory a kernel allocates and frees inside one op is
the rule's `forward_workspace_bytes` / `backward_workspace_bytes` (pow's backward, rms_norm's
composite); where a rule leaves them 0 it is not modelled, nor is the allocator's rounding or
caching. A forward value is freed when eager Python lets go of it: after its last reader, or
later while a Python local or argument still holds it (graph/liveness.py, trace/lifetimes.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from graphcost.graph.costed import CostedGraph
from graphcost.graph.liveness import last_reads
from graphcost.passes.checkpoint.policy import Plan, Region, plan
from graphcost.passes.memory.autograd import NOT_DIFFERENTIABLE, grad_passes_through
from graphcost.passes.memory.training import (
    PHASES,
    STEP_TENSOR_BYTES,
    EventTable,
    KeptTensors,
    MemoryTimeline,
    TrainingConfig,
)
from graphcost.trace.autocast import cast_dtype, cast_inputs

# the graph attributes it reads (graphcost/graph/schema.py)
READS = ("autocast", "bytes_read", "bytes_written", "device", "forward_flops", "names", "outputs",
         "requires_grad", "runs_backward", "saved", "storages", "target")


LINEAR = torch.ops.aten.linear.default


class _Live:
    """Storages alive now, by category."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.where: dict[object, tuple[str, int]] = {}

    def add(self, key: object, nbytes: int, category: str) -> None:
        if key not in self.where:
            self.where[key] = (category, nbytes)
            self.bytes[category] += nbytes

    def drop(self, key: object) -> None:
        if key in self.where:
            category, nbytes = self.where.pop(key)
            self.bytes[category] -= nbytes

    def move(self, key: object, category: str) -> None:
        if key in self.where and self.where[key][0] != category:
            nbytes = self.where[key][1]
            self.drop(key)
            self.add(key, nbytes, category)


class Walk:
    def __init__(self, g: CostedGraph, config: TrainingConfig,
                 checkpoint_plan: Plan | None = None) -> None:
        self.g, self.config = g, config
        self.f = f = g.walk_facts  # what every walk of g shares (graphcost/graph/facts.py)
        find, nbytes, outputs = f.find, f.nbytes, f.graph_outputs
        self.plan = checkpoint_plan or plan(g, config.checkpoint)
        self.regions = [self._region(i, r) for i, r in enumerate(self.plan.regions)]
        self.region_of = {n: r for r in self.regions for n in r.ops}
        # holders of each storage through the backward: the ops outside checkpointed regions
        # that save it, and the regions that keep it (their inputs, their policy's outputs)
        self.savers: dict[int, int] = defaultdict(int)
        self.holders: dict[int, list[str]] = defaultdict(list)  # storage -> ops that keep it
        for n in f.backward_ops:
            if n not in self.region_of:
                for sid in f.nd[n]["saved"]:
                    self.savers[sid] += 1
                    self.holders[sid].append(n)
        for r in self.regions:
            for sid in (r.inputs | r.cache) if r.trigger else ():
                self.savers[sid] += 1
                self.holders[sid].append(r.ops[0])
        self.saved_activation_bytes = sum(nbytes[sid] for sid in self.savers
                                          if sid not in f.persistent)
        self.grad_output_roots = {find(v.storage) for v in outputs if v.requires_grad}
        self.scalar_roots = {find(v.storage) for v in outputs if v.requires_grad
                             and not v.spec.shape}
        self.rows: list[tuple] = []  # see EventTable.from_rows
        self.live = _Live()

    # -- events -------------------------------------------------------------------------------

    def sample(self, step: int, phase: str, node: str, where: str | None = None,
               op: str | None = None) -> None:
        b = self.live.bytes
        label = self.f.labels.get(node)  # an op's
        if label is not None:
            op, where = op or label[0], label[1]
        else:  # the optimizer's update of one parameter (or of all: foreach, fused)
            op = op or f"{self.config.optimizer} update"
            where = where or self.f.nd[node]["names"][0]
        self.rows.append((step, _PHASE_INDEX[phase], node, op, where, b["params"], b["grads"],
                          b["optimizer_state"], b["activations"], b["transient"]))

    def run(self) -> MemoryTimeline:
        f = self.f
        for sid, category in f.persistent.items():
            self.live.add(sid, f.nbytes[sid], category)
        state_created = False
        for step in range(self.config.steps):
            if self.config.set_to_none:
                for sid, _ in f.params:
                    self.live.drop(("grad", sid))
            for _ in range(self.config.grad_accumulation):
                self.forward(step)
                self.backward(step)
            self.optimizer(step, create_state=not state_created)
            state_created = True
        return MemoryTimeline(self.config, EventTable.from_rows(self.rows), self.optimizer_impl,
                              plan=self.plan,
                              recompute_flops=sum(r.recompute_flops for r in self.regions),
                              recompute_bytes=sum(r.recompute_bytes for r in self.regions),
                              recomputed_ops=tuple(n for r in self.regions for n in r.rerun),
                              saved_activation_bytes=self.saved_activation_bytes,
                              kept=self.kept())

    def kept(self) -> KeptTensors:
        """What the forward keeps for backward, and who keeps it: known before walking."""
        f = self.f
        kept = {sid: f.nbytes[sid] for sid in self.savers if sid not in f.persistent}
        return KeptTensors(kept, {sid: tuple(self.holders[sid]) for sid in kept})

    def _region(self, index: int, region: Region) -> _Region:
        """What a checkpointed region holds and recomputes (torch.utils.checkpoint, non-reentrant,
        with early stop: the recomputation ends at the last op that saves a tensor)."""
        f = self.f
        ops = f.ops[region.start:region.stop + 1]
        made = {sid for n in ops for sid in f.new[n]}
        packs = [i for i, n in enumerate(ops) if f.nd[n]["saved"] and
                 f.nd[n]["requires_grad"]]
        running = [n for n in ops if f.nd[n]["saved"] and f.nd[n]["runs_backward"]]
        inputs = frozenset(sid for n in ops for sid in f.reads[n]
                           if sid not in made and sid not in f.persistent)
        keep: dict[int, int] = defaultdict(int)
        for n in running:
            for sid in f.nd[n]["saved"]:
                if sid not in f.persistent and sid not in inputs:
                    keep[sid] += 1
        recompute, partial = [], None
        if packs and running and not region.early_stop:  # the whole function runs again
            recompute = list(ops)
        elif packs and running:
            # The recomputation stops as soon as the last tensor is saved again. Autograd saves
            # an op's inputs (and the copies of them its kernel makes) before the kernel runs,
            # its outputs after: a last op that saves no output of its own is not run again,
            # only the copies it saves are made.
            last = ops[packs[-1]]
            recompute = ops[:packs[-1] + 1]
            if not set(f.nd[last]["storages"]) & f.nd[last]["saved"]:
                partial = last
        rerun = [n for n in recompute if n not in region.save and n != partial]
        held = frozenset()
        if region.reentrant:
            after = f.ops[region.stop + 1:]
            held = frozenset(sid for sid in made if sid not in f.persistent and
                             (sid in f.outputs or any(sid in f.reads[m] for m in after)))
        return _Region(
            index=index, region=region, ops=ops, recompute=recompute, partial=partial,
            rerun=rerun,
            trigger=running[-1] if running else None, frame_end=running[0] if running else None,
            inputs=inputs,
            cache=frozenset(sid for n in ops if n in region.save for sid in self._outputs(n)),
            keep=dict(keep),
            recompute_flops=sum(f.nd[n]["forward_flops"] for n in rerun),
            recompute_bytes=sum(f.nd[n]["bytes_read"] + f.nd[n]["bytes_written"]
                                for n in rerun),
            held=held)

    @property
    def optimizer_impl(self) -> str:
        impl = self.config.optimizer_impl
        if impl == "auto":  # PyTorch's default: foreach needs a CUDA (or XPU...) device
            impl = "foreach" if self.g.graph["device"].kind == "cuda" else "single-tensor"
        return impl

    def forward(self, step: int) -> None:
        f = self.f
        saved = set(self.savers)
        for n in f.ops:
            for sid in f.new[n]:
                self.live.add(sid, f.nbytes[sid], "activations" if sid in saved
                              else "transient")
            self.live.add("workspace", f.workspace[n][0], "transient")
            self.sample(step, "forward", n)
            self.live.drop("workspace")
            for sid in f.frees_after.get(n, []) + [s for s in f.new[n]
                                                      if s not in self._read_later(n, s)]:
                if sid not in saved and sid not in f.outputs and sid not in f.persistent:
                    self.live.drop(sid)
        summed = [v for v in f.graph_outputs if v.requires_grad and v.spec.shape]
        for v in summed:  # a tensor output: the loss is its sum, a scalar of its dtype
            self.live.add(("loss", v.node, v.index), v.spec.dtype.itemsize, "transient")
        if summed:  # taken while the outputs are alive
            self.sample(step, "forward", summed[-1].node, op="sum (the loss)")
        for sid in list(self.live.where):
            if sid in f.outputs and sid not in self.scalar_roots and sid not in saved:
                self.live.drop(sid)  # the model's output, once the loss is taken from it

    def _read_later(self, n: str, sid: int) -> set[int]:
        # An output nobody reads or holds is dead right after its op; the others are freed by
        # `frees_after` at their last reader or when Python lets go of them (g.last_reads has
        # every storage read or held).
        return {sid} if sid in self.g.last_reads else set()

    def backward(self, step: int) -> None:
        """Autograd's engine, node by node in reverse forward order (see module docstring)."""
        f = self.f
        self.remaining: dict[object, int] = dict(self.savers)
        self.consumed: dict[int, set[int]] = defaultdict(set)  # region -> cached outputs used
        self.buffer: dict[tuple[str, int], object] = {}  # value -> the gradient buffer it has
        self.refs: dict[object, int] = defaultdict(int)  # buffer -> values holding it
        self.pending = dict(f.param_consumers)  # param node -> contributions still to come
        roots = []
        for v in f.graph_outputs:
            if v.requires_grad:  # d loss / d loss = 1 (ones_like), expanded for a sum's input
                roots.append(self._new_buffer(v.spec.dtype.itemsize))
                self._hold((v.node, v.index), roots[-1])
                self.refs[roots[-1]] += 1  # torch.autograd.backward holds it until it returns
        for n in f.backward_ops:
            self._backward_node(step, n)
        for bid in roots:
            self.refs[bid] -= 1
            if self.refs[bid] == 0:
                self.live.drop(bid)
        for key in list(self.buffer):
            self._release(key)  # gradients of inputs that never reached a producer
        for sid in self.scalar_roots:
            self.live.drop(sid)  # the loss
        for v in f.graph_outputs:
            self.live.drop(("loss", v.node, v.index))

    def value_dtype_size(self, key: tuple[str, int]) -> int:
        return self.f.nd[key[0]]["outputs"][key[1]].dtype.itemsize

    def _new_buffer(self, nbytes: int) -> object:
        bid = ("gradbuf", len(self.refs), object())
        self.refs[bid] = 0
        self.live.add(bid, nbytes, "transient")
        return bid

    def _hold(self, key: tuple[str, int], bid: object) -> None:
        self.buffer[key] = bid
        self.refs[bid] += 1

    def _release(self, key: tuple[str, int]) -> None:
        bid = self.buffer.pop(key, None)
        if bid is not None:
            self.refs[bid] -= 1
            if self.refs[bid] == 0:
                self.live.drop(bid)

    def _backward_node(self, step: int, n: str) -> None:
        f = self.f
        d = f.nd[n]
        region = self.region_of.get(n)
        if region is not None and n == region.trigger:
            self._recompute(step, region)
        outs = [(n, i) for i in range(len(d["outputs"])) if (n, i) in self.buffer]
        # What the node's function returns, one gradient per input that needs one: a view of
        # its incoming gradient (views, same-shape add/sub) or a new tensor of the input's size.
        contributions: list[tuple[tuple[str, int], int, object | None]] = []
        seen = set()
        target = d.get("target")
        no_gradient = NOT_DIFFERENTIABLE.get(target, ())
        for position, v in enumerate(f.inputs_of[n]):
            key = (v.node, v.index)
            if not v.requires_grad or key in seen or position in no_gradient:
                continue
            seen.add(key)
            through = grad_passes_through(d, v, f.find)
            if through and len(outs) == 1:
                contributions.append((key, 0, self.buffer[outs[0]]))
            else:
                contributions.append((key, v.spec.nbytes, None))
        # Under autocast the op's backward makes its gradients in the dtype it ran in; the cast
        # back to the input's dtype comes after (ToCopyBackward).
        run_dtype = cast_dtype(target, self.g.graph.get("autocast"))
        casts = {(v.node, v.index) for v in cast_inputs(tuple(f.inputs_of[n]), run_dtype)}
        new = sum(nbytes // self.value_dtype_size(key) * run_dtype.itemsize if key in casts
                  else nbytes for key, nbytes, _ in contributions)
        self.live.add("temporary", f.workspace[n][1] + new, "transient")
        self.sample(step, "backward", n)
        self.live.drop("temporary")
        made = [(key, alias if alias is not None else self._new_buffer(nbytes))
                for key, nbytes, alias in contributions]
        for _, bid in made:
            self.refs[bid] += 1  # held by the function's result until delivered
        for key in outs:
            self._release(key)  # the incoming gradient, unless a result is a view of it
        for sid in d["saved"]:
            self._release_saved(region, sid)
        if region is not None and n == region.frame_end:
            self._end_region(region)
        if target is LINEAR:  # at::linear is addmm(bias, input, weight.t()): the bias's
            # gradient is delivered first, the weight's last (it comes through t())
            position = {(v.node, v.index): p for p, v in enumerate(f.inputs_of[n])}
            order = {2: 0, 0: 1, 1: 2}  # bias, input, weight
            made.sort(key=lambda kb: order[min(position.get(kb[0], 0), 2)])
        for key, bid in made:
            self._deliver(step, n, key, bid)

    def _outputs(self, n: str) -> list[int]:
        """The new storages of op `n` its kernel returns: its outputs, and the tensors it makes
        to save that are not copies of an input (flash attention's logsumexp, not matmul's
        contiguous copies of its operands). A selective checkpoint caches these."""
        f = self.f
        d = f.nd[n]
        inputs = {v.spec.nbytes for v in f.inputs_of[n]}
        return [sid for sid in f.new[n] if sid not in f.persistent and
                (sid in d["storages"] or f.nbytes[sid] not in inputs)]

    def _release_saved(self, region: _Region | None, sid: int) -> None:
        """One holder of a saved tensor is done with it (its op's backward ran)."""
        f = self.f
        if region is None or sid in region.cache:
            key: object = sid
        elif sid in f.persistent or sid in region.inputs:
            return  # the region's recomputation saved the tensor that was already there
        else:
            key = ("recomputed", region.index, sid)
        self.remaining[key] -= 1
        if self.remaining[key] == 0 and key not in f.persistent:
            self.live.drop(key)

    def _end_region(self, region: _Region) -> None:
        """The region's last saved tensor was used: its checkpoint frame, which held its inputs
        and the outputs its policy kept, is freed."""
        for sid in sorted(region.inputs | (region.cache - self.consumed[region.index])):
            self.remaining[sid] -= 1
            if self.remaining[sid] == 0 and sid not in self.f.persistent:
                self.live.drop(sid)
        for sid in sorted(region.held):  # a reentrant checkpoint's recomputed outputs
            key = ("recomputed", region.index, sid)
            if key in self.remaining:
                self.remaining[key] -= 1
                if self.remaining[key] == 0:
                    self.live.drop(key)

    def _recompute(self, step: int, region: _Region) -> None:
        """The region's forward again, up to its last saving op: new outputs are allocated
        (the outputs its policy kept are taken from the cache), those its ops save stay for
        the backward, the rest are freed after their last use."""
        f = self.f
        ops = region.recompute
        key = (ops[0], ops[-1], len(ops)) if ops else ()
        if key not in f.recompute_frees:
            last = last_reads(self.g, ops, f.find)
            frees: dict[int, list[int]] = defaultdict(list)
            for sid, i in last.items():
                frees[i].append(sid)
            f.recompute_frees[key] = (last, frees)
        last, frees = f.recompute_frees[key]
        local: dict[int, object] = {}  # storage -> its key, for those the recomputation made
        for i, m in enumerate(ops):
            made = f.new[m]
            if m == region.partial:  # stopped before the kernel: only the copies it saves
                made = [s for s in made if s not in f.nd[m]["storages"]]
            for sid in made:
                if sid in f.persistent:
                    continue
                if sid in region.cache:  # the cached output is handed back
                    key: object = sid
                    self.remaining[sid] += region.keep.get(sid, 0) - 1
                    self.consumed[region.index].add(sid)
                else:
                    key = ("recomputed", region.index, sid)
                    self.remaining[key] = region.keep.get(sid, 0) + (sid in region.held)
                    self.live.add(key, f.nbytes[sid],
                                  "activations" if sid in region.keep else "transient")
                local[sid] = key
            self.live.add("workspace", f.workspace[m][0], "transient")
            self.sample(step, "recompute", m)
            self.live.drop("workspace")
            for sid in frees.get(i, []) + [s for s in f.new[m] if s not in last]:
                key = local.get(sid)
                if key is not None and self.remaining.get(key, 0) == 0:
                    self.live.drop(key)
        for sid, key in local.items():  # early stop: what the rest of the region would read
            if self.remaining.get(key, 0) == 0:
                self.live.drop(key)

    def _deliver(self, step: int, n: str, key: tuple[str, int], bid: object) -> None:
        """Add one gradient to the input buffer of the value's producer. A second one is summed
        out of place (`old + new`): under a dispatch mode autograd's InputBuffer never adds in
        place (isTensorSubclassLike is true while a Python mode is active), so for a moment
        both and their sum exist."""
        if key in self.buffer:
            nbytes = self.f.value_bytes[key]
            self.live.add("sum", nbytes, "transient")
            self.sample(step, "backward", n)
            self.live.drop("sum")
            self._release(key)
            self.refs[bid] -= 1
            if self.refs[bid] == 0:
                self.live.drop(bid)
            self._hold(key, self._new_buffer(nbytes))
        else:
            self._hold(key, bid)
            self.refs[bid] -= 1
        node = key[0]
        if node in self.pending:
            self.pending[node] -= 1
            if self.pending[node] == 0:
                self._accumulate_grad(step, n, key)

    def _accumulate_grad(self, step: int, n: str, key: tuple[str, int]) -> None:
        """AccumulateGrad runs as soon as a parameter's last contribution arrives: the first
        gradient is stolen as `.grad`, later ones are added to it in place."""
        f = self.f
        sid = f.find(f.nd[key[0]]["storages"][0])
        bid = self.buffer[key]
        if ("grad", sid) not in self.live.where and self.refs[bid] == 1:
            nbytes = self.live.where[bid][1]
            del self.buffer[key]
            self.refs[bid] = 0
            self.live.drop(bid)
            self.live.add(("grad", sid), nbytes, "grads")
            return
        if ("grad", sid) not in self.live.where:
            self.live.add(("grad", sid), f.nbytes[sid], "grads")  # a copy of a shared one
        self.sample(step, "backward", n)
        self._release(key)

    def optimizer(self, step: int, create_state: bool) -> None:
        f = self.f
        name = self.config.optimizer
        if create_state and name in ("adam", "adamw"):
            for sid, nbytes in f.updated:
                self.live.add(("exp_avg", sid), nbytes, "optimizer_state")
                self.live.add(("exp_avg_sq", sid), nbytes, "optimizer_state")
                self.live.add(("step", sid), STEP_TENSOR_BYTES, "optimizer_state")
        impl = self.optimizer_impl
        if name in ("adam", "adamw") and impl != "single-tensor":
            # foreach: `_foreach_sqrt(exp_avg_sqs)` holds one temporary per parameter at once;
            # fused: one kernel, no temporaries
            if impl == "foreach":
                self.live.add("temp", sum(n for _, n in f.updated), "transient")
            if f.updated:
                self.sample(step, "optimizer", f.owner[f.updated[-1][0]],
                            where=f"all parameters ({impl})")
            self.live.drop("temp")
            return
        previous_denom = 0
        for sid, nbytes in f.updated:
            node = f.owner[sid]
            if name in ("adam", "adamw"):
                # sqrt and its quotient live together; the last parameter's denom is still held
                self.live.add("temp", 2 * nbytes + previous_denom, "transient")
                self.sample(step, "optimizer", node)
                self.live.drop("temp")
                previous_denom = nbytes
            else:
                if name == "sgd-momentum" and create_state:
                    self.live.add(("momentum", sid), nbytes, "optimizer_state")
                self.sample(step, "optimizer", node)


@dataclass(frozen=True)
class _Region:
    """A checkpointed region as the walk needs it (see Walk._region)."""

    index: int
    region: Region
    ops: list[str]
    recompute: list[str]  # the ops the backward re-runs (early stop: up to the last saver)
    partial: str | None  # the last of them, when it stops before its kernel runs
    rerun: list[str]  # those whose kernels run again (not cached, not partial)
    trigger: str | None  # the op whose backward needs a saved tensor first (None: never)
    frame_end: str | None  # the op whose backward uses the region's last saved tensor
    inputs: frozenset[int]  # storages the region reads from outside (held for recompute)
    cache: frozenset[int]  # outputs of the ops the policy keeps
    keep: dict[int, int]  # recomputed storage -> how many backward ops save it
    recompute_flops: int
    recompute_bytes: int
    # a reentrant checkpoint's backward holds the recomputed outputs until its nested backward
    # is done: the storages its ops make that are read after it
    held: frozenset[int] = frozenset()


_PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
