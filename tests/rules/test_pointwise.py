"""Pointwise ops, reductions, dropout and interpolation: no FLOPs (FlopCounterMode's convention);
what autograd keeps depends on the op (its input, its output, a mask, a noise tensor)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import Fn, analyze_meta, assert_matches_pytorch, on_activations, randn_inputs

SHAPE = (2, 3, 4)
NUMEL = math.prod(SHAPE)



# ---- hand values -----------------------------------------------------------------------------

@pytest.mark.parametrize("fn, kept", [
    (F.relu, "output"), (torch.tanh, "output"), (torch.sigmoid, "output"),
    (lambda x: F.softmax(x, -1), "output"),
    (F.gelu, "input"), (F.silu, "input"),
    (lambda x: x * 3.0, "nothing"), (lambda x: x / 3.0, "nothing"), (lambda x: x + 1, "nothing"),
], ids=["relu", "tanh", "sigmoid", "softmax", "gelu", "silu", "mul_scalar", "div_scalar", "add"])
def test_what_one_op_keeps(fn, kept, dtype):
    # The op runs on an activation (x * p) and its result feeds nothing else.
    a = analyze_meta(*on_activations(fn, SHAPE), dtype=dtype)
    assert (a.forward_flops, a.backward_flops) == (0, 0)
    # x * p keeps only the model input x and the parameter p: no activation.
    assert a.saved_activation_bytes == (0 if kept == "nothing" else NUMEL * dtype.itemsize)


def test_cpu_dropout_keeps_a_noise_tensor_in_the_input_dtype(dtype):
    a = analyze_meta(lambda: nn.Dropout(0.5), randn_inputs(SHAPE), dtype)
    assert a.saved_activation_bytes == NUMEL * dtype.itemsize


@pytest.mark.parametrize("module", [lambda: nn.Dropout(0.0), lambda: nn.Dropout(0.5).eval()],
                         ids=["p0", "eval"])
def test_dropout_that_does_nothing_returns_its_input(module, dtype):
    # relu keeps its output h; dropout(h) is h itself, so linear keeps h again: one storage.
    def make():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), module(), nn.Linear(4, 4))

    a = analyze_meta(make, randn_inputs((3, 4), requires_grad=False), dtype)
    assert a.saved_activation_bytes == 3 * 4 * dtype.itemsize
    assert_matches_pytorch(make, randn_inputs((3, 4), requires_grad=False), dtype)


# ---- against PyTorch -------------------------------------------------------------------------

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


UNARY = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "exp": torch.exp,
    "softmax": lambda x: F.softmax(x, -1), "log_softmax": lambda x: F.log_softmax(x, -1),
    "softmax_fp32": lambda x: F.softmax(x, -1, dtype=torch.float32),
    "log_softmax_fp32": lambda x: F.log_softmax(x, -1, dtype=torch.float32),
    "pow2": lambda x: x.pow(2), "pow3": lambda x: x ** 3, "square": torch.square,
    "sqrt": lambda x: x.abs().sqrt(), "rsqrt": lambda x: (x * x + 1).rsqrt(),
    "log": lambda x: x.abs().log(), "reciprocal": torch.reciprocal, "rdiv": lambda x: 1.0 / x,
    "abs": torch.abs, "erf": torch.erf, "log1p": lambda x: x.abs().log1p(),
    "leaky_relu": F.leaky_relu, "elu": F.elu, "softplus": F.softplus, "mish": F.mish,
    "hardswish": F.hardswish, "hardtanh": F.hardtanh, "sin": torch.sin, "cos": torch.cos,
    "mean": lambda x: x.mean(-1, keepdim=True), "sum": lambda x: x.sum(),
    "neg_sub": lambda x: 1 - (-x), "clamp": lambda x: x.clamp(-0.5, 0.5),
    "masked_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "causal_masked_fill": lambda x: x.masked_fill(
        torch.ones(4, 4, dtype=torch.bool, device=x.device).triu(1), float("-inf")),
    "tril": lambda x: x.tril(), "scalar_mul_div": lambda x: (x * 0.5) / 3.0,
    "upcast_and_back": lambda x: x.float().type_as(x),
}


def beside_sin(fn):
    """fn(x, ...) and sin of every input: sin keeps its inputs, so beside it an op that keeps its
    output adds a storage and one that keeps its inputs does not. Alone, an op that keeps
    nothing is told from one that keeps something. Both ways, a rule that names the wrong tensor
    is caught."""
    def fn_and_sin(*xs):
        return (fn(*xs), *(torch.sin(x) for x in xs))
    return fn_and_sin


def both_ways(table):
    """Each op of `table` alone and beside sin (see beside_sin)."""
    return [pytest.param(f, id=f"{name}-{way}") for name, fn in table.items()
            for f, way in ((fn, "alone"), (beside_sin(fn), "beside_sin"))]


@pytest.mark.parametrize("fn", both_ways(UNARY))
def test_unary_on_activation(fn, dtype):
    assert_matches_pytorch(*on_activations(fn, (2, 4, 4)), dtype)


@pytest.mark.parametrize("module", [nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh], ids=lambda m: m.__name__)
def test_activation_modules_on_an_input_that_needs_grad(module, dtype):
    assert_matches_pytorch(module, randn_inputs(SHAPE), dtype)


# In-place activations: the result is the input's storage; autograd keeps a clone of the input
# (silu_, hardswish_, mish_, hardsigmoid_, hardtanh_, threshold_), the result (relu_, elu_,
# leaky_relu_, celu_, selu_) or the noise and the result (rrelu_).
INPLACE = {
    "relu_": lambda x: F.relu(x, inplace=True), "silu_": lambda x: F.silu(x, inplace=True),
    "hardswish_": lambda x: F.hardswish(x, inplace=True), "mish_": lambda x: F.mish(x, inplace=True),
    "hardsigmoid_": lambda x: F.hardsigmoid(x, inplace=True),
    "relu6_": lambda x: F.relu6(x, inplace=True), "hardtanh_": lambda x: F.hardtanh(x, inplace=True),
    "threshold_": lambda x: F.threshold(x, 0.1, 0.0, inplace=True),
    "elu_": lambda x: F.elu(x, inplace=True), "leaky_relu_": lambda x: F.leaky_relu(x, 0.2, True),
    "celu_": lambda x: F.celu(x, inplace=True), "selu_": lambda x: F.selu(x, inplace=True),
    "rrelu_": lambda x: F.rrelu(x, training=True, inplace=True),
    "rrelu_eval_": lambda x: F.rrelu(x, training=False, inplace=True),
}


@pytest.mark.parametrize("fn", INPLACE.values(), ids=INPLACE.keys())
def test_inplace_activation_on_activation(fn, dtype):
    assert_matches_pytorch(*on_activations(fn, (2, 4, 4)), dtype)


@pytest.mark.parametrize("module", [
    lambda: nn.SiLU(inplace=True), lambda: nn.Hardswish(inplace=True),
    lambda: nn.Mish(inplace=True), lambda: nn.ELU(inplace=True),
    lambda: nn.LeakyReLU(0.1, inplace=True), lambda: nn.ReLU6(inplace=True),
    lambda: nn.Dropout(0.5, inplace=True)],
    ids=["SiLU", "Hardswish", "Mish", "ELU", "LeakyReLU", "ReLU6", "Dropout"])
def test_inplace_modules_between_linears(module, dtype):
    def make():
        return nn.Sequential(nn.Linear(6, 6), module(), nn.Linear(6, 4))

    assert_matches_pytorch(make, randn_inputs((3, 6), requires_grad=False), dtype)


BINARY = {
    "mul": torch.mul, "div": torch.div, "add": torch.add, "sub": torch.sub,
    "where": lambda x, y: torch.where(x > 0, x, y),
    "broadcast_mul": lambda x, y: x * y[0],
    "remainder": torch.remainder, "fmod": torch.fmod,
    "pow_tensor_exponent": lambda x, y: x.abs() ** y,
    "pow_constant_exponent_tensor": lambda x, y: x.abs() ** y.detach(),
    "pow_scalar_base": lambda x, y: 2 ** x + y,
    "clamp_tensor_bounds": lambda x, y: torch.clamp(x, min=y.detach()),
    "remainder_scalar": lambda x, y: (x % 0.7) * y,
}


@pytest.mark.parametrize("fn", both_ways(BINARY))
def test_binary_on_activations(fn, dtype):
    assert_matches_pytorch(*on_activations(fn, SHAPE, SHAPE), dtype)


def test_rotary_embedding_rotate_half(dtype):
    """x * cos + rotate_half(x) * sin: slices, neg, cat and muls on an activation."""
    def rope(x, cos, sin):
        return x * cos + rotate_half(x) * sin

    assert_matches_pytorch(*on_activations(rope, (2, 2, 4, 8), (4, 8), (4, 8)), dtype)


def test_rotary_embedding_with_constant_tables(dtype):
    class Rope(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            angles = torch.arange(4.0)[:, None] * torch.arange(1.0, 9.0)
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())

        def forward(self, x):
            x = self.proj(x).view(2, 4, 2, 4).transpose(1, 2).reshape(2, 2, 4, 4)
            return x * self.cos[:, :4] + rotate_half(x) * self.sin[:, :4]

    assert_matches_pytorch(Rope, randn_inputs((2, 4, 8), requires_grad=False), dtype)


DROPOUTS = {
    "p0": lambda x: F.dropout(x, 0.0),
    "p05": lambda x: F.dropout(x, 0.5),
    "eval": lambda x: F.dropout(x, 0.5, training=False),
    "p0_between_relus": lambda x: F.relu(F.dropout(F.relu(x), 0.0)) * 2,
    "p05_between_relus": lambda x: F.relu(F.dropout(F.relu(x), 0.5)) * 2,
    "alpha": lambda x: F.alpha_dropout(x, 0.5, training=True),
    "feature_1d": lambda x: F.dropout1d(x, 0.5),
    "feature_2d": lambda x: F.dropout2d(x.unsqueeze(-1), 0.5),
    "feature_alpha": lambda x: F.feature_alpha_dropout(x, 0.5, training=True),
    "feature_2d_eval": lambda x: F.dropout2d(x.unsqueeze(-1), 0.5, training=False) * 2,
    "p1": lambda x: F.dropout(x, 1.0),
    "feature_p1": lambda x: F.dropout1d(x, 1.0),
    "inplace": lambda x: F.dropout(x, 0.5, inplace=True),
    "inplace_p1": lambda x: F.dropout(x, 1.0, inplace=True),
    "inplace_feature_2d": lambda x: F.dropout2d(x.unsqueeze(-1), 0.5, inplace=True),
    "inplace_alpha": lambda x: F.alpha_dropout(x, 0.5, training=True, inplace=True),
    "inplace_feature_alpha": lambda x: F.feature_alpha_dropout(x, 0.5, True, inplace=True),
}


@pytest.mark.parametrize("fn", DROPOUTS.values(), ids=DROPOUTS.keys())
def test_dropout(fn, dtype):
    assert_matches_pytorch(*on_activations(fn, SHAPE), dtype)


INTERPOLATIONS = {
    "nearest_x2": dict(scale_factor=2, mode="nearest"),
    "nearest_size": dict(size=(5, 7), mode="nearest"),
    "bilinear_x2": dict(scale_factor=2, mode="bilinear"),
    "bilinear_align_corners": dict(size=(5, 7), mode="bilinear", align_corners=True),
    "bicubic": dict(scale_factor=2, mode="bicubic"),
}


@pytest.mark.parametrize("kwargs", INTERPOLATIONS.values(), ids=INTERPOLATIONS.keys())
def test_interpolate(kwargs, dtype):
    assert_matches_pytorch(*on_activations(lambda x: F.interpolate(x, **kwargs), (1, 2, 4, 4)),
                           dtype)


def test_interpolate_as_first_op(dtype):
    assert_matches_pytorch(lambda: Fn(lambda x: F.interpolate(x, scale_factor=2)),
                           randn_inputs((1, 2, 4, 4)), dtype)


# ---- ops with their own kernels, and ops that cost nothing (so "unsupported" means unknown) ----

KERNELS = {
    "glu": lambda x: F.glu(x, -1), "hardsigmoid": F.hardsigmoid, "selu": F.selu, "celu": F.celu,
    "log_sigmoid": F.logsigmoid, "atan2": lambda x: torch.atan2(x, x * 2),
    "cumsum": lambda x: x.cumsum(-1), "cumprod": lambda x: x.cumprod(-1),
    "logsumexp": lambda x: x.logsumexp(-1), "vector_norm": lambda x: x.norm(dim=-1),
    "var": lambda x: x.var(-1), "std": lambda x: x.std(-1), "amax": lambda x: x.amax(-1),
    "amin": lambda x: x.amin(-1), "sort": lambda x: x.sort(-1).values,
    "gather": lambda x: x.gather(-1, torch.zeros_like(x, dtype=torch.long)),
    "randn_like": lambda x: x + torch.randn_like(x), "rand_like": lambda x: x * torch.rand_like(x),
    "one_hot": lambda x: x + F.one_hot(torch.zeros(x.shape[:-1], dtype=torch.long,
                                                   device=x.device), x.shape[-1]),
    "logical_xor": lambda x: x * torch.logical_xor(x > 0, x < 1),
    "sign": lambda x: x * torch.sign(x), "floor": lambda x: x * torch.floor(x),
    "ceil": lambda x: x * torch.ceil(x), "round": lambda x: x * torch.round(x),
    "trunc": lambda x: x * torch.trunc(x),
    "prelu": lambda x: F.prelu(x, torch.full((4,), 0.25, device=x.device, dtype=x.dtype)),
    "xlogy": lambda x: torch.xlogy(x, x * 2),
    "kl_div": lambda x: F.kl_div(F.log_softmax(x, -1), F.softmax(x * 2, -1),
                                 reduction="batchmean"),
    "pairwise_distance": lambda x: F.pairwise_distance(x, x * 2),
}


@pytest.mark.parametrize("fn", KERNELS.values(), ids=KERNELS.keys())
def test_kernel_ops_against_autograd(fn, dtype):
    """FLOPs against FlopCounterMode, saved bytes against autograd's saved tensors, no op left
    without a rule."""
    assert_matches_pytorch(*on_activations(fn, (2, 4, 6)), dtype)


@pytest.mark.parametrize("channels", [1, 4])
def test_prelu_module_keeps_its_input(channels, dtype):
    """nn.PReLU: _prelu_kernel keeps its input and its weight (a parameter: not an activation)."""
    def make():
        return nn.Sequential(nn.Linear(6, 6), Fn(lambda h: h.view(2, 4, 6)),
                             nn.PReLU(channels if channels == 1 else 4))

    assert_matches_pytorch(make, randn_inputs((8, 6), requires_grad=False), dtype)
