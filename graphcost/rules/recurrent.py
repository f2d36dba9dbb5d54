"""Recurrent layers: nn.LSTM, nn.GRU, nn.RNN (aten.lstm, gru, rnn_tanh, rnn_relu) and
nn.GRUCell (aten.gru_cell).

These ops are CompositeImplicitAutograd, but their composite (ATen's RNN.cpp) branches on the
device: on the CPU an fp32 or bf16 nn.LSTM runs oneDNN, and the cells get the input's gate
matmul for the whole sequence at once (a copy of a batch_first input), where on the meta device
trace decomposes on they run step by step. So each is kept whole and costed here by what the
kernel that runs saves:

- CPU, nn.LSTM in fp32/bf16 without projections: one `mkldnn_rnn_layer` per layer and
  direction, which keeps its input, h0/c0, its output, final h/c and oneDNN's workspace (its
  size is oneDNN's own arithmetic: `mkldnn_workspace_bytes`).
- CPU, everything else: RNN.cpp's cells, step by step, with in-place gates: the gate matmuls
  for the whole sequence at once, then per step the hidden-to-hidden linear, the gate
  activations (sigmoid_/tanh_ in place), the clones autograd makes for an in-place mul_ (GRU).
- CUDA: cuDNN (layers) and the fused GRU cell kernel. NB: not checked here (no GPU).

nn.LSTMCell and nn.RNNCell are not here: trace replaces their ops by what ATen's cells run.

FLOPs are the gate matmuls, as FlopCounterMode counts them on the meta device (where these ops
run RNN.cpp's cells): FlopCounterMode has no formula for mkldnn_rnn_layer and counts a CPU
nn.LSTM as 0; the matmuls oneDNN does are the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graphcost.rules.layout import is_contiguous, strides_of, view_strides
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
    """The saved list: each tensor once (a TensorSpec is one storage per entry, so one that two
    ops keep, such as a layer input, is listed once)."""

    def __init__(self) -> None:
        self.items: list[Saved] = []

    def add(self, *items: Saved | None) -> None:
        for item in items:
            if item is not None and not any(item is kept for kept in self.items):
                self.items.append(item)


def _time_major(x: Value, batch_first: bool) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Shape and strides of the (T, B, I) view the kernels work on (x.transpose(0, 1) when
    batch_first)."""
    strides = strides_of(x)
    if not batch_first:
        return x.shape, strides
    shape = (x.shape[1], x.shape[0], *x.shape[2:])
    return shape, None if strides is None else (strides[1], strides[0], *strides[2:])


def _dropout(kept: _Kept, r: Recurrent, layer: int, x: TensorSpec, grad: bool) -> TensorSpec:
    """Dropout between layers (in training, not after the last): input * noise keeps the noise
    (a 0-dim zero for p = 1) when the input needs a gradient, and makes the next layer's
    input."""
    if not (r.train and r.dropout > 0 and layer < r.layers - 1):
        return x
    if grad:
        kept.add(TensorSpec(() if r.dropout == 1 else x.shape, x.dtype))
    return TensorSpec(x.shape, x.dtype)


def _cells_saved(r: Recurrent) -> tuple[Saved, ...]:
    """RNN.cpp on the CPU (FullLayer / FullBidirectionalLayer): per layer and direction,
    linear_ih over the whole input keeps it (as the matrix its fold makes: a copy when the
    batch_first view cannot be one), then each step's cell."""
    kept = _Kept()
    t, b, g, h, p, dtype = r.seq, r.batch, r.gates, r.hidden, r.out, r.dtype
    shape, strides = _time_major(r.x, r.batch_first)
    x: Value | TensorSpec = r.x
    recorded = r.recorded()
    for layer in range(r.layers):
        for direction in range(r.directions):
            if not recorded[layer][direction]:
                continue
            w_ih, w_hh, w_hr = r.weights(layer, direction)
            if w_ih.requires_grad:  # linear_ih's mm keeps its input
                if isinstance(x, Value):
                    rows = (t * b, shape[-1])
                    view = strides is not None and view_strides(shape, strides, rows) is not None
                    kept.add(x if view else TensorSpec(rows, dtype))  # a copy per direction
                else:
                    kept.add(x)
            if w_hh.requires_grad:  # each step's linear_hh keeps h: h0, then h_0 .. h_{T-2}
                kept.add(r.h0)  # (a simple cell's h_t is the tanh/relu result it keeps anyway)
                if r.kind in ("lstm", "gru"):
                    kept.add(*(TensorSpec((b, p), dtype) for _ in range(t - 1)))
            for _ in range(t):
                kept.add(*_step_saved(r.kind, b, g, h, dtype, w_hr))
            if r.kind == "lstm":  # forgetgate * c keeps c: c0, then c_0 .. c_{T-2}
                kept.add(r.c0, *(TensorSpec((b, h), dtype) for _ in range(t - 1)))
        # the next layer's input: the stacked steps (concatenated directions)
        x = _dropout(kept, r, layer, TensorSpec((t, b, r.directions * p), dtype),
                     any(recorded[layer]))
    return tuple(kept.items)


