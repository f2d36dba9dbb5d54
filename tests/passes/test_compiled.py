"""A training step under torch.compile (graphcost/passes/compiled.py, passes/memory/compiled.py):
the activations Inductor's partitioner keeps, against what a real compile on this CPU keeps
(validation/compiled.py: saved_tensors_hooks on the compiled forward), and the memory of whole
compiled training steps against the allocator's events of a real compiled run. A real compile
costs 15-20 s here: four are run in tests, the other models in bench/validate_compile.py."""

from __future__ import annotations

import json

import pytest
import torch
from graphcost.models import load
from torch import nn

from graphcost.passes import compiled
from graphcost.passes.compiled import compiled_step
from tests.helpers import run_cli
from validation.compiled import (
    allocated_peak,
    measure_compiled_saved,
    measure_compiled_training,
)

TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=64)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def _gpt2(device):
    return load("gpt2", batch=2, seq=32, device=device, **TINY_GPT2)


def _convnet(device):
    with torch.device(device):
        return ConvNet(), (torch.randn(4, 3, 16, 16, device=device),)


@pytest.mark.parametrize("make", [_gpt2, _convnet], ids=["gpt2", "convnet"])
def test_saved_activations_are_a_real_compile_s(make):
    """As the generated code keeps them: Inductor's layout optimization runs the CNN's
    convolutions channels-last, so its forward keeps channels-last copies of the input and the
    conv weights (12,288 + 1,728 + 9,216 B here), which the partitioned graph does not show."""
    module, inputs = make("meta")
    predicted = compiled_step(module, inputs, peak=True)
    torch.manual_seed(0)
    module, inputs = make("cpu")
    measured = measure_compiled_saved(module, inputs)
    assert (predicted.saved_activation_bytes, len(predicted.saved)) == \
        (measured.saved_activation_bytes, measured.saved_tensors)


