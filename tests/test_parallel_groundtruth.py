"""The fake-process-group harness (graphcost.groundtruth_parallel) measures what it claims.

Each check compares with the UNSHARDED model (built again outside any process group) and with
torch.chunk, never with numbers the harness produced itself.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
from graphcost.models import SMALL_OVERRIDES, load
from torch import nn

from validation.sharding import chunk_rows, measure_sharded_states

F32 = 4


def _build_llama(**extra):
    overrides = {**SMALL_OVERRIDES["llama3-8b"], **extra}  # dim 64, ffn 96, vocab 100, 4/2 heads

    def build():
        torch.manual_seed(0)
        return load("llama3-8b", batch=2, seq=16, with_targets=True, device="cpu", **overrides)

    return build


# W=4 under TP needs whole kv heads on every rank: 4 kv heads instead of 2.
BUILDS = {"llama": _build_llama(), "llama-mha": _build_llama(n_kv_heads=4)}


@functools.cache
def _unsharded(key):
    model, _ = BUILDS[key]()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@functools.cache
def _ranks(key, mode, world_size):
    return tuple(measure_sharded_states(BUILDS[key], world_size, r, mode=mode)
                 for r in range(world_size))


def _expected_local_shape(full: torch.Tensor, dim, world_size, rank):
    """torch.chunk's piece ``rank`` along ``dim`` (empty when chunk makes fewer pieces)."""
    if dim is None:
        return tuple(full.shape)
    pieces = torch.chunk(full, world_size, dim=dim)
    if rank < len(pieces):
        return tuple(pieces[rank].shape)
    return tuple(0 if d == dim else n for d, n in enumerate(full.shape))


def _tp_dim(name):
    if name.endswith(("wo.weight", "w2.weight")):
        return 1  # RowwiseParallel linear
    if name.endswith(("norm.weight",)):
        return None  # replicated, plain tensor
    return 0  # ColwiseParallel linears, the vocab-sharded embedding and head


def test_chunk_rows_is_torch_chunk():
    for n in range(12):
        for w in range(1, 6):
            pieces = torch.chunk(torch.empty(n), w) if n else ()
            for r in range(w):
                want = pieces[r].numel() if r < len(pieces) else 0
                assert chunk_rows(n, w, r) == want, (n, w, r)


# --- FSDP2 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_fsdp_shards_every_param_on_dim0_like_torch_chunk(world_size):
    full = _unsharded("llama")
    total = sum(p.numel() for p in full.values())
    ranks = _ranks("llama", "fsdp", world_size)
    assert sum(s.local_param_numel for s in ranks) == total
    for s in ranks:
        assert s.stepped and not s.note and dist.is_initialized() is False
        assert s.global_param_numel == total and s.num_params == len(full)
        assert set(s.local_shapes) == set(full)
        for name, p in s.params.items():
            want = _expected_local_shape(full[name], 0, world_size, s.rank)
            assert p.placement == "Shard(0)" and p.shard_dim == 0
            assert p.local_shape == want, name
            assert p.global_shape == tuple(full[name].shape)
            # padded storage: ceil(n0 / W) rows on every rank
            rows = math.ceil(full[name].shape[0] / world_size)
            assert p.storage_bytes == rows * full[name][0].numel() * F32, name
            # grads and AdamW state follow the parameter's local shard
            assert p.grad_placement == "Shard(0)" and p.grad_local_shape == want
            assert dict(p.state_local_shapes) == {"step": (), "exp_avg": want, "exp_avg_sq": want}
        # grads are views of per-group flat buffers padded like the params; state is unpadded
        assert s.grads_bytes == s.params_bytes
        assert s.grads_local_bytes == s.params_local_bytes == s.local_param_numel * F32
        assert s.optimizer_state_bytes == 2 * s.params_local_bytes + F32 * s.num_params
        assert s.optimizer_state_local_bytes == s.optimizer_state_bytes


