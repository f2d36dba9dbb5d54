"""Ops with a kernel of their own that torch.export keeps whole: nn.Bilinear's _trilinear,
torch.cdist's _euclidean_dist and _cdist_forward, weight norm's _weight_norm_interface and
norm_except_dim. FlopCounterMode has no formula for _trilinear or _euclidean_dist (it counts 0):
their FLOPs are checked against what it counts for the ops their kernels call
(validation.groundtruth.kernel_flops) and against hand counts; saved bytes against autograd."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import weight_norm as hook_weight_norm

from graphcost import FLOPS_PER_FMA
from graphcost.rules.matmul import trilinear_flops
from tests.helpers import Fn, analyze_meta, assert_matches_pytorch, frozen, on_activations, randn_inputs
from validation.groundtruth import kernel_flops, measure_flops

aten = torch.ops.aten
N, D1, D2, OUT = 3, 4, 5, 6


# ---- nn.Bilinear -------------------------------------------------------------------------------

def test_bilinear_flops_from_dimensions():
    """Per output feature, x1 @ W[o] (N x D1 x D2) then a row-wise dot with x2 (N x D2)."""
    a = analyze_meta(lambda: nn.Bilinear(D1, D2, OUT), randn_inputs((N, D1), (N, D2)))
    forward = FLOPS_PER_FMA * OUT * N * D2 * (D1 + 1)
    assert a.forward_flops == forward
    assert a.backward_flops == measure_flops(*_meta(lambda: nn.Bilinear(D1, D2, OUT),
                                                    (N, D1), (N, D2)))[1]
    assert not a.unsupported_ops


def _meta(make, *shapes):
    with torch.device("meta"):
        return make(), tuple(torch.randn(s, requires_grad=True) for s in shapes)


def test_flopcountermode_alone_counts_trilinear_as_zero():
    """Why the ground truth counts inside the kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    module, inputs = _meta(lambda: nn.Bilinear(D1, D2, OUT), (N, D1), (N, D2))
    with FlopCounterMode(display=False) as counter:
        module(*inputs).sum().backward()
    assert counter.get_total_flops() == 0
    assert sum(measure_flops(module, inputs)) > 0


TRILINEAR = [  # (shapes, expand1, expand2, expand3, sumdim, unroll_dim)
    (((N, D1), (OUT, D1, D2), (N, D2)), [1, 3], [0], [1, 2], [2, 3], 1),  # F.bilinear
    (((N, D1), (OUT, D1, D2), (N, D2)), [1, 3], [0], [1, 2], [2, 3], 0),
    (((N, OUT), (N, D1), (OUT, D1)), [2], [1], [0], [1, 2], 1),
    (((N, D1), (OUT, D1, D2), (N, D2)), [1, 3], [0], [1, 2], [2, 3], 3),  # unrolled over a sum
    (((2, N, D1), (N, D1), (2, D1)), [], [0], [1], [2], 1),
    (((2, N), (N, D1), (2, D1)), [2], [0], [1], [1], 2),
]


@pytest.mark.parametrize("case", TRILINEAR, ids=[f"case{i}" for i in range(len(TRILINEAR))])
def test_trilinear_flops_are_what_its_kernel_runs(case):
    shapes, e1, e2, e3, sumdim, unroll = case
    args = [torch.empty(s, device="meta") for s in shapes]
    counted = kernel_flops(aten._trilinear.default)(*args, e1, e2, e3, sumdim, unroll)
    assert trilinear_flops(*shapes, e1, e2, e3, sumdim, unroll) == counted