def test_compiled_training_steps_are_a_real_compiled_run_s():
    """Two AdamW steps of a compiled GPT-2, phase by phase, against the allocator's events of a
    real compiled run (validation.compiled.measure_compiled_training): the forward and backward
    replayed from the code Inductor generates, in the eager step's start and optimizer.
    NB: not exact: a fallback kernel's own temporaries (the CPU flash attention backward's) are
    not in the generated code (-0.8% here)."""
    from graphcost import analyze

    module, inputs = _gpt2("meta")
    phases = analyze(module, inputs).memory(compile=True).timeline.phase_peaks()
    torch.manual_seed(0)
    module, inputs = _gpt2("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measured = measure_compiled_training(module, inputs)
    finally:
        torch.set_num_threads(threads)
    for step in (0, 1):
        ours = max(phases[(step, "forward")], phases[(step, "backward")])
        assert ours == pytest.approx(measured[(step, "forward+backward")], rel=0.02)
        assert phases[(step, "optimizer")] == pytest.approx(measured[(step, "optimizer")],
                                                            rel=1e-4)
    assert max(phases.values()) == pytest.approx(max(measured.values()), rel=0.02)


def test_bf16_mixed_keeps_what_a_compile_under_autocast_keeps():
    """--precision bf16-mixed: the compiled model called under torch.autocast(bfloat16), whose
    region dynamo traces into the graph; fp32 weights, bf16 matmuls."""
    from collections import Counter

    module, inputs = _gpt2("meta")
    predicted = compiled_step(module, inputs, autocast=torch.bfloat16)
    torch.manual_seed(0)
    module, inputs = _gpt2("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = measure_compiled_saved(module, inputs)
    assert (predicted.saved_activation_bytes, len(predicted.saved)) == \
        (measured.saved_activation_bytes, measured.saved_tensors)
    assert Counter(str(t.dtype) for t in predicted.saved)["torch.bfloat16"] > 0


@pytest.mark.parametrize("policy", ["full", "save-matmuls"])
def test_a_checkpoint_policy_under_compile_keeps_what_a_real_compile_keeps(policy):
    """graphcost's policy applied with torch.utils.checkpoint (passes/checkpoint/apply.py) and
    compiled: the regions' ops tagged for the partitioner as dynamo tags them, a selective
    policy's answers from torch's own policy mode (passes/checkpoint_tags.py)."""
    from graphcost import analyze
    from graphcost.passes.checkpoint.apply import checkpointed
    from graphcost.passes.checkpoint.policy import plan

    module, inputs = _gpt2("meta")
    regions = plan(analyze(module, inputs).graph, policy)
    predicted = compiled_step(module, inputs, checkpoint=regions)
    torch.manual_seed(0)
    module, inputs = _gpt2("cpu")
    with checkpointed(module, regions):
        measured = measure_compiled_saved(module, inputs)
    assert (predicted.saved_activation_bytes, len(predicted.saved)) == \
        (measured.saved_activation_bytes, measured.saved_tensors)
    assert predicted.saved_activation_bytes < compiled_step(*_gpt2("meta")).saved_activation_bytes


def test_checkpoint_compile_compares_the_policies_compiled(capsys):
    """`graphcost checkpoint --compile`: a row per policy, each the compiled step with the
    policy's regions (the same as `memory --compile --checkpoint POLICY`)."""
    from graphcost import analyze

    options = ["--batch", "2", "--seq", "32", *[f"--set={k}={v}" for k, v in TINY_GPT2.items()]]
    code, out, _ = run_cli(capsys, "checkpoint", "gpt2", *options, "--compile", "--policies",
                           "none,full", "--json")
    rows = {r["policy"]: r for r in json.loads(out)["rows"]}
    a = analyze("gpt2", batch=2, seq=32, overrides=TINY_GPT2)
    for policy in ("none", "full"):
        memory = a.memory(compile=True, checkpoint=policy)
        assert rows[policy]["peak_bytes"] == memory.peak_bytes
        assert rows[policy]["saved_activation_bytes"] == \
            memory.compiled.saved_activation_bytes
    assert rows["full"]["recompute_flops"] > 0 == rows["none"]["recompute_flops"]


def test_a_model_s_own_checkpoints_are_traced_as_torch_compile_traces_them():
    """A model that calls torch.utils.checkpoint per block in its own forward (the corpus'
    checkpoint_per_block), against a real compile of it."""
    from tests.corpus import BY_NAME

    entry = BY_NAME["checkpoint_per_block"]

    def make(device):
        torch.manual_seed(0)
        with torch.device(device):
            module = entry.make_module()
        return module, tuple(entry.make_inputs(torch.device(device), torch.float32))

    predicted = compiled_step(*make("meta"))
    measured = measure_compiled_saved(*make("cpu"))
    assert (predicted.saved_activation_bytes, len(predicted.saved)) == \
        (measured.saved_activation_bytes, measured.saved_tensors)


def test_a_stack_is_derived_from_its_first_blocks():
    """Six blocks partitioned from the first one, two and three: the same as the whole."""
    module, inputs = load("gpt2", batch=2, seq=32, **dict(TINY_GPT2, n_layer=6))
    derived = compiled_step(module, inputs)
    whole = compiled._partition(module, inputs, {})
    assert derived.blocks == 6 and whole.blocks is None
    assert derived.totals() == whole.totals()
    assert sorted(map(str, derived.saved)) == sorted(map(str, whole.saved))


def test_a_stack_whose_blocks_alternate_is_derived_with_period_two():
    """With the peaks and kernels: Inductor reuses alternate blocks' buffers differently here,
    so the forward's peak alternates between odd and even stacks; 24 blocks are derived from
    the first 2, 4 and 6, and hold what the whole holds, kernel time included."""
    module, inputs = load("gpt2", batch=2, seq=32, **dict(TINY_GPT2, n_layer=24))
    derived = compiled_step(module, inputs, peak=True)
    whole = compiled._partition(module, inputs, {}, peak=True)
    assert derived.blocks == 24 and [s.blocks for s in derived.kernels] == [2, 6]
    assert derived.totals() == whole.totals()
    seconds = lambda k: k.bytes / 1e12 + k.flops / 1e14  # noqa: E731 - any per-kernel time
    assert compiled.kernel_seconds(derived, seconds) == \
        pytest.approx(compiled.kernel_seconds(whole, seconds), rel=1e-9)


def test_the_kernels_flops_are_flop_counter_mode_s():
    """The compiled forward's and backward's kernels count the FLOPs FlopCounterMode counts on
    a real eager step (the ops Inductor decomposes into still run as mm/addmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    def mlp(device):
        torch.manual_seed(0)
        with torch.device(device):
            return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)), \
                torch.randn(8, 32)

    module, x = mlp("meta")
    step = compiled_step(module, (x,), peak=True)
    [sample] = step.kernels
    module, x = mlp("cpu")
    with FlopCounterMode(display=False) as forward:
        out = module(x)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    assert sum(k.flops * n for k, n in sample.forward) == forward.get_total_flops()
    assert sum(k.flops * n for k, n in sample.backward) == backward.get_total_flops()


def test_a_fused_pointwise_chain_reads_its_input_and_writes_its_output_once():
    """Eight pointwise ops on a (1024, 1024) fp32 tensor: one forward kernel that reads x and
    writes y, 4 MiB each; the backward recomputes the chain inside its own kernel."""
    class Chain(nn.Module):
        def forward(self, x):
            return ((x * 2 + 1).sin().exp() - x).cos().relu() * 3

    x = torch.randn(1024, 1024, device="meta", requires_grad=True)
    step = compiled_step(Chain(), (x,), peak=True)
    [sample] = step.kernels
    assert [(k.bytes, n) for k, n in sample.forward] == [(2 * 4 * 2**20, 1)]
    assert step.saved_activation_bytes == 0 and step.recomputed_ops > 0


def test_the_backward_recomputes_pointwise_ops_and_keeps_no_more_than_eager():
    """Inductor's min-cut runs GELU's forward again in the backward rather than keep what its
    derivative needs; it never recomputes a matmul."""
    from graphcost import analyze

    with torch.device("meta"):
        mlp, x = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)), \
            torch.randn(8, 32)
    step = compiled_step(mlp, (x,))
    assert step.recomputed_ops > 0 and step.recompute_flops == 0
    assert step.saved_activation_bytes <= analyze(mlp, (x,)).saved_activation_bytes


def test_memory_compile_from_the_command_line(capsys):
    """The whole step: its peak, the compiled section beside eager's saved activations."""
    options = ["--batch", "2", "--seq", "32", *[f"--set={k}={v}" for k, v in TINY_GPT2.items()]]
    code, out, _ = run_cli(capsys, "memory", "gpt2", *options, "--compile")
    assert code == 0 and ", torch.compile" in out.splitlines()[0]
    assert "saved for backward" in out and "forward + backward" in out
    code, out, _ = run_cli(capsys, "memory", "gpt2", *options, "--compile", "--json")
    result = json.loads(out)
    assert result["compile"] is True and result["compiled"]["saved_activation_bytes"] > 0
    assert result["peak_bytes"] >= result["compiled"]["forward_backward_peak_bytes"]
    code, out, _ = run_cli(capsys, "memory", "gpt2", *options, "--json")
    assert json.loads(out)["compile"] is False and "compiled" not in json.loads(out)
    code, out, _ = run_cli(capsys, "memory", "gpt2", *options, "--compile", "--checkpoint",
                           "full", "--json")
    checkpointed = json.loads(out)
    assert checkpointed["checkpoint"] == "full" and checkpointed["recompute_flops"] > 0
    assert checkpointed["compiled"]["saved_activation_bytes"] < \
        result["compiled"]["saved_activation_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["memory", "gpt2", "--compile", "--inference"], "drop --compile or --inference"),
    (["memory", "gpt2", "--compile", "--tp", "2", "--gpus", "2"], "a parallel plan"),
    (["checkpoint", "gpt2", "--compile", "--budget", "1GiB"], "drop --budget"),
    (["plan", "gpt2", "--gpus", "8", "--global-batch", "8", "--device", "h100-sxm",
      "--compile"], "drop --compile"),
    (["roofline", "gpt2", "--device", "h100-sxm", "--compile", "--inference"],
     "--compile with --inference"),
])
def test_what_compile_does_not_model_yet_is_one_message(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_roofline_and_cost_under_compile_time_inductor_s_kernels(capsys):
    """The forward and backward's time is the generated code's kernels', each at its roofline;
    the optimizer and the model FLOPs (MFU's numerator) are the eager step's."""
    from graphcost import analyze

    a = analyze("gpt2", batch=2, seq=32, overrides=TINY_GPT2)
    eager, compiled_ = a.roofline("h100-sxm"), a.roofline("h100-sxm", compile=True)
    assert compiled_.step.model_flops == eager.step.model_flops
    assert compiled_.step.optimizer_s == eager.step.optimizer_s
    kernels = a.compiled().kernels[-1]
    flops = sum(k.flops * n for k, n in (*kernels.forward, *kernels.backward))
    assert flops == sum(o.flops for o in compiled_.step.ops)
    options = ["--batch", "2", "--seq", "32", *[f"--set={k}={v}" for k, v in TINY_GPT2.items()]]
    code, out, _ = run_cli(capsys, "roofline", "gpt2", *options, "--device", "h100-sxm",
                           "--compile")
    assert code == 0 and "torch.compile" in out and "forward kernel" in out
    code, out, _ = run_cli(capsys, "cost", "gpt2", *options, "--device", "h100-sxm",
                           "--tokens", "1e9", "--compile", "--json")
    result = json.loads(out)
    assert code == 0 and result["compile"] is True
    assert result["mfu"] == pytest.approx(compiled_.step.mfu)


def test_fit_under_compile_answers_with_compiled_steps():
    """The largest batch that fits under --compile: the compiled step at it fits the budget
    and the one past it does not (each computed on its own)."""
    from graphcost import analyze
    from graphcost.api.shapes import fit

    def mlp(batch, seq, training):
        with torch.device("meta"):
            return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)), \
                (torch.randn(batch, seq, 64),)

    budget = 4 * 2**20
    sizes = fit(mlp, device="a100-80gb", seq=32, compile=True,
                reserve=80 * 2**30 - budget).sizes
    batch = sizes.train_max_batch
    assert batch > 2

    def peak(b):
        return analyze(*mlp(b, 32, True)).memory(compile=True).peak_bytes

    assert peak(batch) <= budget < peak(batch + 1)


