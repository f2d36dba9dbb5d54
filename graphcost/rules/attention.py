"""scaled_dot_product_attention. FLOPs are those of the math decomposition (the two batched
matmuls, no causal halving, grouped-query heads expanded), which is what FlopCounterMode counts on
the meta device. What autograd saves depends on the kernel the target device picks:

- cpu: exactly PyTorch's own choice (torch._fused_sdp_choice on tiny CPU tensors of the same
  dtypes, ranks and head counts): the CPU flash kernel saves q, k, v, the output and the fp32
  logsumexp; otherwise the math path saves the scaled q and k, the softmax and dropout results.
- cuda presets: flash attention for fp16/bf16 without an arbitrary mask, memory-efficient
  attention otherwise (logsumexp padded to 32 rows, the mask kept), as PyTorch 2.x selects them.
- meta: the math path.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import bmm_flop

from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten
MATH, FLASH, EFFICIENT = "math", "flash", "efficient"
_CPU_CHOICE_CACHE: dict[tuple, str] = {}


def _cpu_kernel(q: Value, k: Value, v: Value, mask, dropout_p: float, is_causal: bool,
                enable_gqa: bool) -> str:
    key = (q.dtype, len(q.shape), q.shape[:-2], q.shape[-1], k.shape[:-2], v.shape[-1],
           None if not isinstance(mask, Value) else (mask.dtype, len(mask.shape)),
           dropout_p > 0, is_causal, enable_gqa)
    if key not in _CPU_CHOICE_CACHE:
        def tiny(x: Value, last: int) -> torch.Tensor:
            return torch.zeros(*[1 for _ in x.shape[:-2]][:-1], *x.shape[-3:-2], 1, last,
                               dtype=x.dtype) if len(x.shape) >= 3 else torch.zeros(1, last)
        tq, tk, tv = tiny(q, q.shape[-1]), tiny(k, k.shape[-1]), tiny(v, v.shape[-1])
        tmask = None
        if isinstance(mask, Value):
            tmask = torch.zeros([1] * len(mask.shape), dtype=mask.dtype)
        choice = torch._fused_sdp_choice(tq, tk, tv, tmask, dropout_p, is_causal,
                                         enable_gqa=enable_gqa)
        _CPU_CHOICE_CACHE[key] = {0: MATH, 1: FLASH}.get(int(choice), MATH)
    return _CPU_CHOICE_CACHE[key]


def _cuda_kernel(q: Value, mask, dropout_p: float) -> str:
    # NB: mirrors PyTorch's priority order (flash, then efficient) for the common constraints
    # only: head_dim <= 256 and a multiple of 8, no arbitrary mask, 16-bit dtypes for flash.
    head_dim = q.shape[-1]
    if len(q.shape) != 4 or head_dim % 8 != 0:
        return MATH
    if q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and mask is None:
        return FLASH
    if q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return EFFICIENT
    return MATH


@register(aten.scaled_dot_product_attention)
def sdpa_cost(ctx: RuleContext) -> OpCost:
    q, k, v = ctx.inputs[0], ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask")
    dropout_p = ctx.arg(4, "dropout_p", 0.0) or 0.0
    is_causal = bool(ctx.arg(5, "is_causal", False))
    scale = ctx.arg(6, "scale")
    enable_gqa = bool(ctx.kwargs.get("enable_gqa", False))

    *batch, len_q, dim_qk = q.shape
    len_k, dim_v = k.shape[-2], v.shape[-1]
    bh = math.prod(batch)  # batch x query heads: grouped K/V heads are expanded to these
    scores_flops = bmm_flop((bh, len_q, dim_qk), (bh, dim_qk, len_k))
    values_flops = bmm_flop((bh, len_q, len_k), (bh, len_k, dim_v))
    forward = scores_flops + values_flops
    qk_grad = q.requires_grad or k.requires_grad
    backward = (scores_flops * (q.requires_grad + k.requires_grad)
                + values_flops * (qk_grad + v.requires_grad))
    kind = ctx.device.kind
    if kind == "cpu":
        kernel = _cpu_kernel(q, k, v, mask, dropout_p, is_causal, enable_gqa)
    elif kind == "cuda":
        kernel = _cuda_kernel(q, mask, dropout_p)
    else:
        kernel = MATH
    if not ctx.requires_grad:
        return OpCost(forward_flops=forward, backward_flops=0,
                      output_dim_order=(0, 2, 1, 3) if kernel != MATH and len(q.shape) == 4
                      else None)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if kernel == FLASH:
        saved = [q, k, v, Out(0), TensorSpec((*batch, len_q), lse_dtype)]
        if kind == "cuda":
            saved += [TensorSpec((), torch.int64), TensorSpec((), torch.int64)]  # philox seed, offset
    elif kernel == EFFICIENT:
        padded = math.ceil(len_q / 32) * 32
        saved = [q, k, v, Out(0), TensorSpec((*batch, padded), lse_dtype),
                 TensorSpec((), torch.int64), TensorSpec((), torch.int64)]
        if isinstance(mask, Value):
            saved.append(mask)
    else:
        saved = _math_saved(ctx, q, k, v, dropout_p, scale, enable_gqa)
        return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(saved))
    # The fused kernels write the output as (B, T, H, D) and return it transposed.
    order = (0, 2, 1, 3) if len(q.shape) == 4 else None
    return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(saved),
                  output_dim_order=order)


def _math_saved(ctx, q: Value, k: Value, v: Value, dropout_p: float, scale, enable_gqa: bool):
    """What _scaled_dot_product_attention_math's ops save:
    q * s and (k^T) * s each keep the 0-dim scale factor and (for the matmul) their products;
    softmax keeps its result; dropout its noise; attn @ v keeps both operands."""
    *batch, len_q, dim_qk = q.shape
    len_k = k.shape[-2]
    heads_expanded = enable_gqa and k.shape[-3] != q.shape[-3]
    scores = TensorSpec((*batch, len_q, len_k), q.dtype)
    saved: list = []
    if q.requires_grad:
        saved.append(TensorSpec((), torch.float64))  # the sqrt(scale) factor q is multiplied by
    if k.requires_grad:
        saved.append(TensorSpec((), torch.float64))
    k_shape = (*batch, len_k, dim_qk) if heads_expanded else k.shape
    if k.requires_grad:
        saved.append(TensorSpec(q.shape, q.dtype))  # q * s, for the gradient of k
    if q.requires_grad:
        saved.append(TensorSpec(k_shape, k.dtype))  # k * s, for the gradient of q
    saved.append(scores)  # softmax result (if dropout: the noise is kept as well)
    if dropout_p > 0:
        saved.append(TensorSpec(scores.shape, q.dtype if ctx.device.kind == "cpu" else torch.bool))
    if v.requires_grad and dropout_p > 0:
        saved.append(scores)  # the dropped-out probabilities, a new tensor
    if q.requires_grad or k.requires_grad:
        if heads_expanded:
            saved.append(TensorSpec((*batch, len_k, v.shape[-1]), v.dtype))
        else:
            saved.append(v)
    # NB: the softmax result is only a separate storage from what attn @ v keeps when dropout
    # is on; without dropout they are one tensor (listed once above).
    return saved
