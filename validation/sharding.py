"""Per-rank model-state bytes measured with PyTorch's own distributed engine on a fake process group.

The ground truth for graphcost's parallelism pass: the model is sharded for real by
``torch.distributed`` -- FSDP2 (``torch.distributed.fsdp.fully_shard``) or tensor parallelism
(``torch.distributed.tensor.parallel.parallelize_module``) -- on the ``"fake"`` process group
(``torch.testing._internal.distributed.fake_pg``): one simulated rank per call, in this process,
on the CPU, with collectives that move no data. Sizes, placements and allocations are PyTorch's
own; values are not (a fake all-gather leaves its output uninitialised, so the TP loss is usually
NaN), which does not matter for bytes.

    >>> from graphcost.models import load, SMALL_OVERRIDES
    >>> build = lambda: load("llama3-8b", batch=2, seq=16, with_targets=True, device="cpu",
    ...                      **SMALL_OVERRIDES["llama3-8b"])
    >>> s = measure_sharded_states(build, world_size=2, rank=0, mode="fsdp")
    >>> s.params_bytes, s.grads_bytes, s.optimizer_state_bytes
    (149120, 149120, 298324)

What was observed (torch 2.13, CPU, fp32; this is what a prediction has to reproduce):

FSDP2 (``fully_shard`` on every block of the main stack, then on the root)
  - Every parameter becomes a DTensor ``Shard(0)`` over the 1-D mesh. The rank's logical rows are
    ``torch.chunk(param, W, dim=0)[rank]``: chunk size ``c = ceil(n0 / W)``, rank r gets
    ``clamp(n0 - r*c, 0, c)`` rows, so trailing ranks get fewer rows or none (vocab 100 on 3
    ranks: 34, 34, 32 rows; 64 on 3: 22, 22, 20). 1-D parameters (norm weights) are sharded too.
  - Storage is PADDED: each parameter has its own storage of ``c`` rows on every rank
    (``_local_tensor`` is a view of its first rows), so ``params_bytes`` (storage) can exceed
    ``params_local_bytes`` (logical) on the ranks with short chunks; on full-chunk ranks they agree.
  - Gradients (after backward, before zero_grad) are DTensor ``Shard(0)`` with the parameter's
    local shape, but they are VIEWS into one flat reduce-scatter output buffer per FSDP group
    (one per ``fully_shard`` call: each block, and the root's leftovers: embedding, final norm,
    head). That buffer holds every parameter of the group padded to ``c`` rows, on every rank:
    ``grads_bytes`` = sum over groups of sum over params of ``c * row_numel * itemsize``; it equals
    the padded ``params_bytes``.
  - AdamW state: ``exp_avg`` / ``exp_avg_sq`` are DTensors like the parameter whose local tensors
    are UNPADDED (``zeros_like`` of the logical local shard), and ``step`` is a plain (non-DTensor)
    0-dim float32 CPU tensor per parameter (4 bytes each, one storage each).

Tensor parallel (Megatron / torchtitan plan for the zoo Llama, no sequence parallel)
  - ``attention.wq/wk/wv``, ``feed_forward.w1/w3``: ColwiseParallel, weight ``Shard(0)``
    (a bias, if any, would be ``Shard(0)`` too); ``attention.wo``, ``feed_forward.w2``:
    RowwiseParallel, weight ``Shard(1)`` (a bias would be replicated); ``tok_embeddings``:
    RowwiseParallel, i.e. the vocab dim 0 is sharded; ``output``: ColwiseParallel (vocab dim 0),
    output all-gathered to full logits (``output_layouts=Replicate()``) so the plain loss runs.
    Norm weights stay plain tensors, replicated (full size on every rank).
  - Shards follow ``torch.chunk`` along the sharded dim like FSDP2. Storage: a ``Shard(1)``
    local tensor is an exact contiguous copy; a ``Shard(0)`` local tensor on a rank with a short
    chunk is a view of a storage PADDED to ``c`` rows (``distribute_tensor`` scatters padded
    chunks and narrows the last ones), e.g. vocab 100 on 3 ranks: rank 2 holds 32 rows in a
    34-row storage. Full-chunk ranks hold exactly their bytes.
  - A step runs when ``W`` divides both ``n_heads`` and ``n_kv_heads`` (each attention module's
    ``n_heads``/``n_kv_heads`` are divided by ``W`` on the instance, as torchtitan does; the
    per-head size and ``n_rep`` are unchanged). Otherwise a rank would hold a fraction of a head
    and the forward cannot run: only parameters are measured (``stepped=False``, grads and
    optimizer state ``None``, the reason in ``note``).
  - The embedding's gradient is NOT sharded: DTensor's embedding backward produces a
    ``Replicate()`` gradient of the full ``(vocab, dim)`` shape on every rank (stored as is in
    ``.grad``; the optimizer redistributes it to ``Shard(0)`` on the fly). So under TP
    ``grads_bytes`` > ``params_bytes`` by ``(W-1)/W`` of the embedding. Every other gradient has
    its parameter's placement and local shape. The AdamW state is like FSDP2's: local
    ``exp_avg``/``exp_avg_sq`` of the parameter's local shape, a 0-dim float32 ``step`` each.

Peak (``measure_peak=True``): PyTorch's ``MemTracker`` (``FSDPMemTracker`` for FSDP2) over the
steps, which lets DTensor desugar to local ops before counting, follows FSDP2's storage
``resize_`` calls and counts the all-gather / reduce-scatter buffers that FSDP2 allocates (a fake
collective still gets its output buffer). Same caveats as graphcost.memtrack: exact storage bytes
on the CPU, nothing allocated inside a kernel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from validation.groundtruth import scalar_loss
from validation.memtrack import OPTIMIZERS, make_optimizer

__all__ = ["MODES", "ParamShard", "ShardedStates", "chunk_rows", "fake_process_group",
           "llama_tp_plan", "main_stack", "measure_sharded_states"]

MODES = ("fsdp", "tp")


def chunk_rows(n: int, world_size: int, rank: int) -> int:
    """Length of ``torch.chunk(x, world_size)[rank]`` along a dim of size ``n`` (0 when that
    chunk does not exist): ``c = ceil(n / W)``, rank r gets ``clamp(n - r*c, 0, c)``. This is
    how both FSDP2 and DTensor ``Shard(d)`` split a dim."""
    c = math.ceil(n / world_size) if n else 0
    return max(0, min(c, n - rank * c))


@dataclasses.dataclass(frozen=True)
class ParamShard:
    """One parameter as rank ``rank`` holds it."""

    name: str
    placement: str  # "Shard(0)", "Shard(1)", "Replicate()" or "plain" (not a DTensor)
    shard_dim: int | None  # the sharded dim, None when replicated / plain
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]  # logical local shard (torch.chunk's piece)
    dtype: torch.dtype
    storage_bytes: int  # bytes of the local tensor's storage (FSDP2: padded)
    grad_placement: str | None = None  # None before a step / without a grad
    grad_local_shape: tuple[int, ...] | None = None
    state_local_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))  # optimizer state key -> local shape

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def local_bytes(self) -> int:
        return self.local_numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ShardedStates:
    """Per-rank LOCAL model-state bytes measured by `measure_sharded_states`.

    ``*_bytes``: unique storages of the local tensors (DTensor ``_local_tensor``s, plain tensors
    as they are), each storage counted once at ``untyped_storage().nbytes()`` -- what the rank
    really holds (FSDP2 pads). ``*_local_bytes``: the logical local numel times the itemsize,
    summed per tensor -- what an unpadded prediction gives. Grad and optimizer fields are
    ``None`` when no step ran (``stepped=False``; see ``note``)."""

    mode: str
    world_size: int
    rank: int
    optimizer: str
    steps: int
    stepped: bool  # did forward/backward/optimizer.step run
    num_params: int  # number of parameter tensors (unique)
    global_param_numel: int  # the unsharded model's parameter count
    local_param_numel: int  # sum of this rank's logical local numels
    params_bytes: int
    params_local_bytes: int
    grads_bytes: int | None
    grads_local_bytes: int | None
    optimizer_state_bytes: int | None
    optimizer_state_local_bytes: int | None
    local_shapes: Mapping[str, tuple[int, ...]]  # name -> local shape of the parameter
    params: Mapping[str, ParamShard]  # name -> everything about that parameter
    peak_bytes: int | None = None  # MemTracker peak over the steps (measure_peak=True)
    note: str = ""

    @property
    def model_state_bytes(self) -> int | None:
        """params + grads + optimizer state (storage bytes), None without a step."""
        if self.grads_bytes is None or self.optimizer_state_bytes is None:
            return None
        return self.params_bytes + self.grads_bytes + self.optimizer_state_bytes


# --- the fake process group ---------------------------------------------------------------------


class fake_process_group:
    """Context manager: a fake default process group for ``rank`` of ``world_size`` and a 1-D
    CPU DeviceMesh over it (yielded); destroyed on exit so the next rank can be simulated in
    the same process. Refuses to run when a process group already exists."""

    def __init__(self, world_size: int, rank: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.world_size, self.rank = world_size, rank

    def __enter__(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if dist.is_initialized():
            raise RuntimeError("a default process group already exists; the fake one would "
                               "replace it")
        dist.init_process_group("fake", store=FakeStore(), rank=self.rank,
                                world_size=self.world_size)
        try:
            return init_device_mesh("cpu", (self.world_size,))
        except BaseException:
            dist.destroy_process_group()
            raise

    def __exit__(self, *exc):
        dist.destroy_process_group()
        return False


# --- sharding recipes ---------------------------------------------------------------------------


def main_stack(model: nn.Module) -> nn.ModuleList:
    """The model's stack of blocks: ``layers`` (Llama, TransformerLM), ``h`` (GPT-2), else its
    only direct ``nn.ModuleList`` child."""
    for attr in ("layers", "h", "blocks"):
        stack = getattr(model, attr, None)
        if isinstance(stack, nn.ModuleList):
            return stack
    lists = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"cannot tell the main stack of {type(model).__name__}: expected a "
                         f"'layers' or 'h' ModuleList or exactly one ModuleList child")
    return lists[0]


def _apply_fsdp(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in main_stack(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def llama_tp_plan() -> tuple[dict, dict]:
    """(root plan, per-block plan) of the Megatron / torchtitan TP recipe for the zoo Llama,
    without sequence parallel: vocab-sharded embedding and head (head output all-gathered so a
    plain loss runs), column-parallel wq/wk/wv/w1/w3, row-parallel wo/w2, norms replicated."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    root = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    }
    block = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    return root, block