BILINEAR = {
    "inputs_need_grad": (lambda: nn.Bilinear(D1, D2, OUT), randn_inputs((N, D1), (N, D2))),
    "inputs_without_grad": (lambda: nn.Bilinear(D1, D2, OUT),
                            randn_inputs((N, D1), (N, D2), requires_grad=False)),
    "no_bias": (lambda: nn.Bilinear(D1, D2, OUT, bias=False), randn_inputs((N, D1), (N, D2))),
    "batched": (lambda: nn.Bilinear(D1, D2, OUT), randn_inputs((2, N, D1), (2, N, D2))),
    "frozen": (frozen(lambda: nn.Bilinear(D1, D2, OUT), ""), randn_inputs((N, D1), (N, D2))),
    "on_activations": on_activations(
        lambda a, b: F.bilinear(a, b, torch.ones(OUT, D1, D2, device=a.device, dtype=a.dtype)),
        (N, D1), (N, D2)),
    "non_contiguous": on_activations(
        lambda a, b: F.bilinear(a.transpose(0, 1), b.transpose(0, 1),
                                torch.ones(OUT, D1, D2, device=a.device, dtype=a.dtype)),
        (D1, 2, D1), (D1, 2, D2)),
    "same_input_twice": on_activations(
        lambda a: F.bilinear(a, a, torch.ones(OUT, D1, D1, device=a.device, dtype=a.dtype)),
        (N, D1)),
}


@pytest.mark.parametrize("case", BILINEAR.values(), ids=BILINEAR.keys())
def test_bilinear(case, dtype):
    a = assert_matches_pytorch(*case, dtype)
    assert "aten._trilinear.default" in {r.op for r in a.ops}


@pytest.mark.parametrize("case", TRILINEAR[1:], ids=[f"case{i}" for i in range(1, len(TRILINEAR))])
def test_trilinear_called_directly(case, dtype):
    shapes, e1, e2, e3, sumdim, unroll = case
    assert_matches_pytorch(*on_activations(
        lambda a, b, c: aten._trilinear(a, b, c, e1, e2, e3, sumdim, unroll), *shapes), dtype)


# ---- torch.cdist --------------------------------------------------------------------------------

def test_cdist_matmul_path_flops_from_dimensions():
    """x1 and x2 padded with their squared norms and ones: one (R1, M + 2) @ (M + 2, R2) matmul
    per batch; backward, the gradient times x2 and times x1."""
    b, r1, r2, m = 2, 30, 5, 4  # more than 25 rows: the matmul path by default
    a = analyze_meta(*on_activations(lambda x, y: torch.cdist(x, y), (b, r1, m), (b, r2, m)))
    cdist_forward = FLOPS_PER_FMA * b * r1 * r2 * (m + 2)
    cdist_backward = 2 * FLOPS_PER_FMA * b * r1 * r2 * m
    assert (a.forward_flops, a.backward_flops) == (cdist_forward, cdist_backward)
    assert "aten._euclidean_dist.default" in {r.op for r in a.ops}


P_AND_MODES = list(itertools.product([2.0, 1.0, 3.0, 0.0, float("inf")],
                                     [None, "use_mm_for_euclid_dist",
                                      "donot_use_mm_for_euclid_dist"]))


@pytest.mark.parametrize("p, mode", P_AND_MODES, ids=[f"p{p}-{m}" for p, m in P_AND_MODES])
def test_cdist(p, mode):
    kwargs = {} if mode is None else {"compute_mode": mode}
    # NB: the CPU's direct kernel has no bf16 (only the matmul path does): float32 here
    assert_matches_pytorch(*on_activations(lambda x, y: torch.cdist(x, y, p=p, **kwargs),
                                           (2, 3, 4), (2, 5, 4)))


CDIST = {
    "many_rows": (lambda x, y: torch.cdist(x, y), (2, 30, 4), (2, 5, 4)),
    "unbatched_many_rows": (lambda x, y: torch.cdist(x, y), (30, 4), (5, 4)),
    "unbatched_mm": (lambda x, y: torch.cdist(x, y, compute_mode="use_mm_for_euclid_dist"),
                     (3, 4), (5, 4)),
    "broadcast_mm": (lambda x, y: torch.cdist(x, y, compute_mode="use_mm_for_euclid_dist"),
                     (2, 1, 3, 4), (3, 5, 4)),
    "non_contiguous_mm": (lambda x, y: torch.cdist(x.transpose(-1, -2), y,
                                                   compute_mode="use_mm_for_euclid_dist"),
                          (2, 4, 3), (2, 5, 4)),
}


@pytest.mark.parametrize("case", CDIST.values(), ids=CDIST.keys())
def test_cdist_matmul_path(case, dtype):
    fn, *shapes = case
    assert_matches_pytorch(*on_activations(fn, *shapes), dtype)