def _step_saved(kind: str, b: int, g: int, h: int, dtype: torch.dtype,
                w_hr: Value | None) -> tuple[TensorSpec, ...]:
    """What one step of RNN.cpp's cell keeps, beyond its h and c inputs (RNN.cpp: LSTMCell,
    GRUCell, SimpleCell, with the input's gate matmul already done)."""
    if kind == "lstm":
        # gates (sigmoid_/tanh_ in place on chunks of one (B, 4H) tensor: their results),
        # tanh(c), for outgate * tanh(c); with projections, the unprojected h for w_hr's grad
        kept = (TensorSpec((b, g * h), dtype), TensorSpec((b, h), dtype))
        return kept + ((TensorSpec((b, h), dtype),) if w_hr is not None and w_hr.requires_grad
                       else ())
    if kind == "gru":
        # the hidden gates (reset and input gates sigmoid_ in place on them), the clone of the
        # hidden new-gate chunk that its in-place mul_ by the reset gate keeps, the new gate
        # (tanh_ of a new tensor), the clone of h - n that mul_(input gate) keeps
        return (TensorSpec((b, g * h), dtype), TensorSpec((b, h), dtype),
                TensorSpec((b, h), dtype), TensorSpec((b, h), dtype))
    return (TensorSpec((b, h), dtype),)  # tanh / relu keep their result: the new h


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


def _mkldnn_saved(r: Recurrent) -> tuple[Saved, ...]:
    """PyTorch's mkldnn_rnn: the input made contiguous (time-major), then per layer and
    direction one mkldnn_rnn_layer, which keeps its input, weights (zeros of the weights'
    shapes stand in for absent biases: new tensors), h0 and c0 of its layer, its output, its
    final h and c, and the workspace."""
    kept = _Kept()
    t, b, h, dtype = r.seq, r.batch, r.hidden, r.dtype
    shape, strides = _time_major(r.x, r.batch_first)
    x: Value | TensorSpec = r.x if is_contiguous(shape, strides) else TensorSpec(shape, dtype)
    h0 = r.h0 if r.h0.contiguous else TensorSpec(r.h0.shape, r.h0.dtype)
    c0 = r.c0 if r.c0.contiguous else TensorSpec(r.c0.shape, r.c0.dtype)
    recorded = r.recorded()
    for layer in range(r.layers):
        last = layer == r.layers - 1
        outputs = []
        for direction in range(r.directions):
            # one direction's output is the op's own on the last layer
            output = Out(0) if last and r.directions == 1 else TensorSpec((t, b, h), dtype)
            outputs.append(output)
            if not recorded[layer][direction]:
                continue
            w_ih, w_hh, _ = r.weights(layer, direction)
            kept.add(x, h0, c0)
            if not r.has_biases:
                kept.add(TensorSpec(w_ih.shape, w_ih.dtype), TensorSpec(w_hh.shape, w_hh.dtype))
            kept.add(output, TensorSpec((b, h), dtype), TensorSpec((b, h), dtype),
                     TensorSpec((mkldnn_workspace_bytes(t, b, r.layer_input_size(layer), h,
                                                        dtype),), torch.uint8))
        if not last:
            x = outputs[0] if r.directions == 1 else TensorSpec((t, b, 2 * h), dtype)  # cat
            x = _dropout(kept, r, layer, x, any(recorded[layer]))
    return tuple(kept.items)


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


