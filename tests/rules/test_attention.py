"""scaled_dot_product_attention (CPU flash kernel and math path), hand-written attention,
nn.MultiheadAttention and nn.TransformerEncoderLayer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphcost import FLOPS_PER_FMA
from tests.helpers import (
    Fn,
    analyze_meta,
    assert_matches_pytorch,
    frozen,
    on_activations,
    randn_inputs,
)

B, H, T, D = 2, 2, 4, 8
E = H * D  # model width



def sdpa(**kwargs):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs)


def qkv_inputs(q_heads=H, kv_heads=H, len_q=T, len_k=T, dim_v=D, grads=(True, True, True)):
    def make(device, dtype):
        shapes = [(B, q_heads, len_q, D), (B, kv_heads, len_k, D), (B, kv_heads, len_k, dim_v)]
        return tuple(torch.randn(*s, device=device, dtype=dtype, requires_grad=g)
                     for s, g in zip(shapes, grads))
    return make


# ---- hand formulas ---------------------------------------------------------------------------

def test_sdpa_flops_from_dimensions():
    a = analyze_meta(lambda: Fn(sdpa(is_causal=True)), qkv_inputs())
    forward = 2 * FLOPS_PER_FMA * B * H * T * T * D  # q @ k^T and p @ v; no causal halving
    assert a.forward_flops == forward == 4 * B * H * T * T * D
    assert a.backward_flops == 2 * forward


@pytest.mark.parametrize("grads, fmas", [
    ((True, False, False), 2), ((False, True, False), 2), ((False, False, True), 1),
    ((True, True, False), 3),
], ids=["q", "k", "v", "qk"])
def test_sdpa_backward_flops_follow_the_gradients_required(grads, fmas):
    # q or k: dS -> dQ or dK, and dP = dO @ v^T; v: dV = P^T @ dO. Each is one T x T x D bmm.
    a = analyze_meta(lambda: Fn(sdpa()), qkv_inputs(grads=grads))
    assert a.backward_flops == fmas * FLOPS_PER_FMA * B * H * T * T * D


def test_grouped_query_flops_count_the_expanded_heads():
    a = analyze_meta(lambda: Fn(sdpa(enable_gqa=True)), qkv_inputs(q_heads=4, kv_heads=2))
    assert a.forward_flops == 4 * B * 4 * T * T * D


def test_cpu_flash_keeps_output_and_logsumexp(dtype):
    a = analyze_meta(lambda: Fn(sdpa(is_causal=True)), qkv_inputs(), dtype)
    output, logsumexp = B * H * T * D * dtype.itemsize, B * H * T * 4  # logsumexp in fp32
    assert a.saved_activation_bytes == output + logsumexp  # q, k, v are model inputs


def test_math_path_with_dropout_keeps_scaled_operands_probabilities_and_noise(dtype):
    # Dropout sends CPU attention to the math path, which computes in fp32.
    a = analyze_meta(lambda: Fn(sdpa(dropout_p=0.1)), qkv_inputs(), dtype)
    scaled_q = scaled_k = B * H * T * D
    probs = noise = dropped = B * H * T * T
    upcast_v = 0 if dtype == torch.float32 else B * H * T * D
    assert a.saved_activation_bytes == 4 * (scaled_q + scaled_k + probs + noise + dropped
                                            + upcast_v)


# ---- SDPA against PyTorch --------------------------------------------------------------------

ON_INPUTS = {
    "plain": (sdpa(), qkv_inputs()),
    "causal": (sdpa(is_causal=True), qkv_inputs()),
    "dropout": (sdpa(dropout_p=0.1), qkv_inputs()),
    "dropout_causal": (sdpa(dropout_p=0.1, is_causal=True), qkv_inputs()),
    "scale": (sdpa(dropout_p=0.1, scale=0.5), qkv_inputs()),
    "gqa": (sdpa(enable_gqa=True), qkv_inputs(q_heads=4, kv_heads=2)),
    "gqa_dropout": (sdpa(enable_gqa=True, dropout_p=0.2), qkv_inputs(q_heads=4, kv_heads=2)),
    "other_lengths_dropout": (sdpa(dropout_p=0.1), qkv_inputs(len_q=3, len_k=5, dim_v=6)),
    "q_grad_only": (sdpa(dropout_p=0.1), qkv_inputs(grads=(True, False, False))),
    "k_grad_only": (sdpa(dropout_p=0.1), qkv_inputs(grads=(False, True, False))),
    "v_grad_only": (sdpa(dropout_p=0.1), qkv_inputs(grads=(False, False, True))),
    "v_grad_only_no_dropout": (sdpa(), qkv_inputs(grads=(False, False, True))),
    "3d": (sdpa(), randn_inputs((B, T, D), (B, T, D), (B, T, D))),
    "3d_causal": (sdpa(is_causal=True), randn_inputs((B, T, D), (B, T, D), (B, T, D))),
    "bool_mask": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool, device=q.device).tril()),
        qkv_inputs()),
    "bool_mask_dropout": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool, device=q.device).tril(),
        dropout_p=0.3), qkv_inputs()),
    "float_mask_input": (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                         lambda d, t: qkv_inputs()(d, t) + (torch.randn(T, T, device=d, dtype=t),)),
    "float_mask_computed": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.zeros(T, T, device=q.device, dtype=q.dtype).masked_fill(
            torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))),
        qkv_inputs()),
}


@pytest.mark.parametrize("case", ON_INPUTS.values(), ids=ON_INPUTS.keys())
def test_sdpa_on_inputs(case, dtype):
    fn, make_inputs = case
    assert_matches_pytorch(lambda: Fn(fn), make_inputs, dtype)


def from_bthd(fn):
    """q, k, v laid out as (B, T, H, D) and transposed, as GPT-2 and Llama do; the output is
    transposed back and flattened."""
    def attend(q, k, v):
        y = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return y.transpose(1, 2).reshape(B, T, E)
    return attend


QKV, BTHD = [(B, H, T, D)] * 3, [(B, T, H, D)] * 3
ON_ACTIVATIONS = {
    "plain": (sdpa(), QKV),
    "dropout": (sdpa(dropout_p=0.2), QKV),
    "float_mask_needing_grad": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m), QKV + [(T, T)]),
    "float_mask_needing_grad_dropout": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, dropout_p=0.2), QKV + [(T, T)]),
    "4d_mask_needing_grad": (lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m), QKV + [(B, 1, T, T)]),
    "gqa": (sdpa(enable_gqa=True), [(B, 4, T, D), (B, 2, T, D), (B, 2, T, D)]),
    "gqa_dropout": (sdpa(enable_gqa=True, dropout_p=0.1),
                    [(B, 4, T, D), (B, 2, T, D), (B, 2, T, D)]),
    "bthd": (from_bthd(sdpa()), BTHD),
    "bthd_causal": (from_bthd(sdpa(is_causal=True)), BTHD),
    "bthd_dropout": (from_bthd(sdpa(dropout_p=0.1)), BTHD),
    "k_with_strided_head_dim": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k.transpose(-1, -2), v), [(B, H, T, D), (B, H, D, T), (B, H, T, D)]),
    "3d_dropout": (sdpa(dropout_p=0.1), [(B, T, D)] * 3),
}


@pytest.mark.parametrize("case", ON_ACTIVATIONS.values(), ids=ON_ACTIVATIONS.keys())
def test_sdpa_on_activations(case, dtype):
    fn, shapes = case
    assert_matches_pytorch(*on_activations(fn, *shapes), dtype)


# ---- attention blocks as models write them ---------------------------------------------------

class GPT2Attention(nn.Module):
    """nanoGPT's CausalSelfAttention: fused qkv projection split into (B, nh, T, hs) views."""

    def __init__(self, dropout=0.0, manual=False):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.dropout, self.manual = dropout, manual
        self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

    def forward(self, x):
        q, k, v = self.c_attn(x).split(E, dim=2)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.manual:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.dropout(F.softmax(att, dim=-1), self.dropout, self.training)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, E))


