"""A Mixtral-style mixture-of-experts feed-forward, written so that it can be traced.

A router (a linear layer, `gate`) scores every token for every expert and keeps the top k,
whose scores are softmaxed into routing weights; each expert is a SwiGLU feed-forward; a
token's output is the weighted sum of its k experts' outputs. That is Mixtral's layer.

Which tokens go to which expert depends on the data, and a trace on meta tensors has no data:
torch.export cannot follow a dispatch whose sizes depend on values. This layer therefore
*assumes balanced routing*: the N x k (token, choice) pairs are dealt to the experts in equal,
fixed blocks of `capacity = ceil(capacity_factor x k x N / E)` slots (a token's pair p goes to
expert p // capacity), each expert runs on exactly its capacity, and the outputs come back
weighted by the router's weights. Every expert then does the work of k N / E tokens, as with
perfectly balanced routing (what auxiliary load-balancing losses aim at), and FLOPs, saved
tensors and memory are those of that case; a capacity factor above 1 costs the padding of
token-dropping implementations. The router still runs and is differentiable; the choice of
experts it makes is not used for the dispatch. Use it to size and time MoE models, not to
train one.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def balanced_routes(gate: nn.Module, tokens: torch.Tensor, top_k: int, n_experts: int,
                    capacity_factor: float) -> tuple:
    """The router's weights and the balanced dispatch (module docstring): expert i takes the
    (token, choice) pairs i*capacity ...; slots past the N k pairs (a capacity factor above 1)
    repeat pairs and carry no weight. Returns capacity, the weights (N k,), and per slot (E C,)
    its pair, whether it is valid (1.0/0.0) and its token."""
    n, k, e = tokens.shape[0], top_k, n_experts
    scores, _ = torch.topk(gate(tokens), k, dim=-1)  # (N, k)
    weights = F.softmax(scores, dim=-1, dtype=torch.float).to(tokens.dtype).reshape(-1)  # (N k,)
    capacity = math.ceil(capacity_factor * k * n / e)
    pairs = torch.arange(e * capacity, device=tokens.device)  # (E C,)
    valid = (pairs < n * k).to(tokens.dtype)
    pairs = pairs % (n * k)
    return capacity, weights, pairs, valid, pairs // k


class MoEFeedForward(nn.Module):
    def __init__(self, dim: int, make_expert, n_experts: int, top_k: int,
                 capacity_factor: float = 1.0):
        """`make_expert()` builds one expert (a module from dim to dim): LLaMA's SwiGLU
        feed-forward for the zoo's Mixtral."""
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if capacity_factor < 1:
            raise ValueError(f"capacity_factor={capacity_factor} must be at least 1")
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.gate = nn.Linear(dim, n_experts, bias=False)  # the router
        self.experts = nn.ModuleList([make_expert() for _ in range(n_experts)])

    def forward(self, x):
        B, T, D = x.shape
        tokens = x.reshape(-1, D)  # (N, D)
        capacity, weights, pairs, valid, token_of = balanced_routes(
            self.gate, tokens, self.top_k, self.n_experts, self.capacity_factor)
        out = torch.zeros_like(tokens)
        for i, expert in enumerate(self.experts):
            slots = slice(i * capacity, (i + 1) * capacity)
            y = expert(tokens[token_of[slots]])  # (C, D)
            w = (weights[pairs[slots]] * valid[slots])[:, None]
            out = out.index_add(0, token_of[slots], y * w)
        return out.reshape(B, T, D)
