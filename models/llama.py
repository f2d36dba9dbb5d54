"""LLaMA 1/2/3 (and Mixtral: `n_experts`), in the style of Meta's reference model.py, with RoPE
in real arithmetic.

RMSNorm pre-norm blocks, rotary position embeddings (rotate-half form, no complex numbers),
grouped-query attention via repeat_kv, a SwiGLU MLP, no biases and an untied output head.

    >>> cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100,
    ...                   ffn_dim=64, max_seq_len=16)
    >>> Llama(cfg)(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 100])
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe import MoEFeedForward


@dataclass
class LlamaConfig:
    dim: int  # model width d_model
    n_layers: int  # number of transformer blocks
    n_heads: int  # query heads; head_dim = dim // n_heads
    n_kv_heads: int  # key/value heads (== n_heads: multi-head, < n_heads: grouped-query)
    vocab_size: int  # 32000 for LLaMA 1/2, 128256 for LLaMA 3
    ffn_dim: int  # hidden size of the SwiGLU MLP (w1, w3: dim -> ffn_dim; w2: ffn_dim -> dim)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency (500000 for LLaMA 3)
    max_seq_len: int = 4096  # longest sequence; only sizes the precomputed cos/sin tables
    use_torch_rmsnorm: bool = False  # nn.RMSNorm instead of the hand-written RMSNorm below
    n_experts: int = 0  # > 0: a mixture-of-experts feed-forward (Mixtral; graphcost.models.moe)
    top_k: int = 2  # experts per token
    capacity_factor: float = 1.0  # expert slots per routed token (see moe.py: balanced routing)

    def __post_init__(self):
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"LlamaConfig: dim={self.dim} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}; grouped-query attention needs whole groups"
            )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight  # normalise in fp32


def precompute_rope(head_dim: int, max_seq_len: int, theta: float):
    """cos and sin tables of shape (max_seq_len, head_dim) for the rotate-half form of RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (hd/2,)
    t = torch.arange(max_seq_len).float()  # (S,)
    freqs = torch.outer(t, inv_freq)  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd): both halves share a frequency
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # x: (B, T, nh, hd); cos, sin: (T, hd) -> broadcast over batch and heads
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hd)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep: int):
    """(B, T, n_kv, hd) -> (B, T, n_kv * n_rep, hd): each kv head serves n_rep query heads."""
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.n_rep = config.n_heads // config.n_kv_heads
        self.head_dim = config.dim // config.n_heads
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        xq, xk = apply_rope(xq, cos, sin), apply_rope(xk, cos, sin)
        mask, causal = None, True
        if cache is not None:  # inference: keep this step's keys/values, attend to all so far
            cache_k, cache_v = cache  # (B, max_seq, nkv, hd) each
            end = start_pos + T
            cache_k[:B, start_pos:end] = xk
            cache_v[:B, start_pos:end] = xv
            xk, xv = cache_k[:B, :end], cache_v[:B, :end]  # (B, end, nkv, hd)
            # query i (at position start_pos + i) sees keys 0 .. start_pos + i
            mask = torch.arange(end, device=x.device)[None, :] <= \
                torch.arange(start_pos, end, device=x.device)[:, None]  # (T, end)
            causal = False
        xk = repeat_kv(xk, self.n_rep)  # (B, S, nh, hd)
        xv = repeat_kv(xv, self.n_rep)  # (B, S, nh, hd)
        q, k, v = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (B, nh, T|S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, nh * hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU: (B, T, ffn) -> (B, T, dim)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        Norm = nn.RMSNorm if config.use_torch_rmsnorm else RMSNorm
        self.attention_norm = Norm(config.dim, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = Norm(config.dim, eps=config.norm_eps)
        if config.n_experts:
            self.feed_forward = MoEFeedForward(
                config.dim, lambda: FeedForward(config.dim, config.ffn_dim), config.n_experts,
                config.top_k, config.capacity_factor)
        else:
            self.feed_forward = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        Norm = nn.RMSNorm if config.use_torch_rmsnorm else RMSNorm
        self.norm = Norm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = precompute_rope(config.dim // config.n_heads, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, head_dim)

    def reset_rope(self):
        """Refill the cos/sin tables, e.g. after materialising a meta model with to_empty()."""
        # NB: on the meta device the tables hold no values; non-persistent buffers are not in
        # state_dict, so load_state_dict does not fill them either.
        c = self.config
        cos, sin = precompute_rope(c.dim // c.n_heads, c.max_seq_len, c.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def new_kv_cache(self, batch: int, max_seq: int | None = None):
        """Meta-style KV cache: per layer (keys, values), each (batch, max_seq, n_kv_heads,
        head_dim) in the model's dtype, filled by `decode`."""
        c, w = self.config, self.output.weight
        shape = (batch, max_seq or c.max_seq_len, c.n_kv_heads, c.dim // c.n_heads)
        return [(torch.zeros(shape, dtype=w.dtype, device=w.device),
                 torch.zeros(shape, dtype=w.dtype, device=w.device)) for _ in self.layers]

    @torch.no_grad()
    def decode(self, tokens, cache, start_pos: int):
        """Logits for `tokens` (B, T) at positions start_pos.., reading and extending `cache`:
        a prefill (start_pos 0, T tokens) and then one token per step."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos = self.rope_cos[start_pos:start_pos + T]  # (T, head_dim)
        sin = self.rope_sin[start_pos:start_pos + T]
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, cos, sin, layer_cache, start_pos)
        return self.output(self.norm(h))  # (B, T, vocab_size)

    def forward(self, tokens, targets=None):
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, head_dim)
        for layer in self.layers:
            h = layer(h, cos, sin)
        logits = self.output(self.norm(h))  # (B, T, vocab_size)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
