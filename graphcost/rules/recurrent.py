"""Recurrent layers: nn.LSTM, nn.GRU, nn.RNN (aten.lstm, gru, rnn_tanh, rnn_relu), nn.GRUCell
(aten.gru_cell), and oneDNN's LSTM layer (aten.mkldnn_rnn_layer).

These ops are CompositeImplicitAutograd, and their composite (ATen's RNN.cpp) branches on the
device. For a CPU target trace replaces them by what the CPU runs (graphcost/trace/decompose.py:
an fp32/bf16 nn.LSTM becomes one `mkldnn_rnn_layer` per layer and direction, the rest ATen's
cells step by step), so autograd's nodes, and what each keeps and frees, are eager's; the rule
here for `mkldnn_rnn_layer` costs oneDNN's kernel. On CUDA one kernel runs a whole layer stack
(cuDNN's _cudnn_rnn, the fused GRU cell), so the ops are kept whole and costed here.
NB: the CUDA rules are not checked here (no GPU).

FLOPs are the gate matmuls, as FlopCounterMode counts them on the meta device (where these ops
run RNN.cpp's cells): FlopCounterMode has no formula for mkldnn_rnn_layer and counts a CPU
nn.LSTM as 0; the matmuls oneDNN does are the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphcost.rules.registry import (
    FLOPS_PER_FMA,
    OpCost,
    Out,
    RuleContext,
    Saved,
    TensorSpec,
    Value,
    register,
)

aten = torch.ops.aten

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# oneDNN runs a bf16 LSTM only where it has bf16 support (x86 with AVX512BW/VL/DQ, ARM with
# BF16); elsewhere PyTorch falls back to RNN.cpp's cells.
# NB: assumed of the target CPU (graphcost's CPU device does not say).
MKLDNN_DTYPES = (torch.float32, torch.bfloat16)
PAGE_BYTES = 4096  # oneDNN aligns each part of its RNN workspace to a page


# ---- shapes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recurrent:
    """One nn.LSTM / GRU / RNN call, as the op's arguments describe it."""

    kind: str  # "lstm", "gru", "rnn_tanh", "rnn_relu"
    x: Value  # the input as given: (T, B, I), or (B, T, I) with batch_first
    h0: Value  # (L * D, B, H_out)
    c0: Value | None  # LSTM only: (L * D, B, H)
    params: tuple[Value, ...]
    has_biases: bool
    layers: int
    dropout: float
    train: bool
    bidirectional: bool
    batch_first: bool

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def seq(self) -> int:
        return self.x.shape[1] if self.batch_first else self.x.shape[0]

    @property
    def batch(self) -> int:
        return self.x.shape[0] if self.batch_first else self.x.shape[1]

    @property
    def gates(self) -> int:
        return GATES[self.kind]

    @property
    def hidden(self) -> int:  # H: w_hh is (G * H, H_out)
        return self.params[1].shape[0] // self.gates

    @property
    def out(self) -> int:  # H_out: the projection size, else H
        return self.h0.shape[-1]

    @property
    def projected(self) -> bool:  # an LSTM with proj_size: h is (.., P), c is (.., H)
        return self.c0 is not None and self.c0.shape[-1] != self.out

    @property
    def per_layer(self) -> int:  # w_ih, w_hh, [b_ih, b_hh], [w_hr] for each layer and direction
        return 2 + 2 * self.has_biases + self.projected

    def weights(self, layer: int, direction: int) -> tuple[Value, Value, Value | None]:
        """(w_ih, w_hh, w_hr or None) of one layer and direction."""
        start = (layer * self.directions + direction) * self.per_layer
        group = self.params[start:start + self.per_layer]
        return group[0], group[1], group[-1] if self.projected else None

    def layer_input_size(self, layer: int) -> int:
        return self.x.shape[-1] if layer == 0 else self.directions * self.out

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def recorded(self) -> list[list[bool]]:
        """[layer][direction]: does autograd record that layer-direction (does its input, one
        of its weights, or h0/c0 need a gradient)? A frozen first layer on an input without
        one keeps nothing."""
        states = self.h0.requires_grad or (self.c0 is not None and self.c0.requires_grad)
        x_grad, table = self.x.requires_grad, []
        for layer in range(self.layers):
            row = []
            for direction in range(self.directions):
                start = (layer * self.directions + direction) * self.per_layer
                params = self.params[start:start + self.per_layer]
                row.append(x_grad or states or any(v.requires_grad for v in params))
            table.append(row)
            x_grad = any(row)
        return table


def _recurrent(ctx: RuleContext, kind: str) -> Recurrent:
    hx = ctx.arg(1, "hx")
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    return Recurrent(kind, ctx.arg(0, "input"), h0, c0, tuple(ctx.arg(2, "params")),
                     bool(ctx.arg(3, "has_biases")), int(ctx.arg(4, "num_layers")),
                     float(ctx.arg(5, "dropout")), bool(ctx.arg(6, "train")),
                     bool(ctx.arg(7, "bidirectional")), bool(ctx.arg(8, "batch_first")))


