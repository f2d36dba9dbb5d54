"""nn.LSTM / GRU / RNN and nn.GRUCell: kept whole (aten.lstm, gru, rnn_tanh, rnn_relu, gru_cell)
and costed by what the CPU kernel that runs keeps: oneDNN's mkldnn_rnn_layer for an
fp32/bf16 LSTM, ATen's in-place C++ cells otherwise. Checked against FlopCounterMode (on meta,
where the ops run ATen's cells: on the CPU it has no formula for mkldnn_rnn_layer) and against
autograd's saved tensors on a real CPU run. nn.LSTMCell and nn.RNNCell are decomposed by trace
into the ops ATen's cells run: checked here the same way."""

import itertools

import pytest
import torch
from torch import nn

from graphcost import FLOPS_PER_FMA
from graphcost.rules.recurrent import mkldnn_workspace_bytes
from tests.helpers import analyze_meta, assert_matches_pytorch, frozen

B, T, D_IN, H = 2, 3, 4, 5

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="graphcost's CPU rule assumes oneDNN runs nn.LSTM")


def skip_unless_the_cpu_runs_it(cls, dtype):
    """graphcost assumes a CPU with oneDNN (and oneDNN's bf16 support) for nn.LSTM."""
    if cls in (nn.LSTM,) and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this PyTorch: nn.LSTM runs ATen's cells here")
    if (cls in (nn.LSTM,) and dtype == torch.bfloat16
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("this CPU has no oneDNN bf16: a bf16 nn.LSTM runs ATen's cells here")


def sequence(shape, requires_grad=False):
    def make(device, dtype):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)
    return make


# ---- hand counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)],
                         ids=["lstm", "gru", "rnn"])
def test_flops_are_the_gate_matmuls(cls, gates):
    a = analyze_meta(lambda: cls(D_IN, H), sequence((T, B, D_IN)))
    ih, hh = T * B * D_IN * gates * H, T * B * H * gates * H
    assert a.forward_flops == FLOPS_PER_FMA * (ih + hh)
    # weight gradients, and h's gradient at every step but the first (h0 is zeros)
    assert a.backward_flops == FLOPS_PER_FMA * (ih + hh + (T - 1) * B * H * gates * H)


def test_gru_keeps_four_tensors_per_step_and_the_hidden_states():
    """ATen's GRU cell: the hidden gates (B, 3H), the clone of the new-gate chunk mul_ keeps,
    the new gate, the clone of h - n mul_ keeps; each step's linear keeps h (h0, h_0..h_{T-2})."""
    a = analyze_meta(lambda: nn.GRU(D_IN, H), sequence((T, B, D_IN)))
    per_step = B * 3 * H + 3 * B * H
    assert a.saved_activation_bytes == 4 * (T * per_step + T * B * H)


def test_an_rnn_keeps_h0_and_each_new_hidden_state():
    a = analyze_meta(lambda: nn.RNN(D_IN, H), sequence((T, B, D_IN)))
    assert a.saved_activation_bytes == 4 * (B * H + T * B * H)


@needs_mkldnn
def test_an_lstm_on_the_cpu_keeps_onednn_s_workspace():
    a = analyze_meta(lambda: nn.LSTM(D_IN, H), sequence((T, B, D_IN)))
    # h0, c0, the output, the final h and c, and the workspace
    kept = 4 * (2 * B * H + T * B * H + 2 * B * H) + mkldnn_workspace_bytes(T, B, D_IN, H,
                                                                              torch.float32)
    assert a.saved_activation_bytes == kept
    assert [op for op in a.unsupported_ops] == []


WORKSPACE_SHAPES = list(itertools.product([1, 7], [1, 3, 33], [4, 70], [5, 64, 200]))


@needs_mkldnn
@pytest.mark.parametrize("seq, batch, inputs, hidden", WORKSPACE_SHAPES,
                         ids=[f"T{t}-B{b}-D_IN{i}-H{h}" for t, b, i, h in WORKSPACE_SHAPES])