def _uses_mkldnn(r: Recurrent) -> bool:
    """RNN.cpp's use_mkldnn: an LSTM without projections in fp32 or bf16 (fp16 only without
    autograd)."""
    return (r.kind == "lstm" and r.dtype in MKLDNN_DTYPES and not r.projected
            and r.seq * r.batch * r.x.shape[-1] > 0)


def _cells_workspace_bytes(r: Recurrent) -> int:
    """What RNN.cpp's layers hold inside the op at its fullest moment, the last layer's end,
    beyond the saved tensors and the outputs: that layer's input gate matmul for the whole
    sequence (T, B, G * H), still referenced by its step inputs, and, bidirectional, the two
    directions' stacked outputs that the concatenation reads. The final hidden states held for
    stacking take the place of the h_n (and c_n) output not made yet, except a simple cell's,
    which are its saved tanh/relu results: h_n is not there yet."""
    t, b = r.seq, r.batch
    stacked = 2 * t * b * r.out if r.bidirectional else 0
    h_n = r.layers * r.directions * b * r.out if r.kind in ("rnn_tanh", "rnn_relu") else 0
    return (t * b * r.gates * r.hidden + stacked - h_n) * r.dtype.itemsize


def _recurrent_cost(ctx: RuleContext, kind: str) -> OpCost:
    r = _recurrent(ctx, kind)
    forward, backward = recurrent_flops(r)
    workspace = 0
    if ctx.device.kind == "cuda":
        saved = _cudnn_saved(r)
    elif _uses_mkldnn(r):
        saved = _mkldnn_saved(r)
    else:
        saved = _cells_saved(r)
        workspace = _cells_workspace_bytes(r)
    return OpCost(forward_flops=forward, backward_flops=backward,
                  saved=saved if ctx.requires_grad else (), forward_workspace_bytes=workspace,
                  backward_memory_exact=False)  # autograd frees layer by layer, direction by
    # direction; the walk keeps every saved tensor until the whole op's backward is done


@register(aten.lstm.input)
def lstm_cost(ctx: RuleContext) -> OpCost:
    return _recurrent_cost(ctx, "lstm")


@register(aten.gru.input)
def gru_cost(ctx: RuleContext) -> OpCost:
    return _recurrent_cost(ctx, "gru")


@register(aten.rnn_tanh.input)
def rnn_tanh_cost(ctx: RuleContext) -> OpCost:
    return _recurrent_cost(ctx, "rnn_tanh")


@register(aten.rnn_relu.input)
def rnn_relu_cost(ctx: RuleContext) -> OpCost:
    return _recurrent_cost(ctx, "rnn_relu")


# ---- cells -----------------------------------------------------------------------------------
# nn.LSTMCell and nn.RNNCell have no rule: their ops (lstm_cell, rnn_tanh_cell, rnn_relu_cell)
# are composite, and trace replaces each by the ops ATen's cell runs (graphcost/trace/
# decompose.py), which gives their FLOPs and saved tensors exactly and their memory op by op.

@register(aten.gru_cell)
def gru_cell_cost(ctx: RuleContext) -> OpCost:
    """nn.GRUCell, kept whole: its decomposition is exact but for the clone of the new-gate chunk
    that autograd keeps for the in-place mul_ by the reset gate (the mul_ rule keeps the chunk
    itself, which shares the gates' storage). One step of ATen's GRU cell: input @ w_ih.T and
    h @ w_hh.T, then the gates (see _step_saved)."""
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
    if ctx.device.kind == "cuda":
        # the fused kernel (_thnn_fused_gru_cell) keeps both gate matmuls, h and a (B, 5H)
        # workspace. NB: not checked here (no GPU).
        kept.add(TensorSpec((b, g * hidden), x.dtype), TensorSpec((b, g * hidden), x.dtype), h,
                 TensorSpec((b, 5 * hidden), x.dtype))
    else:
        kept.add(*_step_saved("gru", b, g, hidden, x.dtype, None))
        # the new gate's input sum, h - n and its clone exist together at the end of the cell
        # (checked against the live tracker on a GRUCell message-passing model)
        return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(kept.items),
                      forward_workspace_bytes=3 * b * hidden * x.dtype.itemsize)
    return OpCost(forward_flops=forward, backward_flops=backward, saved=tuple(kept.items))
