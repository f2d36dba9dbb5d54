"""Transformers written by hand and with torch.nn's own layers, gated MLPs, PReLU, nn.Bilinear,
weight-normalised convolutions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from . import Entry, floats, inputs, ints

V, B, T, S = 40, 2, 8, 6


class CrossAttentionDecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention to the encoder memory
    (nn.MultiheadAttention, batch_first), MLP."""

    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, memory, causal_mask):
        h = self.ln1(x)
        x = x + self.self_attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        x = x + self.cross_attn(self.ln2(x), memory, memory, need_weights=False)[0]
        return x + self.mlp(self.ln3(x))


class CaptionDecoder(nn.Module):
    """Image-captioning style: projected image features are the memory the text attends to."""

    def __init__(self, feat=20, d=32, heads=4, layers=2):
        super().__init__()
        self.proj = nn.Linear(feat, d)
        self.tok = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.zeros(1, T, d))
        self.layers = nn.ModuleList(CrossAttentionDecoderLayer(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)

    def forward(self, features, tokens, targets):
        memory = self.proj(features)
        x = self.tok(tokens) + self.pos[:, :tokens.size(1)]
        t = tokens.size(1)
        mask = torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, memory, mask)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


class PositionalEncoding(nn.Module):
    """The PyTorch tutorial's sinusoidal encoding, a buffer, with dropout."""

    def __init__(self, d, dropout=0.1, max_len=64):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
        pe = torch.zeros(max_len, 1, d)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x):  # (T, B, d)
        return self.dropout(x + self.pe[:x.size(0)])


class TutorialTransformerLM(nn.Module):
    """"Language modeling with nn.TransformerEncoder" (the PyTorch tutorial): sequence-first,
    post-norm layers with ReLU and dropout 0.1, a generated square subsequent mask."""

    def __init__(self, d=32, heads=4, hidden=64, layers=2):
        super().__init__()
        self.embedding = nn.Embedding(V, d)
        self.pos_encoder = PositionalEncoding(d)
        layer = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.1)
        self.transformer_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.linear = nn.Linear(d, V)
        self.d = d

    def forward(self, src, targets):  # src: (T, B)
        mask = nn.Transformer.generate_square_subsequent_mask(src.size(0), device=src.device)
        x = self.pos_encoder(self.embedding(src) * math.sqrt(self.d))
        out = self.linear(self.transformer_encoder(x, mask))
        return F.cross_entropy(out.view(-1, V), targets.view(-1))


class TranslationTransformer(nn.Module):
    """nn.TransformerEncoder + nn.TransformerDecoder (batch_first, pre-norm, GELU): a
    translation model with a causal target mask and a padding mask on the source."""

    def __init__(self, d=32, heads=4, hidden=64, layers=2):
        super().__init__()
        self.src_tok = nn.Embedding(V, d)
        self.tgt_tok = nn.Embedding(V, d)
        enc = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(d, heads, hidden, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, layers, norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, layers, norm=nn.LayerNorm(d))
        self.generator = nn.Linear(d, V)

    def forward(self, src, tgt_in, tgt_out):
        src_pad = src == 0
        tgt_mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1),
                                                                  device=src.device)
        memory = self.encoder(self.src_tok(src), src_key_padding_mask=src_pad)
        out = self.decoder(self.tgt_tok(tgt_in), memory, tgt_mask=tgt_mask, tgt_is_causal=True,
                           memory_key_padding_mask=src_pad)
        return F.cross_entropy(self.generator(out).transpose(1, 2), tgt_out)