def test_fsdp_uneven_world_size_pads_only_the_short_ranks():
    r0, _, r2 = _ranks("llama", "fsdp", 3)  # vocab 100 -> 34/34/32 rows, dim 64 -> 22/22/20
    assert r0.local_shapes["tok_embeddings.weight"] == (34, 64)
    assert r2.local_shapes["tok_embeddings.weight"] == (32, 64)
    assert r2.local_shapes["norm.weight"] == (20,)
    assert r0.params_bytes == r0.params_local_bytes  # full chunks: no padding
    assert r2.params_bytes == r0.params_bytes > r2.params_local_bytes


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 2), nn.Linear(2, 3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def test_fsdp_more_ranks_than_rows_leaves_empty_shards():
    ranks = [measure_sharded_states(lambda: (_Tiny(), (torch.randn(5, 4),)), 4, r, mode="fsdp")
             for r in range(4)]
    assert [s.local_shapes["layers.0.weight"] for s in ranks] == [(1, 4), (1, 4), (0, 4), (0, 4)]
    assert [s.local_shapes["layers.1.bias"] for s in ranks] == [(1,), (1,), (1,), (0,)]
    assert sum(s.local_param_numel for s in ranks) == sum(p.numel() for p in _Tiny().parameters())
    assert ranks[3].params_local_bytes == 0 and ranks[3].params_bytes == ranks[0].params_bytes


# --- tensor parallel ----------------------------------------------------------------------------


@pytest.mark.parametrize("key,world_size,steps", [("llama", 2, True), ("llama", 3, False),
                                                  ("llama-mha", 4, True)])
def test_tp_megatron_plan_shards(key, world_size, steps):
    full = _unsharded(key)
    sharded = {n for n in full if _tp_dim(n) is not None}
    ranks = _ranks(key, "tp", world_size)
    # every sharded element is on exactly one rank, every replicated one on all of them
    assert sum(s.params[n].local_numel for s in ranks for n in sharded) == \
        sum(full[n].numel() for n in sharded)
    assert sum(s.local_param_numel for s in ranks) == sum(
        p.numel() * (1 if n in sharded else world_size) for n, p in full.items())
    for s in ranks:
        assert s.stepped is steps and bool(s.note) is not steps and not dist.is_initialized()
        for name, p in s.params.items():
            dim = _tp_dim(name)
            want = _expected_local_shape(full[name], dim, world_size, s.rank)
            assert p.local_shape == want, name
            assert p.placement == ("plain" if dim is None else f"Shard({dim})"), name
            if not steps:
                assert p.grad_local_shape is None and not p.state_local_shapes
                continue
            if name == "tok_embeddings.weight":  # DTensor's embedding backward: full, Replicate
                assert p.grad_placement == "Replicate()"
                assert p.grad_local_shape == tuple(full[name].shape)
            else:
                assert p.grad_placement == p.placement and p.grad_local_shape == want, name
            assert dict(p.state_local_shapes) == {"step": (), "exp_avg": want, "exp_avg_sq": want}
        if steps:
            emb = full["tok_embeddings.weight"]
            local_emb = s.params["tok_embeddings.weight"].local_numel
            assert s.grads_local_bytes == s.params_local_bytes + (emb.numel() - local_emb) * F32
            assert s.optimizer_state_bytes == 2 * s.params_local_bytes + F32 * s.num_params
        else:
            assert s.grads_bytes is None and s.optimizer_state_bytes is None
            assert s.model_state_bytes is None


# --- the harness itself -------------------------------------------------------------------------


def test_process_group_is_destroyed_even_on_error_and_peak_is_measured():
    def bad_build():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure_sharded_states(bad_build, 2, 0, mode="fsdp")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="mode"):
        measure_sharded_states(BUILDS["llama"], 2, 0, mode="zero3")
    s = measure_sharded_states(BUILDS["llama"], 2, 1, mode="fsdp", measure_peak=True)
    assert s.peak_bytes >= s.model_state_bytes > 0
