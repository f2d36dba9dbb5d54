"""Saved activations of a compiled training step: graphcost's partition against real
torch.compile runs on this CPU (Inductor's C++ backend), as a markdown table.

    python bench/validate_compile.py [NAME ...]

Per model and dtype: eager saved activation bytes (graphcost's walk, itself checked against
autograd), compiled saved bytes predicted (graphcost/passes/compiled.py) and measured
(validation/compiled.py: saved_tensors_hooks on the real compiled forward), the peak of two
AdamW training steps predicted (`memory --compile`) and measured (the allocator's events of a
real compiled run, from its parameters and inputs), and of the second step's forward and
backward alone, the ops the backward recomputes, and the time graphcost's partition (with the
peak: Inductor's code generation) and the real compile took.
Each real compile costs 15-20 s here (less when Inductor's cache has it).
"""

from __future__ import annotations

import sys
import time
import warnings

import _root  # noqa: F401 - the repository root on sys.path, for validation/ and tests/
import torch
from graphcost.models import SMALL_OVERRIDES, load
from torch import nn

from graphcost import analyze
from graphcost.passes.checkpoint.policy import plan
from graphcost.passes.compiled import compiled_step
from tests.corpus import BY_NAME
from validation.compiled import measure_compiled_saved, measure_compiled_training

SMALL = {name: dict(SMALL_OVERRIDES[name], **layers)
         for name, layers in (("gpt2", {"n_layer": 4}), ("llama3-8b", {"n_layers": 4}))}


class Mixer(nn.Module):
    """MLP-Mixer: token-mixing and channel-mixing MLPs with LayerNorm and residuals."""

    def __init__(self, tokens=16, channels=32, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(channels), "tokens": nn.Sequential(
                nn.Linear(tokens, 64), nn.GELU(), nn.Linear(64, tokens)),
            "norm2": nn.LayerNorm(channels), "channels": nn.Sequential(
                nn.Linear(channels, 128), nn.GELU(), nn.Linear(128, channels))})
            for _ in range(depth))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["tokens"](b["norm1"](x).transpose(1, 2)).transpose(1, 2)
            x = x + b["channels"](b["norm2"](x))
        return self.head(x.mean(1))


def zoo(name):
    def make(device, dtype):
        return load(name, batch=2, seq=32, device=device, dtype=dtype, **SMALL[name])
    return make


def corpus(name):
    entry = BY_NAME[name]

    def make(device, dtype):
        with torch.device(device):
            module = entry.make_module().to(dtype)
        inputs = entry.make_inputs(torch.device(device), dtype)
        return module, tuple(inputs)
    return make


def mixer(device, dtype):
    with torch.device(device):
        return Mixer().to(dtype), (torch.randn(4, 16, 32, dtype=dtype),)


MODELS = {"gpt2": zoo("gpt2"), "llama3": zoo("llama3-8b"), "mlp-mixer": mixer,
          "vit_patch": corpus("vit_patch"), "resnet_basic": corpus("resnet_basic"),
          "caption_cross_attn": corpus("caption_cross_attn")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def relative(ours: int, truth: int) -> str:
    return "exact" if ours == truth else f"{(ours - truth) / truth:+.2%}"


def row(name, make, dtype_name):
    dtype = DTYPES[dtype_name]
    module, inputs = make("meta", dtype)
    analysis = analyze(module, inputs)
    start = time.perf_counter()
    step = compiled_step(module, inputs, peak=True)
    ours = time.perf_counter() - start
    analysis._compiled[str(plan(analysis.graph, "none").policy)] = step  # not partitioned twice
    timeline = analysis.memory(compile=True).timeline
    phases = timeline.phase_peaks()
    ours_step = max(phases[(1, "forward")], phases[(1, "backward")])
    torch.manual_seed(0)
    module, inputs = make("cpu", dtype)
    start = time.perf_counter()
    real = measure_compiled_saved(module, inputs)
    compile_s = time.perf_counter() - start
    measured = measure_compiled_training(module, inputs)
    peak, real_step = max(measured.values()), measured[(1, "forward+backward")]
    saved = relative(step.saved_activation_bytes, real.saved_activation_bytes)
    if saved == "exact" and len(step.saved) != real.saved_tensors:
        saved = "same bytes, other tensors"
    return (f"| {name} | {dtype_name} | {analysis.saved_activation_bytes:,} | "
            f"{step.saved_activation_bytes:,} | {real.saved_activation_bytes:,} | {saved} | "
            f"{timeline.peak_bytes:,} | {peak:,} | {relative(timeline.peak_bytes, peak)} | "
            f"{ours_step:,} | {real_step:,} | {relative(ours_step, real_step)} | "
            f"{step.recomputed_ops} | {ours:.1f} s | {compile_s:.1f} s |")


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")
    print("| model | dtype | eager saved B | compiled saved B (graphcost) | compiled saved B "
          "(real compile) | | training peak B (graphcost) | training peak B (real compile) | "
          "| step 2 fwd+bwd peak B (graphcost) | (real compile) | | ops recomputed | graphcost "
          "| real compile |")
    print("|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|---|---:|---:|---:|")
    for name, make in MODELS.items():
        if names and not any(n in name for n in names):
            continue
        for dtype_name in DTYPES:
            try:
                print(row(name, make, dtype_name), flush=True)
            except Exception as exc:  # one failing row does not stop the table
                print(f"| {name} | {dtype_name} | error: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:120]} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
