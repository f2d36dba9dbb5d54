"""scaled_dot_product_attention. FLOPs are those of the math decomposition (the two batched
matmuls, no causal halving, grouped-query heads expanded), which is what FlopCounterMode counts on
the meta device. What autograd saves depends on the kernel the target device picks:

- cpu: PyTorch's own choice (torch._fused_sdp_choice on tiny CPU tensors with the same dtypes,
  ranks, head counts, mask kind, dropout and causality; a q, k or v whose head dim is not
  unit-stride always takes the math path). The CPU flash kernel saves q, k, v, the output (laid
  out like q), the logsumexp in the accumulation dtype and the mask (a boolean one as its
  additive float version); the math path saves what `_math_saved` lists, all of it exact.
- cuda presets: flash attention for fp16/bf16 without an arbitrary mask, memory-efficient
  attention otherwise (logsumexp padded to 32 rows, the mask kept), as PyTorch 2.x selects them.
- meta: the math path.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import bmm_flop

from graphcost.rules.layout import dense_dim_order, expand_strides, strides_of
from graphcost.rules.matmul import reshaped
from graphcost.rules.registry import OpCost, Out, RuleContext, TensorSpec, Value, register

aten = torch.ops.aten
MATH, FLASH, EFFICIENT = "math", "flash", "efficient"
_CPU_CHOICE_CACHE: dict[tuple, str] = {}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math path and the CPU flash kernel compute 16-bit attention in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _unit_last_stride(x: Value) -> bool:
    strides = strides_of(x)
    return strides is None or len(strides) == 0 or strides[-1] == 1 or x.shape[-1] == 1


def _cpu_kernel(q: Value, k: Value, v: Value, mask, dropout_p: float, is_causal: bool,
                enable_gqa: bool) -> str:
    if not all(_unit_last_stride(x) for x in (q, k, v)):
        return MATH  # the CPU flash kernel needs a unit-stride head dim
    key = (q.dtype, len(q.shape), q.shape[:-2], q.shape[-1], k.shape[:-2], v.shape[-1],
           None if not isinstance(mask, Value) else (mask.dtype, len(mask.shape),
                                                     mask.requires_grad),
           dropout_p > 0, is_causal, enable_gqa)
    if key not in _CPU_CHOICE_CACHE:
        def tiny(x: Value, last: int) -> torch.Tensor:
            return torch.zeros(*[1 for _ in x.shape[:-2]][:-1], *x.shape[-3:-2], 1, last,
                               dtype=x.dtype) if len(x.shape) >= 3 else torch.zeros(1, last)
        tq, tk, tv = tiny(q, q.shape[-1]), tiny(k, k.shape[-1]), tiny(v, v.shape[-1])
        tmask = None
        if isinstance(mask, Value):
            tmask = torch.zeros([1] * len(mask.shape), dtype=mask.dtype,
                                requires_grad=mask.requires_grad)
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


def _like_query_order(q: Value) -> tuple[int, ...] | None:
    """The fused kernels allocate the output `empty_like(query)`: it keeps q's dim order (a q
    viewed from (B, T, H, D) gives a (B, T, H, D)-ordered output). None when that is contiguous."""
    strides = strides_of(q)
    if strides is None:
        return (0, 2, 1, 3) if len(q.shape) == 4 else None
    order = dense_dim_order(q.shape, strides)
    return None if order == tuple(range(len(q.shape))) else order


@register(aten.scaled_dot_product_attention)
def sdpa_cost(ctx: RuleContext) -> OpCost:
    q, k, v = ctx.inputs[0], ctx.arg(1, "key"), ctx.arg(2, "value")
    mask = ctx.arg(3, "attn_mask")
    dropout_p = ctx.arg(4, "dropout_p", 0.0) or 0.0
    is_causal = bool(ctx.arg(5, "is_causal", False))
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
    if kernel == MATH:
        # The math path's output is its last bmm's: contiguous, as traced.
        saved = _math_saved(ctx, q, k, v, dropout_p, enable_gqa) if ctx.requires_grad else ()
        return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(saved))
    # NB: on CUDA the output is taken to be (B, T, H, D)-ordered, as for a q viewed from
    # (B, T, H, D) (GPT-2, Llama); what the CUDA kernels keep cannot be checked on this machine.
    order = _like_query_order(q) if kind == "cpu" else (0, 2, 1, 3)
    if not ctx.requires_grad:
        return OpCost(forward_flops=forward, output_dim_order=order)
    lse_dtype = _acc_dtype(q.dtype)
    if kernel == FLASH:
        saved = [q, k, v, Out(0), TensorSpec((*batch, len_q), lse_dtype)]
        if kind == "cuda":
            # the philox seed and offset
            saved += [TensorSpec((), torch.int64), TensorSpec((), torch.int64)]
        elif isinstance(mask, Value):
            # A boolean mask is first turned into an additive one in q's dtype (a new tensor).
            saved.append(TensorSpec(mask.shape, q.dtype) if mask.dtype == torch.bool else mask)
    else:
        padded = math.ceil(len_q / 32) * 32
        saved = [q, k, v, Out(0), TensorSpec((*batch, padded), lse_dtype),
                 TensorSpec((), torch.int64), TensorSpec((), torch.int64)]
        if isinstance(mask, Value):
            saved.append(mask)
    return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(saved),
                  output_dim_order=order)


def _math_saved(ctx: RuleContext, q: Value, k: Value, v: Value, dropout_p: float,
                enable_gqa: bool) -> list:
    """What `_scaled_dot_product_attention_math` keeps. It upcasts 16-bit q, k, v to float32,
    repeats grouped K/V heads (enable_gqa), then runs
        attn = (q * sqrt(s)) @ (k.transpose(-2, -1) * sqrt(s))   bmm keeps each scaled operand
        attn = _safe_softmax(attn + mask)                          keeps its result
        attn = dropout(attn)                                       CPU: keeps its noise tensor
        out = attn @ v                                             bmm keeps attn and v
    Each op keeps a tensor only for a gradient that is required; the scalar scale is not a
    tensor."""
    acc = _acc_dtype(q.dtype)
    *batch, len_q, dim_qk = q.shape
    grouped = enable_gqa and len(q.shape) >= 3 and k.shape[-3] != q.shape[-3]
    if not grouped:
        batch = torch.broadcast_shapes(tuple(batch), tuple(k.shape[:-2]))
    batch = tuple(batch)
    len_k = k.shape[-2]
    q_grad, k_grad, v_grad = q.requires_grad, k.requires_grad, v.requires_grad
    scores = TensorSpec((*batch, len_q, len_k), acc)
    saved: list = []
    if q_grad:
        saved.append(TensorSpec((*batch, dim_qk, len_k), acc))  # k^T * sqrt(s)
    if k_grad:
        saved.append(TensorSpec((*batch, len_q, dim_qk), acc))  # q * sqrt(s)
    if q_grad or k_grad:
        saved.append(scores)  # the softmax result
    if dropout_p > 0:
        if q_grad or k_grad:
            # CPU dropout is input * noise, the noise in the input's dtype; CUDA's fused
            # native_dropout keeps a boolean mask.
            saved.append(TensorSpec(scores.shape, acc if ctx.device.kind != "cuda"
                                    else torch.bool))
        if v_grad:
            saved.append(TensorSpec(scores.shape, acc))  # the dropped-out probabilities
    elif v_grad and not (q_grad or k_grad):
        saved.append(scores)  # the softmax result, kept by attn @ v only
    if q_grad or k_grad:
        saved.append(_math_value_operand(v, batch, acc, grouped))
    return saved


def _math_value_operand(v: Value, batch: tuple[int, ...], acc: torch.dtype,
                        grouped: bool) -> Value | TensorSpec:
    """v as the last bmm sees it: expanded to the query batch and reshaped to 3D. A repeated
    (grouped-query) or upcast v is a new tensor; otherwise v itself unless the reshape copies."""
    shape = (*batch, v.shape[-2], v.shape[-1])
    if grouped or acc != v.dtype:
        return TensorSpec(shape, acc)
    return reshaped(v, (math.prod(batch), *shape[-2:]), shape,
                    expand_strides(v.shape, strides_of(v), shape))