def test_the_workspace_is_the_one_onednn_allocates(seq, batch, inputs, hidden, dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 on this CPU")
    lstm = nn.LSTM(inputs, hidden).to(dtype)
    workspaces = []

    def pack(t):
        if t.dtype == torch.uint8:
            workspaces.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lstm(torch.randn(seq, batch, inputs, dtype=dtype))
    assert workspaces == [mkldnn_workspace_bytes(seq, batch, inputs, hidden, dtype)]


# ---- against PyTorch -------------------------------------------------------------------------

LAYERS = list(itertools.product([nn.LSTM, nn.GRU, nn.RNN], [1, 2], [False, True], [False, True],
                                [True, False]))


@pytest.mark.parametrize("cls, layers, bidirectional, batch_first, bias", LAYERS,
                         ids=[f"{c.__name__}-L{n}-{'bi' if d else 'uni'}-{'bf' if f else 'tf'}-"
                              f"{'bias' if b else 'nobias'}" for c, n, d, f, b in LAYERS])
def test_recurrent_layer(cls, layers, bidirectional, batch_first, bias, dtype):
    skip_unless_the_cpu_runs_it(cls, dtype)
    shape = (B, T, D_IN) if batch_first else (T, B, D_IN)
    a = assert_matches_pytorch(lambda: cls(D_IN, H, num_layers=layers, bidirectional=bidirectional,
                                           batch_first=batch_first, bias=bias),
                               sequence(shape), dtype)
    # for a CPU target trace runs the ops the CPU's kernels run: oneDNN's layers, ATen's cells
    ops = {r.op for r in a.ops}
    assert not {"aten.lstm.input", "aten.gru.input", "aten.rnn_tanh.input"} & ops
    if cls is nn.LSTM and dtype == torch.float32:
        assert "aten.mkldnn_rnn_layer.default" in ops


class WithStates(nn.Module):
    """h0 (and c0) computed from parameters: states that need a gradient."""

    def __init__(self, cls, **kwargs):
        super().__init__()
        self.rnn = cls(D_IN, H, **kwargs)
        n = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
        self.h0 = nn.Parameter(torch.randn(n, B, kwargs.get("proj_size", 0) or H))
        self.c0 = nn.Parameter(torch.randn(n, B, H))

    def forward(self, x):
        if isinstance(self.rnn, nn.LSTM):
            return self.rnn(x, (self.h0 * 2, self.c0 * 2))
        return self.rnn(x, self.h0 * 2)


class WithHead(nn.Module):
    """A linear on the output: it keeps the RNN's output (the op's own, on one direction)."""

    def __init__(self, cls, **kwargs):
        super().__init__()
        self.rnn = cls(D_IN, H, **kwargs)
        self.head = nn.Linear(H * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


VARIANTS = {
    "dropout": (lambda cls: cls(D_IN, H, num_layers=3, dropout=0.5), (T, B, D_IN), False),
    "dropout_bidirectional": (lambda cls: cls(D_IN, H, num_layers=2, dropout=0.3,
                                              bidirectional=True), (T, B, D_IN), False),
    "dropout_eval": (lambda cls: cls(D_IN, H, num_layers=2, dropout=0.5).eval(), (T, B, D_IN), False),
    "input_needs_grad": (lambda cls: cls(D_IN, H, num_layers=2), (T, B, D_IN), True),
    "frozen_input_needs_grad": (lambda cls: frozen(lambda: cls(D_IN, H, num_layers=2), "")(),
                                (T, B, D_IN), True),
    "frozen_w_ih": (lambda cls: frozen(lambda: cls(D_IN, H, num_layers=2), "weight_ih")(),
                    (T, B, D_IN), False),
    "frozen_w_hh": (lambda cls: frozen(lambda: cls(D_IN, H, num_layers=2), "weight_hh")(),
                    (T, B, D_IN), False),
    "frozen_first_layer": (lambda cls: frozen(lambda: cls(D_IN, H, num_layers=2), "weight_ih_l0",
                                              "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")(),
                           (T, B, D_IN), False),
    "states_need_grad": (lambda cls: WithStates(cls, num_layers=2, bidirectional=True),
                         (T, B, D_IN), False),
    "head": (lambda cls: WithHead(cls, num_layers=2), (T, B, D_IN), False),
    "head_bidirectional_batch_first": (lambda cls: WithHead(cls, num_layers=2,
                                                            bidirectional=True,
                                                            batch_first=True), (B, T, D_IN), False),
    "one_step": (lambda cls: cls(D_IN, H, batch_first=True), (B, 1, D_IN), False),
    "batch_of_one": (lambda cls: cls(D_IN, H, batch_first=True, bidirectional=True), (1, T, D_IN),
                     False),
    "unbatched": (lambda cls: cls(D_IN, H, num_layers=2), (T, D_IN), False),
}
CASES = list(itertools.product([nn.LSTM, nn.GRU, nn.RNN], VARIANTS))


@pytest.mark.parametrize("cls, variant", CASES, ids=[f"{c.__name__}-{v}" for c, v in CASES])
def test_recurrent_layer_variants(cls, variant, dtype):
    skip_unless_the_cpu_runs_it(cls, dtype)
    make, shape, requires_grad = VARIANTS[variant]
    assert_matches_pytorch(lambda: make(cls), sequence(shape, requires_grad), dtype)


PROJECTIONS = {  # an LSTM with projections runs ATen's cells even where oneDNN is there
    "relu": lambda: nn.RNN(D_IN, H, nonlinearity="relu", num_layers=2, bidirectional=True),
    "lstm_proj": lambda: nn.LSTM(D_IN, H, proj_size=3, num_layers=2),
    "lstm_proj_bidirectional": lambda: nn.LSTM(D_IN, H, proj_size=3, num_layers=2,
                                               bidirectional=True),
    "lstm_proj_states": lambda: WithStates(nn.LSTM, proj_size=3, num_layers=2),
    "lstm_proj_frozen_w_hr": frozen(lambda: nn.LSTM(D_IN, H, proj_size=3, num_layers=2),
                                    "weight_hr"),
}


@pytest.mark.parametrize("make", PROJECTIONS.values(), ids=PROJECTIONS.keys())
def test_relu_rnn_and_projected_lstm(make, dtype):
    assert_matches_pytorch(make, sequence((T, B, D_IN)), dtype)


def test_lstm_on_cuda_is_costed_with_the_same_flops():
    """The CUDA rule (cuDNN) is not checked here (no GPU); its FLOPs are the same matmuls."""
    from graphcost import analyze

    with torch.device("meta"):
        lstm, x = nn.LSTM(D_IN, H, num_layers=2), torch.randn(T, B, D_IN)
    cpu, gpu = analyze(lstm, (x,), device="cpu"), analyze(lstm, (x,), device="h100-sxm")
    assert (gpu.forward_flops, gpu.backward_flops) == (cpu.forward_flops, cpu.backward_flops)
    assert not gpu.unsupported_ops


# ---- cells -----------------------------------------------------------------------------------

class Loop(nn.Module):
    """A cell run over a sequence, its state carried from step to step."""

    def __init__(self, cls, **kwargs):
        super().__init__()
        self.cell = cls(D_IN, H, **kwargs)

    def forward(self, x):
        state, outputs = None, []
        for step in x:
            state = self.cell(step, state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outputs)


class GivenState(nn.Module):
    def __init__(self, cls, **kwargs):
        super().__init__()
        self.cell = cls(D_IN, H, **kwargs)
        self.h, self.c = nn.Parameter(torch.randn(B, H)), nn.Parameter(torch.randn(B, H))

    def forward(self, x):
        h = self.h * 1.5
        return self.cell(x, (h, self.c * 2) if isinstance(self.cell, nn.LSTMCell) else h)


CELL_VARIANTS = {
    "one_step": (lambda cls: cls(D_IN, H), (B, D_IN), False),
    "no_bias": (lambda cls: cls(D_IN, H, bias=False), (B, D_IN), False),
    "input_needs_grad": (lambda cls: cls(D_IN, H), (B, D_IN), True),
    "loop": (lambda cls: Loop(cls), (T, B, D_IN), False),
    "loop_no_bias": (lambda cls: Loop(cls, bias=False), (T, B, D_IN), False),
    "given_state": (lambda cls: GivenState(cls), (B, D_IN), False),
    "frozen": (lambda cls: frozen(lambda: cls(D_IN, H), "")(), (B, D_IN), True),
    "frozen_w_ih": (lambda cls: frozen(lambda: Loop(cls), "cell.weight_ih")(), (T, B, D_IN), False),
    "frozen_w_hh": (lambda cls: frozen(lambda: Loop(cls), "cell.weight_hh")(), (T, B, D_IN), False),
    "unbatched": (lambda cls: cls(D_IN, H), (D_IN,), False),
}
CELLS = list(itertools.product([nn.LSTMCell, nn.GRUCell, nn.RNNCell], CELL_VARIANTS))


@pytest.mark.parametrize("cls, variant", CELLS, ids=[f"{c.__name__}-{v}" for c, v in CELLS])
def test_cell(cls, variant, dtype):
    make, shape, requires_grad = CELL_VARIANTS[variant]
    assert_matches_pytorch(lambda: make(cls), sequence(shape, requires_grad), dtype)


def test_relu_cell(dtype):
    assert_matches_pytorch(lambda: Loop(nn.RNNCell, nonlinearity="relu"), sequence((T, B, D_IN)),
                           dtype)


def test_lstm_cell_flops_and_saved_bytes_from_dimensions():
    """nn.LSTMCell is decomposed (trace) into the ops ATen's cell runs."""
    a = analyze_meta(lambda: nn.LSTMCell(D_IN, H), sequence((B, D_IN)))
    assert a.forward_flops == FLOPS_PER_FMA * B * (D_IN + H) * 4 * H
    assert a.backward_flops == FLOPS_PER_FMA * B * (D_IN + H) * 4 * H  # the weights' gradients
    # h0 = c0 (one zeros tensor), the gates, tanh(c)
    assert a.saved_activation_bytes == 4 * (B * H + B * 4 * H + B * H)
    assert "aten.lstm_cell.default" not in {r.op for r in a.ops}


def test_gru_cell_runs_aten_s_cell_and_keeps_the_clones_of_its_in_place_muls():
    a = analyze_meta(lambda: nn.GRUCell(D_IN, H), sequence((B, D_IN)))
    assert "aten.gru_cell.default" not in {r.op for r in a.ops}
    # h0, the hidden gates, the new-gate chunk's clone, the new gate, the clone of h - n
    assert a.saved_activation_bytes == 4 * (B * H + B * 3 * H + 3 * B * H)


# ---- memory inside the op ----------------------------------------------------------------------

PEAK_CASES = list(itertools.product(["GRU", "RNN", "LSTM", "LSTM-proj"], [1, 2], [False, True]))


@pytest.mark.parametrize("kind, layers, bidirectional", PEAK_CASES,
                         ids=[f"{k}-L{n}-{'bi' if d else 'uni'}" for k, n, d in PEAK_CASES])
def test_training_peaks_are_the_live_tracker_s(kind, layers, bidirectional):
    """Every phase's peak of two real CPU training steps (validation.memtrack's live-tensor
    tracker), exactly: the layers run as ATen's cells (GRU, RNN, an LSTM with projections) or
    oneDNN's layers (LSTM), op by op, forward and backward, each value alive as long as the C++
    code holds it (the whole sequence's gate matmul until the layer ends, the final hidden
    states until they are stacked)."""
    from graphcost import analyze
    from graphcost.passes.memory.timeline import training_timeline
    from validation.memtrack import measure_training_peak

    cls = {"GRU": nn.GRU, "RNN": nn.RNN}.get(kind, nn.LSTM)
    extra, out = ({"proj_size": 8}, 8) if kind == "LSTM-proj" else ({}, 16)
    if kind == "LSTM":
        skip_unless_the_cpu_runs_it(nn.LSTM, torch.float32)

    def make():
        return nn.Sequential(cls(12, 16, num_layers=layers, bidirectional=bidirectional,
                                 **extra), Pick(), nn.Linear(out * (1 + bidirectional), 5))

    torch.manual_seed(0)
    with torch.device("meta"):
        module, x = make(), torch.randn(8, 2, 12)
    predicted = training_timeline(analyze(module, (x,), device="cpu")).phase_peaks()
    torch.manual_seed(0)
    measured = dict(measure_training_peak(make(), (torch.randn(8, 2, 12),),
                                          record_timeline=False).step_phase_peaks)
    assert {key: measured[key] for key in predicted} == predicted


class Pick(nn.Module):
    def forward(self, out):
        return out[0]


@pytest.mark.parametrize("hx_grad", [False, True], ids=["h0-data", "h0-trained"])
def test_gru_cell_training_peaks_are_the_live_tracker_s(hx_grad):
    """ATen's GRU cell ends with the new gate's input sum, h - n and its clone alive together;
    every phase's peak equals the live tracker's."""
    from graphcost import analyze
    from graphcost.passes.memory.timeline import training_timeline
    from validation.memtrack import measure_training_peak

    class Unrolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.GRUCell(12, 16)
            self.h0 = nn.Parameter(torch.zeros(4, 16), requires_grad=hx_grad)

        def forward(self, xs):
            h = self.h0
            for x in xs.unbind(0):
                h = self.cell(x, h)
            return h.pow(2).mean()

    torch.manual_seed(0)
    with torch.device("meta"):
        module = Unrolled()
    predicted = training_timeline(analyze(module, (torch.empty(3, 4, 12, device="meta"),),
                                          device="cpu")).phase_peaks()
    torch.manual_seed(0)
    measured = dict(measure_training_peak(Unrolled(), (torch.randn(3, 4, 12),),
                                          record_timeline=False).step_phase_peaks)
    assert {key: measured[key] for key in predicted} == predicted
