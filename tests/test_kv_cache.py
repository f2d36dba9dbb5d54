"""The KV cache graphcost derives from the traced graph against a real decode loop's cache
tensors (the zoo Llama's Meta-style cache), and the decode loop against the full forward."""

from __future__ import annotations

import pytest
import torch
from graphcost.models import SMALL_OVERRIDES, load

from graphcost import analyze
from graphcost.passes.memory.inference import inference_memory, kv_cache_bytes_per_token


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_equals_a_real_decode_loops_cache(kv_heads, dtype):
    cfg = dict(SMALL_OVERRIDES["llama3-8b"], n_kv_heads=kv_heads)
    batch, prompt, new = 2, 12, 4
    torch.manual_seed(0)
    model, (tokens,) = load("llama3-8b", batch=batch, seq=prompt + new, dtype=dtype,
                            device="cpu", **cfg)
    model.eval()
    cache = model.new_kv_cache(batch, max_seq=prompt + new)
    logits = [model.decode(tokens[:, :prompt], cache, 0)]
    for pos in range(prompt, prompt + new):
        logits.append(model.decode(tokens[:, pos:pos + 1], cache, pos))
    with torch.no_grad():
        full = model(tokens)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=tol, rtol=tol)

    cache_bytes = sum(k.nbytes + v.nbytes for k, v in cache)
    a = analyze(*load("llama3-8b", batch=batch, seq=prompt + new, dtype=dtype, **cfg))
    assert kv_cache_bytes_per_token(a) * batch * (prompt + new) == cache_bytes
    assert inference_memory(a).kv_cache_bytes == cache_bytes
