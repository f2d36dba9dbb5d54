"""torch.utils.checkpoint under torch.compile, as dynamo traces it: a checkpointed region's ops are
tagged for Inductor's partitioner, which then recomputes them in the backward rather than
keep them, and keeps what a selective checkpoint's policy says to keep.

Under torch.compile, dynamo traces `checkpoint(fn, ..., use_reentrant=False)` as a higher-order
op and marks each op of `fn` with `node.meta["recompute"]` (PREFER_RECOMPUTE, or the policy's
answer for that op with `context_fn=create_selective_checkpoint_contexts(...)`) and
`node.meta["ac_graph_id"]`; min_cut_rematerialization_partition reads those tags. graphcost's
compiled partition (graphcost.passes.compiled) traces with aot_autograd, not dynamo:
`checkpoints_as_tags` makes a non-reentrant checkpoint call there run its function with the
same tags (torch.fx's preserved node meta) and no saved-tensor hooks; a selective region runs
under torch's own policy mode (`_CachingTorchDispatchMode`), which tags each op it sees under a
trace with its policy's answer, as it does under dynamo. Checkpoints graphcost applies
(graphcost.passes.checkpoint.apply) and the model's own both go this way.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch.fx.traceback as fx_traceback
import torch.utils.checkpoint as torch_checkpoint

from graphcost.errors import ConfigError

# the graph attributes it reads (graphcost/graph/schema.py): none, it tags torch's graphs
READS: tuple[str, ...] = ()

TAGS = ("recompute", "ac_graph_id")


@contextlib.contextmanager
def checkpoints_as_tags() -> Iterator[None]:
    """Within the block, a non-reentrant checkpoint call runs its function with its ops tagged
    for the partitioner (see the module docstring)."""
    ids = itertools.count(1)

    def tagged(fn, preserve_rng_state=True, context_fn=torch_checkpoint.noop_context_fn,
               determinism_check=None, debug=False, early_stop=True, *args, **kwargs):
        region = next(ids)
        policy = contextlib.nullcontext()
        if context_fn is not torch_checkpoint.noop_context_fn:
            policy, _ = context_fn()  # torch's own: it tags each op it sees under a trace
            if not hasattr(policy, "policy_fn"):
                raise ConfigError("a checkpoint's context_fn other than torch's selective "
                                  "checkpoint contexts cannot be traced for torch.compile")
            policy.ac_graph_id = region
        meta = fx_traceback.current_meta
        outer = {k: meta[k] for k in TAGS if k in meta}
        meta.update(recompute=torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE,
                    ac_graph_id=region)
        try:
            with policy:
                yield
        finally:
            meta = fx_traceback.current_meta
            for k in TAGS:
                meta.pop(k, None)
            meta.update(outer)

    original = torch_checkpoint._checkpoint_without_reentrant_generator
    torch_checkpoint._checkpoint_without_reentrant_generator = tagged
    try:
        yield
    finally:
        torch_checkpoint._checkpoint_without_reentrant_generator = original


__all__ = ["checkpoints_as_tags"]