# ---- FLOPs -----------------------------------------------------------------------------------

def recurrent_flops(r: Recurrent) -> tuple[int, int]:
    """(forward, backward) FLOPs of the gate matmuls, as FlopCounterMode counts RNN.cpp's cells:
    per layer and direction x @ w_ih.T over the sequence, then per step h @ w_hh.T (and the
    projection h @ w_hr.T). A backward product for each operand that needs a gradient: every
    hidden state after the first does once anything before it does."""
    t, b, g, h, p = r.seq, r.batch, r.gates, r.hidden, r.out
    forward = backward = 0
    recorded = r.recorded()
    for layer in range(r.layers):
        i = r.layer_input_size(layer)
        x_grad = r.x.requires_grad if layer == 0 else any(recorded[layer - 1])
        for direction in range(r.directions):
            w_ih, w_hh, w_hr = r.weights(layer, direction)
            ih, hh, hr = t * b * i * g * h, b * p * g * h, t * b * h * p
            forward += FLOPS_PER_FMA * (ih + t * hh + (hr if w_hr is not None else 0))
            if not recorded[layer][direction]:
                continue
            backward += FLOPS_PER_FMA * ih * (w_ih.requires_grad + x_grad)
            hidden_grads = (t - 1) + r.h0.requires_grad
            backward += FLOPS_PER_FMA * hh * (t * w_hh.requires_grad + hidden_grads)
            if w_hr is not None:
                backward += FLOPS_PER_FMA * hr * (w_hr.requires_grad + 1)
    return forward, backward


# ---- what is saved ---------------------------------------------------------------------------

class _Kept:
    """The saved list: each tensor once (a TensorSpec is one storage per entry)."""

    def __init__(self) -> None:
        self.items: list[Saved] = []

    def add(self, *items: Saved | None) -> None:
        for item in items:
            if item is not None and not any(item is kept for kept in self.items):
                self.items.append(item)