def _apply_llama_tp(model: nn.Module, mesh) -> str:
    """Shard the zoo Llama; returns '' when a step can run, else why not."""
    from graphcost.models.llama import Llama

    if not isinstance(model, Llama):
        raise NotImplementedError(f"mode='tp' knows the zoo Llama only, not "
                                  f"{type(model).__name__}; pass tp_plan=")
    tp = mesh.size()
    root, block_plan = llama_tp_plan()
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh, root)
    reasons = set()
    for block in model.layers:
        parallelize_module(block, mesh, block_plan)
        attn = block.attention
        if attn.n_heads % tp or attn.n_kv_heads % tp:
            reasons.add(f"tp={tp} does not divide n_heads={attn.n_heads} and "
                        f"n_kv_heads={attn.n_kv_heads}: a rank would hold part of a head, so "
                        f"the forward cannot run; parameters only")
        else:  # local heads, as torchtitan does; head_dim and n_rep are unchanged
            attn.n_heads //= tp
            attn.n_kv_heads //= tp
    return "; ".join(sorted(reasons))


# --- measuring ----------------------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _placement(t: torch.Tensor) -> tuple[str, int | None]:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return "plain", None
    (p,) = t.placements  # 1-D mesh
    if isinstance(p, Shard):
        return f"Shard({p.dim})", p.dim
    return f"{type(p).__name__}()", None  # Replicate(), Partial()


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the unique storages behind ``tensors`` (DTensors by their local tensor)."""
    seen, total = set(), 0
    for t in tensors:
        st = _local(t).untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def _logical_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(_local(t).numel() * t.dtype.itemsize for t in tensors)


def _unique_named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters())  # named_parameters() already drops shared ones


def _train(model, inputs, opt, steps: int, before_forward=None) -> None:
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        if before_forward is not None and i:
            before_forward()
        loss = scalar_loss(model(*inputs))
        loss.backward()
        del loss
        opt.step()  # grads stay as backward left them until the next zero_grad


def _peak(model, inputs, opt, steps: int, mode: str) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if mode == "fsdp":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        mt = FSDPMemTracker(model, opt)
        mt.track_inputs(tuple(tensors))
    else:
        mt = MemTracker()
        mt.track_external(model, opt, *tensors)
    with mt:
        _train(model, inputs, opt, steps, before_forward=mt.reset_mod_stats)
    cpu = mt.get_tracker_snapshot("peak").get(torch.device("cpu"), {})
    return cpu.get("Total", 0)


def measure_sharded_states(build: Callable[[], tuple[nn.Module, Any]], world_size: int,
                           rank: int, *, mode: Literal["fsdp", "tp"],
                           optimizer: str = "adamw", steps: int = 1,
                           measure_peak: bool = False,
                           optimizer_kwargs: dict | None = None,
                           tp_plan: Callable[[nn.Module, Any], str | None] | None = None,
                           ) -> ShardedStates:
    """Shard ``build()``'s model for ``rank`` of ``world_size`` and measure what that rank holds.

    ``build()`` returns ``(model, inputs)`` with real CPU tensors (``model(*inputs)`` returns the
    loss, or outputs whose floating sum is used as one). It is called once, inside a fake process
    group that is destroyed again on return, so ranks can be measured one after another in one
    process. ``mode``: "fsdp" -- ``fully_shard`` each block of `main_stack`, then the root;
    "tp" -- `llama_tp_plan` (or ``tp_plan(model, mesh)``, returning '' / None when a step can
    run, else the reason). Then ``optimizer`` (graphcost.memtrack's names: "adamw", "adam",
    "sgd", "sgd-momentum"; PyTorch defaults plus ``optimizer_kwargs``) runs ``steps`` training
    steps (zero_grad, forward, backward, step) and the parameters, gradients (as backward left
    them) and optimizer state are measured at the end. ``measure_peak`` runs the steps under
    PyTorch's MemTracker (FSDPMemTracker for FSDP2) and reports its peak. See the module
    docstring for the sharding semantics observed."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    with fake_process_group(world_size, rank) as mesh:
        model, inputs = build()
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        named = _unique_named_params(model)
        global_shapes = {n: tuple(p.shape) for n, p in named}
        global_numel = sum(p.numel() for _, p in named)

        note = ""
        if mode == "fsdp":
            _apply_fsdp(model, mesh)
        elif tp_plan is not None:
            note = tp_plan(model, mesh) or ""
        else:
            note = _apply_llama_tp(model, mesh)
        stepped = steps > 0 and not note
        if steps == 0 and not note:
            note = "steps=0: parameters only"

        model.train()
        named = _unique_named_params(model)  # FSDP2 / TP swap in DTensor parameters
        if {n for n, _ in named} != set(global_shapes):
            raise RuntimeError("sharding changed the parameter names")
        trainable = [p for _, p in named if p.requires_grad]
        opt = make_optimizer(optimizer, trainable, optimizer_kwargs)
        peak = None
        if stepped:
            if measure_peak:
                peak = _peak(model, inputs, opt, steps, mode)
            else:
                _train(model, inputs, opt, steps)

        shards = {}
        for name, p in named:
            placement, dim = _placement(p)
            g = p.grad if stepped else None
            state = opt.state.get(p, {}) if stepped else {}
            shards[name] = ParamShard(
                name=name, placement=placement, shard_dim=dim,
                global_shape=global_shapes[name], local_shape=tuple(_local(p).shape),
                dtype=p.dtype, storage_bytes=_storage_bytes([p]),
                grad_placement=None if g is None else _placement(g)[0],
                grad_local_shape=None if g is None else tuple(_local(g).shape),
                state_local_shapes=MappingProxyType({
                    k: tuple(_local(v).shape) for k, v in state.items()
                    if isinstance(v, torch.Tensor)}))
        params = [p for _, p in named]
        grads = [p.grad for p in params if p.grad is not None]
        states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return ShardedStates(
            mode=mode, world_size=world_size, rank=rank, optimizer=optimizer, steps=steps,
            stepped=stepped, num_params=len(params), global_param_numel=global_numel,
            local_param_numel=sum(_local(p).numel() for p in params),
            params_bytes=_storage_bytes(params), params_local_bytes=_logical_bytes(params),
            grads_bytes=_storage_bytes(grads) if stepped else None,
            grads_local_bytes=_logical_bytes(grads) if stepped else None,
            optimizer_state_bytes=_storage_bytes(states) if stepped else None,
            optimizer_state_local_bytes=_logical_bytes(states) if stepped else None,
            local_shapes=MappingProxyType({n: s.local_shape for n, s in shards.items()}),
            params=MappingProxyType(shards), peak_bytes=peak, note=note)
