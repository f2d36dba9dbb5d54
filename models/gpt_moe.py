"""A GPT whose feed-forwards are mixtures of experts, the GShard / Fairseq way.

nanoGPT's GPT-2 (graphcost.models.gpt2: learned positions, LayerNorm, biases, a tied head) with
the MLP of every `expert_interval`-th block replaced by `n_experts` copies of it (d -> 4d -> d,
GELU, biases) behind a top-k router. This is the layer the EleutherAI calculator scripts'
`--moe` counts (two `ffn_expansion_factor` x h^2 matrices per expert, a linear router, MoE
every `--expert-interval` layers), so their MoE examples can be built as written.

Routing is balanced, as in graphcost.models.moe (read its docstring): the N x k (token, choice)
pairs are dealt to the experts in fixed blocks of ceil(capacity_factor x k x N / E) slots, and
the router's weights scale the outputs. The experts' weights are stacked, (E, d, 4d) and
(E, 4d, d), and run as one batched matmul over the (E, slots, d) tokens, so the trace does not
grow with the number of experts (512 trace as fast as 8). Expert parallelism
(graphcost.passes.parallel, `--ep`) finds experts by module (`experts.<i>.`) and does not
split these stacked ones; use the zoo's Mixtral for that.

    >>> cfg = GPTMoEConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16,
    ...                    n_experts=4, expert_interval=2)
    >>> GPTMoE(cfg)(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 100])
    >>> [type(b.mlp).__name__ for b in GPTMoE(cfg).h]
    ['MLP', 'MoEMLP']
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from graphcost.models.gpt2 import GPT2, GPT2Config
from graphcost.models.moe import balanced_routes


@dataclass
class GPTMoEConfig(GPT2Config):
    n_experts: int = 8  # experts per MoE feed-forward
    top_k: int = 1  # experts per token
    # blocks i with (i + 1) % expert_interval == 0 have an MoE feed-forward (2: every other one)
    expert_interval: int = 1
    capacity_factor: float = 1.0  # expert slots per routed token (graphcost.models.moe)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"GPTMoEConfig: top_k={self.top_k} must be between 1 and "
                             f"n_experts={self.n_experts}")
        if not 1 <= self.expert_interval <= self.n_layer:
            raise ValueError(f"GPTMoEConfig: expert_interval={self.expert_interval} must be "
                             f"between 1 and n_layer={self.n_layer}")
        if self.capacity_factor < 1:
            raise ValueError(f"GPTMoEConfig: capacity_factor={self.capacity_factor} must be "
                             "at least 1")


class MoEMLP(nn.Module):
    """`n_experts` GPT-2 MLPs behind a linear router, weights stacked per expert."""

    def __init__(self, config: GPTMoEConfig):
        super().__init__()
        e, d = config.n_experts, config.n_embd
        self.n_experts, self.top_k = e, config.top_k
        self.capacity_factor = config.capacity_factor
        self.gate = nn.Linear(d, e, bias=False)  # the router
        self.w_fc = nn.Parameter(torch.empty(e, d, 4 * d))  # expert i's c_fc, transposed
        self.b_fc = nn.Parameter(torch.zeros(e, 4 * d))
        self.w_proj = nn.Parameter(torch.empty(e, 4 * d, d))  # expert i's c_proj, transposed
        self.b_proj = nn.Parameter(torch.zeros(e, d))
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.w_fc, mean=0.0, std=0.02)  # GPT-2's init, scaled on c_proj
        nn.init.normal_(self.w_proj, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, x):
        B, T, D = x.shape
        tokens = x.reshape(-1, D)  # (N, D)
        capacity, weights, pairs, valid, token_of = balanced_routes(
            self.gate, tokens, self.top_k, self.n_experts, self.capacity_factor)
        xe = tokens[token_of].view(self.n_experts, capacity, D)  # (E, C, D)
        h = self.gelu(torch.baddbmm(self.b_fc[:, None, :], xe, self.w_fc))  # (E, C, 4D)
        y = torch.baddbmm(self.b_proj[:, None, :], h, self.w_proj).reshape(-1, D)  # (E C, D)
        y = y * (weights[pairs] * valid)[:, None]
        out = torch.zeros_like(tokens).index_add(0, token_of, y)  # (N, D)
        return self.dropout(out.reshape(B, T, D))


class GPTMoE(GPT2):
    def __init__(self, config: GPTMoEConfig):
        super().__init__(config)
        for i, block in enumerate(self.h):
            if (i + 1) % config.expert_interval == 0:
                block.mlp = MoEMLP(config)


def _build(config: GPTMoEConfig, batch: int, seq: int, with_targets: bool, device) -> tuple:
    """(model, inputs) on `device` (meta: nothing is allocated, as the zoo's `load`)."""
    with torch.device(device):
        model = GPTMoE(config)
        x = torch.zeros(batch, seq, dtype=torch.long)
        inputs = (x, torch.zeros(batch, seq, dtype=torch.long)) if with_targets else (x,)
    return model, inputs


# The shape the calculator scripts' README (EleutherAI cookbook, calc/) labels "Fairseq-MoE
# 15B": `-l 12 -hs 768 --moe -e 512` with the scripts' defaults (vocab 51,200, 2,048 tokens,
# 4x feed-forward, top-1 routing).
CALCULATOR_MOE_15B = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=51200,
                          block_size=2048, n_experts=512, top_k=1)


def moe_15b(batch: int = 1, seq: int = 2048, with_targets: bool = True, device="meta"):
    """`graphcost analyze models/gpt_moe.py:moe_15b`: the calculators' Fairseq-MoE
    15B, experts in every other block (`--expert-interval 2`, calc_transformer_flops.py's
    default): 14.6 B parameters."""
    config = GPTMoEConfig(**CALCULATOR_MOE_15B, expert_interval=2)
    return _build(config, batch, seq, with_targets, device)


def moe_15b_every_block(batch: int = 1, seq: int = 2048, with_targets: bool = True,
                        device="meta"):
    """The same with experts in every block (`--expert-interval 1`, the default of
    calc_transformer_params.py, which its README example keeps): 29.1 B parameters."""
    config = GPTMoEConfig(**CALCULATOR_MOE_15B, expert_interval=1)
    return _build(config, batch, seq, with_targets, device)