def test_the_allocator_s_events_measure_an_eager_step_as_the_live_tracker_does():
    """The method that can see a compiled step's buffers (validation.compiled.allocated_peak),
    checked where the live tracker sees everything too: an eager training step's peak above
    its start, to the byte."""
    from validation.memtrack import LiveTensorTracker

    torch.manual_seed(0)
    module, inputs = _gpt2("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def step():
            module(*inputs).sum().backward()

        step()  # warm: what a first call makes once
        module.zero_grad(set_to_none=True)
        peak, final = allocated_peak(step)
        module.zero_grad(set_to_none=True)
        tracker = LiveTensorTracker(module, *inputs)
        with tracker:
            start = tracker.live_bytes
            step()
            end = tracker.live_bytes
    finally:
        torch.set_num_threads(threads)
    assert (peak, final) == (tracker.peak_bytes - start, end - start)


def test_analyze_compile_adds_the_compiled_step(capsys):
    options = ["--batch", "2", "--seq", "32", *[f"--set={k}={v}" for k, v in TINY_GPT2.items()]]
    code, out, _ = run_cli(capsys, "analyze", "gpt2", *options, "--compile", "--json")
    result = json.loads(out)
    assert code == 0
    assert result["compiled"]["eager_saved_activation_bytes"] == \
        result["saved_activation_bytes"]
    code, out, _ = run_cli(capsys, "analyze", "gpt2", *options, "--compile")
    assert code == 0 and "saved for backward" in out
