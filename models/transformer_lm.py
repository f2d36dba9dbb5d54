"""The Transformer language model of Stanford CS336 (2024), assignment 1.

Learned token and position embeddings, pre-norm blocks with RMSNorm, causal multi-head
attention with separate q/k/v/output projections, a GELU feed-forward w2(gelu(w1 x)),
a final RMSNorm and an untied LM head. No biases anywhere.

    >>> cfg = TransformerLMConfig(vocab_size=100, context_length=16, n_layers=2, d_model=32,
    ...                           n_heads=4, d_ff=64)
    >>> TransformerLM(cfg)(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 100])
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TransformerLMConfig:
    vocab_size: int  # rows of the token embedding and columns of the LM head
    context_length: int  # longest sequence: rows of the position embedding
    n_layers: int  # number of transformer blocks
    d_model: int  # model width; head size is d_model // n_heads
    n_heads: int  # attention heads per block
    d_ff: int  # hidden size of the position-wise feed-forward network
    attn_pdrop: float = 0.0  # dropout on the attention probabilities
    residual_pdrop: float = 0.0  # dropout on embeddings and on each sublayer's output
    eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"TransformerLMConfig: d_model={self.d_model} is not divisible by "
                f"n_heads={self.n_heads}"
            )


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        xf = x.float()  # normalise in fp32
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.attn_pdrop = config.attn_pdrop
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.output_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_heads
        q = self.q_proj(x).view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_heads, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_pdrop if self.training else 0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.output_proj(y)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.gelu = nn.GELU()

    def forward(self, x):
        return self.w2(self.gelu(self.w1(x)))  # (B, T, d_ff) -> (B, T, d_model)


class TransformerBlock(nn.Module):
    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        self.ln1 = RMSNorm(config.d_model, eps=config.eps)
        self.attn = MultiHeadSelfAttention(config)
        self.ln2 = RMSNorm(config.d_model, eps=config.eps)
        self.ffn = FeedForward(config.d_model, config.d_ff)
        self.drop = nn.Dropout(config.residual_pdrop)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embeddings = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.residual_pdrop)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        self.ln_final = RMSNorm(config.d_model, eps=config.eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.token_embeddings(idx) + self.position_embeddings(pos))  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.ln_final(x))  # (B, T, vocab_size)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