def mkldnn_workspace_bytes(seq: int, batch: int, input_size: int, hidden: int,
                           dtype: torch.dtype) -> int:
    """The workspace oneDNN's LSTM (one layer, one direction, training) allocates and PyTorch
    keeps for backward: oneDNN's rnn_utils set_workspace_sizes / set_offsets, each part
    page-aligned: the gates, h, the layer states, the c states, and three diff-state buffers,
    with leading dimensions padded for its GEMMs (get_good_ld). Checked against the real
    workspace over a grid of shapes in fp32 and bf16 (oneDNN 3.12, PyTorch 2.13)."""
    size = dtype.itemsize
    acc = 4  # gemm accumulation: fp32

    def good_ld(dim: int, item: int) -> int:  # 64-byte aligned, not a multiple of 256
        ld = -(-dim // (64 // item)) * (64 // item)
        return ld + 64 // item if ld % 256 == 0 else ld

    states = 2 * (seq + 1) * batch  # (layers + 1) x (iterations + 1) x batch
    widest = max(hidden, input_size)
    parts = (
        seq * batch * good_ld(4 * hidden, size) * size,  # gates
        seq * batch * good_ld(hidden, size) * size,  # h
        states * good_ld(widest, size) * size,  # layer (and iteration) states
        states * hidden * size,  # c states
        states * good_ld(widest, acc) * acc,  # diff of the layer states
        states * good_ld(widest, acc) * acc,  # diff of the iteration states
        states * hidden * acc,  # diff of the c states
    )
    return sum(-(-part // PAGE_BYTES) * PAGE_BYTES for part in parts)


def _cudnn_saved(r: Recurrent) -> tuple[Saved, ...]:
    """cuDNN's _cudnn_rnn keeps its input, h0, c0, its output and its reserve space.
    NB: not checked here (no GPU). The reserve's size is cuDNN's own; it is estimated as each
    step's gate activations, output and (LSTM) cell state in the input dtype, and is empty in
    eval mode."""
    kept = _Kept()
    kept.add(r.x, r.h0, r.c0, Out(0))
    if r.train:
        per_step = r.gates * r.hidden + r.out + (r.hidden if r.kind == "lstm" else 0)
        kept.add(TensorSpec((r.layers * r.directions * r.seq * r.batch * per_step,), r.dtype))
    return tuple(kept.items)


def _whole_on_cuda_only(ctx: RuleContext) -> None:
    if ctx.device.kind != "cuda":
        raise ValueError(f"{ctx.op} is costed whole only for CUDA; for a CPU target trace "
                         "replaces it by what ATen runs (graphcost/trace/decompose.py), which "
                         "failed here")


LAYERS = {aten.lstm.input: "lstm", aten.gru.input: "gru", aten.rnn_tanh.input: "rnn_tanh",
          aten.rnn_relu.input: "rnn_relu"}


@register(*LAYERS)
def recurrent_layer_cost(ctx: RuleContext) -> OpCost:
    """nn.LSTM / GRU / RNN on CUDA: cuDNN's _cudnn_rnn, one kernel for the whole stack."""
    _whole_on_cuda_only(ctx)
    r = _recurrent(ctx, LAYERS[ctx.op])
    forward, backward = recurrent_flops(r)
    return OpCost(forward_flops=forward, backward_flops=backward,
                  saved=_cudnn_saved(r) if ctx.requires_grad else ())


# ---- cells ---------------------------------------------------------------------------------
# nn.LSTMCell and nn.RNNCell have no rule: their ops (lstm_cell, rnn_tanh_cell, rnn_relu_cell)
# are composite on every device, and trace replaces each by the ops ATen's cell runs.

@register(aten.gru_cell)
def gru_cell_cost(ctx: RuleContext) -> OpCost:
    """nn.GRUCell on CUDA: the fused kernel (_thnn_fused_gru_cell) after input @ w_ih.T and
    h @ w_hh.T; it keeps both gate matmuls, h and a (B, 5H) workspace. NB: not checked here (no
    GPU). On a CPU trace replaces the op by ATen's cell."""
    _whole_on_cuda_only(ctx)
    x, h = ctx.arg(0, "input"), ctx.arg(1, "hx")
    w_ih, w_hh = ctx.arg(2, "w_ih"), ctx.arg(3, "w_hh")
    g = GATES["gru"]
    hidden = w_hh.shape[0] // g
    b = math.prod(x.shape[:-1])
    ih, hh = b * x.shape[-1] * g * hidden, b * h.shape[-1] * g * hidden
    forward = FLOPS_PER_FMA * (ih + hh)
    backward = FLOPS_PER_FMA * (ih * (w_ih.requires_grad + x.requires_grad)
                                + hh * (w_hh.requires_grad + h.requires_grad))
    if not ctx.requires_grad:
        return OpCost(forward_flops=forward, backward_flops=backward)
    kept = _Kept()
    kept.add(x if w_ih.requires_grad else None, h if w_hh.requires_grad else None)
    kept.add(TensorSpec((b, g * hidden), x.dtype), TensorSpec((b, g * hidden), x.dtype), h,
             TensorSpec((b, 5 * hidden), x.dtype))
    return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(kept.items))


# ---- oneDNN ----------------------------------------------------------------------------------

@register(aten.mkldnn_rnn_layer)
def mkldnn_rnn_layer_cost(ctx: RuleContext) -> OpCost:
    """One layer and direction of a CPU nn.LSTM (what trace decomposes aten.lstm into where
    oneDNN runs it). Autograd keeps its input, weights, h0, c0 and all four results: the
    output, final h and c, and the workspace, whose size the meta kernel leaves at 0 and is
    oneDNN's own (`mkldnn_workspace_bytes`). FLOPs are the gate matmuls,
    counted as for RNN.cpp's cells (FlopCounterMode has no formula for this op)."""
    x, w_ih, w_hh, h0, c0 = (ctx.arg(0, "input"), ctx.arg(1, "weight0"), ctx.arg(2, "weight1"),
                             ctx.arg(5, "hx_"), ctx.arg(6, "cx_"))
    hidden, train = ctx.arg(10, "hidden_size"), ctx.arg(15, "train")
    # time-major: RNN.cpp transposes a batch_first input before the layers (batch_first is
    # passed on, but the meta kernel's reading of it is not the layer's)
    t, b = x.shape[0], x.shape[1]
    g, i = GATES["lstm"], x.shape[-1]
    ih, hh = t * b * i * g * hidden, b * hidden * g * hidden
    forward = FLOPS_PER_FMA * (ih + t * hh)
    backward = FLOPS_PER_FMA * (ih * (w_ih.requires_grad + x.requires_grad)
                                + hh * (t * w_hh.requires_grad + (t - 1) + h0.requires_grad))
    # oneDNN trains (and fills the workspace) when autograd records the op, even for a module
    # in eval mode (train=False)
    workspace = ({3: mkldnn_workspace_bytes(t, b, i, hidden, x.dtype)}
                 if train or ctx.requires_grad else None)
    # its backward (mkldnn_rnn_layer_backward) makes the gradient of every input, and the
    # engine drops those nobody needs: they exist while it runs
    unwanted = sum(v.spec.nbytes for v in (x, *ctx.inputs[1:5], h0, c0)
                   if isinstance(v, Value) and not v.requires_grad)
    return OpCost(forward_flops=forward, backward_flops=backward,
                  saved=ctx.saved_if_grad(x, *ctx.inputs[1:5], h0, c0, Out(0), Out(1), Out(2),
                                          Out(3)),
                  output_storage_bytes=workspace,
                  backward_workspace_bytes=unwanted if ctx.requires_grad else 0)