@pytest.mark.parametrize("fn", [lambda x, y: torch.cdist(x, y, p=1),
                                lambda x, y: torch.cdist(x.transpose(-1, -2), y, p=1),
                                lambda x, y: torch.cdist(x, y, p=1)[..., :2]],
                         ids=["p1", "p1_non_contiguous", "p1_sliced"])
def test_cdist_direct_kernel(fn):
    shapes = [(2, 4, 3) if "transpose" in fn.__code__.co_names else (2, 3, 4), (2, 5, 4)]
    assert_matches_pytorch(*on_activations(fn, *shapes))


def test_cdist_where_one_side_needs_no_gradient():
    def inputs(device, dtype):
        return (torch.randn(2, 3, 4, device=device, dtype=dtype, requires_grad=True),
                torch.randn(2, 5, 4, device=device, dtype=dtype))

    for mode in ("use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist"):
        assert_matches_pytorch(lambda: Fn(lambda x, y: torch.cdist(x, y, compute_mode=mode)),
                               inputs)


# ---- weight norm ---------------------------------------------------------------------------------

WEIGHT_NORMS = {"hook": hook_weight_norm, "parametrization": parametrizations.weight_norm}
LAYERS = {
    "linear": (lambda: nn.Linear(D1, OUT), (N, D1), [0, 1, None]),
    "conv1d": (lambda: nn.Conv1d(D1, OUT, 3), (2, D1, 7), [0, 1, 2, None]),
    "conv2d": (lambda: nn.Conv2d(D1, OUT, 3), (2, D1, 7, 7), [1, 2]),
    "conv_transpose": (lambda: nn.ConvTranspose1d(D1, OUT, 3), (2, D1, 7), [0]),
    "kernel_of_one": (lambda: nn.Conv1d(D1, OUT, 1), (2, D1, 7), [1]),
}
WN_CASES = [(w, layer, dim) for w in WEIGHT_NORMS for layer, (_, _, dims) in LAYERS.items()
            for dim in dims]


@pytest.mark.parametrize("which, layer, dim", WN_CASES,
                         ids=[f"{w}-{layer}-dim{d}" for w, layer, d in WN_CASES])
def test_weight_norm(which, layer, dim, dtype):
    make, shape, _ = LAYERS[layer]
    a = assert_matches_pytorch(lambda: WEIGHT_NORMS[which](make(), dim=dim), randn_inputs(shape),
                               dtype)
    if dim in (0, len(shape) - 1):  # the fused kernel (other dims: a norm, a div and a mul)
        assert "aten._weight_norm_interface.default" in {r.op for r in a.ops}


def test_weight_norm_keeps_the_norms_in_float32(dtype):
    """_weight_norm_interface keeps one norm per output channel, in float32 for bf16 weights;
    the linear keeps its input (a model input here, not counted) and nothing else."""
    a = analyze_meta(lambda: parametrizations.weight_norm(nn.Linear(D1, OUT)),
                     randn_inputs((N, D1), requires_grad=False), dtype)
    assert a.saved_activation_bytes == OUT * 4


@pytest.mark.parametrize("prefix", ["weight_g", "parametrizations.weight.original0"])
def test_weight_norm_with_a_frozen_magnitude(prefix, dtype):
    which = hook_weight_norm if prefix == "weight_g" else parametrizations.weight_norm
    assert_matches_pytorch(frozen(lambda: which(nn.Linear(D1, OUT)), prefix),
                           randn_inputs((N, D1)), dtype)


@pytest.mark.parametrize("dim", [-1, 0, 1, 2], ids=lambda d: f"dim{d}")
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_norm_except_dim(dim, transposed, dtype):
    """Kept whole (its rule); the norm keeps v itself, or the copy `.contiguous()` makes."""
    def fn(v):
        return torch.norm_except_dim(v.transpose(0, 2) if transposed else v, 2, dim)

    a = assert_matches_pytorch(*on_activations(fn, (3, 4, 5)), dtype)
    assert "aten.norm_except_dim.default" in {r.op for r in a.ops}
