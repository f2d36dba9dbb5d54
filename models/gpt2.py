"""GPT-2, written the nanoGPT way.

Learned token and position embeddings, pre-LayerNorm blocks with one fused QKV projection,
a 4x GELU MLP, a final LayerNorm and an LM head tied to the token embedding.

    >>> cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16)
    >>> GPT2(cfg)(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 100])
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPT2Config:
    n_layer: int  # number of transformer blocks
    n_head: int  # attention heads per block
    n_embd: int  # model width d_model; head size is n_embd // n_head
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    block_size: int = 1024  # context length: rows of the position embedding
    bias: bool = True  # biases in Linear and LayerNorm layers (False: nanoGPT's leaner variant)
    dropout: float = 0.0  # embedding, attention and residual dropout probability
    tie_weights: bool = True  # lm_head.weight is the same Parameter as wte.weight
    # False: nanoGPT's attention written out (scores, causal mask, softmax, dropout, times V),
    # the unfused layer Megatron-LM's activation formulas describe
    flash: bool = True

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "pick a head count that divides the width"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash = config.flash
        if not config.flash:  # the written-out attention's mask: True where j > i
            ones = torch.ones(config.block_size, config.block_size, dtype=torch.bool)
            self.register_buffer("future", torch.triu(ones, 1).view(1, 1, *ones.shape),
                                 persistent=False)

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0, is_causal=True
            )  # (B, nh, T, hs)
        else:
            y = attention_core(q, k, v, self.future, self.dropout, self.training)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def attention_core(q, k, v, future, dropout, training):
    """Causal attention written out, as nanoGPT does without the fused kernel: (B, nh, T, hs)
    queries, keys and values -> (B, nh, T, hs). `future` is True above the diagonal."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
    att = att.masked_fill(future[:, :, :T, :T], float("-inf"))
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, dropout, training)
    return att @ v


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one Parameter, counted once
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: std 0.02 / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
