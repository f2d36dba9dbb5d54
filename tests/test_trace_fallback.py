"""A submodule graphcost cannot trace (data-dependent control flow or shapes) is one opaque op,
listed as unsupported, and the rest of the model is analysed (graphcost.opaque). The rest's
FLOPs are FlopCounterMode's for the same model with that submodule replaced by a shape-keeping
stand-in of no FLOPs (nn.Identity, a slice), the parameters are the module's own; what cannot be
stood in for, or fails in the root's own code, is one clear error naming the module and line."""

from __future__ import annotations

import inspect
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphcost import analyze
from graphcost.errors import TraceError
from graphcost.graph.build import build_graph, op_nodes
from graphcost.passes.memory.inference import inference_memory
from graphcost.passes.memory.timeline import training_timeline
from graphcost.report.analysis import unsupported_line
from graphcost.trace import opaque
from graphcost.trace.blocks import RepeatedBlocks
from graphcost.trace.export import trace
from tests.helpers import assert_user_error, run_cli
from validation.groundtruth import measure_flops

D, E, B = 8, 4, 2  # width, experts, batch


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_input() -> torch.Tensor:
    return torch.empty(B, D, device="meta")


def analyze_quietly(module: nn.Module, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return analyze(module, *args, **kwargs)


# ---------------------------------------------------------------- models


class Router(nn.Module):
    """A Python branch on tensor values: torch.export cannot follow it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:  # data-dependent
            return torch.relu(y)
        return y


class Net(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.up = nn.Linear(D, D)
        self.router = router
        self.down = nn.Linear(D, 4)

    def forward(self, x):
        return self.down(self.router(self.up(x)))


class TopRouter(nn.Module):
    """A branch on tensor values, two outputs of another shape than its input."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, E)

    def forward(self, x):
        logits = self.gate(x)
        if logits.max() > 0:  # data-dependent
            logits = logits * 2
        return logits.softmax(-1), logits.argmax(-1)  # (B, E) float, (B,) int64


class SliceRouter(nn.Module):
    """TopRouter's output shapes with no FLOPs: the reference for the rest of the model."""

    def forward(self, x):
        return x[:, :E], x[:, 0].long()


class Routed(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.up = nn.Linear(D, D)
        self.router = router
        self.out = nn.Linear(E, 4)

    def forward(self, x):
        probs, choice = self.router(self.up(x))
        return self.out(probs) * choice.unsqueeze(-1)


class Pick(nn.Module):
    """A data-dependent shape: the tokens routed to expert i."""

    def forward(self, choice, i):
        return torch.nonzero(choice == i)[:, 0]


class Experts(nn.Module):
    """Top-1 mixture of experts: its routing has data-dependent shapes, its output does not."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E)
        self.pick = Pick()
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows = self.pick(choice, i)
            out = out.index_add(0, rows, expert(x[rows]))
        return out


class Block(nn.Module):
    def __init__(self, router: nn.Module):
        super().__init__()
        self.up = nn.Linear(D, 2 * D)
        self.router = router
        self.down = nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(self.router(torch.relu(self.up(x))))


class WideRouter(Router):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2 * D, 2 * D)


class Stack(nn.Module):
    def __init__(self, make_router, n_layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Block(make_router()) for _ in range(n_layers))
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Truncate(nn.Module):
    """An output whose shape depends on the values: nothing can stand in for it."""

    def forward(self, x):
        return x[: int(x.abs().sum().item())]


class NonZero(nn.Module):
    """Exports (with a symbolic size), but its output shape depends on the values."""

    def forward(self, x):
        return x[torch.nonzero(x)[:, 0]]


class Counted(nn.Module):
    """Returns a Python int besides its tensor."""

    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            return x, 1
        return -x, 0


class RootBranch(nn.Module):
    """The branch is in the root's own forward: there is no submodule to stand in for."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, D)

    def forward(self, x):
        y = self.up(x)
        if y.sum() > 0:  # data-dependent, in the root
            return y
        return -y


class Shared(nn.Module):
    """One branching module called on two shapes: one stand-in cannot fit both calls."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, E)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.up(x)).sum() + self.gate(x).sum()


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent


def build(make):
    with torch.device("meta"):
        return make()


# ---------------------------------------------------------------- the rest is analysed


def test_untraceable_submodule_is_one_opaque_op():
    model = build(lambda: Net(Router()))
    rest = build(lambda: Net(nn.Identity()))
    with pytest.warns(UserWarning, match=r"could not trace module router \(Router\): "
                                         r"GuardOnDataDependentSymNode.*NOT counted") as seen:
        a = analyze(model, (meta_input(),))
    assert sum("could not trace" in str(w.message) for w in seen) == 1
    assert a.unsupported_ops == {"opaque module router (Router)": 1}
    assert (a.forward_flops, a.backward_flops) == measure_flops(rest, (meta_input(),))
    assert a.params == n_params(model)
    assert a.trainable_params == n_params(model)
    assert [r.module_path for r in a.ops if not r.supported] == ["router"]
    assert {r.key: r.params for r in a.by_module(2)}["router"] == n_params(model.router)
    assert "forward" not in vars(model.router)  # the stand-in was for the export only


def test_stand_in_has_the_outputs_of_a_real_run():
    model = build(lambda: Routed(TopRouter()))
    rest = build(lambda: Routed(SliceRouter()))
    a = analyze_quietly(model, (meta_input(),))
    assert a.unsupported_ops == {"opaque module router (TopRouter)": 1}
    assert (a.forward_flops, a.backward_flops) == measure_flops(rest, (meta_input(),))
    assert a.params == n_params(model)
    with torch.no_grad():
        real = TopRouter()(torch.randn(B, D))
    node = next(n for n in op_nodes(a.graph) if a.graph.nodes[n]["target"] is opaque.OPAQUE)
    assert [(s.shape, s.dtype) for s in a.graph.nodes[node]["outputs"]] == \
        [(tuple(t.shape), t.dtype) for t in real]


def test_data_dependent_shapes_inside_a_module_stand_in_for_the_module_around_them():
    model = build(lambda: Net(Experts()))
    rest = build(lambda: Net(nn.Identity()))
    a = analyze_quietly(model, (meta_input(),))
    assert a.unsupported_ops == {"opaque module router (Experts)": 1}
    assert (a.forward_flops, a.backward_flops) == measure_flops(rest, (meta_input(),))
    assert a.params == n_params(model)


def test_repeated_blocks_are_still_exported_twice_and_copied():
    model = build(lambda: Stack(WideRouter))
    rest = build(lambda: Stack(nn.Identity))
    tr = trace(model, (meta_input(),))
    assert tr.blocks == RepeatedBlocks("layers", 4)
    assert sum(d.get("target") is opaque.OPAQUE
               for _, d in build_graph(tr).nodes(data=True)) == 2
    reused = analyze_quietly(model, (meta_input(),))
    assert reused.unsupported_ops == {f"opaque module layers.{i}.router (WideRouter)": 1
                                      for i in range(4)}
    assert (reused.forward_flops, reused.backward_flops) == measure_flops(rest, (meta_input(),))
    assert reused.params == n_params(model)
    every = analyze_quietly(model, (meta_input(),), reuse_blocks=False)
    assert every.totals() == reused.totals()
    # the report names them once, as a stack: the JSON keeps one entry per module
    assert "opaque module layers.*.router (WideRouter) (x4)." in unsupported_line(reused)


def test_memory_passes_run_and_count_the_weights():
    model = build(lambda: Net(Router()))
    a = analyze_quietly(model, (meta_input(),))
    assert training_timeline(a).peak.params == a.weight_bytes
    assert inference_memory(a).weight_bytes == a.weight_bytes


# ---------------------------------------------------------------- one clear error


def source_line(cls: type, fragment: str) -> int:
    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, text in enumerate(lines) if fragment in text)


def trace_error(model: nn.Module, **kwargs) -> str:
    with pytest.raises(TraceError) as info:
        analyze(model, (meta_input(),), **kwargs)
    return str(info.value)


def test_data_dependent_output_shape_is_a_clear_error():
    model = build(lambda: Net(Truncate()))
    message = trace_error(model)
    line = source_line(Truncate, ".item()")
    assert "cannot trace model 'Net'" in message
    assert f"in module router (Truncate), {__file__}:{line}" in message
    assert "graphcost cannot analyse the rest of the model without module router" in message
    assert "output shapes depend on the values it reads" in message
    assert "forward" not in vars(model.router)  # restored after the failure too


def test_symbolic_size_after_export_is_a_clear_error():
    message = trace_error(build(lambda: Net(NonZero())))
    assert "the output shape of aten.nonzero.default" in message
    assert "depends on tensor values" in message
    assert f"in module router (NonZero), {__file__}:{source_line(NonZero, 'nonzero')}" in message
    assert "output shapes depend on the values it reads" in message


def test_too_large_to_run_on_the_cpu(monkeypatch):
    monkeypatch.setattr(opaque, "MAX_CPU_RUN_BYTES", 64)
    message = trace_error(build(lambda: Net(Router())))
    assert "in module router (Router)" in message
    assert "it does not run on meta tensors" in message
    assert "MiB of parameters and inputs, over the" in message


def test_non_tensor_output_is_a_clear_error():
    message = trace_error(build(lambda: Net(Counted())))
    assert "in module router (Counted)" in message
    assert "it returns int values, not only tensors" in message


def test_module_called_on_two_shapes_is_a_clear_error():
    model = build(Shared)
    message = trace_error(model)
    assert f"in module gate (Gate), {__file__}:{source_line(Gate, 'x.sum()')}" in message
    assert "its stand-in does not fit every call of it" in message
    assert "made for a call on (2, 4) float32, not on (2, 8) float32" in message
    assert "forward" not in vars(model.gate)


def test_failure_in_the_root_forward_names_it():
    message = trace_error(build(RootBranch))
    line = source_line(RootBranch, "# data-dependent, in the root")
    assert "cannot trace model 'RootBranch'" in message
    assert f"in module <root> (RootBranch), {__file__}:{line}" in message
    assert "what to do" in message
    assert "cannot analyse the rest" not in message


def test_strict_refuses_with_the_module_and_line():
    model = build(lambda: Net(Router()))
    message = trace_error(model, strict=True)
    assert f"in module router (Router), {__file__}:{source_line(Router, 'if y.sum()')}" in message
    assert "without --strict" in message
    assert "forward" not in vars(model.router)


# ---------------------------------------------------------------- the command line

# the module's own Router and Net, in a file the CLI loads (`path.py:net`)
MODEL_FILE = "\n".join([
    "import torch", "from torch import nn", f"D = {D}", "",
    inspect.getsource(Router), inspect.getsource(Net),
    "def net():", "    return Net(Router()), (torch.empty(2, D),)", ""])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "routed.py"
    path.write_text(MODEL_FILE)
    return f"{path}:net"


def test_cli_analyze_lists_the_opaque_module(capsys, model_file):
    code, out, err = run_cli(capsys, "analyze", model_file)
    assert code == 0, err
    assert "opaque module router (Router) (x1)" in out
    assert "Make an opaque module's forward traceable (docs/graph.md)." in out  # no rule to add
    assert "register_rule" not in out
    assert err.count("could not trace module router (Router)") == 1
    code, out, err = run_cli(capsys, "analyze", model_file, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["unsupported_ops"] == {"opaque module router (Router)": 1}
    assert result["params"] == n_params(build(lambda: Net(Router())))


def test_cli_strict_is_one_error(capsys, model_file):
    assert_user_error(capsys, ["analyze", model_file, "--strict"], "in module router (Router)")


def test_cli_coverage_lists_it_as_unsupported(capsys, model_file):
    code, out, err = run_cli(capsys, "coverage", model_file)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("opaque module router"))
    assert "UNSUPPORTED" in row
    code, out, err = run_cli(capsys, "coverage", model_file, "--strict")
    assert code == 1


class _RootCTC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 5)

    def forward(self, x, targets):
        return F.ctc_loss(self.proj(x).log_softmax(-1), targets, [10, 10], [3, 4])


class _ModuleCTC(_RootCTC):
    def __init__(self) -> None:
        super().__init__()
        self.ctc = nn.CTCLoss()

    def forward(self, x, targets):
        return self.ctc(self.proj(x).log_softmax(-1), targets, [10, 10], [3, 4])


def _ctc_inputs():
    return (torch.empty(10, 2, 8, device="meta"), torch.empty(2, 4, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("cls", [_RootCTC, _ModuleCTC], ids=["root", "submodule"])
def test_ctc_loss_traces_as_one_op(cls):
    """ctc_loss's composite cannot run on fake tensors (it makes a tensor from the target
    lengths, and _ctc_loss's log_alpha is as wide as the longest target): while graphcost
    exports it runs a kernel that makes the loss's shape only, so F.ctc_loss, in the root
    forward or in nn.CTCLoss, is one op costed by its rule, not an opaque module."""
    with torch.device("meta"):
        model = cls()
    analysis = analyze(model, _ctc_inputs())
    assert analysis.unsupported_ops == {}
    assert "aten.ctc_loss.IntList" in {r.op for r in analysis.ops}
    assert analysis.forward_flops == 2 * 10 * 2 * 8 * 5  # the projection (ctc_loss: no formula)