class RepeatKV(nn.Module):
    """Llama's grouped-query attention: K/V heads repeated by expand + reshape."""

    def __init__(self, n_rep=2):
        super().__init__()
        self.wq = nn.Linear(E, E)
        self.wk, self.wv = nn.Linear(E, E // n_rep), nn.Linear(E, E // n_rep)
        self.n_rep = n_rep

    def forward(self, x):
        kv_heads = H // self.n_rep
        q = self.wq(x).view(B, T, H, D)
        k, v = (w(x).view(B, T, kv_heads, D) for w in (self.wk, self.wv))
        k, v = (t[:, :, :, None, :].expand(B, T, kv_heads, self.n_rep, D).reshape(B, T, H, D)
                for t in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return y.transpose(1, 2).reshape(B, T, E)



BLOCKS = {
    "gpt2": (GPT2Attention, True),
    "gpt2_dropout": (lambda: GPT2Attention(dropout=0.1), True),
    "gpt2_manual": (lambda: GPT2Attention(manual=True), True),
    "gpt2_manual_dropout": (lambda: GPT2Attention(dropout=0.1, manual=True), True),
    "gpt2_frozen_qkv": (frozen(GPT2Attention, "c_attn"), True),
    "gpt2_frozen_proj": (frozen(GPT2Attention, "c_proj"), True),
    "gpt2_frozen_qkv_first_layer": (frozen(GPT2Attention, "c_attn"), False),
    "gpt2_frozen_qkv_weight_dropout": (frozen(lambda: GPT2Attention(dropout=0.1),
                                              "c_attn.weight"), False),
    "repeat_kv": (RepeatKV, False),
    "repeat_kv_frozen_kv": (frozen(RepeatKV, "wk", "wv"), False),
}


@pytest.mark.parametrize("case", BLOCKS.values(), ids=BLOCKS.keys())
def test_attention_blocks(case, dtype):
    make_module, input_grad = case
    assert_matches_pytorch(make_module, randn_inputs((B, T, E), requires_grad=input_grad), dtype)


class MHA(nn.Module):
    def __init__(self, need_weights, mask=None, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kwargs)
        self.need_weights, self.mask = need_weights, mask

    def forward(self, x):
        seq = x.shape[1] if self.attn.batch_first else x.shape[0]
        mask = None
        if self.mask == "bool":
            mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
        elif self.mask == "float":
            mask = torch.zeros(seq, seq, device=x.device, dtype=x.dtype)
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=mask)
        return out if weights is None else (out, weights)


MHAS = {
    "weights": dict(need_weights=True, batch_first=True),
    "no_weights": dict(need_weights=False, batch_first=True),
    "weights_seq_first_dropout": dict(need_weights=True, dropout=0.1),
    "no_weights_seq_first_dropout": dict(need_weights=False, dropout=0.1),
    "no_weights_bool_mask": dict(need_weights=False, batch_first=True, mask="bool"),
    "no_weights_float_mask": dict(need_weights=False, batch_first=True, mask="float"),
    "weights_bool_mask": dict(need_weights=True, batch_first=True, mask="bool"),
}


@pytest.mark.parametrize("kwargs", MHAS.values(), ids=MHAS.keys())
def test_multihead_attention(kwargs, dtype):
    assert_matches_pytorch(lambda: MHA(**kwargs), randn_inputs((B, T, E)), dtype)


def test_multihead_attention_with_other_key_and_value_widths(dtype):
    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=8, vdim=12)

        def forward(self, q, k, v):
            return self.attn(q, k, v, need_weights=False)[0]

    assert_matches_pytorch(CrossAttention, randn_inputs((B, T, E), (B, 5, 8), (B, 5, 12)), dtype)


class CausalEncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=x.dtype)
        return self.layer(x, src_mask=mask, is_causal=True)


ENCODER_LAYERS = {
    "default_dropout": dict(batch_first=True),
    "no_dropout": dict(batch_first=True, dropout=0.0),
    "norm_first": dict(batch_first=True, norm_first=True),
    "norm_first_no_dropout_seq_first": dict(norm_first=True, dropout=0.0),
    "seq_first": dict(),
    "gelu": dict(batch_first=True, dropout=0.0, activation="gelu"),
}


@pytest.mark.parametrize("kwargs", ENCODER_LAYERS.values(), ids=ENCODER_LAYERS.keys())
def test_transformer_encoder_layer(kwargs, dtype):
    shape = (B, T, E) if kwargs.get("batch_first") else (T, B, E)
    assert_matches_pytorch(lambda: nn.TransformerEncoderLayer(E, H, 2 * E, **kwargs),
                           randn_inputs(shape), dtype)


@pytest.mark.parametrize("case", [
    (lambda: nn.TransformerEncoderLayer(E, H, 2 * E, batch_first=True), False),
    (lambda: nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True), False),
    (frozen(lambda: nn.TransformerEncoderLayer(E, H, 2 * E, batch_first=True), "self_attn"),
     True),
    (frozen(lambda: nn.TransformerEncoderLayer(E, H, 2 * E, dropout=0.0, batch_first=True),
            "linear", "norm"), False),
    (CausalEncoderLayer, False),
], ids=["input_no_grad", "input_no_grad_no_dropout", "frozen_attention", "frozen_mlp_and_norms",
        "causal_mask"])
def test_transformer_encoder_layer_gradients(case, dtype):
    make_module, input_grad = case
    assert_matches_pytorch(make_module, randn_inputs((B, T, E), requires_grad=input_grad), dtype)