def translation_inputs(device, dtype):
    src = torch.randint(1, V, (B, S), device=device)
    src[:, -1] = 0  # padding
    return src, torch.randint(0, V, (B, T), device=device), torch.randint(0, V, (B, T),
                                                                             device=device)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention without the flash path: explicit scores, masked_fill, softmax,
    attention dropout."""

    def __init__(self, d, heads, block):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(0.1)
        self.resid_dropout = nn.Dropout(0.1)
        self.n_head = heads
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B_, T_, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B_, T_, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B_, T_, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B_, T_, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T_, :T_] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B_, T_, C)
        return self.resid_dropout(self.c_proj(y))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GLUMLP(nn.Module):
    """The GLU variant with F.glu over one fused projection (Dauphin et al.)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.fc = nn.Linear(d, 2 * hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x):
        return self.out(F.glu(self.fc(x), dim=-1))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, d, heads, block, mlp):
        super().__init__()
        self.ln_1 = RMSNorm(d)
        self.attn = CausalSelfAttention(d, heads, block)
        self.ln_2 = RMSNorm(d)
        self.mlp = mlp

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ExplicitGPT(nn.Module):
    """Explicit-softmax attention, RMSNorm; a SwiGLU MLP in the first block, F.glu in the
    second."""

    def __init__(self, d=32, heads=4, block=16):
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(block, d)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList([Block(d, heads, block, SwiGLU(d, 48)),
                                Block(d, heads, block, GLUMLP(d, 48))])
        self.ln_f = RMSNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx, targets):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class PReLUBilinear(nn.Module):
    """Two-tower matching model: PReLU MLP towers (per-channel and shared slopes), an
    nn.Bilinear score, BCE-with-logits."""

    def __init__(self, a=12, b=10, hidden=16):
        super().__init__()
        self.tower_a = nn.Sequential(nn.Linear(a, hidden), nn.PReLU(hidden), nn.Linear(hidden, hidden))
        self.tower_b = nn.Sequential(nn.Linear(b, hidden), nn.PReLU(), nn.Linear(hidden, hidden))
        self.bilinear = nn.Bilinear(hidden, hidden, 4)
        self.act = nn.PReLU(4)
        self.score = nn.Linear(4, 1)

    def forward(self, xa, xb, y):
        s = self.score(self.act(self.bilinear(self.tower_a(xa), self.tower_b(xb)))).squeeze(-1)
        return F.binary_cross_entropy_with_logits(s, y)


def matching_inputs(device, dtype):
    return (torch.randn(4, 12, device=device, dtype=dtype),
            torch.randn(4, 10, device=device, dtype=dtype),
            torch.randint(0, 2, (4,), device=device).to(dtype))


class WeightNormTCN(nn.Module):
    """Temporal convolutional network (Bai et al.) with weight-normalised convolutions
    (torch.nn.utils.parametrizations.weight_norm), chomped causal padding."""

    def __init__(self, cin=6, ch=16, k=3, levels=2, classes=4):
        super().__init__()
        blocks = []
        for i in range(levels):
            d = 2 ** i
            c_in = cin if i == 0 else ch
            blocks.append(nn.ModuleDict({
                "conv1": weight_norm(nn.Conv1d(c_in, ch, k, padding=(k - 1) * d, dilation=d)),
                "conv2": weight_norm(nn.Conv1d(ch, ch, k, padding=(k - 1) * d, dilation=d)),
                "down": nn.Conv1d(c_in, ch, 1) if c_in != ch else nn.Identity(),
            }))
        self.blocks = nn.ModuleList(blocks)
        self.fc = weight_norm(nn.Linear(ch, classes))
        self.chomp = [(k - 1) * 2 ** i for i in range(levels)]

    def forward(self, x, labels):
        t = x.size(2)
        for blk in self.blocks:
            h = F.relu(blk["conv1"](x)[:, :, :t])
            h = F.relu(blk["conv2"](h)[:, :, :t])
            x = F.relu(h + blk["down"](x))
        return F.cross_entropy(self.fc(x[:, :, -1]), labels)


ENTRIES = [
    Entry("caption_cross_attn", "attention", CaptionDecoder,
          inputs(floats(B, S, 20), ints(V, B, T), ints(V, B, T)),
          "nn.MultiheadAttention self (float causal mask) + cross-attention to encoder memory"),
    Entry("nn_transformer_encoder", "attention", TutorialTransformerLM,
          inputs(ints(V, T, B), ints(V, T, B)),
          "PyTorch tutorial: nn.TransformerEncoder, post-norm, seq-first, dropout, square mask"),
    Entry("nn_transformer_seq2seq", "attention", TranslationTransformer, translation_inputs,
          "nn.TransformerEncoder + nn.TransformerDecoder, pre-norm, key padding mask"),
    Entry("explicit_softmax_gpt", "attention", ExplicitGPT, inputs(ints(V, B, T), ints(V, B, T)),
          "q@k^T, masked_fill, softmax, attention dropout; RMSNorm; SwiGLU and F.glu MLPs; "
          "tied embedding"),
    Entry("prelu_bilinear", "misc", PReLUBilinear, matching_inputs,
          "nn.PReLU (per channel and shared), nn.Bilinear"),
    Entry("weightnorm_tcn", "audio", WeightNormTCN, inputs(floats(B, 6, 16), ints(4, B)),
          "parametrizations.weight_norm on Conv1d and Linear, dilated causal TCN"),
]
