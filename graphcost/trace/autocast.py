"""Mixed precision with torch.autocast: what the traced ops run in, and what autocast copies.

torch.export traces above autocast, so the exported graph has the model's own dtypes. `rerun`
executes the exported graph again on fake CPU tensors inside `torch.autocast("cpu", dtype)` and
writes the values it gets back into the nodes' metadata: every op then carries the dtype it
really produces under autocast (a Linear's output in bf16, a residual sum promoted to fp32).

Inside an op on autocast's lists its floating inputs are copied to the op's dtype (the
lower-precision list: matmuls, convolutions, attention) or to float32 (the fp32 list: losses);
`casts` names those copies, so that annotate can cost them: a copy that autograd saves (a
Linear's bf16 weight copy) is an activation, the others are the op's workspace. Copies of a
leaf that needs a gradient (a parameter) are cached by autocast for the whole region: one copy
per parameter however often it is used.
NB: the lists are the CPU autocast policy of PyTorch 2.x for the ops graphcost has rules for;
CUDA's policy (softmax, layer_norm in fp32) is not modelled.
"""

from __future__ import annotations

import torch

from graphcost.rules.registry import TensorSpec, Value

aten = torch.ops.aten

LOWER_PRECISION = {
    aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default,
    aten.addmm.default, aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default,
    aten.conv3d.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
    aten.conv_transpose3d.input, aten.scaled_dot_product_attention.default,
    aten.prelu.default,
}
FP32 = {
    aten.cross_entropy_loss.default, aten.nll_loss.default, aten.nll_loss_nd.default,
    aten.mse_loss.default, aten.l1_loss.default, aten.smooth_l1_loss.default,
    aten.huber_loss.default, aten.binary_cross_entropy_with_logits.default,
    aten.binary_cross_entropy.default, aten.avg_pool3d.default, aten.max_pool3d.default,
    aten.adaptive_avg_pool3d.default,
}


class _Rerun(torch.fx.Interpreter):
    """Runs the exported graph on CPU fakes: device arguments point at the CPU and the dtype
    assertions export recorded (true without autocast) are skipped."""

    def __init__(self, gm: torch.fx.GraphModule, record: dict) -> None:
        super().__init__(gm)
        self.record = record

    def run_node(self, n: torch.fx.Node):
        if n.target is aten._assert_tensor_metadata.default:
            return None
        result = super().run_node(n)
        self.record[n] = result
        return result

    def call_function(self, target, args, kwargs):
        kwargs = {k: torch.device("cpu") if isinstance(v, torch.device) else v
                  for k, v in kwargs.items()}
        return super().call_function(target, args, kwargs)


def placeholder_like(v: torch.Tensor, bases: dict, device: str) -> torch.Tensor:
    """An empty tensor like a placeholder's example `v` (shape, strides, dtype, requires_grad)
    on `device`: the same one for placeholders that share a storage (tied parameters)."""
    key = v.untyped_storage()._cdata
    if key not in bases:
        bases[key] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype,
                                         device=device).requires_grad_(v.requires_grad)
    return bases[key]


def rerun(program: torch.export.ExportedProgram, dtype: torch.dtype) -> None:
    """Replace each node's meta["val"] by its value under torch.autocast("cpu", dtype)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = program.graph_module
    record: dict = {}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        bases: dict = {}  # placeholders sharing a storage (tied parameters) share a fake
        args = []
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            v = n.meta.get("val")
            if not isinstance(v, torch.Tensor):
                args.append(v)
                continue
            args.append(placeholder_like(v, bases, "cpu"))
            record[n] = args[-1]
        with torch.autocast("cpu", dtype=dtype):
            _Rerun(gm, record).run(*args)
    for n, value in record.items():  # placeholders too: views keep pointing at their storage
        if value is not None:
            n.meta["val"] = value


def cast_dtype(op, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype autocast runs `op` in (None: the op is on neither list, or no autocast)."""
    if autocast_dtype is None:
        return None
    if op in LOWER_PRECISION:
        return autocast_dtype
    if op in FP32:
        return torch.float32
    return None


def cast_inputs(inputs: tuple[Value, ...], dtype: torch.dtype | None) -> list[Value]:
    """The floating inputs autocast copies to `dtype` before running the op."""
    if dtype is None:
        return []
    return [v for v in inputs if v.spec.is_floating and v.dtype != dtype
            and v.dtype in (torch.float32, torch.float16, torch.bfloat16)]


def as_cast(v: Value, dtype: torch.dtype, storage: int) -> Value:
    """`v` after autocast's copy: a new contiguous tensor of `dtype` in storage `storage`."""
    return Value(node=v.node, index=v.index, spec=TensorSpec(v.shape, dtype),
                 requires_grad=v.requires_grad, kind="op", storage=storage, contiguous=True,
                 strides=None)
