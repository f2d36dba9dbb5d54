"""What validation/random_arch.py's random architectures are made of: the activation's layout and
shape (`State`), the layers its grammar builds from (plain torch.nn compositions: a residual,
parallel branches and their combination, gates, shared and stacked blocks, layout transforms,
attention), and the generated model (`RandomArch`). Each has a readable repr, so a generated
model prints as its architecture.

>>> Parallel([nn.Linear(4, 4), nn.Linear(4, 4)], "maximum", -1)(torch.randn(2, 4)).shape
torch.Size([2, 4])
>>> State("seq", (8, 16)).with_width(32)
State(layout='seq', shape=(8, 32))
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LAYOUTS", "MHA", "ChannelsLastLayerNorm", "Gate", "Parallel", "PosEmbed", "RandomArch",
           "Residual", "Scale", "SelfAttention", "Shared", "Stack", "State", "TiedHead",
           "Transform"]

LAYOUTS = ("seq", "flat", "c1d", "c2d")


@dataclasses.dataclass(frozen=True)
class State:
    """The activation's layout and shape, batch excluded."""

    layout: str
    shape: tuple[int, ...]

    @property
    def width(self) -> int:
        """Features (seq, flat) or channels (c1d, c2d): the dimension layers change."""
        return self.shape[-1] if self.layout in ("seq", "flat") else self.shape[0]

    @property
    def feature_dim(self) -> int:
        return -1 if self.layout in ("seq", "flat") else 1

    def with_width(self, width: int) -> State:
        if self.layout in ("seq", "flat"):
            return State(self.layout, self.shape[:-1] + (width,))
        return State(self.layout, (width,) + self.shape[1:])

    def numel(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{self.layout}{tuple(self.shape)}"


# --- modules the grammar builds from (each with a readable repr) --------------------------------


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Parallel(nn.Module):
    """combine(branch_1(x), ..., branch_k(x))."""

    def __init__(self, branches: list[nn.Module], combine: str, dim: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.combine, self.dim = combine, dim

    def extra_repr(self) -> str:
        return f"combine={self.combine}" + (f", dim={self.dim}" if self.combine == "cat" else "")

    def forward(self, x):
        outs = [branch(x) for branch in self.branches]
        if self.combine == "cat":
            return torch.cat(outs, dim=self.dim)
        out = outs[0]
        for other in outs[1:]:
            if self.combine == "add":
                out = out + other
            elif self.combine == "sub":
                out = out - other
            elif self.combine == "mul":
                out = out * other
            else:
                out = torch.maximum(out, other)
        return out


class Gate(nn.Module):
    """value(x) * sigmoid(gate(x)) ("sigmoid"), or silu(value(x)) * gate(x) ("swiglu")."""

    def __init__(self, value: nn.Module, gate: nn.Module, kind: str) -> None:
        super().__init__()
        self.value, self.gate, self.kind = value, gate, kind

    def extra_repr(self) -> str:
        return f"kind={self.kind}"

    def forward(self, x):
        if self.kind == "sigmoid":
            return self.value(x) * torch.sigmoid(self.gate(x))
        return F.silu(self.value(x)) * self.gate(x)


class Shared(nn.Module):
    """The same module (one set of parameters) applied `times` times."""

    def __init__(self, layer: nn.Module, times: int) -> None:
        super().__init__()
        self.layer, self.times = layer, times

    def extra_repr(self) -> str:
        return f"times={self.times}"

    def forward(self, x):
        for _ in range(self.times):
            x = self.layer(x)
        return x


class Stack(nn.Module):
    """Blocks in an nn.ModuleList, applied in order (the other form a repeated stack takes)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Transform(nn.Module):
    """A parameter-free reshaping op, named by `kind`."""

    def __init__(self, kind: str, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.kind, self.shape = kind, tuple(shape)

    def extra_repr(self) -> str:
        return self.kind + (f", shape={self.shape}" if self.shape else "")

    def forward(self, x):
        kind = self.kind
        if kind == "transpose(1,2)":
            return x.transpose(1, 2)
        if kind == "transpose(1,2).contiguous":
            return x.transpose(1, 2).contiguous()
        if kind == "flatten(1)":
            return x.flatten(1)
        if kind == "flatten(2)":
            return x.flatten(2)
        if kind == "flatten(2).transpose(1,2)":
            return x.flatten(2).transpose(1, 2)
        if kind == "mean(1)":
            return x.mean(1)
        if kind == "mean(-1)":
            return x.mean(-1)
        if kind == "view":
            return x.view(x.shape[0], *self.shape)
        if kind == "reshape":
            return x.reshape(x.shape[0], *self.shape)
        if kind == "permute(0,2,3,1).reshape.permute":  # channels-last round trip through a copy
            n, c, h, w = x.shape
            return x.permute(0, 2, 3, 1).reshape(n, h * w, c).permute(0, 2, 1).reshape(n, c, h, w)
        raise ValueError(kind)


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def forward(self, x):
        return x * self.factor


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over the channels of (N, C, H, W): permute to channels-last and back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PosEmbed(nn.Module):
    def __init__(self, seq: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(seq, dim) * 0.02)

    def forward(self, x):
        return x + self.weight


class SelfAttention(nn.Module):
    """Multi-head self-attention over (N, T, D): a fused qkv projection, then
    F.scaled_dot_product_attention ("sdpa") or softmax(q kᵀ / √d) v ("explicit"), then a projection.
    `mask`: "causal" (sdpa: is_causal), "causal-buffer" (explicit: a registered bool buffer),
    "none"."""

    def __init__(self, seq: int, dim: int, heads: int, kind: str, mask: str, bias: bool) -> None:
        super().__init__()
        self.heads, self.kind, self.mask = heads, kind, mask
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        if mask == "causal-buffer":
            self.register_buffer("causal", torch.ones(seq, seq, dtype=torch.bool).triu(1),
                                 persistent=False)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kind={self.kind}, mask={self.mask}"

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.kind == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.mask == "causal")
        else:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
            if self.mask == "causal":
                scores = scores.masked_fill(
                    torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            elif self.mask == "causal-buffer":
                scores = scores.masked_fill(self.causal, float("-inf"))
            y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class MHA(nn.Module):
    """nn.MultiheadAttention as self-attention, output only."""

    def __init__(self, dim: int, heads: int, bias: bool, need_weights: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=True)
        self.heads, self.bias, self.need_weights = heads, bias, need_weights

    def extra_repr(self) -> str:
        return f"heads={self.heads}, bias={self.bias}, need_weights={self.need_weights}"

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class TiedHead(nn.Module):
    """Logits against the embedding's own weight (a parameter used twice)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def extra_repr(self) -> str:
        return "weight tied to the input embedding"

    def forward(self, x):
        return F.linear(x, self.embedding.weight)


class RandomArch(nn.Module):
    """The generated model: stem, body, head; its repr names the seed and the input."""

    def __init__(self, seed: int, input_state: State, stem: nn.Module, body: nn.Sequential,
                 head: nn.Module, frozen: list[str], input_requires_grad: bool) -> None:
        super().__init__()
        self.seed, self.input_state = seed, input_state
        self.input_requires_grad = input_requires_grad
        self.stem, self.body, self.head = stem, body, head
        self.frozen = frozen

    def extra_repr(self) -> str:
        grad = ", input requires grad" if self.input_requires_grad else ""
        frozen = f", frozen={self.frozen}" if self.frozen else ""
        return f"seed={self.seed}, input={self.input_state}{grad}{frozen}"

    def forward(self, x):
        return self.head(self.body(self.stem(x)))
